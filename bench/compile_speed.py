"""Does torch.compile (of the UNet's blocks, hooks kept working) speed up the benchmark's sampling on CPU?

    python bench/compile_speed.py [--threads 2] [--n 128] [--steps 10] [--repeat 3]

Samples the embedded model eagerly and with ``models.compile_blocks`` (mid block eager for the hooks),
alternating the two so that other load on the machine hits both alike; prints the best time of each, their
ratio, and the largest pixel difference between the two sample sets. Compile time is reported apart.
"""
import argparse
import time

import torch

from helpers import models

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eager = models.load_model("embedded")
    comp = models.compile_blocks(models.load_model("embedded"))
    t = time.perf_counter()
    x_c = models.sample(comp, a.n, steps=a.steps, seed=0)
    compile_s = time.perf_counter() - t
    x_e = models.sample(eager, a.n, steps=a.steps, seed=0)
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(a.repeat):
        for name, m in (("eager", eager), ("compiled", comp)):
            t = time.perf_counter()
            models.sample(m, a.n, steps=a.steps, seed=0)
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"n={a.n} steps={a.steps} threads={a.threads}: eager {best['eager']:.2f} s, compiled {best['compiled']:.2f} s, "
          f"speed-up ×{best['eager'] / best['compiled']:.2f} (first compiled call incl. compiling: {compile_s:.1f} s); "
          f"max |Δpixel| {float((x_e - x_c).abs().max()):.2e}")
