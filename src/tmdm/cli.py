"""The `tmdm` command: argparse and the registry of subcommands, each handler a few lines.

  tmdm prepare --config=experiments/demo.py[:preset] [--config.k=v ...]
  tmdm train   --config=experiments/demo.py[:preset] --workdir=DIR [--config.k=v ...]
  tmdm sample  --workdir=DIR [--n=4] [--prompt=TEXT] [--out=DIR] [--config.sample.k=v ...]
  tmdm export  --workdir=DIR --out=FOLDER   /   tmdm import --from=FOLDER --workdir=NEW
  tmdm <command> --help

`--host_devices=N` (any subcommand) simulates N devices on the CPU: it sets XLA_FLAGS before jax is
imported; so this module imports jax and the rest of tmdm only inside the handlers, after it. Errors a
user can fix (errors.USER_ERRORS) print one line and exit with status 2.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

from tmdm import errors

log = logging.getLogger('tmdm')


def _take_host_devices(argv):
  """Removes --host_devices=N from argv and applies it before anything imports jax."""
  rest, count = [], 0
  for i, arg in enumerate(argv):
    if arg.startswith('--host_devices='):
      count = int(arg.split('=', 1)[1])
    elif arg == '--host_devices' and i + 1 < len(argv):
      count = int(argv[i + 1])
    elif i > 0 and argv[i - 1] == '--host_devices':
      continue
    else:
      rest.append(arg)
  if count:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={count}').strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return rest


def _pin_prepare_backend(argv):
  """`tmdm prepare`: one CPU device and an XLA thread pool of fixed size, set before jax is imported.

  The image and audio tokenizers train and encode with XLA on the CPU, whose convolutions split their
  sums by the size of its thread pool, max(usable cores or NPROC, CPU devices). The same data gave
  tokenizers that differed in their last bits, and then 0.1% of the image and 26% of the audio tokens,
  when prepared with --host_devices=8 (or XLA_FLAGS exported for training) or on fewer cores (`taskset`);
  the demo's losses then differed from step 1. So prepare runs on 1 CPU device with NPROC=2 threads (a
  2-core machine's default) whatever the cores or devices; kernels still differ by instruction set, so
  this holds on one kind of CPU. A user's NPROC or JAX_PLATFORMS still wins. BUILD_NOTES, "Reproducible
  runs from a fresh prepare". In a process that already imported jax (tests calling main()) the backend is left as it is."""
  if argv[:1] != ['prepare'] or 'jax' in sys.modules:
    return
  os.environ['JAX_NUM_CPU_DEVICES'] = '1'  # Wins over --xla_force_host_platform_device_count.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Not an accelerator when one is present.
  os.environ.setdefault('NPROC', '2')  # XLA's CPU client sizes its thread pool by NPROC when set.


# The handlers: (args, config overrides) -> exit status. Each imports what it runs (after XLA_FLAGS).

def _start_distributed(args):
  from tmdm.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def prepare(args, overrides):
  from tmdm.config import loader  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import prepare as prepare_lib  # pylint: disable=import-outside-toplevel
  if args.beam_options and not args.beam_runner:
    raise errors.ConfigError('--beam_options needs --beam_runner (e.g. --beam_runner=DirectRunner)')
  return prepare_lib.prepare(loader.load(args.config, overrides), force=args.force, beam_runner=args.beam_runner,
                             beam_options=args.beam_options)


def train(args, overrides):
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.config import loader  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  from tmdm.training import loop  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  cfg = loader.load(args.config, overrides, num_devices=jax.device_count(), process_count=jax.process_count())
  final = loop.run(cfg, args.workdir, generation_eval=evaluators.TrainingEvaluator() if cfg.eval.every_steps else None)
  log.info('final: %s', json.dumps({k: float(f'{float(v):.5g}') for k, v in final.items()}))
  return 0


def sample(args, overrides):
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  samples = generate.sample_command(args.workdir, task=args.task, prompts=args.prompt, inputs=args.input, n=args.n,
                                    out_dir=args.out, seed=args.seed, overrides=overrides)
  for i, smp in enumerate(samples):
    if isinstance(smp.output, str):
      print(f'--- sample {i} ({smp.prompt})\n{smp.output}')
  return 0


def eval_(args, overrides):
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  results = evaluators.eval_command(args.workdir, overrides, out_path=args.out)
  for k, v in results.items():
    print(f'{k:32s} {v:.5g}' if isinstance(v, float) else f'{k:32s} {v}')
  return 0


