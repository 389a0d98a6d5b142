"""The reference's per-seed results (the JSON line reference_protonet.py eval prints last),
combined as `launch/evaluate.py --seeds` combines seeds (fsl_dist.evaluate.combine_seeds).

    python combine.py ref_eval_240_20w.out
"""

import json
import sys

from fsl_dist.evaluate import combine_seeds

if __name__ == "__main__":
    saved = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    r = combine_seeds([{**s, "eval_seed": s["seed"]} for s in saved["per_seed"]])
    print(f"step {saved['step']} cpu {saved['cpu']:.2f}: {r['mean']:.2f} ± {r['ci95']:.2f}% over "
          f"{sum(s['episodes'] for s in saved['per_seed'])} episodes from {len(r['seeds'])} seeds "
          f"(seed means {', '.join(f'{m:.2f}' for m in r['seed_means'])}; between-seed std "
          f"{r['seed_std']:.2f}; interval lower end {r['mean'] - r['ci95']:.2f})")
