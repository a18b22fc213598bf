"""Configs: the base config (base.py, pure: reads no files), loading experiment files and command-line
overrides (loader.py), and the cross-section checks (checks.py), which ask the choice tables of the
code that implements each choice. May import model/, diffusion/, optim, data/, parallel/ and below."""
