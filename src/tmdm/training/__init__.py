"""Training: the run's parts (setup.py), the state pytree (state.py), the jitted step (step.py),
checkpoints (checkpoint.py; the per-host local tier: local_tier.py), preemption and non-finite
handling (resilience.py), metric writers and MFU (metrics.py, perf.py), the goodput account
(goodput.py), the validation ELBO (validation.py) and the loop (loop.py). May import config/,
datasets/, diffusion/, optim, model/, data/, parallel/ and below; never generation or evaluation (the
loop takes generation metrics as a callable)."""
