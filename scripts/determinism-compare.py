#!/usr/bin/env python3
"""Compare the runs of configs/determinism.toml pair by pair (scripts/device-determinism.sh).

usage: determinism-compare.py DIR > summary.json
DIR holds <setting>-<i>/<run>.json (setting: sorted, atomic or deterministic; i: 1 or 2). A pair
(one setting, one run, i = 1 and 2) is identical when its logged curves (every field but the
measured tokens/s) and its metrics are equal as serialised: serde_json writes each float in the
shortest form that reads back to the same bits, so equal text is equal bits.
"""
import glob
import json
import os
import sys

root = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(root, '*-[12]', '*.json'))):
    setting, i = os.path.basename(os.path.dirname(f)).rsplit('-', 1)
    r = json.load(open(f))
    runs.setdefault((setting, r['variant']), {})[i] = r


def repeatable(r):
    curve = [{k: v for k, v in c.items() if k != 'tokens_per_s'} for c in r['curve']]
    return json.dumps([curve, r['metrics']], sort_keys=True)


first = next(iter(next(iter(runs.values())).values()))
out = {
    'what': 'configs/determinism.toml, each run twice per setting: sorted = the default embedding backward, '
            'atomic = ZOO_EMBEDDING_BWD=atomic, deterministic = ZOO_DETERMINISTIC=1 (cuDNN deterministic attention backward too). '
            'identical: the two runs logged the same curve (tokens/s aside) and metrics, bit for bit.',
    'device': first['env']['device']['name'],
    'build': first['env']['git'],
    'pairs': [],
}
for (setting, variant), pair in sorted(runs.items()):
    if set(pair) != {'1', '2'}:
        out['pairs'].append({'setting': setting, 'variant': variant, 'error': 'a run is missing'})
        continue
    a, b = pair['1'], pair['2']
    out['pairs'].append({
        'setting': setting,
        'variant': variant,
        'identical': repeatable(a) == repeatable(b),
        'max_val_loss_difference': max(abs(x['val_loss'] - y['val_loss']) for x, y in zip(a['curve'], b['curve'])),
        'val_loss': [[c['val_loss'] for c in r['curve']] for r in (a, b)],
        'mqar_acc': [r['metrics'].get('mqar_acc,none') for r in (a, b)],
        'train_tok_per_s': [r['throughput']['train_tokens_per_s'] for r in (a, b)],
        'env': {k: a['env']['device'].get(k) for k in ('embedding_bwd', 'deterministic', 'flash_kernels', 'cuda_graph')},
    })
# Each setting's training speed against the default's, per variant, from the second round (i = 2):
# the first round's first runs also pay for the process's warm-up (PTX loading, cuDNN's plans, the
# GPU's clocks; device-determinism.sh runs the default first in each round).
speed = {}
for p in out['pairs']:
    if 'train_tok_per_s' in p:
        speed[(p['setting'], p['variant'])] = p['train_tok_per_s'][1]
out['tok_per_s_vs_sorted_round_2'] = {
    f'{s}/{v}': speed[(s, v)] / speed[('sorted', v)] for (s, v) in speed if ('sorted', v) in speed
}
json.dump(out, sys.stdout, indent=1)
print()
