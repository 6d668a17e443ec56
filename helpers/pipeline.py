"""The DiffLens pipeline, one function per stage, used by the runner and by the chapters alike.

    harvest ─▶ sae ─▶ probe ─▶ rank (IG) ─▶ footprints ─▶ edit ─▶ evaluate

* :func:`harvest.run <helpers.harvest.run>` samples with h captured at a named site and judges every image;
* :func:`train_sae` trains a TopK SAE on the harvested h of the training samples;
* :func:`train_probe` fits the per-step h-probe on the judge's labels;
* :func:`rank_and_footprints` ranks SAE latents per class by integrated gradients and stores each class's
  top latents with their footprints;
* :func:`features` / :func:`edit_for` turn those files into an :class:`~helpers.intervention.Edit`;
* :func:`evaluate` is the one metric row (FD with CI, class shares, keep-rates, similarity, FID).

Nothing here knows the portrait world: an attribute is a name with class names, from the judge
(``judge.attributes``). The train/held-out split (:func:`n_train`) and the uniform target
(:func:`uniform`) have their home here. Chapter modules (``helpers.chapters``) call these with the
embedded model's settings; ``python -m helpers run`` calls them with a config's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from . import attribution, harvest, hooks, intervention, io, metrics
from . import probe as P
from . import sae as S

TRAIN_SHARE = 0.9  # leading share of the harvested samples that trains the SAE and the probe; the rest is held out
K_MAX = 64  # top latents stored per class with their footprints


class NoRanking(ValueError):
    """A class had no harvested sample judged in it, so it has no ranked features."""


def n_train(n: int, share: float = TRAIN_SHARE) -> int:
    """How many leading samples of ``n`` train the SAE and the probe (the rest are held out)."""
    if not 0 < share <= 1:
        raise ValueError(f"train share must be in (0, 1], got {share!r}")
    return int(share * n)


def uniform(classes: int | Sequence[str]) -> list[float]:
    """The uniform target over ``classes`` (a count or the class names)."""
    k = classes if isinstance(classes, int) else len(classes)
    if k < 2:
        raise ValueError(f"uniform: an attribute needs two or more classes, got {k}")
    return [1.0 / k] * k


def minority(probs: torch.Tensor, among: torch.Tensor | None = None) -> int:
    """The class a model draws least often (by judged share), from judge probabilities ``(n, classes)``.

    ``among`` (class ids, e.g. those with a ranking) limits the choice to those classes."""
    shares = metrics.shares_of(probs.argmax(-1), probs.shape[1], dtype=torch.float64)
    if among is not None:
        keep = torch.zeros_like(shares, dtype=torch.bool)
        keep[torch.as_tensor(among).long()] = True
        shares[~keep] = float("inf")
    return int(shares.argmin())


# ----------------------------------------------------------------------------- sae


def train_sae(folder, n_train: int, cfg: S.SAEConfig | None = None, train: S.SAETrainConfig | None = None,
              max_rows: int | None = None, device="cpu", desc: str = "sae", progress: bool = True):
    """Train a TopK SAE on the harvest in ``folder``: rows of samples ``< n_train`` train, the rest are held out.

    ``cfg`` defaults to 8× expansion with k scaled to the width (:func:`helpers.sae.scaled_k`), at the
    harvest's site. Returns ``(sae, history, held_out_metrics, rows_used)``.
    """
    settings = harvest.load_summary(folder).settings
    rows = harvest.load_rows(folder, max_rows=max_rows)
    keep = rows["sample"] < n_train
    x, held = rows["x"][keep].float(), rows["x"][~keep].float()
    if len(x) == 0:
        raise ValueError(f"train_sae: no training rows in {folder} (n_train = {n_train}); harvest more samples")
    width = x.shape[1]
    site = settings.get("site", hooks.DEFAULT_SITE)
    cfg = cfg or S.SAEConfig(d_in=width, expansion=8, k=S.scaled_k(width), site=site)
    if cfg.site != site:
        raise ValueError(f"train_sae: SAEConfig.site is {cfg.site!r} but the harvest was captured at {site!r}")
    train = train or S.SAETrainConfig()
    # a small harvest: one batch at most all rows, and the dead-latent window within reach
    train = replace(train, batch_size=min(train.batch_size, len(x)), dead_rows=min(train.dead_rows, 50 * len(x)))
    sae, hist = S.train_sae(x.to(device), cfg, train, desc=desc, progress=progress)
    ev = S.evaluate(sae, held.to(device)) if len(held) else {}
    return sae.cpu(), hist, ev, len(x)


# ----------------------------------------------------------------------------- probe


def train_probe(summary: harvest.Summary, attributes: dict[str, Sequence[str]], n_train: int, epochs: int = 300,
                progress: bool = False):
    """The per-step probe on the first ``n_train`` samples' pooled h; returns ``(probe, held-out accuracy)``
    (accuracy per step and attribute, ``None`` when nothing is held out)."""
    labels = summary.labels()
    missing = [a for a in attributes if a not in labels]
    if missing:
        raise ValueError(f"train_probe: the harvest's judge did not read {missing}; it read {list(labels)}")
    probe = P.train_probe(summary.pooled[:n_train], {a: labels[a][:n_train] for a in attributes},
                          attributes=dict(attributes), epochs=epochs, progress=progress,
                          site=summary.settings.get("site", hooks.DEFAULT_SITE))
    acc = None
    if n_train < len(summary.pooled):
        acc = P.accuracy(probe, summary.pooled[n_train:], {a: labels[a][n_train:] for a in attributes})
    return probe, acc


# ----------------------------------------------------------------------------- rank + footprints


def h_by_step(folder, steps, samples: torch.Tensor) -> dict[int, torch.Tensor]:
    """h ``(len(samples), C, H, W)`` at each listed step, in the order of ``samples``, from a harvest's shards."""
    sh = hooks.load_shards(Path(folder) / "shards")
    out = {}
    for s in steps:
        sel = (sh["step"] == s).nonzero().flatten()
        if len(sel) == 0:
            raise ValueError(f"h_by_step: the harvest in {folder} stored no full h at step {s} "
                             "(harvest shard_steps); attribute only stored steps")
        order = torch.full((max(int(sh["sample"].max()), int(torch.as_tensor(samples).max())) + 1,), -1,
                           dtype=torch.long)
        order[sh["sample"][sel]] = sel
        rows = order[torch.as_tensor(samples).long()]
        if (rows < 0).any():
            raise ValueError(f"h_by_step: samples {torch.as_tensor(samples)[rows < 0][:5].tolist()} have no stored h at "
                             f"step {s} in {folder}")
        out[int(s)] = sh["h"][rows]
    return out


