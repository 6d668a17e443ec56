"""Chapter 4 experiments: per-step probe, IG rankings, and the top-k vs random-k vs channels check.

:func:`run` reuses the chapter 2–3 harvest (same cache key) and SAE, and writes ``data/identify/``:

* ``probe.safetensors``        — the per-step probe, with held-out accuracy per step in its metadata
* ``rank_latents_<attr>.safetensors`` / ``rank_channels_<attr>.safetensors`` — IG scores per class
* ``footprints_<attr>.safetensors`` — for each class, its top ``pipeline.K_MAX`` latents and where each fires
  (mean activation map over the class's harvested samples, :func:`helpers.intervention.footprint`)
* ``check.json``               — for each social attribute's minority class: share judged in that class and
  leakage onto the other attributes, after adding β to the top-k latents (at their footprint, and
  flat everywhere as in the paper), k random latents (at their footprint), or the top-k channels
  (ranked the same way, pushed in the direction they contribute), on the same noise
* ``log.json``                 — timings (IG throughput) and fingerprints
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import attribution, cache, hooks, io, models, pipeline, world
from .. import harvest as H
from .. import intervention as I
from .. import judge as J
from .. import probe as P
from .. import sae as S
from . import dissect as D

OUT = models.DATA_DIR / "identify"
IG_STEPS = (0, 4, 8, 12, 16, 20, 24)  # sampling steps whose h is attributed
CHECK_SEED = 4_242  # noise of the check (not the harvest, not the evaluation set)
# Features edited per class. Chosen on a validation noise seed (777, n=64), never on the check or sweep
# seeds: gender and age move with 8 latents; race (an ordinal skin-tone scale the model encodes as graded
# intensity on shared features) did not move with 8 at any β up to 32, and did with 32.
K = {"gender": 8, "age": 8, "race": 32}
CHECK_BETAS = {"footprint": (1.0, 2.0, 4.0), "flat": (2.0, 4.0), "random": (2.0, 4.0), "random, size-matched": (2.0, 4.0),
               "channels": (2.0, 4.0)}


h_by_step = pipeline.h_by_step
minority = pipeline.minority


def channel_edit_fn(channels: list[int], signs: list[float], beta: float, scale: float):
    """Add ``± beta · scale`` to each listed channel of h at every position (the raw-channel analogue).

    ``signs`` say which way each channel pushes towards the class (the sign of its mean value in that
    class: with a zero baseline, IG credits a channel when value and gradient share a sign). ``scale`` is
    the SAE's input scale, so a channel edit of β has the same size as a latent edit of β.
    """
    def fn(h, info):
        d = torch.zeros(1, h.shape[1], 1, 1, dtype=h.dtype)
        d[0, channels, 0, 0] = torch.tensor(signs, dtype=h.dtype) * beta * scale
        return h + d
    return fn


def channel_signs(h_by_step: dict[int, torch.Tensor], labels: torch.Tensor, cls: int, channels) -> list[float]:
    """Sign of each channel's mean value over samples judged ``cls`` (all given steps and positions)."""
    ids = (torch.as_tensor(labels).long() == cls).nonzero().flatten()
    m = sum(h[ids][:, list(channels)].float().mean((0, 2, 3)) for h in h_by_step.values())
    return [1.0 if v >= 0 else -1.0 for v in m.tolist()]


def features(attribute: str, cls: int, k: int | None = None, folder=OUT) -> tuple[list[int], torch.Tensor]:
    """The top ``k`` latents of ``cls`` (default ``K[attribute]``) and their footprints ``(k, H·W)``."""
    return pipeline.features(folder, attribute, cls, K[attribute] if k is None else k)


def edit_for(attribute: str, beta: float, cls: int | None = None, target=None, k: int | None = None,
             flat: bool = False, steps=None, swap: bool = False, folder=OUT, source=None) -> "I.Edit":
    """:func:`helpers.pipeline.edit_for` on chapter 4's rankings with ``K[attribute]`` features per class."""
    return pipeline.edit_for(folder, attribute, beta, K[attribute] if k is None else k, cls=cls, target=target,
                             flat=flat, steps=steps, swap=swap, source=source)


def edit_norm(sae, feats, fp) -> float:
    """‖Δh‖ of adding β = 1 of ``feats`` at their footprint ``fp`` ``(k, positions)`` (over positions and channels).
    Add edits are linear in β, so this sizes any β's edit exactly."""
    d = fp.float().T @ sae.W_dec[list(map(int, feats))].detach().float()  # (positions, channels)
    return float(d.norm() * sae.input_scale)


