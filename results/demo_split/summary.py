"""The budget-split table of results/demo_split/README.md, from the copied reports.

  PYTHONPATH=. .venv/bin/python results/demo_split/summary.py

Reads <arm>/seed<S>/results.json and student_k{2,4}_eval.json for the arms below and writes
summary.json and summary.md beside this file: per arm and seed, the stage acc_totals, the k=4
student's agreement with the AR map and the k=2 / k=4 samples' gen-ppl under the teacher as a
ratio to the AR samples' of the same run (95% bootstrap bounds divided by the same AR point).
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = {  # arm directory: stages
    'k2_150': '(1, 250), (2, 150), (4, 150)',
    'k2_400': '(1, 250), (2, 400), (4, 150)',
}


def row(arm: str, seed_dir: str) -> dict:
  with open(os.path.join(seed_dir, 'results.json')) as f:
    results = json.load(f)
  models = {m['name']: m for m in results['models']}
  ar = models['ar']['gen_ppl_teacher']
  out = {'arm': arm, 'stages': ARMS[arm], 'seed': os.path.basename(seed_dir),
         'ar_gen_ppl': ar}
  for k in (2, 4):
    with open(os.path.join(seed_dir, f'student_k{k}_eval.json')) as f:
      out[f'acc_total_k{k}'] = json.load(f)['acc_total']
    m = models[f'pflm_k{k}']
    ci = m['gen_ppl_teacher_ci']
    out[f'gen_ppl_x_ar_k{k}'] = [m['gen_ppl_teacher'] / ar, ci['lo'] / ar, ci['hi'] / ar]
    out[f'entropy_x_ar_k{k}'] = m['entropy'] / models['ar']['entropy']
    out[f'distinct_2_x_ar_k{k}'] = m['distinct_2'] / models['ar']['distinct_2']
  out['k4_vs_ar_map'] = models['pflm_k4']['agreement_vs_ar']['slot']
  out['stage_k2_seconds'] = json.load(open(os.path.join(seed_dir, 'student_k2_eval.json')))[
      'seconds']
  return out


def main() -> None:
  rows = [row(arm, os.path.join(HERE, arm, seed))
          for arm in ARMS for seed in sorted(os.listdir(os.path.join(HERE, arm)))
          if os.path.isdir(os.path.join(HERE, arm, seed))]
  with open(os.path.join(HERE, 'summary.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  lines = ['| stages | seed | k=2 acc_total | k=4 acc_total | k=4 vs AR map | k=2 gen-ppl x AR | '
           'k=4 gen-ppl x AR [95%] | k=4 entropy / distinct-2 x AR | stage k=2 s |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    g2, g4 = r['gen_ppl_x_ar_k2'], r['gen_ppl_x_ar_k4']
    lines.append(
        f"| {r['stages']} | {r['seed']} | {r['acc_total_k2']:.3f} | {r['acc_total_k4']:.3f} | "
        f"{' / '.join(f'{a:.3f}' for a in r['k4_vs_ar_map'])} | {g2[0]:.2f} | "
        f"{g4[0]:.2f} [{g4[1]:.2f}, {g4[2]:.2f}] | {r['entropy_x_ar_k4']:.3f} / "
        f"{r['distinct_2_x_ar_k4']:.2f} | {r['stage_k2_seconds']:.0f} |")
  with open(os.path.join(HERE, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
