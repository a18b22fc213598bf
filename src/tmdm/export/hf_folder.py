"""`tmdm export`: a trained run as a Hugging Face-style folder; `tmdm import`: such a folder back as a run.

The folder (local or a URL):
  config.json                   model_type 'tmdm', the architecture, CompleteP's multipliers (stated, not
                                folded), the vocabulary layout, the diffusion schedules, auto_map
  generation_config.json        the run's sampler settings per task (sample.* of its config)
  model-0000i-of-0000n.safetensors, model.safetensors.index.json
                                the weights under torch names (NAMES), float32 or bfloat16
  configuration_tmdm.py, modeling_tmdm.py
                                the PyTorch reference (hf/), loaded with trust_remote_code
  tokenizer.model               the text SentencePiece model
  image_tokenizer/, audio_tokenizer/
                                tokenizer.json (tmdm's settings and weight hash) and model.safetensors
  tmdm_config.json              the run's whole config (what `tmdm import` rebuilds the run from)
  README.md                     the model card: data, steps, tokens, validation ELBO, latest eval numbers

Several processes: every process restores its shards of the checkpoint and takes part in gathering
one leaf at a time (sharding.fetch); process 0 writes. No host holds more than one leaf and one
safetensors file (at most `max_shard_bytes`) of the model at once.

safetensors is a small documented format (an 8-byte little-endian header size, a JSON header of
name -> dtype, shape and byte offsets, the raw little-endian tensors); it is written and read here
(`to_safetensors`, `from_safetensors`), and tests read it back with the safetensors package.
"""

import hashlib
import json
import logging
import os
import struct

import jax
import ml_dtypes
import numpy as np

from tmdm import errors, storage, vocab as vocab_lib
from tmdm.data import mixture, store
from tmdm.generation import generate, tasks as tasks_lib
from tmdm.parallel import sharding as sharding_lib
from tmdm.training import checkpoint as checkpoint_lib, metrics as metrics_lib, setup as setup_lib
from tmdm.training import state as train_state

log = logging.getLogger('tmdm')

HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hf')
REFERENCE_FILES = ('configuration_tmdm.py', 'modeling_tmdm.py')
INDEX = 'model.safetensors.index.json'
TMDM_CONFIG = 'tmdm_config.json'
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
_ST_DTYPE = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16', 'int32': 'I32', 'int64': 'I64',
             'uint8': 'U8', 'bool': 'BOOL'}
_NP_DTYPE = {v: k for k, v in _ST_DTYPE.items()}


# The name mapping: tmdm's parameter (within a block for the layer ones) -> (torch name, tmdm -> torch,
# torch -> tmdm given the tmdm shape). Torch linear weights are [out, in]; tmdm's attention weights keep
# heads apart, so the head weights are flattened [D, H, K] <-> [H K, D] and [H, K, D] <-> [D, H K].
_HEADS_IN = (lambda w: w.reshape(w.shape[0], -1).T), (lambda t, shape: t.T.reshape(shape))
_HEADS_OUT = (lambda w: w.reshape(-1, w.shape[-1]).T), (lambda t, shape: t.T.reshape(shape))
_SAME = (lambda w: w), (lambda t, shape: t.reshape(shape))
_T = (lambda w: w.T), (lambda t, shape: t.T.reshape(shape))
LAYER_NAMES = {
    ('attn', 'wq'): ('self_attn.q_proj.weight', *_HEADS_IN),
    ('attn', 'wk'): ('self_attn.k_proj.weight', *_HEADS_IN),
    ('attn', 'wv'): ('self_attn.v_proj.weight', *_HEADS_IN),
    ('attn', 'wo'): ('self_attn.o_proj.weight', *_HEADS_OUT),
    ('attn_norm', 'scale'): ('input_layernorm.weight', *_SAME),
    ('mlp_norm', 'scale'): ('post_attention_layernorm.weight', *_SAME),
    ('mlp', 'w_gate'): ('mlp.gate_proj.weight', *_T),
    ('mlp', 'w_up'): ('mlp.up_proj.weight', *_T),
    ('mlp', 'w_down'): ('mlp.down_proj.weight', *_T),
}
TOP_NAMES = {
    ('embed',): ('model.embed_tokens.weight', *_SAME),
    ('unembed',): ('lm_head.weight', *_T),
    ('final_norm', 'scale'): ('model.norm.weight', *_SAME),
}


