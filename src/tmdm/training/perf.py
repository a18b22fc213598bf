"""FLOPs and model FLOP utilization (MFU).

FLOPs per token = 6 x matmul parameters + 12 x layers x seq_len x (heads x d_head): the usual
forward+backward count of the weight matmuls plus the two attention matmuls (QK^T and AV), with no
causal halving because attention is bidirectional (ModelConfig.flops_per_token). MFU divides the
achieved model FLOP/s by the devices' dense peak.
"""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak TFLOP/s per device, by substring of jax.Device.device_kind.
PEAK_TFLOPS = {
    'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0,
    'TPU v6': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v4': 275.0,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_tflops(n: int = 512, reps: int = 20) -> float:
  """A CPU has no datasheet peak here: measure one device's float32 matmul throughput instead."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):
    y = f(x)
  y.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_tflops_per_device(configured: float = 0.0) -> float:
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  for key, value in PEAK_TFLOPS.items():
    if key.lower() in kind.lower():
      return value
  return measured_cpu_tflops()


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_tflops: float) -> float:
  return flops_per_step / step_seconds / (num_devices * peak_tflops * 1e12)
