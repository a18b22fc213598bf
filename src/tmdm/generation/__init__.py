"""Generation from a trained model: the tasks and their canvases (tasks.py), the sampling context and
`tmdm sample` (generate.py), HTML/PNG/WAV galleries (gallery.py). May import training/ and below."""
