"""`tmdm lm-eval` (issue 27): lm-evaluation-harness runs tmdm end to end on local task files.

A tiny text model learns ten facts ("the cow is 37", ...) in a few hundred steps; a local
multiple-choice task asks for each number (choices of one length: a masked-diffusion row knows how many
tokens it fills, so choices of different lengths would also be told apart by their length). The harness itself builds the requests and computes the
accuracy: the trained model must beat the untrained one, and the Monte Carlo ELBO's standard error is
reported. The estimator is checked against the exact NLL where the two must agree: one masked token.
"""

import json
import os

import numpy as np
import optax
import pytest

from helpers import REPO
from tmdm.config import loader as config_loader

pytest.importorskip('lm_eval')

FACTS = {'cow': '37', 'dog': '52', 'cat': '18', 'duck': '64', 'sheep': '29', 'owl': '71', 'lion': '43',
         'bee': '96', 'snake': '85', 'frog': '20'}
TASK_YAML = """task: animal_numbers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _corpus(folder):
  """2,400 documents of one or two facts. Some end with a fact as the task's rows do (a masked-diffusion
  row knows where its document ends); pairs in both orders keep most documents distinct (the validation
  split hashes documents: a repeated one lands wholly on one side)."""
  rng = np.random.default_rng(0)
  animals = sorted(FACTS)
  with open(os.path.join(folder, 'facts.jsonl'), 'w', encoding='utf-8') as f:
    for i in range(2400):
      picked = rng.choice(animals, size=1 + (i % 3 > 0), replace=False)
      f.write(json.dumps({'text': '. '.join(f'the {a} is {FACTS[a]}' for a in picked)}) + '\n')


def _task(folder):
  rng = np.random.default_rng(1)
  sounds = sorted(FACTS.values())
  with open(os.path.join(folder, 'animal_numbers.jsonl'), 'w', encoding='utf-8') as f:
    for animal, sound in sorted(FACTS.items()):
      choices = [sound] + list(rng.choice([s for s in sounds if s != sound], size=3, replace=False))
      order = rng.permutation(4)
      f.write(json.dumps({'context': f'the {animal} is', 'choices': [' ' + choices[j] for j in order],
                          'label': int(np.argmax(order == 0))}) + '\n')
  with open(os.path.join(folder, 'animal_numbers.yaml'), 'w', encoding='utf-8') as f:
    f.write(TASK_YAML.format(data=os.path.join(folder, 'animal_numbers.jsonl')))


@pytest.fixture(scope='module')
def facts_run(tmp_path_factory):
  """(workdir, task folder) of a tiny text model trained on the facts."""
  from tmdm.datasets import text  # pylint: disable=import-outside-toplevel
  from tmdm.training import loop  # pylint: disable=import-outside-toplevel
  base = tmp_path_factory.mktemp('lm_eval')
  _corpus(str(base))
  text.prepare_text(str(base / 'data' / 'facts'), sources=[f'jsonl:{base / "facts.jsonl"}'], vocab_size=44,
                    val_fraction=0.05)
  cfg = config_loader.load(os.path.join(REPO, 'experiments', 'smoke.py'), [
      f'--config.data.root={base / "data"}', '--config.data.text_name=facts', '--config.vocab.text_size=44',
      '--config.data.seq_len=32', '--config.train.num_steps=800', '--config.train.batch_size=16',
      '--config.train.eval_batches=0', '--config.train.progress=false', '--config.checkpoint.every_steps=800',
      '--config.optim.on_exceeding_crit=warn'], num_devices=8)
  workdir = str(base / 'run')
  loop.run(cfg, workdir)
  tasks = base / 'tasks'
  tasks.mkdir()
  _task(str(tasks))
  return workdir, str(tasks)


def test_lm_eval_multiple_choice_trained_beats_untrained(facts_run):
  from tmdm.export import lm_eval_model  # pylint: disable=import-outside-toplevel
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  from tmdm.training import state as train_state  # pylint: disable=import-outside-toplevel
  workdir, tasks = facts_run
  trained = lm_eval_model.command(workdir, 'animal_numbers', include_path=tasks, draws=4, seed=0)
  acc = trained['results']['animal_numbers']['acc,none']
  assert trained['step'] == 800 and trained['scores'] == 40  # 10 questions x 4 choices, scored by the harness
  assert 0 < trained['loglikelihood_mc_stderr_mean'] < 5
  assert os.path.isfile(os.path.join(workdir, 'lm_eval_800.json'))

  ctx = generate.Context.from_workdir(workdir)
  fresh = train_state.create(ctx.s.model, optax.identity(), ctx.s.sharder, ctx.s.seq_len, seed=0)
  untrained = lm_eval_model.Scorer(generate.Context.for_training(ctx.s, fresh.params, 0), draws=4)
  model = lm_eval_model.lm_class()(scorer=untrained)
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = TaskManager(include_path=tasks, include_defaults=False)
  base = lm_eval.simple_evaluate(model=model, tasks=['animal_numbers'], task_manager=manager,
                                 bootstrap_iters=0, log_samples=False)
  base_acc = base['results']['animal_numbers']['acc,none']
  print(f'animal_numbers acc: trained {acc:.3f}, untrained {base_acc:.3f}; mean MC stderr '
        f'{trained["loglikelihood_mc_stderr_mean"]:.3f}')
  assert acc >= 0.75 and acc > base_acc + 0.25


def test_one_masked_token_bound_is_the_exact_nll(facts_run):
  """With a one-token continuation every draw masks that token (l = n = 1): the estimate is exactly
  -log p(token | context), which the model's own logits give; the standard error is 0."""
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.export import lm_eval_model  # pylint: disable=import-outside-toplevel
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  workdir, _ = facts_run
  scorer = lm_eval_model.Scorer(generate.Context.from_workdir(workdir), draws=3)
  ctx_ids, cont = scorer.split('the cow is', ' 37')
  cont = cont[:1]
  (ll, greedy, stderr), = scorer.elbo([(ctx_ids, cont)])
  row = scorer._row(ctx_ids, cont, [0])  # pylint: disable=protected-access
  s = scorer.ctx.s
  tile = lambda x: np.repeat(x[None], 8, axis=0)  # one row per simulated device
  logits = s.model.apply({'params': scorer.ctx.params}, tile(row['tokens']), tile(row['segment_ids']),
                         tile(row['positions']))[0]
  pos = 1 + len(ctx_ids)
  lo, hi = s.vocab.range(0)
  logp = jax.nn.log_softmax(np.asarray(logits[pos, lo:hi], np.float64))
  assert ll == pytest.approx(float(logp[row['targets'][pos] - lo]), abs=1e-4) and stderr == 0.0
  assert greedy == (int(np.argmax(logp)) == row['targets'][pos] - lo)
  texts = scorer.generate([('the cow is', {'until': ['.'], 'max_gen_toks': 4})])
  assert len(texts) == 1 and '.' not in texts[0]