def _key(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)


def leaf_tensors(path: tuple, shape) -> list:
  """[(torch name, layer index or None, to_torch, from_torch)] of one parameter leaf: a scanned leaf
  ('blocks', 'block', ...) stacks every layer on its first axis, an unscanned one is 'block_I'."""
  if path in TOP_NAMES:
    name, fwd, back = TOP_NAMES[path]
    return [(name, None, fwd, back)]
  if path[:2] == ('blocks', 'block') and path[2:] in LAYER_NAMES:
    name, fwd, back = LAYER_NAMES[path[2:]]
    return [(f'model.layers.{i}.{name}', i, fwd, back) for i in range(shape[0])]
  if path[0].startswith('block_') and path[1:] in LAYER_NAMES:
    name, fwd, back = LAYER_NAMES[path[1:]]
    return [(f'model.layers.{int(path[0][6:])}.{name}', None, fwd, back)]
  raise errors.ConfigError(f'parameter {"/".join(path)} has no torch name (time_conditioning is not exported)')


# safetensors, written and read here.
def to_safetensors(tensors: dict, metadata: dict | None = None) -> bytes:
  header, blobs, offset = {}, [], 0
  for name, array in tensors.items():
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': _ST_DTYPE[array.dtype.name], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  if metadata:
    header['__metadata__'] = {k: str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # The data starts 8-byte aligned.
  return struct.pack('<Q', len(text)) + text + b''.join(blobs)


def from_safetensors(data: bytes) -> dict:
  """name -> numpy array (bfloat16 as ml_dtypes.bfloat16)."""
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + size])
  out, base = {}, 8 + size
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = ml_dtypes.bfloat16 if entry['dtype'] == 'BF16' else np.dtype(_NP_DTYPE[entry['dtype']])
    lo, hi = entry['data_offsets']
    out[name] = np.frombuffer(data[base + lo:base + hi], dtype=dtype).reshape(entry['shape'])
  return out


def _restore(workdir, step, weights, overrides):
  """(Setup, params, step, 'ema' or 'params') of a run's checkpoint, sharded like the model."""
  cfg, ckpt, step = generate.checkpoint_config(workdir, overrides, step=step)
  if step is None:
    raise errors.ConfigError(f'{workdir} has no checkpoint to export')
  generate.fit_mesh(cfg)
  s = setup_lib.build(cfg, with_optimizer=False)
  if s.model_cfg.time_conditioning:
    raise errors.ConfigError('model.time_conditioning runs are not exported (the reference has no time input)')
  want_ema = weights == 'ema' or (not weights and cfg.sample.ema)
  try:
    params, step, used_ema = ckpt.restore_params(train_state.abstract_params(s.model, s.sharder, s.seq_len),
                                                 ema=want_ema, step=step)
  finally:
    ckpt.close()
  if weights == 'ema' and not used_ema:
    raise errors.ConfigError(f'checkpoint {step} of {workdir} keeps no weight EMA (optim.ema is 0): use --weights=params')
  return s, params, step, 'ema' if used_ema else 'params'


