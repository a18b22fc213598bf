"""Model configuration (frozen, hashable: jitted code closes over it) and size presets.

CompleteP (Dey et al. 2025, arXiv 2505.01618) with width multiplier m_w = d_model / base_width and
depth multiplier m_L = n_layers / base_depth, alpha = depth_alpha (1 for CompleteP):
  residual branches        x + m_L^-alpha * F(x)
  hidden init std          init_std / sqrt(m_w)
  hidden Adam lr           lr / m_w * m_L^(alpha - 1)
  hidden Adam eps          eps / m_w * m_L^-alpha
  norm-scale lr, eps       lr * m_L^(alpha - 1), eps * m_L^-alpha
  hidden weight decay      wd * m_w   (ours: optax multiplies decay by the lr, so lr * wd stays put)
  output logits            x 1 / m_w
  attention scale          1 / d_head
Embedding and unembedding keep the base lr, eps and decay. 'standard' sets every multiplier to 1,
uses 1/sqrt(d_head) and GPT-2's 1/sqrt(2 n_layers) init for the residual output projections.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

GROUPS = ('embed', 'hidden', 'norm', 'unembed')
PARAMETERIZATIONS = ('completep', 'standard')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash', 'flash')  # layers.attention_impl resolves 'auto'.
COMPUTE_DTYPES = ('bfloat16', 'float32', 'float16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int  # The padded joint vocabulary (VocabSpec.size): from the vocab section, not a model key.
  d_model: int = 256  # Residual stream width.
  n_layers: int = 4  # Transformer blocks.
  n_heads: int = 4  # Attention heads.
  d_head: int = 64  # Width of one head.
  d_ff: int = 704  # SwiGLU hidden width.
  parameterization: str = 'completep'  # 'completep' (width+depth transfer) or 'standard'.
  base_width: int = 256  # CompleteP: width at which the hyperparameters were tuned.
  base_depth: int = 4  # CompleteP: depth at which the hyperparameters were tuned.
  depth_alpha: float = 1.0  # CompleteP: residual branches scaled by (base_depth / n_layers)**alpha.
  init_std: float = 0.02  # Std of weight init at the base width.
  rope_theta: float = 10_000.0  # RoPE base frequency.
  norm_eps: float = 1e-6  # RMSNorm epsilon.
  compute_dtype: str = 'bfloat16'  # Activations and matmuls; parameters stay float32.
  # 'auto' (splash on TPU, cuDNN on GPU in 16-bit, XLA elsewhere), 'xla', 'cudnn', 'splash' (Pallas TPU kernel) or
  # 'flash' (Pallas' Triton flash kernel for GPU with segment ids: no [B, L, L] mask; layers.flash_attention).
  attention_impl: str = 'auto'
  splash_block_q: int = 512  # Splash attention: query rows per forward block (multiple of 128; cut to fit the row).
  splash_block_kv: int = 512  # Splash attention: key/value rows per forward block (multiple of 128).
  splash_block_q_bwd: int = 512  # Splash attention: query rows per block of the backward kernels (multiple of 128).
  splash_block_kv_bwd: int = 512  # Splash attention: key/value rows per block of the backward kernels (multiple of 128).
  splash_fused_bwd: bool = False  # Splash attention: one fused backward kernel for dq, dk, dv (else separate dq and dkv).
  flash_block_q: int = 128  # GPU flash attention: query rows per forward block (power of 2, >= 16; cut to the row).
  flash_block_k: int = 128  # GPU flash attention: key/value rows per forward block (power of 2, >= 16).
  flash_block_bwd: int = 32  # GPU flash attention: rows per block of the dq and dkv backward kernels (power of 2).
  remat: str = 'none'  # Rematerialization per block: 'none', 'dots' (save matmul outputs), 'dots_no_batch' (not attention's), 'full'.
  scan_layers: bool = True  # Stack blocks with nn.scan (one compiled block, faster compiles).
  time_conditioning: bool = False  # Feed t to the network (off: it infers the noise level).
  loss_chunk: int = 0  # Cross-entropy over chunks of this many positions, logits recomputed in the backward (0: whole rows).

  @classmethod
  def from_config(cls, m, vocab_size: int) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size'}
    return cls(vocab_size=vocab_size, **{k: m[k] for k in fields})

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def completep(self) -> bool:
    return self.parameterization == 'completep'

  @property
  def width_mult(self) -> float:
    return self.d_model / self.base_width

  @property
  def depth_mult(self) -> float:
    return self.n_layers / self.base_depth

  @property
  def residual_mult(self) -> float:
    return self.depth_mult**-self.depth_alpha if self.completep else 1.0

  @property
  def output_mult(self) -> float:
    return 1.0 / self.width_mult if self.completep else 1.0

  @property
  def attn_scale(self) -> float:
    return 1.0 / self.d_head if self.completep else 1.0 / math.sqrt(self.d_head)

  @property
  def hidden_std(self) -> float:
    return self.init_std / math.sqrt(self.width_mult) if self.completep else self.init_std

  @property
  def out_proj_std(self) -> float:
    return self.hidden_std if self.completep else self.init_std / math.sqrt(2 * self.n_layers)

  def group_multipliers(self) -> dict:
    """Per parameter group: multipliers of the base lr, Adam eps and weight decay."""
    ones = {'lr': 1.0, 'eps': 1.0, 'wd': 1.0}
    if not self.completep:
      return {g: dict(ones, wd=0.0 if g == 'norm' else 1.0) for g in GROUPS}
    m_w, m_l, a = self.width_mult, self.depth_mult, self.depth_alpha
    return {
        'embed': dict(ones),
        'unembed': dict(ones),
        'hidden': {'lr': m_l**(a - 1) / m_w, 'eps': m_l**-a / m_w, 'wd': m_w},
        'norm': {'lr': m_l**(a - 1), 'eps': m_l**-a, 'wd': 0.0},
    }

  # Parameter and FLOP counts (see BUILD_NOTES.md for the formula).
  @property
  def block_matmul_params(self) -> int:
    attn = 4 * self.d_model * self.n_heads * self.d_head
    return attn + 3 * self.d_model * self.d_ff

  @property
  def matmul_params(self) -> int:
    """Weights that take part in matmuls: blocks and the unembedding (the embedding is a lookup)."""
    return self.n_layers * self.block_matmul_params + self.d_model * self.vocab_size

  @property
  def non_embedding_params(self) -> int:
    return self.n_layers * (self.block_matmul_params + 2 * self.d_model) + self.d_model

  @property
  def num_params(self) -> int:
    return self.non_embedding_params + 2 * self.vocab_size * self.d_model

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x layers x seq x (heads x d_head).
    Attention is bidirectional, so there is no causal halving."""
    return 6.0 * self.matmul_params + 12.0 * self.n_layers * seq_len * self.n_heads * self.d_head


