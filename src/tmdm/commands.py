"""Subcommands of the `tmdm` CLI: COMMANDS maps a name to its help, its argparse arguments and the
function that runs it (args, config overrides) -> exit status. cli.py builds the parser from it."""

import dataclasses
import json
import logging
import os

import jax
import tqdm

from tmdm import checkpoint, config_lib, distributed, generate, resilience, train
from tmdm.data import store
from tmdm.modalities import text

log = logging.getLogger('tmdm')

# Errors that end a command with one line (and exit status 2) instead of a traceback.
USER_ERRORS = (config_lib.ConfigError, store.DataError, text.MissingCorpus, FileNotFoundError,
               resilience.RunError, checkpoint.CheckpointError)


def _progress(iterable, **kwargs):
  return tqdm.tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


def prepare(args, overrides):
  """The text dataset, then the image-text and audio-text ones the config trains on (data.mix_image,
  data.mix_audio > 0; captions through the text tokenizer); each is skipped when already built with
  the same settings, rebuilt with --force."""
  import time  # pylint: disable=import-outside-toplevel
  from tmdm.modalities import audio, image, pairs  # pylint: disable=import-outside-toplevel  (scipy, PIL)
  cfg = config_lib.load(args.config, overrides)
  root = train.text_root(cfg)
  sources = [x.strip() for x in cfg.data.text_sources.split(',') if x.strip()]
  manifest_path = os.path.join(root, store.MANIFEST)
  if os.path.isfile(manifest_path) and not args.force:
    manifest = store.read_manifest(root)
    same = (manifest['source']['corpora'] == sources and
            manifest['tokenizers']['text']['vocab_size'] == cfg.vocab.text_size)
    if not same:
      raise config_lib.ConfigError(f'{root} holds a different dataset ({manifest["source"]}); use --force or '
                                   'another data.text_name')
    log.info('text dataset %s is ready (use --force to rebuild)', root)
  else:
    start = time.time()
    manifest = text.prepare_text(root, sources=sources, vocab_size=cfg.vocab.text_size,
                                 val_fraction=cfg.data.val_fraction, max_docs=cfg.data.text_max_docs,
                                 spm_sample_docs=cfg.data.spm_sample_docs, progress=_progress)
    for split, info in manifest['splits'].items():
      tokens = sum(s['num_tokens']['text'] for s in info['shards'])
      log.info('text %s: %d documents, %d tokens -> %s', split, info['num_records'], tokens, root)
    log.info('text dataset built in %.0f s', time.time() - start)

  text_tok = text.TextTokenizer(os.path.join(root, manifest['tokenizers']['text']['file']))
  for mod, build in (('image', image.prepare_image), ('audio', audio.prepare_audio)):
    section, pair_root = cfg[mod], os.path.join(cfg.data.root, cfg[mod].name)
    if cfg.data[f'mix_{mod}'] <= 0 or not section.sources.strip():
      log.info('%s dataset not needed (data.mix_%s is 0 or %s.sources is empty)', mod, mod, mod)
      continue
    settings = pairs.settings_of(section, text_tok.sha256)
    if os.path.isfile(os.path.join(pair_root, store.MANIFEST)) and not args.force:
      if store.read_manifest(pair_root)['source'].get('settings') == settings:
        log.info('%s dataset %s is ready (use --force to rebuild)', mod, pair_root)
        continue
      raise config_lib.ConfigError(f'{pair_root} holds an {mod} dataset built with other {mod}.* settings or another '
                                   f'text tokenizer; use --force or another {mod}.name')
    start = time.time()
    pair_manifest = build(pair_root, text_tokenizer=text_tok, cfg=section, progress=_progress, log=log.info)
    codebook = pair_manifest['tokenizers'][mod]['codebook_size']
    if codebook != cfg.vocab[f'{mod}_size']:
      raise config_lib.ConfigError(f'the {mod} tokenizer has {codebook} codes but vocab.{mod}_size is '
                                   f'{cfg.vocab[f"{mod}_size"]}')
    for split, info in pair_manifest['splits'].items():
      tokens = {k: sum(s['num_tokens'][k] for s in info['shards']) for k in ('text', mod)}
      log.info('%s %s: %d pairs, %d text + %d %s tokens -> %s', mod, split, info['num_records'], tokens['text'],
               tokens[mod], mod, pair_root)
    log.info('%s dataset built in %.0f s (skipped inputs: %s)', mod, time.time() - start,
             pair_manifest['source']['skipped'])
  return 0


def train_cmd(args, overrides):
  _start_distributed(args)
  cfg = config_lib.load(args.config, overrides, num_devices=jax.device_count(),
                        process_count=jax.process_count())
  final = train.run(cfg, args.workdir)
  log.info('final: %s', json.dumps({k: float(f'{float(v):.5g}') for k, v in final.items()}))
  return 0