def hf_config(s: setup_lib.Setup, step: int, weights: str, dtype: str, tokens_per_item: dict) -> dict:
  c, v, d = s.model_cfg, s.vocab, s.diffusion
  return {
      'model_type': 'tmdm', 'architectures': ['TmdmForMaskedDiffusion'],
      'auto_map': {'AutoConfig': 'configuration_tmdm.TmdmConfig', 'AutoModel': 'modeling_tmdm.TmdmForMaskedDiffusion'},
      'vocab_size': v.size, 'hidden_size': c.d_model, 'num_hidden_layers': c.n_layers,
      'num_attention_heads': c.n_heads, 'head_dim': c.d_head, 'intermediate_size': c.d_ff,
      'rope_theta': c.rope_theta, 'rms_norm_eps': c.norm_eps, 'attention_scale': c.attn_scale,
      'residual_multiplier': c.residual_mult, 'logits_multiplier': c.output_mult,
      'max_position_embeddings': s.seq_len, 'tie_word_embeddings': False, 'dtype': dtype,
      'vocab_layout': {
          'specials': {name: v.id(name) for name in vocab_lib.SPECIALS},
          'mask_token_id': v.mask_id, 'pad_token_id': v.pad_id,
          'ranges': {name: list(v.range(m)) for m, name in enumerate(vocab_lib.MODALITIES)},
          'used': v.used,
      },
      'diffusion': {'schedules': dict(zip(vocab_lib.MODALITIES, d.schedules)), 'poly_power': d.poly_power,
                    'loglinear_eps': d.loglinear_eps},
      'tokens_per_item': tokens_per_item,
      'tmdm': {'step': step, 'weights': weights, 'parameterization': c.parameterization,
               'trained_compute_dtype': c.compute_dtype, 'params': c.num_params},
  }


def generation_config(cfg) -> dict:
  """The run's sampler settings: the text task's (sample.*) and each cross-modal task's."""
  keys = ('sampler', 'steps', 'temperature', 'top_p', 'schedule', 'threshold', 'block_len', 'guidance',
          'guidance_schedule', 'entropy_budget', 'cache', 'refresh')
  out = {'tasks': {task: {k: tasks_lib.sampler_section(cfg.sample, task)[k] for k in keys} for task in tasks_lib.TASKS}}
  out.update(text_len=cfg.sample.text_len, infill_len=cfg.sample.infill_len, caption_len=cfg.sample.caption_len)
  return out


def _tokenizer_folders(cfg) -> dict:
  """{'text': spm.model path, 'image' / 'audio': tokenizer folder} of the run's prepared data, where present."""
  out = {}
  spm = storage.join(mixture.root(cfg, 'text'), 'spm.model')
  if storage.isfile(spm):
    out['text'] = spm
  for kind in ('image', 'audio'):
    try:
      entry = store.read_manifest(mixture.root(cfg, kind))['tokenizers'][kind]
    except store.DataError:
      continue
    out[kind] = storage.join(mixture.root(cfg, kind), entry['file'])
  if 'text' not in out:  # The pair datasets keep a copy of the text tokenizer too.
    for kind in ('image', 'audio'):
      spm = storage.join(mixture.root(cfg, kind), 'spm.model')
      if storage.isfile(spm):
        out['text'] = spm
        break
  return out


