"""Intervention overhead: DDIM sampling of the embedded model with an error-preserving SAE edit
(8 latents per class, per-sample class targeting; flat add, footprint add and scale) vs plain
sampling, in one run.

    python bench/intervention_overhead.py [--threads 2] [--n 64] [--repeat 5]

Target (issue 4): ≤ 5% extra wall time. Runs alternate and the medians are compared. Uses the
shipped SAE (data/dissect/sae.safetensors) and any 8 latents per class (the cost does not
depend on which).
"""
import argparse
import statistics
import time

import torch

from helpers import intervention, models
from helpers.chapters import dissect
from helpers import sae as S

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    sae, _ = S.load_sae(dissect.OUT / "sae.safetensors")
    noise = models.make_noise(a.n, model.sample_size, 0)
    edit = intervention.Edit("race", {c: list(range(8 * c, 8 * c + 8)) for c in range(4)}, beta=2.0, mode="add",
                             target=[0.25] * 4)
    fp = {c: torch.rand(8, 64) for c in range(4)}  # footprint add: cost does not depend on the maps' values
    edit_fp = intervention.Edit("race", edit.features, beta=2.0, mode="add", target=[0.25] * 4, footprint=fp)
    models.sample(model, noise=noise[:8], steps=3)  # warm-up
    edit_sc = intervention.Edit("race", edit.features, beta=2.0, mode="scale", target=[0.25] * 4)
    t = {"plain": [], "edited": [], "footprint": [], "scale": []}
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        models.sample(model, noise=noise, steps=a.steps, batch_size=a.n)
        t["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        intervention.sample_edited(model, sae, [edit], noise=noise, steps=a.steps, batch_size=a.n)
        t["edited"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        intervention.sample_edited(model, sae, [edit_fp], noise=noise, steps=a.steps, batch_size=a.n)
        t["footprint"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        intervention.sample_edited(model, sae, [edit_sc], noise=noise, steps=a.steps, batch_size=a.n)
        t["scale"].append(time.perf_counter() - t0)
    p = statistics.median(t["plain"])
    print(f"n={a.n} steps={a.steps} threads={a.threads}: runs (s) " + ", ".join(f"{k} {[round(x, 2) for x in v]}"
                                                                          for k, v in t.items()))
    for name, label in (("edited", "flat add"), ("footprint", "footprint add"), ("scale", "scale, needs the SAE encode")):
        e = statistics.median(t[name])
        print(f"intervention overhead ({label}): {100 * (e / p - 1):+.2f}% "
              f"(median {e:.2f} s vs plain {p:.2f} s; target <= 5%, {'met' if e / p <= 1.05 else 'NOT met'})")
