"""The paper's SD table on the world's Stable Diffusion (chapter 8): see helpers/chapters/worldsd.py.

    nohup python scripts/worldsd_table.py validate > runs/worldsd-val.log 2>&1 &
    python scripts/worldsd_table.py freeze
    nohup python scripts/worldsd_table.py test > runs/worldsd-test.log 2>&1 &
"""
import argparse
import json
from pathlib import Path

import torch

from helpers.chapters import worldsd

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["validate", "freeze", "test"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guidance", type=float, default=None, help="default: minisd.GUIDANCE (the book's)")
    ap.add_argument("--sd", type=Path, default=None, help="a candidate SD folder (default: the shipped data/minisd/sd)")
    ap.add_argument("--out", type=Path, default=None, help=f"cells folder (default: {worldsd.OUT})")
    ap.add_argument("--run", type=Path, default=None, help=f"the runner's stage folder (default: {worldsd.RUN})")
    a = ap.parse_args()
    worldsd.OUT, worldsd.RUN = a.out or worldsd.OUT, a.run or worldsd.RUN
    torch.set_num_threads(a.threads)
    if a.phase == "freeze":
        print(json.dumps(worldsd.freeze(), indent=1))
    else:
        t = worldsd.Table(device=a.device, guidance=a.guidance, sd_folder=a.sd)
        rows = worldsd.validate(t) if a.phase == "validate" else worldsd.test(t)
        for r in rows:
            print(r["attribute"], r["method"], r["setting"], f"FD {r['FD']:.3f} keep {r['keep other attributes']:.3f} "
                  f"CLIP-I {r['CLIP-I']:.3f} CLIP-T {r['CLIP-T']:.3f}")