def sample_sweep(args, overrides):
  from tmdm.tools import sample_sweep as sweep  # pylint: disable=import-outside-toplevel
  sweep.sweep_command(args.workdir, args.task, rules=args.rules, steps=args.steps, temperatures=args.temperatures,
                      guidance=args.guidance, out_dir=args.out, record_path=args.record, tolerance=args.tolerance,
                      caches=args.caches, fastest=args.fastest,
                      overrides=overrides, command='tmdm ' + ' '.join(sys.argv[1:]))
  return 0


def bench_sample(args, overrides):
  from tmdm.tools import sample_bench  # pylint: disable=import-outside-toplevel
  if bool(args.workdir) == bool(args.config):
    raise errors.ConfigError('give exactly one of --workdir (a trained model) or --config (a fresh one)')
  if args.workdir:
    sample_bench.compare_command(args.workdir, args.task, args.setting, out_dir=args.out, overrides=overrides)
  else:
    sample_bench.bench_command(workdir='', config=args.config, task=args.task, steps=args.steps,
                               batch=args.batch, repeats=args.repeats, overrides=overrides)
  return 0


def export(args, overrides):
  from tmdm.export import hf_folder  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  hf_folder.export(args.workdir, args.out, step=args.step, weights=args.weights, dtype=args.dtype,
                   max_shard_bytes=int(args.max_shard_mb * 2**20), overrides=overrides)
  print(f'exported to {args.out}')
  return 0


def import_(args, overrides):
  from tmdm.export import hf_folder  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  step = hf_folder.import_folder(args.source, args.workdir, data_root=args.data_root, overrides=overrides)
  print(f'imported {args.source} (exported at step {step}) into {args.workdir}: `tmdm sample --workdir='
        f'{args.workdir}`, or `tmdm train` to fine-tune from it')
  return 0


def lm_eval_(args, overrides):
  from tmdm.export import lm_eval_model  # pylint: disable=import-outside-toplevel
  _start_distributed(args)
  summary = lm_eval_model.command(args.workdir, args.tasks, include_path=args.include_path, draws=args.draws,
                                  seed=args.seed, limit=args.limit, batch=args.batch, out_path=args.out,
                                  overrides=overrides)
  for task, metrics in summary['results'].items():
    for key, value in metrics.items():
      if isinstance(value, float):
        print(f'{task:24s} {key:28s} {value:.4f}')
  if summary['loglikelihood_mc_stderr_mean'] is not None:
    print(f'mean Monte Carlo standard error of the {summary["scores"]} scores ({args.draws} draws each): '
          f'{summary["loglikelihood_mc_stderr_mean"]:.4f} nats')
  return 0


def bench(args, overrides):
  from tmdm.tools import bench as bench_lib  # pylint: disable=import-outside-toplevel
  return bench_lib.bench_command(args, overrides)


def compile_check(args, overrides):
  from tmdm.tools import compile_check as cc  # pylint: disable=import-outside-toplevel
  return cc.command(args, overrides)


def scaling(args, overrides):
  from tmdm.scaling import report  # pylint: disable=import-outside-toplevel
  if overrides:
    raise errors.ConfigError('tmdm scaling takes no --config overrides')
  return report.command(args)


def study(args, overrides):
  from tmdm.scaling import study as study_lib  # pylint: disable=import-outside-toplevel
  if overrides:
    raise errors.ConfigError('tmdm study takes no --config overrides')
  return study_lib.command(args)