def active_share(sae, h_by_step, labels, cls: int, feats) -> torch.Tensor:
    """Per feature: the share of an image's positions where it is active, averaged over the class's images."""
    shares = [(z > 0).float().mean((0, 1)) for z in intervention.class_latents(sae, h_by_step, labels, cls, feats)]
    return sum(shares) / len(shares)


def save_footprints(sae, rankings: dict, h_by_step, labels: dict, out, classes: dict[str, Sequence[str]],
                    k_max: int = K_MAX) -> None:
    """Top ``k_max`` latents of every class and their footprints, one file per attribute
    (``footprints_<attribute>.safetensors``; the class names go in its metadata)."""
    for a, r in rankings.items():
        t = {}
        for c in range(len(classes[a])):
            if r.counts[c] == 0:
                continue
            feats = r.top(c, min(k_max, r.scores.shape[1]))
            t[f"{c}.features"] = torch.tensor(feats)
            t[f"{c}.map"] = intervention.footprint(sae, h_by_step, labels[a], c, feats)
            t[f"{c}.active"] = active_share(sae, h_by_step, labels[a], c, feats)
        io.save_tensors(Path(out) / f"footprints_{a}.safetensors", t,
                        meta={"attribute": a, "k_max": k_max, "classes": list(classes[a]), "site": sae.cfg.site})


