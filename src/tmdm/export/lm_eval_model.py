"""tmdm in lm-evaluation-harness: `tmdm lm-eval --workdir=RUN --tasks=...` or `lm_eval --model tmdm`.

A masked-diffusion model has no left-to-right likelihood; it scores a continuation by a bound on it,
as LLaDA does (Nie et al., 2025): the Monte Carlo estimate of the ELBO of the continuation given the
context. One draw picks l uniformly from 1..n (n continuation tokens), masks l of them uniformly at
random, and scores (n / l) * sum over the masked of -log p(token | row); the bound is the mean over
`draws` draws and loglikelihood returns its negative. Each request draws from its own seeded
generator (the seed and the request's text), so a score does not depend on batching or order.

  loglikelihood          -ELBO(continuation | context); is_greedy: every continuation token is the
                         argmax with the whole continuation masked
  loglikelihood_rolling  -ELBO of the document (longer ones in windows of one row, each window alone)
  generate_until         the text sampler (the run's sample.* settings; temperature 0 unless the task
                         asks to sample) on `<txt> context [MASK]... </txt>`, cut at the first stop string

Every score's Monte Carlo standard error (std of the draws / sqrt(draws)) is kept (`Scorer.stderrs`);
`tmdm lm-eval` reports their mean per task beside the harness's own numbers.
Legend: B rows, L row length (data.seq_len), V vocabulary.
"""

import hashlib
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from tmdm import errors, storage
from tmdm.diffusion import loss as loss_lib
from tmdm.generation import generate, tasks as tasks_lib

log = logging.getLogger('tmdm')


