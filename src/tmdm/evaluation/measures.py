"""The measures behind evaluators.py, on numpy arrays (no model): a digit classifier and its features,
the image tokenizer's encoder features, the Fréchet distance, the spread of a sample and caption
matching by nearest neighbours, DTW-aligned log-mel distance, word error rate, digit words in captions.

Legend: N items, H W image side, F G frames, M mel bands, K features.
"""

import functools
import re

import numpy as np

from tmdm.datasets.image import NUMBER_WORDS, digit_to_rgb


def digit_features(images_NHWC) -> np.ndarray:
  """Images in [0, 1] (dark ink on white) -> ink on a 16x16 grid, flattened [N, 256]: coarse
  enough to ignore the tokenizer's blur, fine enough to tell digits apart."""
  x = 1.0 - np.asarray(images_NHWC, np.float32).mean(axis=-1)
  n, h, w = x.shape
  f = h // 16
  return x[:, :16 * f, :16 * f].reshape(n, 16, f, 16, f).mean(axis=(2, 4)).reshape(n, -1)


@functools.lru_cache(maxsize=4)
def digit_classifier(size: int, seed: int = 0):
  """An MLP (256-128-64-10) trained on 75% of scikit-learn's real digits, rendered exactly as the
  image dataset renders them. Returns (classifier, accuracy on the other 25%, features of all 1797)."""
  from sklearn import datasets, model_selection, neural_network  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  images = np.stack([digit_to_rgb(d, size) for d in digits.images]).astype(np.float32) / 255
  x, y = digit_features(images), digits.target
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
  clf = neural_network.MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-3, max_iter=400, random_state=seed)
  clf.fit(x_tr, y_tr)
  return clf, float(clf.score(x_te, y_te)), x


def penultimate(clf, x_NK) -> np.ndarray:
  """The classifier's last hidden layer (ReLU): the features of the Fréchet distance."""
  h = np.asarray(x_NK, np.float64)
  for w, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
    h = np.maximum(h @ w + b, 0.0)
  return h


def class_spread(x_NK, labels_N) -> float:
  """Mean over classes (with 2 or more items) of the mean pairwise Euclidean distance between the
  class's feature vectors: how much the items of one class differ from each other."""
  x, labels = np.asarray(x_NK, np.float64), np.asarray(labels_N)
  per_class = []
  for c in np.unique(labels):
    xc = x[labels == c]
    if len(xc) < 2:
      continue
    d = np.sqrt(np.maximum(((xc[:, None, :] - xc[None, :, :])**2).sum(-1), 0.0))
    per_class.append(d.sum() / (len(xc) * (len(xc) - 1)))
  return float(np.mean(per_class)) if per_class else float('nan')


def frechet(a_NK, b_NK) -> float:
  """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between Gaussians fitted to two feature sets."""
  from scipy import linalg  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(a_NK, np.float64), np.asarray(b_NK, np.float64)
  # ReLU features have dead units (zero variance): a tiny ridge keeps the product's root defined.
  ridge = 1e-6 * np.eye(a.shape[1])
  ca, cb = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
  root = linalg.sqrtm(ca @ cb)
  root = root.real if np.iscomplexobj(root) else root
  return float(np.sum((a.mean(0) - b.mean(0))**2) + np.trace(ca + cb - 2.0 * root))


@functools.lru_cache(maxsize=4)
def _encoder_feature_fn(tok):
  """A jitted (params, images_NHWC) -> [N, F] for one image tokenizer (one compile per tokenizer)."""
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.tokenizers import image as image_tok  # pylint: disable=import-outside-toplevel
  layer = 'enc_res'  # Autoencoder.encode's last hidden layer: the one the FSQ projection reads.

  @jax.jit
  def fn(params, x_NHWC):
    _, state = tok.model.apply(params, x_NHWC, method=image_tok.Autoencoder.encode, mutable=['intermediates'],
                               capture_intermediates=lambda mdl, _: mdl.name == layer)
    h_NhwF = state['intermediates'][layer]['__call__'][0]
    return h_NhwF.mean(axis=(1, 2))
  return fn


def has_encoder_features(tok) -> bool:
  from tmdm.tokenizers import image as image_tok  # pylint: disable=import-outside-toplevel
  return isinstance(tok, image_tok.ImageTokenizer)


def encoder_features(tok, images_NHWC) -> np.ndarray:
  """The image tokenizer's own features of images in [0, 1]: its encoder's last hidden layer (`width`
  channels at the latent resolution, before the projection to the FSQ latent), averaged over
  positions -> [N, width] float64. Like Inception's pool features for FID: what the tokenizer sees of
  colour, edges and texture, not where. (The FSQ latent itself has len(levels) = 4 channels: averaged
  it is blind to most content, flattened (8 x 8 x 4 = 256) it has more dimensions than eval.num samples.)
  On the demo's digits (width 32, 163 held-out) the nearest held-out neighbour in these features has
  the same digit for 52% (chance 10%): 2 x 2 pooling gives 77% with 4 x the dimensions, the flattened
  latent 94% with 256, the pooled latent 31%."""
  from tmdm.tokenizers import learned  # pylint: disable=import-outside-toplevel
  fn = _encoder_feature_fn(tok)
  out = learned.batched_apply(lambda x: fn(tok.params, x), np.asarray(images_NHWC, np.float32), tok.batch)
  return np.zeros((0, tok.cfg.width), np.float64) if out is None else np.asarray(out, np.float64)