def check(model, sae, judge, channel_rankings: dict, summary, h_by_step, n_label: int, n: int, steps: int,
          betas=None, seed: int = CHECK_SEED, folder=OUT, progress: bool = True) -> dict:
    """Target effect and leakage: top-k latents (footprint / flat) vs random-k latents vs top-k channels."""
    from tqdm.auto import tqdm

    betas = CHECK_BETAS if betas is None else betas
    noise = models.make_noise(n, model.sample_size, seed)
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb, fb = judge.predict(base), judge.features(base)
    labels = summary.labels()
    g = torch.Generator().manual_seed(seed)
    out = {"n": n, "k": dict(K), "steps": steps, "seed": seed, "betas": {m: list(b) for m, b in betas.items()},
           "rows": []}
    runs = len(world.SOCIAL) * sum(len(b) for b in betas.values())
    bar = tqdm(total=runs, desc="check", disable=not progress)
    for a in world.SOCIAL:
        ranked = (torch.bincount(labels[a][:n_label], minlength=len(world.ATTRIBUTES[a])) > 0).nonzero().flatten()
        c = minority(summary.probs[a], among=ranked)  # a class with no training sample has no ranking
        k = K[a]
        top, fp = features(a, c, k, folder)
        rand = torch.randperm(sae.cfg.d_sae, generator=g)[:k].tolist()
        rfp = I.footprint(sae, h_by_step, labels[a][:n_label], c, rand)
        size_ratio = edit_norm(sae, top, fp) / edit_norm(sae, rand, rfp)  # random-k's edit is this much smaller
        chans = channel_rankings[a].top(c, min(k, channel_rankings[a].scores.shape[1]))
        signs = channel_signs(h_by_step, labels[a][:n_label], c, chans)
        for method, bs in betas.items():
            for beta in bs:
                if method == "channels":
                    name, units = "top-k channels", chans
                    with hooks.edit(model.unet, channel_edit_fn(chans, signs, beta, float(sae.input_scale))):
                        imgs = models.sample(model, noise=noise, steps=steps, batch_size=n)
                else:
                    name, units, e = {
                        "footprint": ("top-k latents, footprint", top, I.Edit(a, {c: top}, beta, "add", cls=c,
                                                                                footprint={c: fp})),
                        "flat": ("top-k latents, flat", top, I.Edit(a, {c: top}, beta, "add", cls=c)),
                        "random": ("random-k latents, footprint", rand, I.Edit(a, {c: rand}, beta, "add", cls=c,
                                                                                footprint={c: rfp})),
                        # the same random latents with β scaled so that ‖Δh‖ equals the top-k edit's
                        "random, size-matched": ("random-k latents, size-matched", rand,
                                                 I.Edit(a, {c: rand}, beta * size_ratio, "add", cls=c,
                                                        footprint={c: rfp})),
                    }[method]
                    imgs, _ = I.sample_edited(model, sae, [e], noise=noise, steps=steps, batch_size=n)
                pe = judge.predict(imgs)
                ev = pipeline.evaluate(pb, pe, a, keep={"other social": [b for b in world.SOCIAL if b != a],
                                                        "nuisance": list(world.NUISANCE)},
                                       original_features=fb, edited_features=judge.features(imgs), n_boot=200)
                changed = {b: float((pe[b].argmax(-1) != pb[b].argmax(-1)).float().mean()) for b in world.ATTRIBUTES}
                out["rows"].append({
                    "attribute": a, "class": world.ATTRIBUTES[a][c], "class_id": c, "method": name, "beta": beta,
                    "k": k, "units": units, "size_ratio": size_ratio, "share_before": ev["share original"][c], "share_after": ev["share edited"][c],
                    "keep_other_social": ev["keep other social"], "keep_nuisance": ev["keep nuisance"],
                    "similarity": ev["similarity"], "changed": changed})
                bar.update(1)
    bar.close()
    return out


def rerun_check(out=OUT, progress: bool = True) -> dict:
    """Only the check, from the stored probe rankings and footprints (the harvest is re-made in the cache when
    missing): what a new control needs without redoing IG. Rewrites ``check.json``."""
    from .. import attribution as A

    out = Path(out)
    hs = H.HarvestSettings()
    folder = H.cached("embedded", hs, progress=progress)
    summary = H.load_summary(folder)
    sae, _ = S.load_sae(D.OUT / "sae.safetensors")
    n_train = pipeline.n_train(hs.n)
    hs_by = h_by_step(folder, IG_STEPS, torch.arange(n_train))
    ch = {a: A.Ranking.load(out / f"rank_channels_{a}.safetensors") for a in world.SOCIAL}
    t0 = time.time()
    chk = check(models.load_model("embedded"), sae, J.load_judge(), ch, summary, hs_by, n_train, n=128, steps=hs.steps,
                folder=out, progress=progress)
    chk["seconds"] = time.time() - t0
    io.write_json(out / "check.json", chk)
    return chk


def run(out=OUT, quick: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR), "quick": quick}
    hs = H.HarvestSettings(n=40, steps=5, batch_size=20) if quick else H.HarvestSettings()
    folder = H.cached("embedded", hs, progress=progress)
    summary = H.load_summary(folder)
    sae, _ = S.load_sae(D.OUT / "sae.safetensors")
    n_train = pipeline.n_train(hs.n)
    labels = summary.labels()
    tr = {a: y[:n_train] for a, y in labels.items()}
    t0 = time.time()
    probe, acc = pipeline.train_probe(summary, {a: world.ATTRIBUTES[a] for a in world.SOCIAL}, n_train)
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
    pipeline.save_footprints(sae, rankings, hs_by, tr, out, world.ATTRIBUTES)
    model = models.load_model("embedded")
    judge = J.load_judge()
    t0 = time.time()
    chk = check(model, sae, judge, ch_rankings, summary, hs_by, n_train, n=16 if quick else 128, steps=hs.steps,
                betas={m: b[:1] for m, b in CHECK_BETAS.items()} if quick else None, folder=out, progress=progress)
    chk["seconds"] = time.time() - t0
    io.write_json(out / "check.json", chk)
    io.write_json(out / "log.json", log)
    return log
