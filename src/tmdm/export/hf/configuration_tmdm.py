"""Configuration of the tmdm masked-diffusion Transformer for transformers (trust_remote_code).

Written by `tmdm export`; every field below is in the exported config.json. The model is the one of
tmdm's src/tmdm/model: pre-norm blocks (RMSNorm, rotary attention without biases, SwiGLU), residual
branches scaled by `residual_multiplier`, attention logits scaled by `attention_scale`, output
logits by `logits_multiplier` (CompleteP's multipliers, stated rather than folded into the weights),
bidirectional attention restricted to each position's segment (packed documents; segment 0 is padding
and sees only padding). `vocab_layout` gives the joint vocabulary: special and task tokens, each
modality's id range; a position may only predict ids of its own modality.
"""

from transformers import PretrainedConfig

MODALITIES = ('text', 'image', 'audio')


class TmdmConfig(PretrainedConfig):
  model_type = 'tmdm'

  def __init__(self, vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
               intermediate_size=176, rope_theta=10_000.0, rms_norm_eps=1e-6, attention_scale=None,
               residual_multiplier=1.0, logits_multiplier=1.0, max_position_embeddings=512, vocab_layout=None,
               diffusion=None, tokens_per_item=None, **kwargs):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.head_dim = head_dim
    self.intermediate_size = intermediate_size
    self.rope_theta = rope_theta
    self.rms_norm_eps = rms_norm_eps
    self.attention_scale = head_dim**-0.5 if attention_scale is None else attention_scale
    self.residual_multiplier = residual_multiplier
    self.logits_multiplier = logits_multiplier
    self.max_position_embeddings = max_position_embeddings  # tmdm's row length (data.seq_len)
    # {'specials': {name: id}, 'mask_token_id', 'pad_token_id', 'ranges': {modality: [lo, hi)}}
    self.vocab_layout = vocab_layout or {}
    # {'schedules': {modality: name}, 'poly_power', 'loglinear_eps'}: alpha(t) of each modality
    self.diffusion = diffusion or {'schedules': dict.fromkeys(MODALITIES, 'linear'), 'poly_power': 2.0,
                                   'loglinear_eps': 1e-3}
    self.tokens_per_item = tokens_per_item or {}  # {'image': codes per image, 'audio': codes per clip}
    kwargs.setdefault('tie_word_embeddings', False)
    super().__init__(**kwargs)
