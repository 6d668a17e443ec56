"""Does sampling in channels_last pay on this machine? (issue 15: the benchmark samples in channels_last.)

    python bench/channels_last.py [--n 128] [--steps 25] [--threads 2]

Samples the embedded model from the same noise in the default memory format and in channels_last, in one
run, alternating twice, and prints the time ratio and the largest difference between the two sets of
images (the formats reorder the arithmetic, so they agree to float32 rounding, not bit for bit).
"""
import argparse
import time

import torch

from helpers import models

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    noise = models.make_noise(a.n, model.sample_size, 1)
    models.sample(model, noise=noise[:8], steps=2, batch_size=8)  # warm-up
    times = {"default": [], "channels_last": []}
    imgs = {}
    for _ in range(2):
        for fmt in times:
            model.unet.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            t0 = time.perf_counter()
            imgs[fmt] = models.sample(model, noise=noise, steps=a.steps, batch_size=a.n)
            times[fmt].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"{a.n} samples × {a.steps} steps, batch {a.n}, {a.threads} threads (best of 2 each):")
    for k, v in best.items():
        print(f"  {k:14} {v:6.1f} s  ({a.n * a.steps / v:.0f} UNet passes per s)")
    print(f"speed-up of channels_last: {best['default'] / best['channels_last']:.2f}×")
    print(f"largest image difference: {(imgs['default'] - imgs['channels_last']).abs().max():.1e}")