def _media_tokenizer_files(folder) -> dict:
  """{file name: bytes} of an image / audio tokenizer: its tokenizer.json and its weights as safetensors."""
  from tmdm.tokenizers import registry  # pylint: disable=import-outside-toplevel  (flax models)
  tok = registry.load(folder)
  flat = {'/'.join(_key(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tok.params)}
  return {'tokenizer.json': storage.read_bytes(storage.join(folder, 'tokenizer.json')),
          'model.safetensors': to_safetensors(flat, {'format': 'np'})}


def _plan_files(entries, dtype, max_shard_bytes):
  """Group (leaf, tensor) entries into files of at most max_shard_bytes (one tensor may exceed it)."""
  size = np.dtype(DTYPES[dtype]).itemsize
  files, current, used = [], [], 0
  for entry in entries:
    n = int(np.prod(entry['shape'])) * size
    if current and used + n > max_shard_bytes:
      files.append(current)
      current, used = [], 0
    current.append(entry)
    used += n
  if current:
    files.append(current)
  return files


def write_weights(params, out, dtype: str, max_shard_bytes: int) -> dict:
  """Writes the safetensors files and their index; returns {torch name: file}. Leaves are fetched one
  at a time in file order (every process takes part), and process 0 writes each file when it is full."""
  leaves = {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  entries = []
  for path in sorted(leaves, key=lambda p: (p[0] != 'embed', p)):
    shape = leaves[path].shape
    for name, layer, fwd, _ in leaf_tensors(path, shape):
      entries.append({'path': path, 'name': name, 'layer': layer, 'fwd': fwd,
                      'shape': shape[1:] if layer is not None else shape})
  files = _plan_files(entries, dtype, max_shard_bytes)
  names = [f'model-{i + 1:05d}-of-{len(files):05d}.safetensors' for i in range(len(files))]
  weight_map, total, fetched = {}, 0, {}
  primary = jax.process_index() == 0
  for file_name, group in zip(names, files):
    tensors = {}
    for e in group:
      if e['path'] not in fetched:
        fetched.clear()  # One leaf on the host at a time.
        fetched[e['path']] = sharding_lib.fetch(leaves[e['path']])
      value = fetched[e['path']]
      value = value[e['layer']] if e['layer'] is not None else value
      tensors[e['name']] = np.ascontiguousarray(e['fwd'](value)).astype(DTYPES[dtype])
      weight_map[e['name']] = file_name
      total += tensors[e['name']].nbytes
    if primary:
      storage.write_bytes(storage.join(out, file_name), to_safetensors(tensors, {'format': 'pt'}))
    del tensors
  if primary:
    index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}
    storage.write_text(storage.join(out, INDEX), json.dumps(index, indent=2))
  return weight_map


def read_weights(folder) -> dict:
  """torch name -> numpy array of an exported folder (every file its index lists)."""
  index = json.loads(storage.read_text(storage.join(folder, INDEX)))
  out = {}
  for file_name in sorted(set(index['weight_map'].values())):
    out.update(from_safetensors(storage.read_bytes(storage.join(folder, file_name))))
  missing = sorted(set(index['weight_map']) - set(out))
  if missing:
    raise errors.ConfigError(f'{folder}: {len(missing)} tensors of {INDEX} are in no file (e.g. {missing[0]})')
  return out


def params_from_tensors(tensors: dict, abstract_params) -> dict:
  """The tmdm parameter tree (float32 numpy) of exported tensors: the inverse of the name mapping."""
  def one(path, leaf):
    parts = leaf_tensors(_key(path), leaf.shape)
    missing = [name for name, *_ in parts if name not in tensors]
    if missing:
      raise errors.ConfigError(f'the exported weights lack {missing[0]} (another model shape?)')
    shape = leaf.shape[1:] if parts[0][1] is not None else leaf.shape
    values = [back(np.asarray(tensors[name], np.float32), shape) for name, _, _, back in parts]
    return np.stack(values) if parts[0][1] is not None else values[0]
  return jax.tree_util.tree_map_with_path(one, abstract_params)


def _latest_eval(workdir) -> tuple[dict, dict]:
  """(the last validation row's ELBO per dataset, mode and modality; the newest eval_STEP.json)."""
  elbo = {}
  try:
    rows = metrics_lib.read_metrics(workdir)
  except (OSError, ValueError):
    rows = []
  for row in rows:
    found = {k[len('eval/'):]: v for k, v in row.items() if k.startswith('eval/') and '/loss/' in k
             and not k.endswith('/focus')}
    if found:
      elbo = dict(found, step=row['step'])
  evals = sorted((int(n[5:-5]), n) for n in storage.listdir(workdir)
                 if n.startswith('eval_') and n.endswith('.json') and n[5:-5].isdigit())
  latest = json.loads(storage.read_text(storage.join(workdir, evals[-1][1]))) if evals else {}
  return elbo, latest


def model_card(cfg, hf: dict, elbo: dict, evals: dict, tokenizers: dict) -> str:
  t, m = cfg.train, hf['tmdm']
  step = m['step']
  data = [f'- text: `{cfg.data.text_sources}` ({cfg.data.text_name}), mixture weight {cfg.data.mix_text}']
  if 'image' in tokenizers:
    data.append(f'- image-text: `{cfg.image.sources}` ({cfg.image.name}), mixture weight {cfg.data.mix_image}, '
                f'{hf["tokens_per_item"].get("image")} codes per image')
  if 'audio' in tokenizers:
    data.append(f'- audio-text: `{cfg.audio.sources}` ({cfg.audio.name}), mixture weight {cfg.data.mix_audio}, '
                f'{hf["tokens_per_item"].get("audio")} codes per clip')
  lines = [
      '---', 'library_name: transformers', 'tags: [tmdm, masked-diffusion, text, image, audio]', '---', '',
      f'# tmdm masked-diffusion model (step {step})', '',
      'A bidirectional masked-diffusion Transformer over one joint vocabulary of text, image and audio tokens,',
      'trained from scratch with tmdm. The folder holds the weights (safetensors), the PyTorch reference',
      '(`modeling_tmdm.py`, loaded with `trust_remote_code=True`) and the tokenizers.', '',
      '## Model', '',
      f'- {m["params"]:,} parameters: {hf["num_hidden_layers"]} layers, width {hf["hidden_size"]}, '
      f'{hf["num_attention_heads"]} heads of {hf["head_dim"]}, SwiGLU {hf["intermediate_size"]}',
      f'- joint vocabulary of {hf["vocab_size"]} ids (ranges in config.json `vocab_layout`), rows of '
      f'{hf["max_position_embeddings"]} positions',
      f'- parameterization {m["parameterization"]}: residual x {hf["residual_multiplier"]:.4g}, logits x '
      f'{hf["logits_multiplier"]:.4g}, attention scale {hf["attention_scale"]:.4g}',
      f'- exported weights: {m["weights"]} in {hf["dtype"]} (trained in {m["trained_compute_dtype"]} compute)', '',
      '## Training', '',
      f'- {step:,} steps of {t.batch_size} rows x {cfg.data.seq_len} positions: {step * t.batch_size * cfg.data.seq_len:,} '
      'tokens', *data, '',
  ]
  if elbo:
    lines += [f'## Validation ELBO (nats per token, step {elbo["step"]})', '', '| data / mode / modality | loss |',
              '|---|---|']
    lines += [f'| {k} | {v:.4f} |' for k, v in sorted(elbo.items()) if k != 'step']
    lines.append('')
  if evals:
    lines += [f'## Latest evaluation (`tmdm eval`, step {evals.get("step")})', '', '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v:.4g} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in evals.items()
              if k != 'step' and isinstance(v, (int, float))]
    lines.append('')
  lines += [
      '## Use', '', '```python', 'from transformers import AutoModel',
      'model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)',
      "canvas = model.canvas('t2i', text_ids=[...])  # SentencePiece ids of tokenizer.model",
      "tokens = model.sample(canvas, **generation_config['tasks']['t2i'])", '```', '',
      'Back into tmdm: `tmdm import --from=FOLDER --workdir=RUN`.', '']
  return '\n'.join(lines)


def export(workdir, out, *, step=None, weights='', dtype='float32', max_shard_bytes=1 << 30, overrides=()) -> dict:
  """Writes the folder; returns its config.json."""
  if dtype not in DTYPES:
    raise errors.ConfigError(f'--dtype must be one of {", ".join(DTYPES)} (got {dtype!r})')
  if weights not in ('', 'ema', 'params'):
    raise errors.ConfigError(f'--weights must be ema or params (got {weights!r})')
  s, params, step, used = _restore(workdir, step, weights, overrides)
  cfg = s.cfg
  tokenizers = _tokenizer_folders(cfg)
  media = [kind for kind in tokenizers if kind != 'text']
  tokens_per_item = {kind: store.read_manifest(mixture.root(cfg, kind))['tokenizers'][kind]['tokens_per_item']
                     for kind in media}
  hf = hf_config(s, step, used, dtype, tokens_per_item)
  if jax.process_index() == 0:
    storage.makedirs(out)
    for kind in media:
      storage.makedirs(storage.join(out, f'{kind}_tokenizer'))
  write_weights(params, out, dtype, max_shard_bytes)
  if jax.process_index() == 0:
    storage.write_text(storage.join(out, 'config.json'), json.dumps(hf, indent=2))
    storage.write_text(storage.join(out, 'generation_config.json'), json.dumps(generation_config(cfg), indent=2))
    storage.write_text(storage.join(out, TMDM_CONFIG), json.dumps(cfg.to_dict(), indent=2))
    for name in REFERENCE_FILES:
      with open(os.path.join(HF_DIR, name), encoding='utf-8') as f:
        storage.write_text(storage.join(out, name), f.read())
    if 'text' in tokenizers:
      storage.write_bytes(storage.join(out, 'tokenizer.model'), storage.read_bytes(tokenizers['text']))
    for kind in media:
      for name, data in _media_tokenizer_files(tokenizers[kind]).items():
        storage.write_bytes(storage.join(out, f'{kind}_tokenizer', name), data)
    elbo, evals = _latest_eval(workdir)
    storage.write_text(storage.join(out, 'README.md'), model_card(cfg, hf, elbo, evals, tokenizers))
  log.info('exported step %d of %s (%s weights, %s) to %s', step, workdir, used, dtype, out)
  return hf


# Import.
def _unflatten(flat: dict) -> dict:
  out = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value)
  return out


