"""Masked diffusion: noise schedules (schedules.py), corruption and its weights (corruption.py), the
ELBO (loss.py) and the samplers (sampling.py). May import model/, parallel/ and below."""
