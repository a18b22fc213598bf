"""Learned image and audio tokenizers behind one interface (base.py); `base.load(folder)` loads any kind."""