def exported_tokenizer_hashes(src) -> dict:
  """{dataset: {field: sha256}} of an export's tokenizers, as a run's checkpoint meta records them."""
  spm = hashlib.sha256(storage.read_bytes(storage.join(src, 'tokenizer.model'))).hexdigest()
  out = {'text': {'text': spm}}
  for kind in ('image', 'audio'):
    path = storage.join(src, f'{kind}_tokenizer', 'tokenizer.json')
    if storage.isfile(path):
      out[kind] = {'text': spm, kind: json.loads(storage.read_text(path))['sha256']}
  return out


def _check_data_root(cfg, hashes: dict):
  """The prepared data at cfg.data.root must hold the exported tokenizers (one-line error otherwise)."""
  for name, fields in hashes.items():
    root = mixture.root(cfg, name)
    if name not in mixture.weights(cfg) and not storage.isfile(storage.join(root, store.MANIFEST)):
      continue
    have = store.read_manifest(root)['tokenizers']
    for field, digest in fields.items():
      if have.get(field, {}).get('sha256') != digest:
        raise errors.ConfigError(f'the {field} tokenizer of {root} is not the exported one (sha256 '
                                 f'{have.get(field, {}).get("sha256", "none")[:12]}... vs {digest[:12]}...)')


def _import_tokenizers(src, cfg, data_root):
  """Writes the exported tokenizers as a tmdm data root of tokenizers only (no records): sampling from
  prompts and inputs works, training and held-out evaluation need the data (`--data_root`)."""
  from tmdm.tokenizers import learned, registry  # pylint: disable=import-outside-toplevel  (flax models)
  spm_bytes = storage.read_bytes(storage.join(src, 'tokenizer.model'))
  text_entry = {'name': 'sentencepiece', 'file': 'spm.model', 'vocab_size': cfg.vocab.text_size,
                'sha256': hashlib.sha256(spm_bytes).hexdigest()}
  text_root = storage.join(data_root, cfg.data.text_name)
  storage.makedirs(text_root)
  storage.write_bytes(storage.join(text_root, 'spm.model'), spm_bytes)
  store.write_manifest(text_root, modality='text', fields=['text'], tokenizers={'text': text_entry}, splits={},
                       source={'imported_from': src})
  for kind in ('image', 'audio'):
    folder = storage.join(src, f'{kind}_tokenizer')
    if not storage.isfile(storage.join(folder, 'tokenizer.json')):
      continue
    meta = json.loads(storage.read_text(storage.join(folder, 'tokenizer.json')))
    params = _unflatten(from_safetensors(storage.read_bytes(storage.join(folder, 'model.safetensors'))))
    root = mixture.root(cfg, kind)
    storage.makedirs(root)
    digest = learned.save(storage.join(root, 'tokenizer'), {k: v for k, v in meta.items() if k != 'sha256'}, params)
    if digest != meta['sha256']:
      raise errors.ConfigError(f'{folder}: the {kind} tokenizer weights do not match the hash in tokenizer.json')
    tok = registry.load(storage.join(root, 'tokenizer'))
    storage.write_bytes(storage.join(root, 'spm.model'), spm_bytes)
    store.write_manifest(root, modality=kind, fields=['text', kind],
                         tokenizers={'text': text_entry, kind: tok.manifest_entry('tokenizer')}, splits={},
                         source={'imported_from': src})


