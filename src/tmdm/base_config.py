"""The base configuration: every key the code reads exists here, with one line saying what it is.

Experiment files under `experiments/` start from `get_config()` and change values; they never add
keys (the loader rejects unknown keys, so a typo fails loudly instead of being ignored).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, corruption noise and (unless data.seed >= 0) the data order.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Pure data-parallel axis; -1 takes every device the other axes leave.
  c.mesh.fsdp = 1  # Data-parallel axis that also shards parameters and optimizer state (ZeRO-3).
  c.mesh.tensor = 1  # Tensor-parallel axis: heads, MLP hidden units and the vocabulary.
  c.mesh.gather_on_use = True  # Gather each weight's fsdp dim inside the step (see BUILD_NOTES: XLA bug).

  c.vocab = ml_collections.ConfigDict()
  c.vocab.text_size = 4000  # Text tokenizer vocabulary (must equal the SentencePiece model's size).
  c.vocab.image_size = 1000  # Image codebook size (product of the image FSQ levels).
  c.vocab.audio_size = 1000  # Audio codebook size (product of the audio FSQ levels).
  c.vocab.multiple = 128  # Pad the joint vocabulary to a multiple of this (tensor axis must divide it).

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 256  # Residual stream width.
  c.model.n_layers = 4  # Transformer blocks.
  c.model.n_heads = 4  # Attention heads.
  c.model.d_head = 64  # Width of one head.
  c.model.d_ff = 704  # SwiGLU hidden width.
  c.model.parameterization = 'completep'  # 'completep' (width+depth transfer) or 'standard'.
  c.model.base_width = 256  # CompleteP: width at which the hyperparameters were tuned.
  c.model.base_depth = 4  # CompleteP: depth at which the hyperparameters were tuned.
  c.model.depth_alpha = 1.0  # CompleteP: residual branches scaled by (base_depth / n_layers)**alpha.
  c.model.init_std = 0.02  # Std of weight init at the base width.
  c.model.rope_theta = 10_000.0  # RoPE base frequency.
  c.model.norm_eps = 1e-6  # RMSNorm epsilon.
  c.model.compute_dtype = 'bfloat16'  # Activations and matmuls; parameters stay float32.
  c.model.attention_impl = 'auto'  # 'auto' (cuDNN on GPU, XLA elsewhere), 'xla' or 'cudnn'.
  c.model.remat = 'none'  # Rematerialization per block: 'none', 'dots' (save matmul outputs), 'full'.
  c.model.scan_layers = True  # Stack blocks with nn.scan (one compiled block, faster compiles).
  c.model.time_conditioning = False  # Feed t to the network (off: it infers the noise level).

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule_text = 'linear'  # Noise schedule of text positions (see diffusion/schedules.py).
  c.diffusion.schedule_image = 'cosine'  # Noise schedule of image positions.
  c.diffusion.schedule_audio = 'cosine'  # Noise schedule of audio positions.
  c.diffusion.poly_power = 2.0  # Exponent p of the 'polynomial' schedule alpha = 1 - t**p.
  c.diffusion.loglinear_eps = 1e-3  # 'loglinear': alpha = 1 - (1 - eps) t, never fully masked.
  c.diffusion.t_min = 1e-3  # t ~ U[t_min, 1]: truncates the ELBO integral where w(t) explodes.
  c.diffusion.t_sampling = 'stratified'  # 'uniform' or 'stratified' (antithetic times across the batch).
  c.diffusion.complementary = False  # Pair each row with its complementary mask (rows per step halve).
  c.diffusion.p_joint = 0.6  # Pairs: share of examples corrupting condition and target at rate t.
  c.diffusion.p_conditional = 0.3  # Pairs: share keeping the condition clean.
  c.diffusion.p_drop_condition = 0.1  # Pairs: share masking the whole condition (trains CFG's uncond.).

  c.data = ml_collections.ConfigDict()
  c.data.root = 'data'  # Folder of prepared datasets (relative to the working directory).
  c.data.text_name = 'fortunes'  # Text dataset folder under data.root (built by `tmdm prepare`).
  c.data.text_sources = 'fortunes'  # Comma list for `tmdm prepare`: fortunes, kjv, gcide, txt:GLOB, jsonl:PATH.
  c.data.text_max_docs = 0  # Cap on prepared documents (0: all).
  c.data.val_fraction = 0.02  # Share of documents held out for validation.
  c.data.seq_len = 128  # Tokens per row.
  c.data.seed = -1  # Data order seed; -1 uses `seed`.
  c.data.num_workers = 0  # Grain worker processes reading records (0: in the main process).
  c.data.prefetch = 2  # Batches prepared ahead by a host thread.
  c.data.spm_sample_docs = 200_000  # Documents given to the SentencePiece trainer.

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # Optimizer family in optim.OPTIMIZERS.
  c.optim.lr = 3e-3  # Peak learning rate at the base width (CompleteP scales it per group).
  c.optim.b1 = 0.9  # Adam beta1.
  c.optim.b2 = 0.95  # Adam beta2.
  c.optim.eps = 1e-8  # Adam epsilon at the base width and depth.
  c.optim.weight_decay = 0.1  # Decoupled weight decay (multiplied by the learning rate, as in optax).
  c.optim.clip_norm = 1.0  # Global gradient-norm clip (0: off).
  c.optim.warmup_frac = 0.05  # Warmup length as a fraction of train.num_steps.
  c.optim.max_warmup_steps = 1000  # Warmup is capped at this many steps.
  c.optim.decay = 'cosine'  # Learning-rate decay after warmup: 'cosine', 'linear' or 'constant'.
  c.optim.min_lr_ratio = 0.1  # Final learning rate as a fraction of the peak.

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000  # Optimizer steps.
  c.train.batch_size = 32  # Physical global batch in rows (sequences) per optimizer step.
  c.train.microbatches = 1  # Split each batch into this many accumulated microbatches (memory only).
  c.train.log_every_steps = 10  # Fetch and write metrics every this many steps.
  c.train.eval_every_steps = 0  # Validation ELBO every this many steps (0: only at the end).
  c.train.eval_batches = 4  # Validation batches per evaluation.
  c.train.progress = True  # Show a console progress bar.
  c.train.tensorboard = True  # Write TensorBoard event files into the workdir.
  c.train.peak_tflops = 0.0  # Per-device peak for MFU; 0 looks the device up (or measures a CPU).

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Save every this many steps (and always at the end).
  c.checkpoint.keep = 3  # Newest checkpoints kept on disk.
  c.checkpoint.async_save = True  # Write checkpoints in the background.

  c.sample = ml_collections.ConfigDict()
  c.sample.steps = 64  # Denoising steps.
  c.sample.temperature = 1.0  # Softmax temperature.
  c.sample.top_p = 1.0  # Nucleus sampling mass (1: off).
  c.sample.num = 4  # Samples written after training / by `tmdm sample`.
  c.sample.text_len = 64  # Canvas length for unconditional text samples.
  return c
