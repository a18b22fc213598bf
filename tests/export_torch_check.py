"""Run by tests/test_export.py in a process of its own: loads exported folders with transformers alone
(nothing from tmdm may be imported) and writes what the PyTorch reference computes.

  python export_torch_check.py JOB.json OUT.npz

JOB.json: {"folders": {name: [path, "float32" | "bfloat16"]}, "rows": path of an npz of [B, L] rows,
"canvases": [{"folder", "task", "text_ids" | "codes" + "caption_len", "knobs"}]}.
OUT.npz: NAME/logits per folder; canvas_I/KEY (the canvas the reference built) and sample_I per canvas;
`tmdm_modules`, the tmdm modules this process imported (none).
"""

import json
import os
import sys

os.environ['HF_HUB_OFFLINE'] = '1'

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from transformers import AutoModel  # pylint: disable=wrong-import-position


def main(job_path, out_path):
  with open(job_path, encoding='utf-8') as f:
    job = json.load(f)
  models = {name: AutoModel.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
            for name, (path, dtype) in job['folders'].items()}
  rows = {k: torch.from_numpy(v).long() for k, v in np.load(job['rows']).items()}
  out = {}
  with torch.no_grad():
    for name, model in models.items():
      logits = model(rows['tokens'], segment_ids=rows['segment_ids'], positions=rows['positions'],
                     modality=rows['modality']).logits
      out[f'{name}/logits'] = logits.float().numpy()
  for i, c in enumerate(job['canvases']):
    model = models[c['folder']]
    canvas = model.canvas(c['task'], text_ids=c.get('text_ids', ()), codes=c.get('codes', ()),
                          caption_len=c.get('caption_len', 0))
    out.update({f'canvas_{i}/{k}': v.numpy() for k, v in canvas.items()})
    out[f'sample_{i}'] = model.sample(canvas, **c['knobs']).numpy()
  out['tmdm_modules'] = np.asarray(sorted(m for m in sys.modules if m == 'tmdm' or m.startswith('tmdm.')) or [''])
  np.savez(out_path, **out)


if __name__ == '__main__':
  main(*sys.argv[1:])
