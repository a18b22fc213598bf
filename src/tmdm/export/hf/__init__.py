"""The PyTorch reference of the tmdm model, copied into every exported folder and loaded by
transformers with trust_remote_code: it imports torch, transformers and nothing from tmdm."""