def import_folder(src, workdir, *, data_root='', overrides=()) -> int:
  """`tmdm import`: WORKDIR/config.json (the exported run's config, `overrides` applied) and a step-0
  checkpoint holding the exported weights, a fresh optimizer state and no data position (training
  starts at the data's beginning: fine-tuning from a release). data_root: the prepared data to train
  and evaluate on (its tokenizers must be the exported ones); without it, WORKDIR/data holds the
  exported tokenizers only. Returns the step the weights were exported from."""
  if storage.exists(storage.join(workdir, 'checkpoints')) or storage.isfile(storage.join(workdir, 'config.json')):
    raise errors.ConfigError(f'{workdir} is already a run: import into a new --workdir')
  for name in ('config.json', TMDM_CONFIG, INDEX):
    if not storage.isfile(storage.join(src, name)):
      raise errors.ConfigError(f'{src} is not a tmdm export ({name} is missing)')
  hf = json.loads(storage.read_text(storage.join(src, 'config.json')))
  cfg = generate.config_from_dict(json.loads(storage.read_text(storage.join(src, TMDM_CONFIG))), overrides)
  cfg.checkpoint.dir = ''
  cfg.data.root = data_root or storage.join(storage.absolute(workdir), 'data')
  hashes = exported_tokenizer_hashes(src)
  if data_root:
    _check_data_root(cfg, hashes)
  elif jax.process_index() == 0:
    _import_tokenizers(src, cfg, cfg.data.root)
  generate.fit_mesh(cfg)
  s = setup_lib.build(cfg)
  abstract = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  params = params_from_tensors(read_weights(src), abstract.params)
  if hf['vocab_size'] != s.vocab.size or hf['num_hidden_layers'] != s.model_cfg.n_layers:
    raise errors.ConfigError(f'{src}: config.json does not describe the model of {TMDM_CONFIG}')
  state = train_state.create(s.model, s.tx, s.sharder, s.seq_len, cfg.seed)
  params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract.params)
  # The optimizer state made from the imported weights (a weight EMA starts at them, not at the init).
  opt_sharding = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len).opt_state
  state = state.replace(params=params, opt_state=jax.jit(s.tx.init, out_shardings=opt_sharding)(params))
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, 'config.json'), json.dumps(cfg.to_dict(), indent=2))
  ckpt = checkpoint_lib.Checkpointer(storage.join(workdir, 'checkpoints'), keep=cfg.checkpoint.keep, async_save=False)
  try:
    meta = {'config': cfg.to_dict(), 'tokenizers': hashes, 'imported_from': src,
            'exported_step': hf['tmdm']['step'], 'exported_weights': hf['tmdm']['weights']}
    ckpt.save(0, state, None, 0, cfg.to_dict(), meta)
  finally:
    ckpt.close()
  log.info('imported %s (step %d, %s weights) into %s', src, hf['tmdm']['step'], hf['tmdm']['weights'], workdir)
  return hf['tmdm']['step']
