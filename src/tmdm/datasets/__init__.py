"""The corpora and their preparation: text (text.py), image-text and audio-text pairs (image.py,
audio.py, pairs.py) and `tmdm prepare` (prepare.py), written as token stores (data/store.py), in this
process or on Apache Beam (beam.py, beam_sources.py, beam_stages.py). May import data/, tokenizers/,
config/ and below."""
