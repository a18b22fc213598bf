"""The model outside tmdm: `tmdm export` writes a Hugging Face-style folder (safetensors, config.json,
generation_config.json, tokenizers, a model card and the PyTorch reference in hf/), `tmdm import` turns
one back into a run (hf_folder.py); `tmdm lm-eval` scores a run with lm-evaluation-harness
(lm_eval_model.py). May import evaluation/ and below; the files in hf/ import nothing from tmdm."""
