"""Chapter 7 artifacts (data/benchmark/v2/): validation frontiers of every row, the frozen choices, the test
cells. Resumable: rerun the same command after an interruption and finished cells are loaded, not recomputed.

    python scripts/benchmark.py validate [--attributes gender]   # every row's grid on the validation seed
    python scripts/benchmark.py freeze                            # matched settings + best DiffLens row, logged
    python scripts/benchmark.py test [--split test|test2]         # the frozen settings on a test seed

Costs on 2 cores (measured, see data/benchmark/v2/log.json and each cell's seconds): the Original pass of
n samples ≈ 0.26 s per sample; a cell costs what it edits (unedited samples are the Original's own, edited
ones resume at their first edited step). See helpers/chapters/benchmark.py for the protocol.
"""
import argparse

import torch

from helpers import world
from helpers.chapters import benchmark

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["validate", "freeze", "test"])
    ap.add_argument("--attributes", nargs="+", default=list(world.SOCIAL), choices=list(world.SOCIAL))
    ap.add_argument("--split", default="test", choices=["test", "test2"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    b = benchmark.Bench()
    if a.stage == "validate":
        benchmark.validate(b, a.attributes)
    elif a.stage == "freeze":
        benchmark.freeze(b, a.attributes)
    else:  # the second seed replicates the keep-0.95 point
        benchmark.test(b, a.split, a.attributes, keep_points=benchmark.KEEP_POINTS[:1] if a.split == "test2"
                       else benchmark.KEEP_POINTS)
