"""Chapter 4 experiments: per-step probe, IG rankings, and the top-k vs random-k vs channels check.

:func:`run` reuses the chapter 2–3 harvest (same cache key) and SAE, and writes ``data/identify/``:

* ``probe.safetensors``        — the per-step probe, with held-out accuracy per step in its metadata
* ``rank_latents_<attr>.safetensors`` / ``rank_channels_<attr>.safetensors`` — IG scores per class
* ``footprints_<attr>.safetensors`` — for each class, its top ``K_MAX`` latents and where each fires
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
# Features edited per class. Chosen on a validation noise seed (777, n=64), never on the check or sweep
# seeds: gender and age move with 8 latents; race (an ordinal skin-tone scale the model encodes as graded
# intensity on shared features) did not move with 8 at any β up to 32, and did with 32.
K = {"gender": 8, "age": 8, "race": 32}
K_MAX = 64
CHECK_BETAS = {"footprint": (1.0, 2.0, 4.0), "flat": (2.0, 4.0), "random": (2.0, 4.0), "channels": (2.0, 4.0)}


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


def save_footprints(sae, rankings: dict, h_by_step, labels: dict, out) -> None:
    """Top ``K_MAX`` latents of every class and their footprints, one file per attribute."""
    for a, r in rankings.items():
        t = {}
        for c in range(len(world.ATTRIBUTES[a])):
            if r.counts[c] == 0:
                continue
            feats = r.top(c, K_MAX)
            t[f"{c}.features"] = torch.tensor(feats)
            t[f"{c}.map"] = I.footprint(sae, h_by_step, labels[a], c, feats)
            t[f"{c}.active"] = active_share(sae, h_by_step, labels[a], c, feats)
        io.save_tensors(Path(out) / f"footprints_{a}.safetensors", t, meta={"attribute": a, "k_max": K_MAX})


def active_share(sae, h_by_step, labels, cls: int, feats) -> torch.Tensor:
    """Per feature: the share of an image's positions where it is active, averaged over the class's images."""
    shares = [(z > 0).float().mean((0, 1)) for z in I.class_latents(sae, h_by_step, labels, cls, feats)]
    return sum(shares) / len(shares)


def features(attribute: str, cls: int, k: int | None = None, folder=OUT) -> tuple[list[int], torch.Tensor]:
    """The top ``k`` latents of ``cls`` (default ``K[attribute]``) and their footprints ``(k, H·W)``."""
    k = K[attribute] if k is None else k
    if k > K_MAX:
        raise ValueError(f"features: k={k} but only the top {K_MAX} footprints are stored")
    path = Path(folder) / f"footprints_{attribute}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"features: {path} is missing; run helpers.identify.run() (chapter 4) first")
    t, _ = io.load_tensors(path)
    if f"{cls}.features" not in t:
        raise ValueError(f"features: class {cls} of {attribute!r} had no harvested samples, so no ranking")
    return t[f"{cls}.features"][:k].tolist(), t[f"{cls}.map"][:k]


def edit_for(attribute: str, beta: float, cls: int | None = None, target=None, k: int | None = None,
             flat: bool = False, steps=None, swap: bool = False, folder=OUT) -> "I.Edit":
    """An add-mode :class:`~helpers.intervention.Edit` on the ranked features (footprint unless ``flat``).

    With ``cls`` every sample is pushed towards that class; with ``target`` each sample draws its class
    and that class's features are edited. ``steps`` limits the edit to those sampling steps. ``swap``
    also zeroes the other classes' ranked features in each sample (``Edit.suppress_others``).
    """
    classes = range(len(world.ATTRIBUTES[attribute])) if cls is None or swap else [cls]
    feats, fps = {}, {}
    for c in classes:
        feats[c], fps[c] = features(attribute, c, k, folder)
    return I.Edit(attribute, feats, beta=beta, mode="add", cls=cls, target=target,
                  footprint=None if flat else fps, steps=None if steps is None else list(steps), suppress_others=swap)


def check(model, sae, judge, channel_rankings: dict, summary, h_by_step, n_label: int, n: int, steps: int,
          betas=None, seed: int = CHECK_SEED, folder=OUT, progress: bool = True) -> dict:
    """Target effect and leakage: top-k latents (footprint / flat) vs random-k latents vs top-k channels."""
    from tqdm.auto import tqdm

    betas = CHECK_BETAS if betas is None else betas
    noise = models.make_noise(n, model.sample_size, seed)
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb = judge.predict(base)
    labels = summary.labels()
    g = torch.Generator().manual_seed(seed)
    out = {"n": n, "k": dict(K), "steps": steps, "seed": seed, "betas": {m: list(b) for m, b in betas.items()},
           "rows": []}
    runs = len(world.SOCIAL) * sum(len(b) for b in betas.values())
    bar = tqdm(total=runs, desc="check", disable=not progress)
    for a in world.SOCIAL:
        c = minority(summary.probs[a])
        k = K[a]
        top, fp = features(a, c, k, folder)
        rand = torch.randperm(sae.cfg.d_sae, generator=g)[:k].tolist()
        rfp = I.footprint(sae, h_by_step, labels[a][:n_label], c, rand)
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
                    }[method]
                    imgs, _ = I.sample(model, sae, [e], noise=noise, steps=steps, batch_size=n)
                pe = judge.predict(imgs)
                changed = {b: float((pe[b].argmax(-1) != pb[b].argmax(-1)).float().mean()) for b in world.ATTRIBUTES}
                out["rows"].append({
                    "attribute": a, "class": world.ATTRIBUTES[a][c], "class_id": c, "method": name, "beta": beta,
                    "k": k, "units": units, "share_before": float((pb[a].argmax(-1) == c).float().mean()),
                    "share_after": float((pe[a].argmax(-1) == c).float().mean()),
                    "keep_other_social": metrics.keep_rate(pb, pe, [b for b in world.SOCIAL if b != a]),
                    "keep_nuisance": metrics.keep_rate(pb, pe, list(world.NUISANCE)),
                    "similarity": float(metrics.similarity(base, imgs, judge).mean()),
                    "changed": changed})
                bar.update(1)
    bar.close()
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
    save_footprints(sae, rankings, hs_by, tr, out)
    model = models.load_model("embedded")
    judge = J.load_judge()
    t0 = time.time()
    chk = check(model, sae, judge, ch_rankings, summary, hs_by, n_train, n=16 if quick else 128, steps=hs.steps,
                betas={m: b[:1] for m, b in CHECK_BETAS.items()} if quick else None, folder=out, progress=progress)
    chk["seconds"] = time.time() - t0
    io.write_json(out / "check.json", chk)
    io.write_json(out / "log.json", log)
    return log
