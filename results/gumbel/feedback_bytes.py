"""Analytic per-step cost of token feedback (roofline.analytic_step_cost): FLOPs and bytes of a
k=4 decode step with and without the block, and of an AR step, at batch 1 for the demo's shape
(configs/shakespeare_gumbel.py) and the paper's (configs/lm1b_ar.py, configs/owt_ar.py), with
the bytes-roofline speed-up at batch 1 (4 AR steps' bytes over one k=4 step's; memory-bound:
time ~ bytes). Writes feedback_bytes.json next to this file.

  PYTHONPATH=. .venv/bin/python results/gumbel/feedback_bytes.py
"""

import json
import os

from configs import lm1b_ar, owt_ar, shakespeare_gumbel
from kforcing_jax import models, roofline

GEN_LEN = 128


def main():
  out = {}
  for name, module in (('demo', shakespeare_gumbel), ('lm1b', lm1b_ar), ('owt', owt_ar)):
    config = module.get_config()
    ar = roofline.analytic_step_cost(models.teacher(config), 1, 1, GEN_LEN)
    row = {'ar_bytes': ar['bytes']}
    for feedback in (False, True):
      config.model.token_feedback = feedback
      step = roofline.analytic_step_cost(models.student(config, 4), 4, 1, GEN_LEN)
      tag = 'feedback' if feedback else 'plain'
      row[f'k4_{tag}_flops'] = step['flops']
      row[f'k4_{tag}_bytes'] = step['bytes']
      row[f'k4_{tag}_bytes_roofline_speedup_b1'] = 4 * ar['bytes'] / step['bytes']
    out[name] = row
    ratio = row['k4_feedback_bytes'] / row['k4_plain_bytes']
    print(f'{name}: k=4 step bytes {row["k4_plain_bytes"] / 1e6:.1f} -> '
          f'{row["k4_feedback_bytes"] / 1e6:.1f} MB (x{ratio:.2f}), '
          f'FLOPs x{row["k4_feedback_flops"] / row["k4_plain_flops"]:.3f}; bytes-roofline '
          f'speed-up at batch 1 {row["k4_plain_bytes_roofline_speedup_b1"]:.2f}x -> '
          f'{row["k4_feedback_bytes_roofline_speedup_b1"]:.2f}x')
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'feedback_bytes.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