def goodput(args, overrides):
  from tmdm import storage  # pylint: disable=import-outside-toplevel
  from tmdm.training import goodput as goodput_lib  # pylint: disable=import-outside-toplevel
  if overrides:
    raise errors.ConfigError('tmdm goodput takes no --config overrides')
  try:
    s = goodput_lib.summary(args.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise errors.ConfigError(str(e)) from None
  print(goodput_lib.table(s))
  out = args.out or storage.join(args.workdir, 'goodput.png')
  goodput_lib.plot_timeline(s, out)
  print(f'timeline: {out}')
  return 0


# The arguments of each subcommand.

def _config_arg(p, required=True):
  p.add_argument('--config', required=required, help='experiments/FILE.py[:preset]')


def _distributed_args(p):
  p.add_argument('--coordinator', default='', help='multi-process: coordinator host:port (else detected)')
  p.add_argument('--num_processes', type=int, default=0, help='multi-process: number of processes')
  p.add_argument('--process_id', type=int, default=-1, help='multi-process: this process (0-based)')


def _prepare_args(p):
  _config_arg(p)
  p.add_argument('--force', action='store_true', help='rebuild datasets that exist')
  p.add_argument('--beam_runner', default='',
                 help='build with an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, FlinkRunner, '
                      '...; needs the `beam` extra); default: in this process')
  p.add_argument('--beam_options', default='',
                 help="Beam pipeline flags, passed through, e.g. '--direct_num_workers=2 "
                      "--direct_running_mode=multi_processing'")


def _train_args(p):
  _config_arg(p)
  p.add_argument('--workdir', required=True, help='run folder: checkpoints, metrics, config')
  _distributed_args(p)


def _sample_args(p):
  from tmdm.generation import tasks  # pylint: disable=import-outside-toplevel
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


def _eval_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--out', default=None, help='JSON of the results (default: WORKDIR/eval_STEP.json)')
  _distributed_args(p)


def _sample_sweep_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--task', required=True, choices=['text', 't2i', 't2s', 'i2t', 's2t'])
  p.add_argument('--rules', default='ancestral,confidence:cosine,confidence:linear,threshold:0.9',
                 help='reveal rules: ancestral, confidence:SCHEDULE, threshold:TAU, entropy:GAMMA (comma list)')
  p.add_argument('--steps', default='8,16,32', help='steps (comma list)')
  p.add_argument('--temperatures', default='0.7,1.0', help='temperatures (comma list)')
  p.add_argument('--guidance', default='0,1,3', help='guidance weights (comma list; ignored for text)')
  p.add_argument('--caches', default='0', help='0: uncached, 1: the cached sampler (comma list, e.g. 0,1)')
  p.add_argument('--fastest', action='store_true',
                 help='choose the fastest setting whose score is within the noise (paired bootstrap) of the best')
  p.add_argument('--tolerance', type=float, default=0.0,
                 help='treat settings this close to the best metric as ties (broken by the secondary metric, then forward passes)')
  p.add_argument('--out', default=None, help='folder for sweep.csv/.md/.png (default: WORKDIR/sample_sweep/TASK)')
  p.add_argument('--record', default='', metavar='FILE.json',
                 help='write the chosen setting (with metric and command) into FILE.json and print the experiment line')


def _bench_sample_args(p):
  p.add_argument('--workdir', default='',
                 help='a training workdir: compare --setting s on its held-out items (quality and time, JSON lines)')
  p.add_argument('--config', default='', help='or an experiment config: throughput against --steps of a fresh model')
  p.add_argument('--task', default='t2i', choices=['text', 't2i', 't2s', 'i2t', 's2t'])
  p.add_argument('--setting', action='append', default=[],
                 help="--workdir: sampler keys of the task, 'KEY=VALUE,...' (repeatable; 'baseline': the run's "
                      "own; default: baseline, cache=1, sampler=entropy, sampler=entropy,cache=1)")
  p.add_argument('--out', default=None, help='--workdir: folder for bench.jsonl/.png (default: WORKDIR/bench_sample/TASK)')
  p.add_argument('--steps', default='8,16,32,64,128', help='--config: steps (comma list)')
  p.add_argument('--batch', type=int, default=16, help='rows per sampling call')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per row')


def _export_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (local or gs://)')
  p.add_argument('--out', required=True, help='the folder to write (local or gs://)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the newest)')
  p.add_argument('--weights', default='', choices=['', 'ema', 'params'],
                 help="the weight EMA or the raw parameters (default: what sampling uses, sample.ema)")
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='dtype of the saved weights')
  p.add_argument('--max_shard_mb', type=float, default=1024, help='largest safetensors file (MiB)')
  _distributed_args(p)


def _import_args(p):
  p.add_argument('--from', dest='source', required=True, help='a folder written by `tmdm export` (local or gs://)')
  p.add_argument('--workdir', required=True, help='the new run folder')
  p.add_argument('--data_root', default='',
                 help='prepared data to train or evaluate on (its tokenizers must be the exported ones); '
                      'default: WORKDIR/data with the exported tokenizers only')
  _distributed_args(p)


def _lm_eval_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--tasks', required=True, help='lm-eval task names (comma list)')
  p.add_argument('--include_path', default='', help='a folder of local task YAMLs (no hub access needed)')
  p.add_argument('--draws', type=int, default=16, help='Monte Carlo draws of the ELBO per scored continuation')
  p.add_argument('--seed', type=int, default=0, help='seed of the draws and of the harness')
  p.add_argument('--limit', type=int, default=None, help='at most this many documents per task')
  p.add_argument('--batch', type=int, default=32, help='rows per forward pass')
  p.add_argument('--out', default=None, help='results JSON (default: WORKDIR/lm_eval_STEP.json)')
  _distributed_args(p)


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


def _study_args(p):
  sub = p.add_subparsers(dest='study_command', required=True)
  rep = sub.add_parser('report', help="a finished sweep's runs as a table (seeds grouped) and a figure")
  rep.add_argument('root', help='the sweep folder (launch/sweep.py --root): ROOT/NAME per run, a folder or gs:// URL')
  rep.add_argument('--out', default='', help='folder for results.json, table.md, study.png (default ROOT/report)')
  rep.add_argument('--metrics', default='', help='comma list of final metrics (default: per-modality ELBOs and '
                                                 'the generation scores the runs logged)')
  rep.add_argument('--baseline', default='', help='setting the paired differences are taken to (default: first)')
  rep.add_argument('--title', default='', help='figure and table title (default: the folder name)')
  rep.add_argument('--x', default='', help='METRIC:CONFIG_KEY,...: plot these metrics against a config value '
                                           '(e.g. eval/loss/image:data.mix_image) instead of by setting')


def _goodput_args(p):
  p.add_argument('workdir', help='a training workdir (local or gs://)')
  p.add_argument('--out', default='', help='the timeline PNG (default: WORKDIR/goodput.png)')


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: object  # argparse parser -> None
  run: object  # (args, overrides) -> exit status


COMMANDS = {
    'prepare': Command('build datasets and tokenizers', _prepare_args, prepare),
    'train': Command('train, or resume from the latest checkpoint', _train_args, train),
    'sample': Command('generate from a trained workdir (text, t2i, t2s, i2t, s2t) with an HTML gallery',
                      _sample_args, sample),
    'eval': Command('evaluate a trained workdir (eval.tasks: ELBO, T2I digits, T2S, I2T, S2T)', _eval_args, eval_),
    'sample-sweep': Command('sweep sampler settings for a task; table, plot, --record the defaults',
                            _sample_sweep_args, sample_sweep),
    'bench-sample': Command('sampling throughput and latency against steps', _bench_sample_args, bench_sample),
    'export': Command('write a Hugging Face-style folder: safetensors, config, tokenizers, model card, the '
                      'PyTorch reference', _export_args, export),
    'import': Command('make a run from an exported folder: sample, evaluate or fine-tune it', _import_args, import_),
    'lm-eval': Command('score a run with lm-evaluation-harness (Monte Carlo ELBO likelihoods, the text sampler)',
                       _lm_eval_args, lm_eval_),
    'bench': Command('benchmark the real train step on synthetic tokens', _bench_args, bench),
    'compile-check': Command('compile the train step for a mesh without allocating it; print memory and FLOPs',
                             _compile_check_args, compile_check),
    'scaling': Command('fit scaling laws to sweep results; plan a compute-optimal run', _scaling_args, scaling),
    'goodput': Command('where a run\'s wall time went, by cause, across restarts: a table and a timeline PNG',
                       _goodput_args, goodput),
    'study': Command('report a design-space study: a sweep as a table over seeds and a figure', _study_args, study),
}


COMMON_FLAGS = ('Every subcommand also takes --host_devices=N (simulate N CPU devices) and --config.KEY=VALUE '
                '(override any key of src/tmdm/config/base.py, e.g. --config.train.num_steps=100).')


def build_parser():
  """The `tmdm` parser with every subcommand (also what tests/test_docs.py checks the docs against)."""
  parser = argparse.ArgumentParser(prog='tmdm', description='Tri-modal masked diffusion pretraining.',
                                   epilog=COMMON_FLAGS)
  sub = parser.add_subparsers(dest='command', required=True)
  for name, command in COMMANDS.items():
    command.add_arguments(sub.add_parser(name, help=command.help, epilog=COMMON_FLAGS))
  return parser


def main(argv=None):
  argv = _take_host_devices(sys.argv[1:] if argv is None else list(argv))
  _pin_prepare_backend(argv)
  overrides = [a for a in argv if a.startswith('--config.')]
  argv = [a for a in argv if not a.startswith('--config.')]
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax._src', 'grain', 'fsspec', 'google.auth'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger('gcsfs').setLevel(logging.ERROR)  # It warns on every gs:// call when it cannot tell a bucket's type.

  args = build_parser().parse_args(argv)
  try:
    return COMMANDS[args.command].run(args, overrides)
  except errors.USER_ERRORS as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__  # Grain appends traceback notes.
    print(f'tmdm {args.command}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
