"""Learned image and audio tokenizers behind one interface (base.py): FSQ (fsq.py), the conv
auto-encoders (learned.py, image.py, audio.py with mel.py); `registry.load(folder)` loads any kind.
Imports only storage from the rest of tmdm."""
