"""Evaluation: the evaluators of eval.tasks and `tmdm eval` (evaluators.py) and their measures (digit
classifier, Frechet distance, mel DTW: measures.py). May import generation/ and below."""
