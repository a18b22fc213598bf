"""The base configuration: every key the code reads exists here, with one line saying what it is.

Experiment files under `experiments/` start from `get_config()` and change values; they never add
keys (the loader rejects unknown keys, so a typo fails loudly instead of being ignored).
"""

import ml_collections

from tmdm.model import config as model_config


def _sampler_keys(section, **defaults):
  """The sampler keys of one task (diffusion/sampling.py). Settings measured by `tmdm sample-sweep`
  belong in the experiment file that was measured (e.g. experiments/demo.py), not here."""
  section.sampler = 'confidence'  # 'ancestral', 'confidence' or 'threshold' (sampling.SAMPLERS).
  section.steps = 32  # Denoising steps in all (an upper bound for 'threshold').
  section.temperature = 1.0  # Softmax temperature of the draws.
  section.top_p = 1.0  # Nucleus sampling mass (1: off).
  section.schedule = 'cosine'  # 'confidence': share still masked after each step ('linear', 'cosine', 'noise').
  section.threshold = 0.9  # 'threshold': reveal every position whose drawn token has probability >= this.
  section.block_len = 0  # Semi-autoregressive blocks of this many positions, left to right (0: one block).
  section.guidance = 0.0  # Classifier-free guidance weight w: (1 + w) cond - w uncond (0: off).
  section.guidance_schedule = 'constant'  # w over time: 'constant', 'increasing' or 'decreasing' (mean w).
  section.reuse = True  # Skip the forward pass when the previous step revealed nothing.
  section.entropy_budget = 1.0  # 'entropy': reveal, lowest entropy first, while the others' entropies sum <= this (nats).
  section.cache = False  # Keep keys/values of unchanged positions; cached steps run only the block's positions.
  section.refresh = 0  # With cache: also refresh it every this many steps of a block (0: at block starts only).
  section.update(defaults)
  return section


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, corruption noise and (unless data.seed >= 0) the data order.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Pure data-parallel axis; -1 takes every device the other axes leave.
  c.mesh.fsdp = 1  # Data-parallel axis that also shards parameters and optimizer state (ZeRO-3).
  c.mesh.tensor = 1  # Tensor-parallel axis: heads, MLP hidden units and the vocabulary.
  c.mesh.gather_on_use = True  # Gather each weight's fsdp dim inside the step (BUILD_NOTES, "Library bugs and workarounds").

  c.vocab = ml_collections.ConfigDict()
  c.vocab.text_size = 4000  # Text tokenizer vocabulary (must equal the SentencePiece model's size).
  c.vocab.image_size = 1000  # Image codebook size (product of the image FSQ levels).
  c.vocab.audio_size = 1000  # Audio codebook size (product of the audio FSQ levels).
  c.vocab.multiple = 128  # Pad the joint vocabulary to a multiple of this (tensor axis must divide it).

  # The model section is ModelConfig's fields and defaults (model/config.py says what each is).
  c.model = ml_collections.ConfigDict(model_config.config_defaults())

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule_text = 'linear'  # Noise schedule of text positions (diffusion/schedules.py; 'cosine' is MDLM's).
  c.diffusion.schedule_image = 'cosine'  # Noise schedule of image positions.
  c.diffusion.schedule_audio = 'cosine'  # Noise schedule of audio positions.
  c.diffusion.poly_power = 2.0  # Exponent p of the 'polynomial' schedule alpha = 1 - t**p.
  c.diffusion.loglinear_eps = 1e-3  # 'loglinear': alpha = 1 - (1 - eps) t, never fully masked.
  c.diffusion.t_min = 1e-3  # t ~ U[t_min, 1]: truncates the ELBO integral where w(t) explodes.
  c.diffusion.t_sampling = 'stratified'  # 'uniform' or 'stratified' (antithetic times across the batch).
  c.diffusion.complementary = False  # Pair each row with its complementary mask (rows per step halve).
  c.diffusion.pair_alpha_min = 1e-3  # Pairs: the second copy's weight -alpha'/alpha caps alpha at this (bias -x/2).
  c.diffusion.p_joint = 0.6  # Pairs: share of examples corrupting condition and target at rate t.
  c.diffusion.p_conditional = 0.3  # Pairs: share keeping the condition clean.
  c.diffusion.p_drop_condition = 0.1  # Pairs: share masking the whole condition (trains CFG's uncond.).

  c.data = ml_collections.ConfigDict()
  c.data.root = 'data'  # Folder of prepared datasets (relative to the working directory).
  c.data.text_name = 'fortunes'  # Text dataset folder under data.root (built by `tmdm prepare`).
  c.data.text_sources = 'fortunes'  # Comma list for `tmdm prepare`: fortunes, kjv, gcide, txt:GLOB, jsonl:PATH, parquet:GLOB.
  c.data.text_max_docs = 0  # Cap on prepared documents (0: all).
  c.data.mix_text = 1.0  # Mixture weight (share of rows) of packed text rows; 0 leaves text out.
  c.data.mix_image = 0.0  # Mixture weight of image-text rows.
  c.data.mix_audio = 0.0  # Mixture weight of audio-text rows.
  c.data.max_skip_fraction = 0.01  # Stop when more than this share of records read were bad.
  c.data.num_shards = 0  # Data shards (each process reads whole shards); 0: one per process. Fix it to
  #                        keep the data order (and resume) independent of the number of processes.
  c.data.p_text_first = 0.5  # Pairs laid out text first (T2I, T2S); the rest media first (I2T, S2T).
  c.data.val_fraction = 0.02  # Share of documents held out for validation.
  c.data.seq_len = 128  # Tokens per row.
  c.data.seed = -1  # Data order seed; -1 uses `seed`.
  c.data.num_workers = 0  # Grain worker processes reading records (0: in the main process).
  c.data.prefetch = 2  # Batches prepared ahead by a host thread.
  c.data.spm_sample_docs = 200_000  # Documents given to the SentencePiece trainer.
  c.data.max_bad_fraction = 0.01  # `tmdm prepare`: stop when more of a user file source's records are bad (0: any).
  c.data.beam_shard_records = 50_000  # --beam_runner: records per shard (in-process: 50,000 text, 1 per pair split).
  c.data.beam_tokenizer_sample = 100_000  # --beam_runner: image/audio tokenizers train on the first N pairs (0: all).

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # Optimizer family in optim.OPTIMIZERS.
  c.optim.lr = 3e-3  # Peak learning rate at the base width (CompleteP scales it per group).
  c.optim.b1 = 0.9  # Adam beta1.
  c.optim.b2 = 0.95  # Adam beta2.
  c.optim.eps = 1e-8  # Adam epsilon at the base width and depth.
  c.optim.weight_decay = 0.1  # Decoupled weight decay (multiplied by the learning rate, as in optax).
  c.optim.ema = 0.0  # Weight-EMA decay per step at the logical batch (0: none); kept in the optimizer state.
  c.optim.clip_norm = 1.0  # Global gradient-norm clip (0: off); not rescaled (no SDE counterpart).
  c.optim.warmup_frac = 0.05  # Warmup length as a fraction of the token horizon D.
  c.optim.max_warmup_steps = 1000  # Warmup cap, in steps of the logical batch (fixed in tokens).
  c.optim.decay = 'cosine'  # Learning-rate decay after warmup: 'cosine', 'linear' or 'constant'.
  c.optim.min_lr_ratio = 0.1  # Final learning rate as a fraction of the peak.
  # The logical/physical batch SDE scaler (docs/design.md 2.4): lr, b1, b2, eps, weight_decay, ema above
  # are the logical batch's; D = train.num_steps * train.batch_size * data.seq_len tokens.
  c.optim.sde_scaling = True  # Rescale them to the physical batch by kappa = batch / B_logical (off: kappa = 1).
  c.optim.base_batch = 0  # Batch (sequences) the values were tuned at; 0: this run's train.batch_size (kappa = 1).
  c.optim.base_tokens = 0.0  # Token horizon the values were tuned at; 0: this run's D.
  c.optim.gamma = 0.44  # B_logical = base_batch * (D / base_tokens)**gamma (the notes' fit).
  c.optim.logical_batch = 0  # Explicit logical batch in sequences (replaces the gamma rule); 0: from gamma.
  c.optim.weight_decay_rule = 'sqrt'  # Decay vs kappa: 'sqrt' (decay x lr, optax), 'linear' or 'constant'.
  c.optim.s_crit = 100  # Fewest optimizer steps for the rule to hold: B_crit = D / (seq_len * s_crit); 0: no check.
  c.optim.on_exceeding_crit = 'warn'  # train.batch_size > B_crit: 'warn' (log) or 'error' (ConfigError).

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000  # Optimizer steps.
  c.train.batch_size = 32  # Physical global batch in rows (sequences) per optimizer step.
  c.train.microbatches = 1  # Split each batch into this many accumulated microbatches (memory only).
  c.train.log_every_steps = 10  # Fetch and write metrics every this many steps.
  c.train.eval_every_steps = 0  # Validation ELBO every this many steps (0: only at the end).
  c.train.eval_batches = 4  # Validation batches per evaluation.
  c.train.eval_focus_words = ''  # Comma-separated words: validation also reports their text tokens' ELBO (loss/focus).
  c.train.progress = True  # Show a console progress bar.
  c.train.tensorboard = True  # Write TensorBoard event files into the workdir.
  c.train.peak_tflops = 0.0  # Per-device peak for MFU; 0 looks the device up (or measures a CPU).
  c.train.max_nonfinite_streak = 5  # Stop after this many consecutive non-finite steps (each is skipped).
  c.train.rollbacks = 0  # On such a stop: restart from the last checkpoint with a new data seed, this often.
  c.train.fault_nonfinite_steps = ()  # Fault injection (tests): steps whose gradients are made NaN.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Save every this many steps (and always at the end).
  c.checkpoint.keep = 3  # Newest checkpoints kept on disk.
  c.checkpoint.async_save = True  # Write checkpoints in the background.
  c.checkpoint.dir = ''  # Checkpoint folder; '': WORKDIR/checkpoints.
  c.checkpoint.on_error = 'stop'  # A failed save: 'stop' the run, or 'warn' loudly and keep training.
  c.checkpoint.allow_fresh_start = False  # Checkpoints exist but all are corrupt: train from step 0 (else stop).
  c.checkpoint.local_dir = ''  # Local tier: a per-host folder (local SSD, /dev/shm); '': off. Never a URL.
  c.checkpoint.local_every_steps = 0  # Local-tier save every this many steps (each process its own shards).
  c.checkpoint.local_keep = 2  # Newest local-tier steps kept per process.

  # Generation (`tmdm sample`, `tmdm eval`, `tmdm sample-sweep`; tasks in generation/tasks.py). The sampler keys
  # at this level drive the text tasks; sample.<task> holds those of each cross-modal task. A run's
  # config.json keeps them: `tmdm sample` and `tmdm eval` use the run's own (command-line overrides win).
  c.sample = ml_collections.ConfigDict()
  _sampler_keys(c.sample, sampler='ancestral', steps=64, schedule='cosine', guidance=0.0)
  c.sample.num = 4  # Samples written after training / by `tmdm sample` (per prompt).
  c.sample.batch = 16  # Rows per sampling call (rounded up to a multiple of the mesh's batch shards).
  c.sample.text_len = 64  # Row length of text samples (one document: <txt> ... </txt>).
  c.sample.infill_len = 8  # Masked tokens per '[MASK]' in an infilling prompt.
  c.sample.caption_len = 10  # I2T / S2T caption slot without a reference caption (rows carry no length).
  c.sample.ema = True  # Sample with the weight EMA when the run kept one (optim.ema > 0).
  # Cross-modal tasks keep the condition's keys and values cached: on the demo checkpoint the cached
  # sampler at the same steps was within the noise of the uncached one on every task, 1.2-3.9x faster
  # (BUILD_NOTES "Fast sampling: measured").
  for task, steps in (('t2i', 32), ('t2s', 32), ('i2t', 16), ('s2t', 16)):
    c.sample[task] = _sampler_keys(ml_collections.ConfigDict(), sampler='confidence', steps=steps,
                                   schedule='cosine', guidance=1.0 if task in ('t2i', 't2s') else 0.0, cache=True)

  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = 'elbo,text_infill,t2i_digits,t2i_features,t2s,i2t,s2t'  # EVALUATORS (evaluation/evaluators.py); skipped without their data.
  c.eval.every_steps = 0  # During training: run eval.tasks (except elbo) every this many steps (0: off).
  c.eval.num = 50  # Generated samples per evaluator (T2I digits: rounded up to a multiple of 10).
  c.eval.seed = 0  # Seeds the samplers and the digit classifier.
  c.eval.t2s_voices = 3  # espeak-ng voices (the first of audio.voices) rendering the T2S reference.
  c.eval.t2s_speed = 165  # espeak-ng words per minute of the T2S reference.

  c.image = ml_collections.ConfigDict()
  c.image.name = 'digits-icons'  # Image-text dataset folder under data.root (built by `tmdm prepare`).
  c.image.sources = 'digits,adwaita'  # Comma list: digits, adwaita, jsonl:PATH, folder:DIR (datasets/image.py).
  c.image.max_items = 0  # Cap on pairs taken from each source (0: all).
  c.image.val_fraction = 0.1  # Share of pairs held out (by key hash: one icon's sizes stay together).
  c.image.seed = 0  # Seeds caption phrasing and tokenizer training.
  c.image.size = 32  # Image side in pixels (RGB) given to the tokenizer.
  c.image.digit_captions = 'varied'  # Captions of the `digits` source: 'varied' (8 phrasings) or 'word' (the number word alone).
  c.image.fit = 'pad'  # A non-square image: 'pad' (centred on white), 'crop' (centre square) or 'stretch'.
  c.image.levels = (8, 5, 5, 5)  # FSQ levels per latent channel; their product must equal vocab.image_size.
  c.image.downsamples = 2  # Stride-2 stages: tokens per image = (size / 2**downsamples)**2 (32 px -> 64).
  c.image.width = 32  # Tokenizer conv features at the latent resolution (half at full resolution).
  c.image.train_steps = 2000  # Tokenizer training steps (Adam, warmup + cosine decay).
  c.image.batch_size = 32  # Tokenizer training batch in images.
  c.image.lr = 2e-3  # Tokenizer peak learning rate.
  c.image.encode_batch = 256  # Images per jitted encode call while pretokenizing.
  c.image.tokenizer_path = ''  # An existing tokenizer folder to use instead of training one ('': train).

  c.audio = ml_collections.ConfigDict()
  c.audio.name = 'speech'  # Audio-text dataset folder under data.root (built by `tmdm prepare`).
  c.audio.sources = 'espeak:fortunes,espeak:kjv'  # Comma list: espeak:CORPUS (spoken sentences), jsonl:PATH.
  c.audio.max_items = 1500  # Cap on clips taken from each source (0: all; espeak sentences are plentiful).
  c.audio.val_fraction = 0.05  # Share of clips held out (by transcript hash).
  c.audio.seed = 0  # Seeds sentence choice, voices, speeds and tokenizer training.
  c.audio.voices = 'en-us,en-gb,en-gb-scotland,en-gb-x-rp,en-029,en-us-nyc,en-us+f3,en-gb+f2,en-us+m3,en-gb+f4'  # espeak-ng voices, one drawn per clip.
  c.audio.speeds = (140, 190)  # espeak-ng words per minute, drawn uniformly from [lo, hi].
  c.audio.min_words = 3  # Shortest spoken sentence in words.
  c.audio.max_words = 10  # Longest spoken sentence in words (clips still longer than `seconds` are skipped).
  c.audio.sample_rate = 16_000  # Waveform rate in Hz (inputs are resampled to it).
  c.audio.seconds = 4.0  # Fixed clip length: shorter clips padded with silence, longer ones skipped.
  c.audio.n_fft = 512  # STFT size (Hann window of the same length).
  c.audio.hop = 160  # STFT hop in samples (10 ms: 100 mel frames per second).
  c.audio.n_mels = 64  # Mel bands.
  c.audio.levels = (8, 5, 5, 5)  # FSQ levels; their product must equal vocab.audio_size.
  c.audio.downsamples = 2  # Stride-2 stages over mel frames: 100 / 2**2 = 25 tokens per second.
  c.audio.width = 96  # Tokenizer conv features.
  c.audio.train_steps = 1200  # Tokenizer training steps.
  c.audio.batch_size = 16  # Tokenizer training batch in clips.
  c.audio.lr = 2e-3  # Tokenizer peak learning rate.
  c.audio.encode_batch = 64  # Clips per jitted encode call while pretokenizing.
  c.audio.griffin_lim_iters = 48  # Griffin-Lim iterations when decoding codes to waveforms.
  c.audio.listen = 4  # Held-out clips written as WAVs (original, mel-only and token round trips).
  c.audio.tokenizer_path = ''  # An existing tokenizer folder to use instead of training one ('': train).
  return c
