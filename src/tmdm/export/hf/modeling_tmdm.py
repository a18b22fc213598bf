"""PyTorch reference of the tmdm masked-diffusion Transformer and its samplers (trust_remote_code).

This file is the model's specification for other ecosystems: small on purpose, and checked against
tmdm (its logits to 1e-4 in float32, its greedy samples token for token: tmdm's tests/test_export.py).

  model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
  logits = model(input_ids, segment_ids=..., positions=..., modality=...).logits   # [B, L, V] float32
  canvas = model.canvas('t2i', text_ids=[...])       # or 'text' (prompt ids) / 'i2t' (image codes)
  tokens = model.sample(canvas, steps=16, sampler='confidence', temperature=0.0)

A row is a dict of [B, L] int64 tensors: input_ids (or `tokens`), segment_ids (1.. per packed document,
0: padding), positions (per document, for the rotary embedding), modality (0 text, 1 image, 2 audio:
which ids a position may predict), and for sampling `cond` (1 on the condition, which classifier-free
guidance masks). Legend: B rows, L positions, D hidden size, H heads, K head size, V vocabulary.
"""

import dataclasses
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tmdm import MODALITIES, TmdmConfig


class RMSNorm(nn.Module):

  def __init__(self, size, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(size))
    self.eps = eps

  def forward(self, x):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return x32.to(x.dtype) * self.weight.to(x.dtype)


def rotary(x_BLHK, positions_BL, theta):
  """Rotate-half rotary embedding at per-document positions, computed in float32."""
  half = x_BLHK.shape[-1] // 2
  freq = theta**(-torch.arange(half, dtype=torch.float32, device=x_BLHK.device) / half)
  angle = positions_BL[..., None].float() * freq
  sin, cos = angle.sin()[:, :, None, :], angle.cos()[:, :, None, :]
  x1, x2 = x_BLHK.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BLHK.dtype)


class Attention(nn.Module):

  def __init__(self, c: TmdmConfig):
    super().__init__()
    inner = c.num_attention_heads * c.head_dim
    self.q_proj = nn.Linear(c.hidden_size, inner, bias=False)
    self.k_proj = nn.Linear(c.hidden_size, inner, bias=False)
    self.v_proj = nn.Linear(c.hidden_size, inner, bias=False)
    self.o_proj = nn.Linear(inner, c.hidden_size, bias=False)
    self.heads, self.head_dim, self.scale, self.theta = c.num_attention_heads, c.head_dim, c.attention_scale, c.rope_theta

  def forward(self, x_BLD, positions_BL, mask_B1LL):
    B, L, _ = x_BLD.shape
    split = lambda t: t.view(B, L, self.heads, self.head_dim)
    q = rotary(split(self.q_proj(x_BLD)), positions_BL, self.theta)
    k = rotary(split(self.k_proj(x_BLD)), positions_BL, self.theta)
    v = split(self.v_proj(x_BLD))
    heads = lambda t: t.transpose(1, 2)  # [B, H, L, K]
    out = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask_B1LL,
                                                     scale=self.scale)
    return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):

  def __init__(self, c: TmdmConfig):
    super().__init__()
    self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
    self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
    self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

  def forward(self, x):
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
  """Pre-norm: x + r attn(norm(x)), then x + r mlp(norm(x)), r the residual multiplier."""

  def __init__(self, c: TmdmConfig):
    super().__init__()
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    self.self_attn = Attention(c)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    self.mlp = MLP(c)
    self.r = c.residual_multiplier

  def forward(self, x, positions_BL, mask_B1LL):
    x = x + self.r * self.self_attn(self.input_layernorm(x), positions_BL, mask_B1LL)
    return x + self.r * self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):

  def __init__(self, c: TmdmConfig):
    super().__init__()
    self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
    self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

  def forward(self, input_ids, segment_ids, positions):
    x = self.embed_tokens(input_ids)
    mask_B1LL = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # within each document
    for layer in self.layers:
      x = layer(x, positions, mask_B1LL)
    return self.norm(x)


