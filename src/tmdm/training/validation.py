"""The validation ELBO the training loop measures: per mixture component and corruption mode, on
the first `train.eval_batches` batches of each validation split (data/shards.eval_batches)."""

import os

import jax
import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.data import mixture
from tmdm.datasets import text
from tmdm.diffusion import corruption, loss as loss_lib


def evaluate(eval_fn, params, components: dict, seed) -> dict:
  """Validation ELBO per mixture component and corruption mode (training/step.eval_sums):
    eval/<component>/joint/loss/<m>        every position of the row at one t: the ELBO of the row,
                                           comparable to other models' perplexity bounds
    eval/<component>/conditional/loss/<m>  pair components: condition clean, target masked, a bound
                                           on -log p(target | condition) (T2I rows give it for image,
                                           I2T rows for text)
    eval/loss/<m>, eval/loss               joint, all components together
  Every mode sees the same batches with the same keys."""
  out, total = {}, None
  for name, batches in components.items():
    for mode in corruption.EVAL_MODES if mixture.is_pairs(name) else ('joint',):
      sums = None
      for i, batch in enumerate(batches):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        part = jax.device_get(eval_fn(params, batch, key, mode=mode))
        sums = part if sums is None else jax.tree.map(np.add, sums, part)
      if sums is None:
        continue
      if mode == 'joint':
        total = sums if total is None else jax.tree.map(np.add, total, sums)
      out.update({f'eval/{name}/{mode}/{k}': v for k, v in loss_lib.finalize(sums).items()})
  if total is not None:
    out.update({f'eval/{k}': v for k, v in loss_lib.finalize(total).items()})
  return out


def focus_ids(cfg, manifests: dict, vocab: vocab_lib.VocabSpec) -> tuple:
  """Joint-vocabulary ids of train.eval_focus_words under the runs' text tokenizer (every dataset
  uses the same one: mixture.check), for validation's loss/focus."""
  words = [w.strip() for w in cfg.train.eval_focus_words.split(',') if w.strip()]
  if not words:
    return ()
  name, manifest = next(iter(manifests.items()))
  tok = text.TextTokenizer(os.path.join(mixture.root(cfg, name), manifest['tokenizers']['text']['file']))
  return tuple(vocab.text_start + i for i in tok.word_ids(words))