def rank_and_footprints(sae, probe, folder, labels: dict[str, torch.Tensor], attributes: Sequence[str], steps,
                        n_train: int, out, per_class: int = 48, ig_steps: int = 32, device="cpu",
                        progress: bool = True) -> dict:
    """IG rankings of the SAE latents for every class of each attribute (``rank_latents_<a>.safetensors``) and
    the footprints of each class's top latents, from the first ``n_train`` harvested samples at ``steps``.
    Returns ``{attribute: Ranking}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sae.to(device)
    probe.to(device)
    hs = h_by_step(folder, steps, torch.arange(n_train))
    tr = {a: labels[a][:n_train] for a in attributes}
    ranks = {}
    for a in attributes:
        r = attribution.rank(sae, probe, hs, tr[a], a, per_class=per_class, n_steps=ig_steps, progress=progress)
        r.save(out / f"rank_latents_{a}.safetensors")
        ranks[a] = r
    save_footprints(sae, ranks, hs, tr, out, {a: probe.class_names[a] for a in attributes})
    sae.cpu()
    probe.cpu()
    return ranks


def features(folder, attribute: str, cls: int, k: int) -> tuple[list[int], torch.Tensor]:
    """The top ``k`` latents of class ``cls`` and their footprints ``(k, H·W)``, from ``folder``'s footprint file."""
    path = Path(folder) / f"footprints_{attribute}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"features: {path} is missing; run the attribution stage (chapter 4) first")
    t, meta = io.load_tensors(path)
    if k > meta.get("k_max", K_MAX):
        raise ValueError(f"features: k={k} but only the top {meta.get('k_max', K_MAX)} footprints are stored")
    if f"{cls}.features" not in t:
        raise NoRanking(f"features: class {cls} of {attribute!r} had no harvested samples, so no ranking")
    return t[f"{cls}.features"][:k].tolist(), t[f"{cls}.map"][:k]


def class_names(folder, attribute: str) -> list[str]:
    """The class names stored with an attribute's footprints."""
    path = Path(folder) / f"footprints_{attribute}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"class_names: {path} is missing; run the attribution stage (chapter 4) first")
    meta = io.load_tensors(path)[1]
    if "classes" not in meta:
        raise ValueError(f"{path} does not name its classes (an older format); rerun the attribution stage")
    return list(meta["classes"])


def edit_for(folder, attribute: str, beta, k: int, cls: int | None = None, target=None, flat: bool = False,
             steps=None, swap: bool = False, source: torch.Tensor | None = None, mode: str = "add",
             policy: str = "quota", probe=None, read_step: int | None = None) -> intervention.Edit:
    """An :class:`~helpers.intervention.Edit` on the ranked features of ``folder``.

    ``mode="add"`` (default) adds β at each feature's footprint (flat everywhere with ``flat``); ``mode="scale"``
    multiplies the features by β. ``beta`` is one strength or one per class (the released configs' ratios,
    the majority's at 1). With ``cls`` every sample is pushed towards that class; with ``target`` each sample
    is assigned a class by ``policy`` (:data:`helpers.intervention.POLICIES`; ``"minimal"`` reads each
    sample's own class with ``probe``), and that class's features are edited (``source``: each sample's own
    class from elsewhere, to move only the surplus). ``steps`` limits the edit to those sampling steps.
    ``swap`` also zeroes the other classes' ranked features in each sample (``Edit.suppress_others``).
    """
    names = class_names(folder, attribute)
    classes = range(len(names)) if cls is None or swap or not isinstance(beta, (int, float)) else [cls]
    feats, fps = {}, {}
    for c in classes:
        feats[c], fps[c] = features(folder, attribute, c, k)
    return intervention.Edit(attribute, feats, beta=beta, mode=mode, cls=cls, target=target,
                             footprint=None if flat or mode != "add" else fps,
                             steps=None if steps is None else list(steps), suppress_others=swap, source=source,
                             classes=tuple(names), policy=policy, probe=probe, read_step=read_step)


# ----------------------------------------------------------------------------- cells that cost what they edit


@dataclass
class Reference:
    """The unedited pass over a cell's noise, with what edited cells reuse: the judge's reading and features of
    every sample, the state entering each of ``states``' steps and the pooled h at each of ``pooled``' steps."""

    probs: dict[str, torch.Tensor]  # {attribute: (n, classes)}
    features: torch.Tensor  # (n, F) judge features
    states: dict[int, torch.Tensor]  # step -> (n, C, H, W) x entering that step
    pooled: dict[int, torch.Tensor]  # step -> (n, C_h) spatially pooled h at the site
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    steps: int
    passes: int  # UNet passes spent


