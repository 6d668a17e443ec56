"""Render throughput and embedded-model sampling throughput, measured in one run.

    python bench/throughput.py [--threads 2] [--n 256]

Prints images/s for the world renderer (at several batch sizes) and for DDIM sampling of the
embedded model at several step counts, plus the per-UNet-call cost. These are measurements
on the machine at hand, not pass/fail targets.
"""
import argparse
import time

import torch

from helpers import models, world


def timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=256, help="samples per DDIM measurement")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\nrenderer (32x32, 2x supersampling):")
    for n in (256, 1024, 4096):
        s = timed(lambda: world.sample(n, seed=1))
        print(f"  batch {n:5d}: {n / s:8.0f} images/s")
    model = models.load_model("embedded")
    print("\nembedded model, deterministic DDIM, batch", min(a.n, 256))
    for steps in (10, 25, 50):
        s = timed(lambda: models.sample(model, a.n, steps=steps, seed=0), repeat=1)
        print(f"  {steps:3d} steps: {a.n / s:7.1f} images/s  ({s / (steps * a.n) * 1e3:.2f} ms per image-step)")