def _distributed_args(p):
  p.add_argument('--coordinator', default='', help='multi-process: coordinator host:port (else detected)')
  p.add_argument('--num_processes', type=int, default=0, help='multi-process: number of processes')
  p.add_argument('--process_id', type=int, default=-1, help='multi-process: this process (0-based)')


def _start_distributed(args):
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def sample(args, overrides):
  _start_distributed(args)
  samples = generate.sample_command(args.workdir, task=args.task, prompts=args.prompt, inputs=args.input, n=args.n,
                                    out_dir=args.out, seed=args.seed, overrides=overrides)
  for i, smp in enumerate(samples):
    if isinstance(smp.output, str):
      print(f'--- sample {i} ({smp.prompt})\n{smp.output}')
  return 0


def bench_cmd(args, overrides):
  from tmdm import bench  # pylint: disable=import-outside-toplevel
  if args.what != 'step':
    if not args.config:
      raise config_lib.ConfigError(f'tmdm bench {args.what} needs --config (e.g. experiments/demo.py)')
    cfg = config_lib.load(args.config, overrides, num_devices=jax.device_count())
    train.check_data(cfg)
    results = {'pipeline': lambda: bench.pipeline_throughput(cfg),
               'input': lambda: [bench.input_overhead(cfg, steps=max(args.steps, 30))],
               'checkpoint': lambda: [bench.checkpoint_cost(cfg)]}[args.what]()
    for r in results:
      print(json.dumps(r))
    return 0
  result = bench.step(args.preset, steps=args.steps, segments=args.segments, batch=args.batch, remat=args.remat,
                      microbatches=args.microbatches, overrides=overrides)
  print(json.dumps(result))
  if args.yardstick:
    base = bench.yardstick(args.yardstick, args.preset)
    print(json.dumps(base))
    print(json.dumps({'preset': args.preset, 'tok_s_ratio_tmdm_over_yardstick': round(result['tok_s'] / base['tok_s'], 3)}))
  return 0


def _bench_args(p):
  p.add_argument('what', choices=['step', 'pipeline', 'input', 'checkpoint'],
                 help='step: the train step at the yardstick shapes; pipeline: Grain alone; input: training with the '
                      'real pipeline vs one in-memory batch; checkpoint: loop blocking per async save, restore time')
  p.add_argument('--config', default='', help='pipeline / input / checkpoint: experiments/FILE.py[:preset]')
  p.add_argument('--preset', default='cpu-small', help='cpu-small, bench-0.5b or bench-1b (the yardstick shapes)')
  p.add_argument('--batch', type=int, default=0, help='rows per step (default: the yardstick batch, 8)')
  p.add_argument('--remat', default='', help="'none', 'dots' or 'full' (default: the config's)")
  p.add_argument('--microbatches', type=int, default=1, help='gradient-accumulation microbatches')
  p.add_argument('--segments', type=int, default=1, help='packed documents per row (segment-masked attention)')
  p.add_argument('--steps', type=int, default=10, help='timed steps (after 3 warm-up steps)')
  p.add_argument('--yardstick', default='', help='path of plain_step.py: run it too and print the ratio')


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: object  # argparse parser -> None
  run: object  # (args, overrides) -> exit status


def _config_arg(p, required=True):
  p.add_argument('--config', required=required, help='experiments/FILE.py[:preset]')


def _prepare_args(p):
  _config_arg(p)
  p.add_argument('--force', action='store_true', help='rebuild datasets that exist')


def _train_args(p):
  _config_arg(p)
  p.add_argument('--workdir', required=True, help='run folder: checkpoints, metrics, config')
  _distributed_args(p)


def _sample_args(p):
  from tmdm import tasks  # pylint: disable=import-outside-toplevel
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--task', default='text', choices=sorted(tasks.TASKS),
                 help='; '.join(f'{k}: {t.help}' for k, t in tasks.TASKS.items()))
  p.add_argument('--prompt', action='append', default=[],
                 help='text, t2i, t2s: the prompt (repeatable; t2i/t2s default: held-out captions); '
                      's2t: text spoken by espeak-ng')
  p.add_argument('--input', action='append', default=[],
                 help='i2t: image files, s2t: WAV files (globs, repeatable; default: held-out pairs)')
  p.add_argument('--n', type=int, default=0, help='samples per prompt, or held-out pairs (default: sample.num)')
  p.add_argument('--out', default=None, help='output folder (default: WORKDIR/samples/TASK)')
  p.add_argument('--seed', type=int, default=0, help='random seed')
  _distributed_args(p)


def eval_cmd(args, overrides):
  from tmdm import evaluate  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  results = evaluate.eval_command(args.workdir, overrides, out_path=args.out)
  for k, v in results.items():
    print(f'{k:32s} {v:.5g}' if isinstance(v, float) else f'{k:32s} {v}')
  return 0


