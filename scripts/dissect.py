"""Chapters 2–3 artifacts: harvest → SAEs (with and without AuxK) → checks, into data/dissect/.

    python scripts/dissect.py            # full run (about 20 min on 2 cores)
    python scripts/dissect.py --quick --out /tmp/dissect   # tiny smoke run of the same pipeline

See helpers/dissect.py for what is written.
"""
import argparse
import json

import torch

from helpers.chapters import dissect

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    ap.add_argument("--out", default=str(dissect.OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recompute-harvest", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    log = dissect.run(a.out, quick=a.quick, recompute_harvest=a.recompute_harvest)
    print(json.dumps(log, indent=1))
