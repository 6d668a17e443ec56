"""Chapter 6 artifacts: fit the baselines, tune every method's knob on the validation seed, run the
chosen settings on the test seed (data/benchmark/). Resumable: rerun the same command after an
interruption and finished cells are loaded, not recomputed.

    python scripts/benchmark.py                       # n_val 128, n_test 500 (hours on 2 cores)
    python scripts/benchmark.py --attributes gender   # one attribute

See helpers/benchmark.py for the protocol.
"""
import argparse
import json

import torch

from helpers import world
from helpers.chapters import benchmark

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-val", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--attributes", nargs="+", default=list(world.SOCIAL), choices=list(world.SOCIAL))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    log = benchmark.run(n_val=a.n_val, n_test=a.n_test, attributes=a.attributes)
    print(json.dumps(log, indent=1))