@dataclasses.dataclass
class TmdmOutput(ModelOutput):
  logits: torch.FloatTensor = None


class TmdmForMaskedDiffusion(PreTrainedModel):
  config_class = TmdmConfig
  base_model_prefix = 'model'
  _no_split_modules = ['Block']

  def __init__(self, config: TmdmConfig):
    super().__init__(config)
    self.model = Backbone(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  @property
  def allowed(self):
    """Bool [3, V]: the ids each modality may predict. Built from the config on use: transformers
    creates the model on the meta device, where a buffer made in __init__ would hold no values."""
    allowed = torch.zeros(len(MODALITIES), self.config.vocab_size, dtype=torch.bool, device=self.lm_head.weight.device)
    for m, name in enumerate(MODALITIES):
      lo, hi = self.config.vocab_layout.get('ranges', {}).get(name, (0, 0))
      allowed[m, lo:hi] = True
    return allowed

  def _init_weights(self, module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, RMSNorm):
      nn.init.ones_(module.weight)

  @property
  def mask_id(self) -> int:
    return self.config.vocab_layout['mask_token_id']

  def forward(self, input_ids, segment_ids=None, positions=None, modality=None, **_):
    """Float32 logits [B, L, V]; with `modality`, -inf outside each position's modality range."""
    B, L = input_ids.shape
    if segment_ids is None:
      segment_ids = torch.ones_like(input_ids)
    if positions is None:
      positions = torch.arange(L, device=input_ids.device).expand(B, L)
    h = self.model(input_ids, segment_ids, positions)
    logits = self.lm_head(h).float() * self.config.logits_multiplier
    if modality is not None:
      logits = logits.masked_fill(~self.allowed[modality.clamp(0, len(MODALITIES) - 1)], -math.inf)
    return TmdmOutput(logits=logits)

  # Canvases: the training layouts of tmdm's data pipeline, the target masked.
  def canvas(self, task, text_ids=(), codes=(), caption_len=0, length=0):
    """One row [1, L] of a task: 'text' (<txt> prompt [MASK]... </txt>), 't2i' / 't2s' ([T2I] <txt>
    caption </txt> <img> [MASK]*T </img> [PAD]...) or 'i2t' / 's2t' ([I2T] <img> codes </img> <txt>
    [MASK]*caption_len </txt> [PAD]...). text_ids are text-tokenizer ids, codes image / audio codebook ids."""
    v, L = self.config.vocab_layout, length or self.config.max_position_embeddings
    sp, mask, pad = v['specials'], v['mask_token_id'], v['pad_token_id']
    text_lo = v['ranges']['text'][0]
    text = [text_lo + int(i) for i in text_ids]
    if task == 'text':
      parts = [([sp['<txt>']] + text + [mask] * (L - 2 - len(text)) + [sp['</txt>']], 0, 0)]
      head = []
    else:
      kind = 'image' if task in ('t2i', 'i2t') else 'audio'
      m, (lo, _) = MODALITIES.index(kind), v['ranges'][kind]
      o, c = ('<img>', '</img>') if kind == 'image' else ('<aud>', '</aud>')
      if task in ('t2i', 't2s'):
        room = L - 5 - self.config.tokens_per_item[kind]
        text_part = ([sp['<txt>']] + text[:room] + [sp['</txt>']], 0, 1)
        media_part = ([sp[o]] + [mask] * self.config.tokens_per_item[kind] + [sp[c]], m, 0)
        parts = [text_part, media_part]
      else:
        parts = [([sp[o]] + [lo + int(i) for i in codes] + [sp[c]], m, 1),
                 ([sp['<txt>']] + [mask] * caption_len + [sp['</txt>']], 0, 0)]
      head = [sp['[' + task.upper() + ']']]
    tokens, modality, cond = list(head), [0] * len(head), [0] * len(head)
    for ids, m, is_cond in parts:
      tokens += ids
      modality += [m] * len(ids)
      cond += [0] + [is_cond] * (len(ids) - 2) + [0]
    n = len(tokens)
    if n > L:
      raise ValueError(f'a {task} row needs {n} positions, more than {L}')
    row = lambda xs, fill: torch.tensor([xs + [fill] * (L - n)])
    return {'tokens': row(tokens, pad), 'segment_ids': row([1] * n, 0), 'positions': row(list(range(n)), 0),
            'modality': row(modality, 0), 'cond': row(cond, 0)}

  @torch.no_grad()
  def sample(self, canvas, steps=32, sampler='confidence', schedule='cosine', temperature=1.0, top_p=1.0,
             block_len=0, guidance=0.0, guidance_schedule='constant', threshold=0.9, entropy_budget=1.0,
             generator=None, **_):
    """Fills every [MASK] of canvas['tokens'] ([B, L]); returns the tokens. tmdm's engine: each step
    predicts every masked position and reveals some; the rules differ in which:
      confidence  the k most confident (log-probability of the drawn token), k such that a share
                  schedule((i + 1) / S) of the block's masked positions stays masked after step i
      ancestral   each masked position with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) of its
                  modality's schedule, on the time grid t_i = 1 - i / S
      threshold   those whose drawn token has probability >= threshold (at least one per row)
      entropy     lowest entropy first, while the entropies ranked ahead sum to at most entropy_budget
    The last step of a block reveals the rest. temperature 0 is greedy; block_len > 0 fills blocks left
    to right with ceil(steps / blocks) steps each; guidance w: (1 + w) cond - w uncond logits, uncond
    with canvas['cond'] positions masked. Unrevealed draws are not reused across steps (tmdm's `reuse`
    and `cache` only save work; greedy results are the same)."""
    x = canvas['tokens'].clone()
    seg, pos, mod = canvas['segment_ids'], canvas['positions'], canvas['modality']
    cond = canvas.get('cond', torch.zeros_like(x)).bool()
    mask = self.mask_id
    B, L = x.shape
    generate = x == mask
    first = generate.float().argmax(-1, keepdim=True)
    row_mod = mod.gather(1, first)[:, 0].clamp(0, 2)
    per = block_len if 0 < block_len < L else L
    n_blocks = -(-L // per)
    S = max(1, -(-int(steps) // n_blocks))
    column = torch.arange(L).expand(B, L)
    schedules = [_schedule(self.config.diffusion, m) for m in MODALITIES]

    def predict(x, t):
      logits = self(x, seg, pos).logits
      if guidance:
        w = guidance * _GUIDANCE[guidance_schedule](t)[:, None, None]
        logits = (1 + w) * logits - w * self(torch.where(cond, mask, x), seg, pos).logits
      return logits.masked_fill(~self.allowed[mod.clamp(0, 2)], -math.inf)

    for b in range(n_blocks):
      in_block = generate & (column >= b * per) & (column < (b + 1) * per)
      n0 = (in_block & (x == mask)).sum(-1)
      i = 0
      while i < S and (in_block & (x == mask)).any():
        open_ = in_block & (x == mask)
        if sampler == 'ancestral':
          t, s = torch.full((B,), 1.0 - i / S), torch.full((B,), 1.0 - (i + 1) / S)
        else:
          share = open_.sum(-1).float() / n0.clamp(min=1)
          t = torch.stack([sch[1](1.0 - share) for sch in schedules], 1).gather(1, row_mod[:, None])[:, 0]
          s = t
        logits = predict(x, t)
        tokens, conf = _draw(logits, temperature, top_p, generator)
        if sampler == 'confidence':
          r = torch.tensor((i + 1) / S, dtype=torch.float32)
          gammas = torch.stack([_COUNT[schedule](r, sch) * torch.ones(()) for sch in schedules])
          keep = torch.ceil(n0.float() * gammas[row_mod] - 1e-4)
          k = open_.sum(-1) - keep
          reveal = _rank(torch.where(open_, conf, -math.inf)) < k[:, None]
        elif sampler == 'ancestral':
          alpha = lambda tt: torch.stack([1 - sch[0](tt) for sch in schedules], 1).gather(1, mod.clamp(0, 2))
          a_t, a_s = alpha(t), alpha(s)
          p = (a_s - a_t) / (1 - a_t).clamp(min=1e-12)
          reveal = torch.rand(x.shape, generator=generator) < p
        elif sampler == 'threshold':
          rank = _rank(torch.where(open_, conf, -math.inf))
          reveal = (conf >= math.log(max(threshold, 1e-12))) | (rank == 0)
        elif sampler == 'entropy':
          logp = torch.log_softmax(logits, -1)
          ent = -torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros(())).sum(-1)
          score = torch.where(open_, -ent, -math.inf)
          order = _argsort(-score)
          ranked = torch.where(open_, ent, math.inf).gather(1, order)
          take = (torch.cumsum(ranked, -1) - ranked) <= entropy_budget
          reveal = take.gather(1, _rank(score))
        else:
          raise ValueError(f'unknown sampler {sampler!r}')
        reveal = open_ & (reveal | (i == S - 1))
        x = torch.where(reveal, tokens, x)
        i += 1
    return x


def _rank(score_BL):
  """0 for each row's highest score, 1 for the next, ... (ties: the earlier position first)."""
  return _argsort(_argsort(-score_BL))


def _argsort(x_BL):
  """Indices that sort each row ascending; equal values keep their order."""
  return torch.sort(x_BL, dim=-1, stable=True).indices


def _draw(logits, temperature, top_p, generator):
  """(argmax(logits / T + Gumbel), log-probability of each drawn token); T = 0 is greedy."""
  if temperature > 0:
    logits = logits / max(temperature, 1e-6)
  if top_p < 1:
    sorted_desc = logits.sort(-1, descending=True).values
    probs = sorted_desc.softmax(-1)
    kept = torch.where(probs.cumsum(-1) - probs < top_p, sorted_desc, math.inf)
    logits = torch.where(logits >= kept.min(-1, keepdim=True).values, logits, -math.inf)
  noisy = logits
  if temperature > 0:
    u = torch.rand(logits.shape, generator=generator).clamp(1e-20, 1.0)
    noisy = logits - torch.log(-torch.log(u))
  tokens = noisy.argmax(-1)
  logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
  return tokens, logp


def _schedule(diffusion, modality):
  """(mask_prob(t), alpha_inv(alpha)) of a modality's schedule (tmdm's diffusion/schedules.py)."""
  name = diffusion['schedules'][modality]
  half_pi, p, c = math.pi / 2, diffusion.get('poly_power', 2.0), 1 - diffusion.get('loglinear_eps', 1e-3)
  table = {
      'linear': (lambda t: t, lambda a: 1 - a),
      'cosine': (lambda t: 2 * torch.sin(half_pi * t / 2)**2, lambda a: torch.arccos(a.clamp(0, 1)) / half_pi),
      'md4_cosine': (lambda t: torch.sin(half_pi * t), lambda a: torch.arcsin((1 - a).clamp(0, 1)) / half_pi),
      'polynomial': (lambda t: t**p, lambda a: (1 - a).clamp(0, 1)**(1 / p)),
      'loglinear': (lambda t: c * t, lambda a: ((1 - a) / c).clamp(0, 1)),
  }
  return table[name]


# Share of a block still masked after a fraction r of its steps ('noise': the modality's own schedule).
_COUNT = {
    'linear': lambda r, sch: 1 - r,
    'cosine': lambda r, sch: torch.cos(0.5 * math.pi * r),
    'noise': lambda r, sch: sch[0](1 - r),
}
_GUIDANCE = {'constant': torch.ones_like, 'increasing': lambda t: 2 * (1 - t), 'decreasing': lambda t: 2 * t}