def mean_pairwise_distance(x_NK) -> float:
  """Mean Euclidean distance over all pairs of distinct items (nan for fewer than 2)."""
  x = np.asarray(x_NK, np.float64)
  if len(x) < 2:
    return float('nan')
  d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :])**2).sum(-1), 0.0))
  return float(d.sum() / (len(x) * (len(x) - 1)))


def spread(gen_NK, real_NK) -> float:
  """Mean pairwise feature distance among generated items over that among real ones: 1 as varied as
  the data, near 0 one image for every prompt, above 1 more varied than the data (e.g. noise)."""
  return mean_pairwise_distance(gen_NK) / max(mean_pairwise_distance(real_NK), 1e-12)


def _same_caption(captions) -> np.ndarray:
  norm = [' '.join(words(c)) for c in captions]
  return np.array([[a == b for b in norm] for a in norm])


def nn_caption_match(gen_NK, real_NK, captions_N) -> tuple[np.ndarray, float]:
  """Generated item i was asked for by captions_N[i], the caption of real item i. Per item: whether the
  real item nearest to it in feature space has the same caption (words compared, lowercase); and
  chance, the expected hit rate of a real item drawn at random (mean share of items sharing the
  caption). Exact caption equality: two phrasings of one content count as different, for the chance
  as for the model."""
  gen, real = np.asarray(gen_NK, np.float64), np.asarray(real_NK, np.float64)
  same = _same_caption(captions_N)
  nearest = np.argmin(((gen[:, None, :] - real[None, :, :])**2).sum(-1), axis=1)
  return same[np.arange(len(gen)), nearest].astype(np.float64), float(same.mean())


def nn_caption_match_real(real_NK, captions_N) -> float:
  """The same for the real items themselves, leaving each out of its own neighbours: how often two
  nearest real images share a caption, i.e. how far these features tell the captions apart at all."""
  real = np.asarray(real_NK, np.float64)
  same = _same_caption(captions_N)
  d = ((real[:, None, :] - real[None, :, :])**2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return float(np.mean(same[np.arange(len(real)), np.argmin(d, axis=1)]))


def trim_silence(logmel_FM, below_peak: float = 4.0) -> np.ndarray:
  """Frames from the first to the last whose mean log-mel is within `below_peak` nats of the loudest
  (4 nats of magnitude is about 35 dB): the padding silence of a clip says nothing about its speech."""
  energy = logmel_FM.mean(axis=-1)
  loud = np.nonzero(energy >= energy.max() - below_peak)[0]
  return logmel_FM[loud[0]:loud[-1] + 1]


def dtw_distance(a_FM, b_GM) -> float:
  """Mean |log-mel difference| (over bands) of the frame pairs on the cheapest monotone alignment of
  two sequences (dynamic time warping; steps (1,0), (0,1), (1,1)); computed by anti-diagonals."""
  a, b = np.asarray(a_FM, np.float64), np.asarray(b_GM, np.float64)
  F, G = len(a), len(b)
  cost = np.abs(a[:, None, :] - b[None, :, :]).mean(-1)
  total = np.full((F + 1, G + 1), np.inf)
  length = np.zeros((F + 1, G + 1))
  total[0, 0] = 0.0
  for k in range(2, F + G + 1):
    i = np.arange(max(1, k - G), min(F, k - 1) + 1)
    j = k - i
    prev = np.stack([total[i - 1, j], total[i, j - 1], total[i - 1, j - 1]])
    prev_len = np.stack([length[i - 1, j], length[i, j - 1], length[i - 1, j - 1]])
    pick = np.argmin(prev, axis=0)
    total[i, j] = cost[i - 1, j - 1] + prev[pick, np.arange(len(i))]
    length[i, j] = prev_len[pick, np.arange(len(i))] + 1
  return float(total[F, G] / length[F, G])


def words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
  """(word-level edit distance, reference words)."""
  h, r = words(hyp), words(ref)
  row = list(range(len(h) + 1))
  for i, rw in enumerate(r, 1):
    prev, row[0] = row[0], i
    for j, hw in enumerate(h, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
  return row[-1], len(r)


def digit_in(text: str) -> int:
  """The first digit a caption names (word or numeral), or -1."""
  for w in words(text):
    if w in NUMBER_WORDS:
      return NUMBER_WORDS.index(w)
    if len(w) == 1 and w.isdigit():
      return int(w)
  return -1


def token_accuracy(hyp_ids, ref_ids) -> float:
  """Share of the reference's positions holding the same id (the caption slot has its length)."""
  hyp, ref = np.asarray(hyp_ids), np.asarray(ref_ids)
  n = min(len(hyp), len(ref))
  return float(np.sum(hyp[:n] == ref[:n]) / max(len(ref), 1))
