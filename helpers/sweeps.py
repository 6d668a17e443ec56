"""Chapter 5 experiments: β sweeps over the top features of a class, and multi-attribute control.

:func:`run` loads the SAE (chapter 3) and the IG rankings (chapter 4) and writes ``data/sweeps/``:

* ``sweep_<attr>.safetensors`` — for each β (add mode, and scale mode): judged probabilities of every
  attribute for ``n`` samples from the same noise, plus the first ``keep`` images (slider frames)
* ``multi.safetensors``       — per-sample targeting of gender, age and race towards uniform, one
  attribute at a time and all three at once, on the same noise
* ``log.json``                — settings and timings

All cells share one noise seed, so every β and every edit is compared sample by sample.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import attribution, cache, io, models, world
from . import dissect as D
from . import identify as ID
from . import intervention as I
from . import judge as J
from . import sae as S

OUT = models.DATA_DIR / "sweeps"
SWEEP_SEED = 5_151  # noise of the sweeps (not the harvest, evaluation or check seeds)
BETAS = {"add": (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0), "scale": (0.0, 1.0, 2.0, 4.0, 8.0)}


def _probs_tensors(prefix: str, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{a}": p for a, p in probs.items()}


def run(out=OUT, n: int = 128, k: int = 8, keep: int = 12, steps: int = 25, quick: bool = False,
        progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    betas = {"add": (0.0, 4.0), "scale": (1.0, 4.0)} if quick else BETAS
    if quick:
        n, keep, steps = 8, 4, 5
    sae, _ = S.load_sae(D.OUT / "sae.safetensors")
    rankings = {a: attribution.Ranking.load(ID.OUT / f"rank_latents_{a}.safetensors") for a in world.SOCIAL}
    from . import harvest as H

    summary = H.load_summary(D.OUT / "summary.safetensors")
    model = models.load_model("embedded")
    judge = J.load_judge()
    noise = models.make_noise(n, model.sample_size, SWEEP_SEED)
    log = {"model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR), "n": n, "k": k, "steps": steps,
           "seed": SWEEP_SEED, "betas": betas, "quick": quick, "seconds": {}}
    t0 = time.time()
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb = judge.predict(base)
    io.save_tensors(out / "base.safetensors", {"images": (base[:keep] * 255).round().to(torch.uint8),
                                               **_probs_tensors("probs", pb)}, meta={"n": n, "seed": SWEEP_SEED})
    for a in world.SOCIAL:
        t1 = time.time()
        c = ID.minority(summary.probs[a])
        feats = rankings[a].top(c, k)
        tensors = {}
        for mode, bs in betas.items():
            for j, beta in enumerate(bs):
                e = I.Edit(a, {c: feats}, beta=beta, mode=mode, cls=c)
                imgs, _ = I.sample(model, sae, [e], noise=noise, steps=steps, batch_size=n)
                tensors[f"{mode}.{j}.images"] = (imgs[:keep] * 255).round().to(torch.uint8)
                tensors.update(_probs_tensors(f"{mode}.{j}", judge.predict(imgs)))
        io.save_tensors(out / f"sweep_{a}.safetensors", tensors,
                        meta={"attribute": a, "class_id": c, "class": world.ATTRIBUTES[a][c], "features": feats,
                              "betas": {m: list(b) for m, b in betas.items()}, "n": n, "keep": keep})
        log["seconds"][a] = time.time() - t1
    # multi-attribute: per-sample targeting towards uniform, one attribute at a time and all at once
    t1 = time.time()
    beta_multi = betas["add"][len(betas["add"]) // 2 + 1] if not quick else betas["add"][-1]
    edits = {}
    for a in world.SOCIAL:
        kcls = len(world.ATTRIBUTES[a])
        feats = {c: rankings[a].top(c, k) for c in range(kcls)}
        edits[a] = I.Edit(a, feats, beta=beta_multi, mode="add", target=[1 / kcls] * kcls)
    tensors = {}
    for name, es in [(a, [edits[a]]) for a in world.SOCIAL] + [("all", list(edits.values()))]:
        imgs, iv = I.sample(model, sae, es, noise=noise, steps=steps, batch_size=n, class_seed=1)
        tensors.update(_probs_tensors(name, judge.predict(imgs)))
        tensors[f"{name}.images"] = (imgs[:keep] * 255).round().to(torch.uint8)
        for e in es:
            tensors[f"{name}.assigned.{e.attribute}"] = iv.classes(e.attribute)
    io.save_tensors(out / "multi.safetensors", tensors, meta={"beta": beta_multi, "k": k, "n": n, "mode": "add"})
    log["seconds"]["multi"] = time.time() - t1
    log["seconds"]["total"] = time.time() - t0
    io.write_json(out / "log.json", log)
    return log
