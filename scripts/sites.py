"""The chapter "Where each attribute lives": activation-patching cells of the embedded model (data/sites/).
Resumable: rerun after an interruption and finished cells are skipped.

    python scripts/sites.py patch      # the pool, its pairs, every (site group, window) patch
    python scripts/sites.py latents    # h patched with what the SAE / its ranked latents carry of the donor's h
    python scripts/sites.py edits      # DiffLens' edits on the same pairs (the ceiling-vs-edit comparison)

Costs on 2 cores: see helpers/chapters/sites.py (each cell's header records its seconds and UNet passes).
"""
import argparse

import torch

from helpers.chapters import sites

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["patch", "latents", "edits"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = sites.Sites()
    if a.stage == "patch":
        s.run()
    elif a.stage == "latents":
        s.latents()
    else:
        s.edits()
