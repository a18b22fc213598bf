"""`tmdm scaling`: fit scaling laws to sweep results (fit.json and plots); plan a compute-optimal run."""

import json
import os
import warnings

from tmdm import errors
from tmdm.scaling import laws as scaling, plots as scaling_plots


def command(args) -> int:
  """`tmdm scaling fit|plan`."""
  if args.scaling_command == 'fit':
    try:
      rows = scaling.read_results(args.results)
    except ValueError as e:
      raise errors.ConfigError(str(e)) from None
    report = scaling.fit_results(rows, n_boot=args.bootstrap, level=args.level, seed=args.seed, starts=args.starts,
                                 delta=args.delta)
    if not report:
      raise errors.ConfigError(f'{args.results}: no modality has the 5 points a fit needs')
    print(f'wrote {scaling.write_fit(args.out, report, os.path.abspath(args.results))}')
    with warnings.catch_warnings():
      if not all(e['determined'] for e in report.values()):  # Its WARNING is printed: not numpy's on its nan/inf.
        warnings.simplefilter('ignore', RuntimeWarning)
      paths = scaling_plots.write_all(args.out, rows, report)
    for path in paths:
      print(f'wrote {path}')
    return 0
  with open(args.fit, encoding='utf-8') as f:
    fits = json.load(f)['modalities']
  names = [args.modality] if args.modality else sorted(fits)
  for name in names:  # Every check before any plan is printed.
    if name not in fits:
      raise errors.ConfigError(f'{args.fit} has no fit for modality {name!r} (has: {", ".join(fits)})')
    scaling.check_determined(fits[name], name, args.fit)
  for name in names:
    p = scaling.plan(fits[name], args.flops, fits[name].get('interval_level', 0.9), name)
    preset, preset_n = scaling.nearest_preset(p['params'])
    print(f'{name}: C = {p["flops"]:.3g} FLOPs -> N* = {p["params"]:.4g} non-embedding parameters, '
          f'D* = {p["tokens"]:.4g} tokens ({p["tokens_per_param"]:.1f} tokens/parameter), '
          f'predicted loss {p["loss"]:.4g}')
    if 'params_interval' in p:
      lo_n, hi_n = p['params_interval']
      lo_d, hi_d = p['tokens_interval']
      print(f'  bootstrap interval: N* in [{lo_n:.3g}, {hi_n:.3g}], D* in [{lo_d:.3g}, {hi_d:.3g}]')
      if not (hi_n < 10 * lo_n and hi_d < 10 * lo_d):
        print('  WARNING: the interval spans more than 10x: the fit does not determine this plan')
    if fits[name].get('at_bound'):
      print(f'  WARNING: the fit left {", ".join(fits[name]["at_bound"])} on the search bounds (undetermined)')
    if args.tokens_per_step:
      print(f'  {p["tokens"] / args.tokens_per_step:.0f} steps of {args.tokens_per_step} tokens')
    print(f'  nearest model preset: {preset} ({preset_n:.3g} non-embedding parameters)')
  return 0
