"""Peak resident memory while harvesting activations with streaming shards.

    python bench/harvest_memory.py [--n 4000] [--steps 25]

100,000 activations = 4,000 samples x 25 steps, each h a 128x8x8 map (3.3 GB as float32 if
held in memory). Target (issue 3): peak RSS < 2 GiB. Prints the RSS before the harvest (model,
judge and libraries loaded), the peak, and the bytes the activations would take in memory.
"""
import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from helpers import harvest as H
from helpers import judge as J
from helpers import models


def rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    judge = J.load_judge()
    before = rss_gib()
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.time()
        folder = H.run(model, H.HarvestSettings(n=a.n, steps=a.steps, seed=77), tmp / "h", judge=judge)
        secs = time.time() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        width = model.unet.config.block_out_channels[-1]
        side = model.sample_size // 4
        acts = a.n * a.steps
        in_mem = acts * width * side * side * 4 / 2**30
        disk = sum(p.stat().st_size for p in (folder / "shards").glob("*.safetensors")) / 2**30
    finally:
        shutil.rmtree(tmp)
    print(f"{acts:,} activations ({a.n} samples x {a.steps} steps) in {secs / 60:.1f} min; "
          f"float32 in memory would be {in_mem:.2f} GiB; shards on disk {disk:.2f} GiB")
    print(f"RSS before harvest {before:.2f} GiB, peak {peak:.2f} GiB -> {peak / 2:.2f} of the 2 GiB target "
          f"({'met' if peak < 2 else 'NOT met'})")
