"""The logical/physical batch SDE scaler (optim.scale_hyperparams, optim.plan, optim.build): the
formulas, their invariants, the B_crit check, CompleteP on top, and microbatching's orthogonality."""

import logging
import math
import os

import jax
import numpy as np
import optax
import pytest

from tmdm import errors, optim, vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.model import config as model_config, transformer
from tmdm.parallel import sharding
from tmdm.training import state as train_state
from helpers import REPO, random_batch, tiny_config, trainer

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
BASE = {'lr': 3e-3, 'b1': 0.9, 'b2': 0.95, 'eps': 1e-8, 'weight_decay': 0.1, 'ema': 0.999}


def test_kappa_one_leaves_every_hyperparameter_unchanged():
  for kwargs in (dict(batch=256, tokens=13e9, base_batch=256, base_tokens=13e9),
                 dict(batch=48, tokens=1e6, base_batch=7, base_tokens=3e4, logical_batch=48)):
    for rule in optim.WEIGHT_DECAY_RULES:
      out = optim.scale_hyperparams(BASE, weight_decay_rule=rule, **kwargs)
      assert out['kappa'] == 1.0 and out['logical_batch'] == kwargs['batch']
      assert {k: out[k] for k in BASE} == BASE


@pytest.mark.parametrize('rule, wd_power', [('sqrt', 0.5), ('linear', 1.0), ('constant', 0.0)])
def test_formulas_match_a_direct_float64_computation(rule, wd_power):
  rng = np.random.default_rng(0)
  for _ in range(50):
    batch, base_batch = rng.integers(1, 4096, 2)
    tokens, base_tokens = 10.0**rng.uniform(5, 13, 2)
    gamma = rng.uniform(0.0, 1.0)
    out = optim.scale_hyperparams(BASE, batch=int(batch), tokens=tokens, base_batch=int(base_batch),
                                  base_tokens=base_tokens, gamma=gamma, weight_decay_rule=rule)
    logical = np.float64(base_batch) * (np.float64(tokens) / np.float64(base_tokens))**np.float64(gamma)
    kappa = np.float64(batch) / logical
    want = {'lr': BASE['lr'] * np.sqrt(kappa), 'b1': np.float64(0.9)**kappa, 'b2': np.float64(0.95)**kappa,
            'eps': BASE['eps'] / np.sqrt(kappa), 'weight_decay': BASE['weight_decay'] * kappa**wd_power,
            'ema': np.float64(0.999)**kappa, 'kappa': kappa, 'logical_batch': logical}
    for k, v in want.items():
      if v == 0.0:  # beta**kappa underflowed in float64: clamped to the smallest positive float
        assert out[k] == math.ulp(0.0)
      else:
        np.testing.assert_allclose(out[k], v, rtol=1e-12, err_msg=k)


def test_beta_to_the_kappa_stays_in_the_open_unit_interval():
  for kappa in np.concatenate([np.logspace(-30, 8, 400), [1e-300, 1e300]]):
    out = optim.scale_hyperparams(dict(BASE, b1=0.5, b2=0.9999, ema=0.99999), batch=float(kappa), tokens=1.0,
                                  base_batch=1.0, base_tokens=1.0)
    for k in ('b1', 'b2', 'ema'):
      assert 0.0 < out[k] < 1.0, (k, kappa, out[k])
  assert optim.scale_hyperparams(dict(BASE, b1=0.0), batch=5, tokens=1, base_batch=1, base_tokens=1)['b1'] == 0.0


def _plan(cfg):
  return optim.plan(cfg.optim, num_steps=cfg.train.num_steps, batch_size=cfg.train.batch_size,
                    seq_len=cfg.data.seq_len)


def test_critical_batch_warns_only_above_b_crit(caplog):
  cfg = tiny_config()  # D = 50 steps * B * 13 tokens, so B_crit = D / (13 * 25) = 2 B: B > B_crit iff steps < 25
  cfg.optim.s_crit = 25
  for steps, warns in ((24, True), (25, False), (26, False)):
    cfg.train.num_steps = steps
    p = _plan(cfg)
    assert p.critical_batch == pytest.approx(steps * cfg.train.batch_size / 25)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='tmdm'):
      assert optim.check_critical_batch(p, 'warn') is warns
    assert bool(caplog.records) is warns
    if warns:
      assert 'exceeds B_crit = D / (seq_len * optim.s_crit) = 2496 / (13 * 25) = 7.68 sequences' in caplog.text


def test_critical_batch_error_is_one_config_error_line():
  # smoke: 200 steps of 16 x 64 tokens, so B_crit = 200 * 16 / s_crit.
  with pytest.raises(errors.ConfigError) as e:
    config_loader.load(SMOKE, ['--config.optim.s_crit=400', '--config.optim.on_exceeding_crit=error'], num_devices=8)
  assert 'train.batch_size 16 exceeds B_crit' in str(e.value)
  assert '= 8 sequences (200 optimizer steps < 400)' in str(e.value)
  assert '\n' not in str(e.value)
  config_loader.load(SMOKE, ['--config.optim.s_crit=200', '--config.optim.on_exceeding_crit=error'], num_devices=8)
  with pytest.raises(errors.ConfigError, match='round to 1 in float32'):
    config_loader.load(SMOKE, ['--config.optim.logical_batch=1000000000', '--config.optim.b2=0.999'])