def _eval_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--out', default=None, help='JSON of the results (default: WORKDIR/eval_STEP.json)')
  _distributed_args(p)


def sample_sweep(args, overrides):
  import sys  # pylint: disable=import-outside-toplevel
  from tmdm import sample_sweep as sweep  # pylint: disable=import-outside-toplevel
  sweep.sweep_command(args.workdir, args.task, rules=args.rules, steps=args.steps, temperatures=args.temperatures,
                      guidance=args.guidance, out_dir=args.out, do_record=args.record, tolerance=args.tolerance,
                      overrides=overrides, command='tmdm ' + ' '.join(sys.argv[1:]))
  return 0


def _sample_sweep_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--task', required=True, choices=['text', 't2i', 't2s', 'i2t', 's2t'])
  p.add_argument('--rules', default='ancestral,confidence:cosine,confidence:linear,threshold:0.9',
                 help='reveal rules: ancestral, confidence:SCHEDULE, threshold:TAU (comma list)')
  p.add_argument('--steps', default='8,16,32', help='steps (comma list)')
  p.add_argument('--temperatures', default='0.7,1.0', help='temperatures (comma list)')
  p.add_argument('--guidance', default='0,1,3', help='guidance weights (comma list; ignored for text)')
  p.add_argument('--tolerance', type=float, default=0.0,
                 help='treat settings this close to the best metric as ties (broken by the secondary metric, then forward passes)')
  p.add_argument('--out', default=None, help='folder for sweep.csv/.md/.png (default: WORKDIR/sample_sweep/TASK)')
  p.add_argument('--record', action='store_true', help='write the chosen setting into src/tmdm/sampling_defaults.json')


def bench_sample(args, overrides):
  from tmdm import sample_bench  # pylint: disable=import-outside-toplevel
  if bool(args.workdir) == bool(args.config):
    raise config_lib.ConfigError('give exactly one of --workdir (a trained model) or --config (a fresh one)')
  sample_bench.bench_command(workdir=args.workdir, config=args.config, task=args.task, steps=args.steps,
                             batch=args.batch, repeats=args.repeats, overrides=overrides)
  return 0


def _bench_sample_args(p):
  p.add_argument('--workdir', default='', help='a training workdir (its latest checkpoint)')
  p.add_argument('--config', default='', help='or an experiment config (freshly initialized model, no data needed)')
  p.add_argument('--task', default='t2i', choices=['text', 't2i', 't2s', 'i2t', 's2t'])
  p.add_argument('--steps', default='8,16,32,64,128', help='steps (comma list)')
  p.add_argument('--batch', type=int, default=16, help='rows per sampling call')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per row')


def compile_check(args, overrides):
  from tmdm import compile_check as cc  # pylint: disable=import-outside-toplevel
  meshes = [cc.parse_mesh(m) for m in args.mesh]
  if args.fit and not args.topology:
    raise config_lib.ConfigError('--fit searches a TPU topology: give --topology=NAME (e.g. v5e:16x16)')
  if args.topology:  # Compile-only TPU chips on this host: no distributed start-up, no visible devices needed.
    if args.fit:
      return cc.fit_search(args.config, overrides, args.topology, hbm_gib=args.hbm_gib, limit=args.fit_limit)
    return cc.run(args.config, overrides, meshes, hbm_gib=args.hbm_gib, topology=args.topology)
  distributed.initialize()  # As a job on a TPU slice or under SLURM: the target's own devices and compiler.
  if not meshes:  # The config's own mesh on the visible devices.
    meshes = [config_lib.resolve_mesh(config_lib.load(args.config, overrides).mesh, jax.device_count())]
  return cc.run(args.config, overrides, meshes, hbm_gib=args.hbm_gib)


def _compile_check_args(p):
  _config_arg(p)
  p.add_argument('--mesh', action='append', default=[], metavar='D,F,T',
                 help='data,fsdp,tensor sizes (repeatable; default: the config\'s mesh on the visible devices)')
  p.add_argument('--hbm_gib', type=float, default=0.0,
                 help='per-device memory to check the peak against (0: off; on a --topology, the compiler\'s own)')
  p.add_argument('--topology', default='',
                 help='compile for TPU chips from this host via libtpu: v5e:16x16, v5p:4x4x8, v6e:8x8, or v5e-256 '
                      '(chips), v5p-256 (TensorCores); exit 1 when the step does not fit')
  p.add_argument('--fit', action='store_true',
                 help='with --topology: search remat, loss chunking, microbatches and the tensor split for '
                      'settings that fit, fewest recomputed FLOPs first')
  p.add_argument('--fit_limit', type=int, default=3, help='--fit stops after this many fitting settings')