class Scorer:
  """The JAX side: ELBO draws and greedy checks on batches of text rows of a trained run."""

  def __init__(self, ctx: generate.Context, draws: int = 16, seed: int = 0, batch: int = 32):
    self.ctx, self.draws, self.seed = ctx, draws, seed
    self.vocab, self.L = ctx.s.vocab, ctx.s.seq_len
    shards = ctx.s.mesh_shape.batch_shards
    self.batch = -(-batch // shards) * shards
    self.tok = ctx.tokenizer('text')
    self.stderrs = []  # MC standard error of each loglikelihood / rolling score, in request order
    s = ctx.s
    allowed = loss_lib.allowed_table(s.vocab, s.sharder)

    def score(params, rows):
      logits = s.model.apply({'params': params}, rows['tokens'], rows['segment_ids'], rows['positions'])
      modality = jnp.zeros_like(rows['tokens'])  # every position is text
      nll = loss_lib.vocab_parallel_nll(logits, rows['targets'], modality, allowed, s.sharder)
      masked = rows['tokens'] == s.vocab.mask_id
      greedy = jnp.argmax(jnp.where(allowed[modality], logits, -jnp.inf), axis=-1) == rows['targets']
      return jnp.sum(jnp.where(masked, nll, 0.0), axis=-1), jnp.all(greedy | ~masked, axis=-1)

    rows_sharding = s.sharder.batch()
    self._score = jax.jit(score, in_shardings=(None, rows_sharding), out_shardings=s.sharder.replicated)

  def _ids(self, text: str) -> list:
    return [int(i) for i in self.tok.encode([text])[0]] if text else []

  def split(self, context: str, continuation: str) -> tuple[list, list]:
    """Token ids of the context and the continuation: the whole string encoded once and cut where the
    context's own encoding ends (SentencePiece merges across the boundary otherwise)."""
    ctx_ids, whole = self._ids(context), self._ids(context + continuation)
    if whole[:len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
      return ctx_ids, whole[len(ctx_ids):]
    return ctx_ids, self._ids(continuation)

  def _row(self, ctx_ids, cont_ids, masked):
    """One `<txt> context continuation </txt>` row (context cut from the left to fit), [MASK] at the
    continuation positions in `masked`; targets are the clean ids."""
    room = self.L - 2
    if len(cont_ids) > room:
      raise errors.ConfigError(f'a continuation of {len(cont_ids)} tokens does not fit rows of {self.L}')
    ctx_ids = ctx_ids[max(0, len(ctx_ids) + len(cont_ids) - room):]
    body = np.asarray(ctx_ids + cont_ids, np.int64) + self.vocab.text_start
    n = len(body) + 2
    row = {k: np.zeros(self.L, np.int32) for k in ('tokens', 'segment_ids', 'positions', 'targets')}
    row['tokens'][:] = self.vocab.pad_id
    row['tokens'][:n] = np.concatenate([[self.vocab.id('<txt>')], body, [self.vocab.id('</txt>')]])
    row['targets'][:] = row['tokens']
    start = 1 + len(ctx_ids)
    row['tokens'][start + np.asarray(masked, np.int64)] = self.vocab.mask_id
    row['segment_ids'][:n] = 1
    row['positions'][:n] = np.arange(n)
    return row

  def _run(self, rows):
    """(masked NLL sum, all-greedy) per row, in batches."""
    sums, greedy = [], []
    for lo in range(0, len(rows), self.batch):
      chunk = rows[lo:lo + self.batch]
      chunk = chunk + [chunk[-1]] * (self.batch - len(chunk))
      stacked = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
      batch = {k: jax.device_put(v, self.ctx.s.sharder.batch()) for k, v in stacked.items()}
      s, g = self._score(self.ctx.params, batch)
      n = min(self.batch, len(rows) - lo)
      sums.append(np.asarray(s)[:n])
      greedy.append(np.asarray(g)[:n])
    return np.concatenate(sums), np.concatenate(greedy)

  def _draws(self, key: str, n: int):
    """`draws` (l, masked positions) of one request, from a generator seeded by it."""
    digest = hashlib.sha256(f'{self.seed}\0{key}'.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
    out = []
    for _ in range(self.draws):
      count = int(rng.integers(1, n + 1))
      out.append((count, np.sort(rng.choice(n, size=count, replace=False))))
    return out

  def elbo(self, pairs) -> list:
    """[(loglikelihood, is_greedy, mc stderr)] of (context ids, continuation ids) pairs."""
    rows, plan = [], []
    for ctx_ids, cont_ids in pairs:
      n = len(cont_ids)
      if n == 0:
        plan.append(None)
        continue
      draws = self._draws(json.dumps([ctx_ids, cont_ids]), n)
      plan.append((len(rows), n, [c for c, _ in draws]))
      rows.append(self._row(ctx_ids, cont_ids, np.arange(n)))  # all masked: the greedy check
      rows += [self._row(ctx_ids, cont_ids, masked) for _, masked in draws]
    sums, greedy = self._run(rows) if rows else (np.zeros(0), np.zeros(0, bool))
    out = []
    for p in plan:
      if p is None:
        out.append((0.0, True, 0.0))
        continue
      first, n, counts = p
      values = sums[first + 1:first + 1 + self.draws] * n / np.asarray(counts, np.float64)
      stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float('nan')
      out.append((-float(values.mean()), bool(greedy[first]), stderr))
    return out

  def loglikelihood(self, requests) -> list:
    """[(context, continuation)] -> [(loglikelihood, is_greedy)]."""
    scored = self.elbo([self.split(c, x) for c, x in requests])
    self.stderrs += [s for _, _, s in scored]
    return [(ll, g) for ll, g, _ in scored]

  def loglikelihood_rolling(self, texts) -> list:
    """Documents -> the negative ELBO bound, windows of L - 2 tokens scored alone and summed."""
    window = self.L - 2
    out = []
    for text in texts:
      ids = self._ids(text)
      parts = [ids[i:i + window] for i in range(0, max(len(ids), 1), window)]
      scored = self.elbo([([], p) for p in parts])
      out.append(sum(ll for ll, _, _ in scored))
      self.stderrs.append(math.sqrt(sum(s * s for _, _, s in scored)))
    return out

  def generate(self, requests) -> list:
    """[(context, {'until', 'max_gen_toks', 'temperature', 'do_sample'})] -> generated strings."""
    out = []
    spec, knobs = self.ctx.settings('text')
    for context, kw in requests:
      kw = dict(kw or {})
      until = kw.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      n = int(kw.get('max_gen_toks', 64))
      temperature = float(kw.get('temperature', 0.0)) if kw.get('do_sample', False) else 0.0
      room = self.L - 2
      n = max(1, min(n, room - 1))
      ids = self._ids(context)[-(room - n):] if room - n > 0 else []
      body, masked = np.asarray(ids + [0] * n, np.int64), np.arange(len(ids) + n) >= len(ids)
      canvas = tasks_lib.text_rows(self.vocab, [(body, masked)], self.L)
      tokens, _ = self.ctx.run(canvas, spec, knobs._replace(temperature=temperature), seed=self.seed)
      gen = tasks_lib.text_ids(tokens, canvas, self.vocab, only_generated=True)[0]
      text = self.tok.decode(gen)
      cut = min([text.find(u) for u in until if u and u in text], default=len(text))
      out.append(text[:cut])
    return out


def lm_class():
  """The lm_eval.api.model.LM subclass (lm-eval imported on first use: it is the `export` extra)."""
  from lm_eval.api import model as lm_model, registry  # pylint: disable=import-outside-toplevel

  class TmdmLM(lm_model.LM):
    """lm-eval's view of a tmdm run: `pretrained` is the workdir (local or gs://)."""

    def __init__(self, pretrained: str = '', draws: int = 16, seed: int = 0, batch_size: int = 32, scorer=None,
                 **_):
      super().__init__()
      self.scorer = scorer or Scorer(generate.Context.from_workdir(pretrained), draws=int(draws), seed=int(seed),
                                     batch=int(batch_size))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
      kw = dict(p.split('=', 1) for p in arg_string.split(',') if p)
      kw.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == 'batch_size'})
      return cls(**kw)

    def loglikelihood(self, requests, disable_tqdm=False):
      return self.scorer.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
      return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm=False):
      return self.scorer.generate([r.args for r in requests])

  if 'tmdm' not in registry.MODEL_REGISTRY:
    registry.register_model('tmdm')(TmdmLM)
  return TmdmLM