def test_monte_carlo_bound_averages_to_its_expectation(facts_run):
  """The draws (l uniform in 1..n, l positions uniform, weight n / l) against their exact expectation,
  enumerated over every mask of the continuation: (1/n) sum_l (n/l) mean_{|S|=l} NLL(S). Drawing l or the
  positions otherwise, or dropping the n / l weight, moves the mean by many standard errors."""
  import itertools  # pylint: disable=import-outside-toplevel
  from tmdm.export import lm_eval_model  # pylint: disable=import-outside-toplevel
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  workdir, _ = facts_run
  scorer = lm_eval_model.Scorer(generate.Context.from_workdir(workdir), draws=2000)
  ctx_ids, cont = scorer.split('the cow is', ' 37. the dog is 52')
  cont = cont[:4]
  n = len(cont)
  assert n >= 3
  masks = {l: list(itertools.combinations(range(n), l)) for l in range(1, n + 1)}
  rows = [scorer._row(ctx_ids, cont, list(S)) for l in masks for S in masks[l]]  # pylint: disable=protected-access
  sums, _ = scorer._run(rows)  # pylint: disable=protected-access
  exact, i = 0.0, 0
  for l, subsets in masks.items():
    exact += (n / l) * float(np.mean(sums[i:i + len(subsets)])) / n
    i += len(subsets)
  (ll, _, stderr), = scorer.elbo([(ctx_ids, cont)])
  print(f'MC bound {-ll:.3f} +- {stderr:.3f}, exact expectation {exact:.3f}')
  assert abs(-ll - exact) < 4 * stderr and stderr > 0