def scaling_cmd(args, overrides):
  from tmdm import scaling, scaling_plots  # pylint: disable=import-outside-toplevel
  if overrides:
    raise config_lib.ConfigError('tmdm scaling takes no --config overrides')
  if args.scaling_command == 'fit':
    try:
      rows = scaling.read_results(args.results)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    report = scaling.fit_results(rows, n_boot=args.bootstrap, level=args.level, seed=args.seed, starts=args.starts,
                                 delta=args.delta)
    if not report:
      raise config_lib.ConfigError(f'{args.results}: no modality has the 5 points a fit needs')
    print(f'wrote {scaling.write_fit(args.out, report, os.path.abspath(args.results))}')
    for path in scaling_plots.write_all(args.out, rows, report):
      print(f'wrote {path}')
    return 0
  with open(args.fit, encoding='utf-8') as f:
    fits = json.load(f)['modalities']
  names = [args.modality] if args.modality else sorted(fits)
  for name in names:
    if name not in fits:
      raise config_lib.ConfigError(f'{args.fit} has no fit for modality {name!r} (has: {", ".join(fits)})')
    p = scaling.plan(fits[name], args.flops, fits[name].get('interval_level', 0.9))
    preset, preset_n = scaling.nearest_preset(p['params'])
    print(f'{name}: C = {p["flops"]:.3g} FLOPs -> N* = {p["params"]:.4g} non-embedding parameters, '
          f'D* = {p["tokens"]:.4g} tokens ({p["tokens_per_param"]:.1f} tokens/parameter), '
          f'predicted loss {p["loss"]:.4g}')
    if 'params_interval' in p:
      lo_n, hi_n = p['params_interval']
      lo_d, hi_d = p['tokens_interval']
      print(f'  bootstrap interval: N* in [{lo_n:.3g}, {hi_n:.3g}], D* in [{lo_d:.3g}, {hi_d:.3g}]')
      if not (hi_n < 10 * lo_n and hi_d < 10 * lo_d):
        print('  WARNING: the interval spans more than 10x: the fit does not determine this plan')
    if fits[name].get('at_bound'):
      print(f'  WARNING: the fit left {", ".join(fits[name]["at_bound"])} on the search bounds (undetermined)')
    if args.tokens_per_step:
      print(f'  {p["tokens"] / args.tokens_per_step:.0f} steps of {args.tokens_per_step} tokens')
    print(f'  nearest model preset: {preset} ({preset_n:.3g} non-embedding parameters)')
  return 0


def _scaling_args(p):
  sub = p.add_subparsers(dest='scaling_command', required=True)
  fit = sub.add_parser('fit', help='fit L(N, D) = E + A/N^alpha + B/D^beta per modality; write fit.json and plots')
  fit.add_argument('results', help='JSONL: one row per run and modality with params, tokens, modality, loss')
  fit.add_argument('--out', required=True, help='folder for fit.json and the PNG plots')
  fit.add_argument('--bootstrap', type=int, default=100, help='bootstrap resamples for intervals (0: none)')
  fit.add_argument('--level', type=float, default=0.9, help='interval coverage')
  fit.add_argument('--starts', type=int, default=64, help='L-BFGS starts: the best grid points (0: whole grid)')
  fit.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  fit.add_argument('--delta', type=float, default=1e-3, help='Huber delta on log-loss residuals (Hoffmann: 1e-3)')
  plan = sub.add_parser('plan', help='compute-optimal model size and tokens for a FLOP budget')
  plan.add_argument('--fit', required=True, help='fit.json written by `tmdm scaling fit`')
  plan.add_argument('--flops', type=float, required=True, help='training FLOP budget C (C = 6 N D)')
  plan.add_argument('--modality', default='', help='one modality (default: every fitted modality)')
  plan.add_argument('--tokens_per_step', type=int, default=0, help='batch x seq_len, to print the step count')


COMMANDS = {
    'prepare': Command('build datasets and tokenizers', _prepare_args, prepare),
    'train': Command('train, or resume from the latest checkpoint', _train_args, train_cmd),
    'sample': Command('generate from a trained workdir (text, t2i, t2s, i2t, s2t) with an HTML gallery',
                      _sample_args, sample),
    'eval': Command('evaluate a trained workdir (eval.tasks: ELBO, T2I digits, T2S, I2T, S2T)', _eval_args, eval_cmd),
    'sample-sweep': Command('sweep sampler settings for a task; table, plot, --record the defaults',
                            _sample_sweep_args, sample_sweep),
    'bench-sample': Command('sampling throughput and latency against steps', _bench_sample_args, bench_sample),
    'bench': Command('benchmark the real train step on synthetic tokens', _bench_args, bench_cmd),
    'compile-check': Command('compile the train step for a mesh without allocating it; print memory and FLOPs',
                             _compile_check_args, compile_check),
    'scaling': Command('fit scaling laws to sweep results; plan a compute-optimal run', _scaling_args, scaling_cmd),
}
