"""A corpus of one's own: text files, captioned images and transcribed speech in the documented
formats (docs/own_data.md). The preset argument is the corpus folder:

  python -m tmdm.tools.example_corpus my_corpus        # or your own files in the same layout
  tmdm prepare --config=experiments/custom.py:my_corpus
  tmdm train   --config=experiments/custom.py:my_corpus --workdir=runs/custom --host_devices=8
  tmdm eval    --workdir=runs/custom --host_devices=8
  tmdm sample  --workdir=runs/custom --task=t2i --prompt="a small red circle on white" --host_devices=8

  CORPUS/text/**/*.txt             one UTF-8 document per file
  CORPUS/images/captions.jsonl     {"image": path relative to the file, "caption": text}
  CORPUS/speech/clips.jsonl        {"audio": WAV path relative to the file, "text": transcript}

Leave a kind out by setting its mixture weight to 0 (--config.data.mix_audio=0). A small corpus needs
a small text vocabulary: `tmdm prepare` names the largest one it supports. Evaluators that need the
demo's data (the digit classifier, the espeak-ng score) are skipped; ELBO, infilling, captioning and
transcription accuracy run on any data.
"""

from tmdm.config import base as base_config


def get_config(arg=None):
  corpus = arg or 'my_corpus'
  c = base_config.get_config()
  c.model.update(d_model=128, n_layers=4, n_heads=4, d_head=32, d_ff=384, base_width=128, base_depth=4)
  c.model.scan_layers = False  # unrolled is faster on CPU for a few layers (BUILD_NOTES "Performance on CPU")
  c.vocab.update(text_size=1000)
  c.data.update(root='data', text_name='custom-text', text_sources=f'txt:{corpus}/text/**/*.txt', seq_len=128,
                mix_text=0.3, mix_image=0.4, mix_audio=0.3, val_fraction=0.1)  # small corpora: hold out more
  c.image.update(name='custom-images', sources=f'folder:{corpus}/images', max_items=0, train_steps=400)
  c.audio.update(name='custom-speech', sources=f'jsonl:{corpus}/speech/clips.jsonl', max_items=0, train_steps=400,
                 val_fraction=0.1)
  c.mesh.update(data=-1, fsdp=2, tensor=1)
  c.train.update(num_steps=1000, batch_size=16, log_every_steps=50, eval_batches=1)
  c.checkpoint.update(every_steps=250, keep=2)
  c.eval.tasks = 'elbo,text_infill,t2i_features,i2t,s2t'  # t2i_features: T2I in the image tokenizer's features
  return c
