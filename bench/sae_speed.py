"""SAE training step time: the sparse path (decode only the k active latents) vs the dense
1×1-conv formulation (encoder matmul → TopK → scatter into a dense latent map → decoder
matmul over all latents), in one run, on the same data, seed and shapes.

    python bench/sae_speed.py [--threads 2] [--steps 40]

Targets (issue 3): ≥ 1.7× at 128 channels / 1024 latents, ≥ 2.5× at 512 / 4096 (the paper's
P2 size). "At equal loss": both runs start from the same init and see the same batches, so
their loss curves must agree; the script prints both final FVUs.
"""
import argparse

import torch

from helpers import sae as S


def planted_rows(n, d, atoms, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.randint(0, atoms, (n, k), generator=g)
    return torch.einsum("nk,nkd->nd", torch.rand(n, k, generator=g), D[idx]) + 0.05 * torch.randn(n, d, generator=g)


def step_ms(hist, skip):
    """Milliseconds per step after the first ``skip`` steps (warm-up excluded)."""
    a = next(h for h in hist if h["step"] == skip)
    b = hist[-1]
    return 1000 * (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4096)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads} batch={a.batch} steps={a.steps} (first 10 excluded)")
    for d_in, target in ((128, 1.7), (512, 2.5)):
        cfg = S.SAEConfig(d_in=d_in, expansion=8, k=S.scaled_k(d_in))
        x = planted_rows(100_000, d_in, 2 * cfg.d_sae, 8)
        tc = S.SAETrainConfig(steps=a.steps, batch_size=a.batch, log_every=10, warmup_steps=5)
        res = {}
        for mode in ("dense", "sparse", "dense", "sparse"):  # alternate, keep the faster of two runs
            _, hist = S.train_sae(x, cfg, tc, progress=False, dense=(mode == "dense"))
            ms = step_ms(hist, 10)
            if mode not in res or ms < res[mode][0]:
                res[mode] = (ms, hist[-1]["fvu"])
        ratio = res["dense"][0] / res["sparse"][0]
        print(f"C={d_in:4d} latents={cfg.d_sae:5d} k={cfg.k:3d}: dense {res['dense'][0]:7.1f} ms/step, "
              f"sparse {res['sparse'][0]:7.1f} ms/step -> {ratio:.2f}x faster (target >= {target}x, "
              f"{'met' if ratio >= target else 'NOT met'}); final FVU dense {res['dense'][1]:.4f} "
              f"sparse {res['sparse'][1]:.4f}")
