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

from .. import cache, io, models, pipeline, world
from .. import intervention as I
from .. import judge as J
from .. import sae as S
from . import dissect as D
from . import identify as ID

OUT = models.DATA_DIR / "sweeps"
SWEEP_SEED = 5_151  # noise of the sweeps (not the harvest, evaluation or check seeds)
# add: β times each feature's footprint (chapter 4), so β = 1 adds what an image of the class has on average
BETAS = {"add": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0), "scale": (0.0, 1.0, 2.0, 4.0)}
# β of the multi-attribute runs, read off the validation-seed prototype (seed 777, n=64) of chapter 4,
# where footprint β = 2–4 moved gender and age to or past balance and race moved most at 4 (k = 32)
BETA_MULTI = {"gender": 3.0, "age": 3.0, "race": 4.0}


def run(out=OUT, n: int = 128, keep: int = 12, steps: int = 25, quick: bool = False,
        progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    betas = {"add": (0.0, 4.0), "scale": (1.0, 4.0)} if quick else BETAS
    if quick:
        n, keep, steps = 8, 4, 5
    sae, _ = S.load_sae(D.OUT / "sae.safetensors")
    from .. import harvest as H

    summary = H.load_summary(D.OUT / "summary.safetensors")
    model = models.load_model("embedded")
    judge = J.load_judge()
    noise = models.make_noise(n, model.sample_size, SWEEP_SEED)
    log = {"model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR), "n": n, "k": dict(ID.K), "steps": steps,
           "seed": SWEEP_SEED, "betas": betas, "quick": quick, "seconds": {}}
    t0 = time.time()
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb = judge.predict(base)
    io.save_tensors(out / "base.safetensors", {"images": (base[:keep] * 255).round().to(torch.uint8),
                                               **io.prefixed("probs", pb)}, meta={"n": n, "seed": SWEEP_SEED})
    for a in world.SOCIAL:
        t1 = time.time()
        c = pipeline.minority(summary.probs[a])
        feats, fp = ID.features(a, c)
        tensors = {}
        for mode, bs in betas.items():
            for j, beta in enumerate(bs):
                e = I.Edit(a, {c: feats}, beta=beta, mode=mode, cls=c, footprint={c: fp} if mode == "add" else None,
                           classes=world.ATTRIBUTES[a])
                imgs, _ = I.sample_edited(model, sae, [e], noise=noise, steps=steps, batch_size=n)
                tensors[f"{mode}.{j}.images"] = (imgs[:keep] * 255).round().to(torch.uint8)
                tensors.update(io.prefixed(f"{mode}.{j}", judge.predict(imgs)))
        io.save_tensors(out / f"sweep_{a}.safetensors", tensors,
                        meta={"attribute": a, "class_id": c, "class": world.ATTRIBUTES[a][c], "features": feats,
                              "betas": {m: list(b) for m, b in betas.items()}, "n": n, "keep": keep})
        log["seconds"][a] = time.time() - t1
    # multi-attribute: per-sample targeting towards uniform, one attribute at a time and all at once
    t1 = time.time()
    edits = {}
    for a in world.SOCIAL:
        edits[a] = ID.edit_for(a, BETA_MULTI[a], target=pipeline.uniform(world.ATTRIBUTES[a]))
    tensors = {}
    for name, es in [(a, [edits[a]]) for a in world.SOCIAL] + [("all", list(edits.values()))]:
        imgs, iv = I.sample_edited(model, sae, es, noise=noise, steps=steps, batch_size=n, class_seed=1)
        tensors.update(io.prefixed(name, judge.predict(imgs)))
        tensors[f"{name}.images"] = (imgs[:keep] * 255).round().to(torch.uint8)
        for e in es:
            tensors[f"{name}.assigned.{e.attribute}"] = iv.classes(e.attribute)
    io.save_tensors(out / "multi.safetensors", tensors, meta={"beta": BETA_MULTI, "k": dict(ID.K), "n": n, "mode": "add (footprint)"})
    log["seconds"]["multi"] = time.time() - t1
    log["seconds"]["total"] = time.time() - t0
    io.write_json(out / "log.json", log)
    return log


# ----------------------------------------------------------------------------- verdicts (chapter 5's findings)


def finding3(shares: dict[float, float], n: int) -> dict:
    """Finding 3 on one sweep (``{β: share judged in the target class}``, ``n`` samples per β): the share is
    **monotone** (no step up in β lowers it by more than one standard error of a difference, or 1/n) **and
    moves** (largest-β share above smallest-β share by more than two standard errors of their difference)."""
    import numpy as np

    betas = sorted(shares)
    p = np.array([shares[b] for b in betas], dtype=float)
    se = np.sqrt(p * (1 - p) / n * 2)
    monotone = not bool((np.diff(p) < -np.maximum(se[1:], 1 / n)).any())
    se_ends = float(np.sqrt((p[0] * (1 - p[0]) + p[-1] * (1 - p[-1])) / n))
    moves = bool(p[-1] - p[0] > 2 * se_ends)
    return {"monotone": monotone, "moves": moves, "holds": monotone and moves,
            "share at smallest β": float(p[0]), "share at largest β": float(p[-1])}


def log_ratio(pred: torch.Tensor, majority: int, target: int, n: int | None = None) -> float:
    """log(p_majority / p_target) of judged classes ``pred``, shares clipped at 1/(2n) so the log is finite."""
    import math

    n = n or len(pred)
    p_t = max((pred == target).float().mean().item(), 1 / (2 * n))
    p_m = max((pred == majority).float().mean().item(), 1 / (2 * n))
    return math.log(p_m / p_t)


def finding4(ratios: list[float]) -> dict:
    """Finding 4 on one attribute's add sweep (log ratios majority/target over β): broad control holds when the
    ratio is driven through balance — it takes both signs over the sweep."""
    return {"log ratio at β=0": ratios[0], "min over β": min(ratios), "max over β": max(ratios),
            "crosses 0": min(ratios) < 0 < max(ratios)}


def finding5(fd_original: float, fd_alone: float, fd_together: float, floor: float) -> dict:
    """Finding 5 for one attribute: with all three attributes edited, its FD is **reduced** against the original
    by more than twice the noise ``floor`` and lies within twice the floor of its FD when edited alone (**no
    interference**)."""
    return {"FD original": fd_original, "FD edited alone": fd_alone, "FD all three edited": fd_together,
            "reduced vs original": fd_together < fd_original - 2 * floor,
            "no interference": abs(fd_together - fd_alone) <= 2 * floor}
