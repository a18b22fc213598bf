"""tmdm: pretraining tri-modal masked diffusion models in JAX.

Packages by role, lowest layer first; a module imports only from its own package or from the
layers below it (tests/test_layout.py checks every import, module-level and function-level):

  errors, storage, vocab  user-facing errors; local-or-URL files; the joint vocabulary layout
  parallel/               mesh shape, sharding rules, multi-process start-up
  model/ tokenizers/ data/   the Transformer; image/audio tokenizers; token stores, Grain pipelines
  diffusion/ optim        corruption, ELBO, samplers; the optimizer and its SDE batch scaler
  config/                 the base config, loading, cross-section checks
  datasets/               the corpora and `tmdm prepare`
  training/               setup, state, step, checkpoints, resilience, metrics, the loop
  generation/             tasks, the sampling context, galleries
  evaluation/             evaluators and their measures
  export/                 the model outside tmdm: Hugging Face-style export and import, the PyTorch
                          reference (export/hf, imports nothing from tmdm), lm-evaluation-harness
  tools/ scaling/         benchmarks, compile-check, sample sweeps; scaling laws and sweeps
  cli                     the `tmdm` command
"""