def original_pass(model, noise: torch.Tensor, steps: int, judge, state_steps=(), pooled_steps=(),
                  batch_size: int = 128, site: str = hooks.DEFAULT_SITE, progress: bool = False) -> Reference:
    """Sample ``noise`` unedited, keeping what :func:`edited_pass` needs to skip unedited samples and resume
    edited ones (pixel models)."""
    from tqdm.auto import tqdm

    from . import models

    states = {int(s): [] for s in state_steps}
    pooled = {int(s): [] for s in pooled_steps}
    imgs = []
    bar = tqdm(total=len(noise) * steps, disable=not progress, desc="original", unit="img-step")
    for b in range(0, len(noise), batch_size):
        st = {s: None for s in states}

        def keep(h, info):
            if info.step in pooled:
                pooled[info.step].append(h.detach().float().mean((2, 3)).cpu())

        with hooks.site_hooks(model.unet, keep, site=site):  # one block per batch: steps count from 0 in each
            imgs.append(models.sample(model, noise=noise[b:b + batch_size], steps=steps, batch_size=batch_size,
                                      states=st, bar=bar))
        for s in states:
            states[s].append(st[s])
    bar.close()
    images = torch.cat(imgs)
    return Reference(judge.predict(images), judge.features(images), {s: torch.cat(v) for s, v in states.items()},
                     {s: torch.cat(v) for s, v in pooled.items()}, images, steps, len(noise) * steps)


def edited_pass(ref: Reference, asked: torch.Tensor, run, judge, start_step: int = 0) -> dict:
    """A cell that costs what it edits: samples asked for no class (``-1``) are the reference's own (an edit that
    does nothing at any step gives the unedited sample bit for bit), the others are sampled by
    ``run(idx, x, start_step) -> images`` from ``x`` = their reference state entering ``start_step`` (their
    noise when 0). Returns ``{"probs", "features", "edited", "passes"}`` for all ``n`` samples."""
    asked = torch.as_tensor(asked).long()
    idx = (asked >= 0).nonzero().flatten()
    probs = {a: p.clone() for a, p in ref.probs.items()}
    features = ref.features.clone()
    if len(idx):
        if start_step not in ref.states:
            raise ValueError(f"edited_pass: the reference kept no state at step {start_step} (kept: "
                             f"{sorted(ref.states)}); run original_pass with state_steps=({start_step},)")
        images = run(idx, ref.states[start_step][idx], start_step)
        p = judge.predict(images)
        for a in probs:
            probs[a][idx] = p[a]
        features[idx] = judge.features(images)
    return {"probs": probs, "features": features, "edited": asked >= 0,
            "passes": len(idx) * (ref.steps - start_step)}


# ----------------------------------------------------------------------------- evaluate


def evaluate(original: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], attribute: str,
             keep: dict[str, Sequence[str]], original_features: torch.Tensor | None = None,
             edited_features: torch.Tensor | None = None, reference_features: torch.Tensor | None = None,
             n_boot: int = 1000, floor: bool = False) -> dict:
    """The metric row of one edit, from judge probabilities of the original and the edited samples (same noise).

    * ``FD`` against the uniform distribution, with a bootstrap 95% CI (``FD lo`` / ``FD hi``) and, with
      ``floor``, the FD a perfectly uniform sampler shows at this n (``FD floor``);
    * ``share original`` / ``share edited``: judged class shares of ``attribute``;
    * ``keep <name>`` for every group of ``keep`` (``{name: attributes}``): the share of samples whose judged
      class of every listed attribute is unchanged;
    * with features: ``similarity`` (mean cosine similarity of each edited sample to its original) and
      ``FID`` of the edited features against ``reference_features`` (default: the originals').
    """
    k = edited[attribute].shape[1]
    preds = edited[attribute].argmax(-1)
    fd = metrics.fd_bootstrap(preds, k, n_boot=n_boot)
    row = {"n": len(preds), "FD original": metrics.fairness_discrepancy(original[attribute].argmax(-1), k),
           "FD": metrics.fairness_discrepancy(preds, k), "FD lo": fd["lo"], "FD hi": fd["hi"],
           "share original": metrics.shares_of(original[attribute].argmax(-1), k).tolist(),
           "share edited": metrics.shares_of(preds, k).tolist()}
    if floor:
        row["FD floor"] = metrics.fd_floor(len(preds), k, n_sim=2000)
    for name, attrs in keep.items():
        row[f"keep {name}"] = metrics.keep_rate(original, edited, list(attrs)) if attrs else None
    if original_features is not None and edited_features is not None:
        row["similarity"] = float(torch.nn.functional.cosine_similarity(
            edited_features.float(), original_features.float(), dim=1).mean())
        ref = original_features if reference_features is None else reference_features
        row["FID"] = metrics.fid_from_features(ref.float(), edited_features.float()) if len(edited_features) > 1 \
            else None
    return row