# Shapes only; vocabulary sizes come from the experiment's vocab section.
PRESETS = {
    'test': dict(d_model=40, n_layers=3, n_heads=4, d_head=10, d_ff=28, base_width=40, base_depth=3),
    'tiny': dict(d_model=64, n_layers=2, n_heads=2, d_head=32, d_ff=176, base_width=64, base_depth=2),
    'demo': dict(d_model=192, n_layers=4, n_heads=3, d_head=64, d_ff=512, base_width=192, base_depth=4),
    'cpu-small': dict(d_model=256, n_layers=4, n_heads=4, d_head=64, d_ff=704),  # also the yardstick's
    # Pilot of the paper's batch-size study: ~320M parameters, ~240M of them embeddings (with a
    # ~118k joint vocabulary), width / depth = 128 (docs/design.md 2.1).
    'pilot-320m': dict(d_model=1024, n_layers=8, n_heads=8, d_head=128, d_ff=2048),
    # The shapes of the performance yardstick, a plain JAX step (docs/design.md 3).
    'bench-0.5b': dict(d_model=1024, n_layers=24, n_heads=16, d_head=64, d_ff=2816),
    'bench-1b': dict(d_model=2048, n_layers=16, n_heads=16, d_head=128, d_ff=5632),
    '1b': dict(d_model=2048, n_layers=16, n_heads=16, d_head=128, d_ff=5632),
    # The paper's largest model: ~3B parameters (shape ours; width / depth = 128).
    '3b': dict(d_model=3072, n_layers=24, n_heads=24, d_head=128, d_ff=8192),
}


def config_defaults() -> dict:
  """The `model` section of the base config: every field but vocab_size, at its default."""
  return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != 'vocab_size'}


def param_group(path) -> str:
  """The group (GROUPS) of the parameter at a tree path: by its leaf name, which the model's layers
  fix. Here, not in transformer.py, so that the optimizer needs only the model's config."""
  names = [getattr(k, 'key', getattr(k, 'name', str(k))) for k in path]
  if names[-1] == 'embed':
    return 'embed'
  if names[-1] == 'unembed':
    return 'unembed'
  if names[-1] == 'scale':
    return 'norm'
  return 'hidden'


def param_groups(params):
  """Tree of group names (GROUPS) with the structure of params."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)
