"""Chapter 4 experiments: per-step probe, IG rankings, and the top-k vs random-k vs channels check.

:func:`run` reuses the chapter 2–3 harvest (same cache key) and SAE, and writes ``data/identify/``:

* ``probe.safetensors``        — the per-step probe, with held-out accuracy per step in its metadata
* ``rank_latents_<attr>.safetensors`` / ``rank_channels_<attr>.safetensors`` — IG scores per class
* ``check.json``               — for each social attribute's minority class: share judged in that class and
  leakage onto the other attributes, after adding β to the top-k latents, k random latents, or the
  top-k channels (ranked the same way), on the same noise
* ``log.json``                 — timings (IG throughput) and fingerprints
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import attribution, cache, hooks, io, metrics, models, world
from . import dissect as D
from . import harvest as H
from . import intervention as I
from . import judge as J
from . import probe as P
from . import sae as S

OUT = models.DATA_DIR / "identify"
IG_STEPS = (0, 4, 8, 12, 16, 20, 24)  # sampling steps whose h is attributed
CHECK_SEED = 4_242  # noise of the check (not the harvest, not the evaluation set)


def h_by_step(folder, steps, samples: torch.Tensor) -> dict[int, torch.Tensor]:
    """h ``(len(samples), C, H, W)`` at each listed step, in the order of ``samples``."""
    sh = hooks.load_shards(Path(folder) / "shards")
    out = {}
    for s in steps:
        sel = (sh["step"] == s).nonzero().flatten()
        order = torch.empty(int(sh["sample"].max()) + 1, dtype=torch.long)
        order[sh["sample"][sel]] = sel
        out[int(s)] = sh["h"][order[samples]]
    return out


def minority(probs: torch.Tensor) -> int:
    """The class the model draws least often (by judged share)."""
    return int(torch.bincount(probs.argmax(-1), minlength=probs.shape[1]).argmin())


def channel_edit_fn(channels: list[int], beta: float, scale: float):
    """Add ``beta · scale`` to each listed channel of h at every position (the raw-channel analogue)."""
    def fn(h, info):
        d = torch.zeros(1, h.shape[1], 1, 1, dtype=h.dtype)
        d[0, channels] = beta * scale
        return h + d
    return fn


def check(model, sae, judge, rankings: dict, channel_rankings: dict, summary, n: int, steps: int, k: int,
          betas, seed: int = CHECK_SEED) -> dict:
    """Target effect and leakage of top-k latents vs random-k latents vs top-k channels."""
    noise = models.make_noise(n, model.sample_size, seed)
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb = judge.predict(base)
    g = torch.Generator().manual_seed(seed)
    out = {"n": n, "k": k, "steps": steps, "seed": seed, "betas": list(betas), "rows": []}
    for a in world.SOCIAL:
        c = minority(summary.probs[a])
        methods = {"top-k SAE latents": rankings[a].top(c, k),
                   "random-k SAE latents": torch.randperm(sae.cfg.d_sae, generator=g)[:k].tolist(),
                   "top-k channels": channel_rankings[a].top(c, k)}
        for beta in betas:
            for name, units in methods.items():
                if name.endswith("channels"):
                    with hooks.edit(model.unet, channel_edit_fn(units, beta, float(sae.input_scale))):
                        imgs = models.sample(model, noise=noise, steps=steps, batch_size=n)
                else:
                    e = I.Edit(a, {c: units}, beta=beta, mode="add", cls=c)
                    imgs, _ = I.sample(model, sae, [e], noise=noise, steps=steps, batch_size=n)
                pe = judge.predict(imgs)
                changed = {b: float((pe[b].argmax(-1) != pb[b].argmax(-1)).float().mean()) for b in world.ATTRIBUTES}
                keep_other = metrics.keep_rate(pb, pe, [b for b in world.SOCIAL if b != a])
                keep_nuis = metrics.keep_rate(pb, pe, list(world.NUISANCE))
                out["rows"].append({
                    "attribute": a, "class": world.ATTRIBUTES[a][c], "class_id": c, "method": name, "beta": beta,
                    "units": units, "share_before": float((pb[a].argmax(-1) == c).float().mean()),
                    "share_after": float((pe[a].argmax(-1) == c).float().mean()),
                    "keep_other_social": keep_other, "keep_nuisance": keep_nuis, "changed": changed})
    return out


def run(out=OUT, quick: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR), "quick": quick}
    hs = H.HarvestSettings(n=40, steps=5, batch_size=20) if quick else H.HarvestSettings()
    folder = H.cached("embedded", hs, progress=progress)
    summary = H.load_summary(folder)
    sae, _ = S.load_sae(D.OUT / "sae.safetensors")
    n_train = int(0.9 * hs.n)
    labels = summary.labels()
    tr = {a: y[:n_train] for a, y in labels.items()}
    te = {a: y[n_train:] for a, y in labels.items()}
    t0 = time.time()
    probe = P.train_probe(summary.pooled[:n_train], tr, attributes=world.SOCIAL)
    acc = P.accuracy(probe, summary.pooled[n_train:], te)
    P.save_probe(probe, out / "probe.safetensors", meta={"held_out_accuracy": acc.to_dict(orient="list"),
                                                          "train_samples": n_train, "harvest": folder.name})
    log["probe_seconds"] = time.time() - t0
    ig_steps = tuple(s for s in IG_STEPS if s < hs.steps) if not quick else (0, 2, 4)
    hs_by = h_by_step(folder, ig_steps, torch.arange(n_train))
    per_class = 8 if quick else 48
    rankings, ch_rankings = {}, {}
    t0 = time.time()
    attributed = 0
    for a in world.SOCIAL:
        r = attribution.rank(sae, probe, hs_by, tr[a], a, per_class=per_class, progress=progress)
        r.save(out / f"rank_latents_{a}.safetensors")
        rankings[a] = r
        attributed += sum(r.counts) * len(ig_steps)
    log["ig_seconds"] = time.time() - t0
    log["ig_sample_steps"] = attributed
    log["ig_sample_steps_per_second"] = attributed / log["ig_seconds"]
    log["ig_delta"] = {a: r.delta for a, r in rankings.items()}
    for a in world.SOCIAL:
        r = attribution.rank(None, probe, hs_by, tr[a], a, per_class=per_class, progress=progress)
        r.save(out / f"rank_channels_{a}.safetensors")
        ch_rankings[a] = r
    model = models.load_model("embedded")
    judge = J.load_judge()
    t0 = time.time()
    chk = check(model, sae, judge, rankings, ch_rankings, summary, n=16 if quick else 128, steps=hs.steps,
                k=8, betas=(2.0,) if quick else (2.0, 4.0))
    chk["seconds"] = time.time() - t0
    io.write_json(out / "check.json", chk)
    io.write_json(out / "log.json", log)
    return log