def test_unpinned_config_is_its_own_base_and_schedule_is_fixed_in_tokens():
  cfg = config_loader.load(SMOKE)
  p = _plan(cfg)
  assert p.kappa == 1.0 and p.hyper == dict(optim.base_hyperparams(cfg.optim), kappa=1.0)
  # The same horizon at 8x the batch: kappa 8, and the lr schedule at equal tokens is unchanged.
  small, large = tiny_config(), tiny_config()
  for c, (batch, steps) in ((small, (8, 400)), (large, (64, 50))):
    c.optim.update(base_batch=8, base_tokens=400 * 8 * 13, warmup_frac=0.1, max_warmup_steps=30)
    c.train.update(batch_size=batch, num_steps=steps)
  ps, pl = _plan(small), _plan(large)
  assert (ps.kappa, pl.kappa, ps.logical_batch, pl.logical_batch) == (1.0, 8.0, 8.0, 8.0)
  assert ps.warmup_frac == pl.warmup_frac == 30 * 8 * 13 / (400 * 8 * 13)  # cap in logical steps binds
  fs = optim.lr_schedule(small.optim, 400, ps.warmup_frac)
  fl = optim.lr_schedule(large.optim, 50, pl.warmup_frac)
  steps = np.arange(50)
  np.testing.assert_allclose(fs(8 * steps), fl(steps), rtol=1e-6, atol=1e-7)


def _model_and_params(cfg, mesh=(1, 1, 1)):
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  sharder = sharding.Sharder(sharding.make_mesh(mesh))
  mcfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  return vocab, sharder, mcfg, transformer.Transformer(mcfg, sharder)


def test_completep_multipliers_multiply_the_scaled_values():
  """Per group g: adamw(lr sqrt(k) m_lr, b1^k, b2^k, eps / sqrt(k) m_eps, wd sqrt(k) m_wd), and the
  live values in the optimizer state are the scaled base ones."""
  cfg = tiny_config(d_model=80, n_layers=6)  # m_w = 2, m_L = 2 against the preset's 40 / 3
  cfg.optim.update(base_batch=4, base_tokens=1e4, gamma=0.5, clip_norm=0.0, warmup_frac=0.0, decay='constant',
                   eps=1e-3, ema=0.9)
  cfg.train.update(batch_size=16, num_steps=30)
  _, sharder, mcfg, model = _model_and_params(cfg)
  p = _plan(cfg)
  kappa = 16 / (4 * (30 * 16 * 13 / 1e4)**0.5)
  assert p.kappa == pytest.approx(kappa)
  tx = optim.build(cfg.optim, 30, mcfg.group_multipliers(), batch_size=16, seq_len=13)
  params = train_state.create(model, tx, sharder, 13, seed=0).params
  groups = model_config.param_groups(params)
  assert set(jax.tree.leaves(groups)) == set(model_config.GROUPS)

  def reference(g):
    m = mcfg.group_multipliers()[g]
    return optax.adamw(0.003 * kappa**0.5 * m['lr'], b1=0.9**kappa, b2=0.95**kappa, eps=1e-3 / kappa**0.5 * m['eps'],
                       weight_decay=0.1 * kappa**0.5 * m['wd'])
  ref_tx = optax.multi_transform({g: reference(g) for g in model_config.GROUPS}, model_config.param_groups)
  state, ref_state = tx.init(params), ref_tx.init(params)
  step, ref_step = jax.jit(tx.update), jax.jit(ref_tx.update)
  got, want, ema = params, params, params
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    u, state = step(grads, state, got)
    v, ref_state = ref_step(grads, ref_state, want)
    got, want = optax.apply_updates(got, u), optax.apply_updates(want, v)
    ema = jax.tree.map(lambda e, w: 0.9**kappa * e + (1 - 0.9**kappa) * w, ema, want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(optim.ema_params(state)), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  live = jax.device_get(optim.live_hyperparams(state))
  for k, v in p.hyper.items():
    np.testing.assert_allclose(live[k], v, rtol=1e-6, err_msg=k)
  assert mcfg.group_multipliers()['hidden']['lr'] == 0.5  # the multipliers are not all 1


def _updated_params(microbatches, mesh=(2, 2, 2), steps=2):
  cfg = tiny_config()
  cfg.optim.update(warmup_frac=0.0, base_batch=4, base_tokens=1e3)  # kappa = 4: the scaled optimizer
  t = trainer(cfg, mesh, microbatches=microbatches, batch_size=16, seq_len=cfg.data.seq_len)
  vocab, sharder, state, step_fn = t.vocab, t.sharder, t.state, t.step
  with jax.default_matmul_precision('highest'):
    for i in range(steps):
      batch = random_batch(vocab, 16, cfg.data.seq_len, seed=3 + i, modalities=(vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO))
      state, _ = step_fn(state, {k: jax.device_put(v, sharder.batch()) for k, v in batch.items()})
  return jax.device_get(state.params), float(optim.live_hyperparams(state.opt_state)['lr'])


def test_microbatched_update_equals_one_physical_batch():
  """Accumulating k microbatches gives the same optimizer update (not just gradient) as k = 1."""
  ref, lr = _updated_params(1)
  assert lr > 0
  for k in (4,):  # k = 2 passes too; one k keeps the test under ~30 s
    got, _ = _updated_params(k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
      # In units of one step (lr, Adam's update size). Adam divides by |g| + eps, so the few weights
      # whose gradient is ~eps amplify float32 summation-order noise: bound the rms tightly and the
      # max loosely (measured: rms < 1e-5, max 1.3e-3 of a step).
      err = np.abs(a - b) / lr
      name = f'microbatches={k} {jax.tree_util.keystr(path)}'
      assert np.sqrt(np.mean(err**2)) < 1e-4 and err.max() < 1e-2, (name, err.max())
