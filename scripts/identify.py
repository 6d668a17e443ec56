"""Chapters 4–5 artifacts: probe → IG rankings → footprints → check (data/identify/), then the β sweeps
and multi-attribute runs (data/sweeps/). Needs the chapter 2–3 artifacts (scripts/dissect.py).

    python scripts/identify.py                 # both stages (about 50 min on 2 cores)
    python scripts/identify.py --stage sweeps  # only the sweeps (reuses data/identify/)
    python scripts/identify.py --stage check   # only the check, from the stored rankings (about 25 min)

See helpers/chapters/identify.py and helpers/chapters/sweeps.py for what is written.
"""
import argparse
import json

import torch

from helpers.chapters import identify, sweeps

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "identify", "check", "sweeps"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.stage in ("all", "identify"):
        print(json.dumps(identify.run(quick=a.quick), indent=1), flush=True)
    if a.stage == "check":
        chk = identify.rerun_check()
        print(f"check.json rewritten: {len(chk['rows'])} rows in {chk['seconds']:.0f} s", flush=True)
    if a.stage in ("all", "sweeps"):
        print(json.dumps(sweeps.run(quick=a.quick), indent=1), flush=True)
