"""Attribution throughput: integrated gradients over SAE latents (32 IG steps, batch 16), in
samples per second, for one (sample, step) each, on h captured from the embedded model.

    python bench/attribution_throughput.py [--threads 2] [--n 64] [--ig-steps 32]

Also prints the same attribution run one sample at a time (what the paper's code does) for
comparison, and captum's largest convergence delta.
"""
import argparse
import time

import torch

from helpers import attribution, hooks, models
from helpers.chapters import dissect, identify
from helpers import probe as P
from helpers import sae as S

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    sae, _ = S.load_sae(dissect.OUT / "sae.safetensors")
    probe, _ = P.load_probe(identify.OUT / "probe.safetensors")
    step = probe.cfg.n_steps // 2
    with hooks.capture(model.unet, steps=[step]) as c:
        models.sample(model, a.n, steps=probe.cfg.n_steps, seed=3)
    h = c.activations[0]
    attribution.latent_ig(sae, probe, h[:2], step, "gender", 1, n_steps=a.ig_steps)  # warm-up
    t0 = time.perf_counter()
    deltas = []
    for s in range(0, a.n, a.batch):
        _, d = attribution.latent_ig(sae, probe, h[s:s + a.batch], step, "gender", 1, n_steps=a.ig_steps)
        deltas.append(d.abs().max().item())
    batched = a.n / (time.perf_counter() - t0)
    m = min(a.n, 16)
    t0 = time.perf_counter()
    for s in range(m):
        attribution.latent_ig(sae, probe, h[s:s + 1], step, "gender", 1, n_steps=a.ig_steps)
    single = m / (time.perf_counter() - t0)
    print(f"IG over {sae.cfg.d_sae} latents x {h.shape[2] * h.shape[3]} positions, {a.ig_steps} IG steps, "
          f"threads={a.threads}: batched ({a.batch}) {batched:.1f} samples/s, one at a time {single:.1f} samples/s "
          f"-> {batched / single:.1f}x; max |convergence delta| {max(deltas):.1e}")