def command(workdir, tasks: str, *, include_path='', draws=16, seed=0, limit=None, batch=32, out_path=None,
            overrides=()) -> dict:
  """`tmdm lm-eval`: lm-eval's simple_evaluate on the run's latest checkpoint; writes the results
  (with the mean MC standard error of the scores) to WORKDIR/lm_eval_STEP.json."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  ctx = generate.Context.from_workdir(workdir, overrides)
  scorer = Scorer(ctx, draws=draws, seed=seed, batch=batch)
  model = lm_class()(scorer=scorer)
  # With local tasks only, lm-eval's ~15k built-in task files are not indexed (6 s; they need the hub anyway).
  manager = TaskManager(include_path=include_path or None, include_defaults=not include_path)
  names = [t for t in tasks.split(',') if t]
  unknown = [t for t in names if t not in manager.all_tasks]
  if unknown:
    raise errors.ConfigError(f'unknown lm-eval task {unknown[0]!r} (local tasks: --include_path=FOLDER of task YAMLs)')
  results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, num_fewshot=0, limit=limit,
                                    bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                    torch_random_seed=None, fewshot_random_seed=seed, log_samples=False)
  stderr = [s for s in scorer.stderrs if np.isfinite(s)]
  summary = {'step': ctx.step, 'draws': draws, 'seed': seed, 'results': results['results'],
             'loglikelihood_mc_stderr_mean': float(np.mean(stderr)) if stderr else None,
             'scores': len(scorer.stderrs)}
  if jax.process_index() == 0:
    out_path = out_path or storage.join(workdir, f'lm_eval_{ctx.step}.json')
    storage.write_text(out_path, json.dumps(summary, indent=2, default=str))
    log.info('wrote %s', out_path)
  return summary
