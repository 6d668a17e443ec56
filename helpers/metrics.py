"""Bias and quality metrics: Fairness Discrepancy with CIs, FID, similarity, keep-rate.

Introduced in chapter 1.

* **FD** (Fairness Discrepancy, as in DiffLens): ``FD = ||p̄ − p_ref||₂`` with ``p̄`` the mean
  one-hot judge prediction and ``p_ref`` the target distribution (uniform by default).
* **FID**: torchmetrics' ``FrechetInceptionDistance`` with the judge's encoder as the custom
  feature extractor (a *domain* FID; numbers are not comparable to Inception FIDs).
* **Similarity**: cosine similarity of judge features between paired images (stand-in for CLIP-I).
* **Keep-rate**: share of paired samples whose listed attributes are judged unchanged.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _one_hot(preds: torch.Tensor | np.ndarray, n_classes: int) -> np.ndarray:
    p = torch.as_tensor(preds)
    if p.dim() == 2:  # probabilities or one-hot: take the argmax class
        if p.shape[1] != n_classes:
            raise ValueError(f"FD: predictions have {p.shape[1]} columns but n_classes={n_classes}")
        p = p.argmax(1)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n_classes):
        raise ValueError(f"FD: class indices must lie in 0..{n_classes - 1}")
    return np.eye(n_classes)[p.long().numpy()]


def _ref(p_ref, n_classes: int) -> np.ndarray:
    if p_ref is None:
        return np.full(n_classes, 1.0 / n_classes)
    r = np.asarray(p_ref, dtype=float)
    if r.shape != (n_classes,) or (r < 0).any() or not np.isclose(r.sum(), 1.0):
        raise ValueError(f"FD: p_ref must be {n_classes} non-negative numbers summing to 1, got {p_ref}")
    return r


def fairness_discrepancy(preds, n_classes: int, p_ref=None) -> float:
    """FD of class predictions ``(n,)`` (indices) or ``(n, n_classes)`` (probabilities)."""
    oh = _one_hot(preds, n_classes)
    if len(oh) == 0:
        raise ValueError("FD: no predictions")
    return fd_of_shares(oh.mean(0), p_ref)


def shares_of(classes: torch.Tensor, n_classes: int, dtype=torch.float32) -> torch.Tensor:
    """The share of samples in each class ``(n_classes,)``, from class indices ``(n,)`` (a class no sample is in
    has share 0)."""
    classes = torch.as_tensor(classes).long()
    if len(classes) == 0:
        raise ValueError("shares_of: no samples")
    return torch.bincount(classes, minlength=n_classes).to(dtype) / len(classes)


def fd_of_shares(shares, p_ref=None) -> float:
    """FD of a class distribution ``(n_classes,)``: its L2 distance to ``p_ref`` (default uniform) — what
    :func:`fairness_discrepancy` computes from the predictions' mean, usable on a mixture of distributions."""
    shares = np.asarray(shares, dtype=np.float64)
    return float(np.linalg.norm(shares - _ref(p_ref, len(shares))))


def fd_bootstrap(preds, n_classes: int, p_ref=None, n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """FD with a percentile bootstrap confidence interval: ``{"fd", "lo", "hi", "n"}``."""
    oh = _one_hot(preds, n_classes)
    ref = _ref(p_ref, n_classes)
    rng = np.random.default_rng(seed)
    n = len(oh)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # resample weights
    means = counts @ oh / n
    fds = np.linalg.norm(means - ref, axis=1)
    a = (1 - ci) / 2
    return {"fd": float(np.linalg.norm(oh.mean(0) - ref)), "lo": float(np.quantile(fds, a)),
            "hi": float(np.quantile(fds, 1 - a)), "n": n}


def fd_floor(n: int, n_classes: int, p_ref=None, n_sim: int = 20_000, seed: int = 0) -> dict[str, float]:
    """FD that sampling noise alone gives: ``n`` draws from exactly ``p_ref``.

    Returns the mean and 95th percentile over ``n_sim`` simulated sets, and the analytic
    root-mean-square ``sqrt(sum_k p_k (1 - p_k) / n)``.
    """
    ref = _ref(p_ref, n_classes)
    rng = np.random.default_rng(seed)
    fds = np.linalg.norm(rng.multinomial(n, ref, size=n_sim) / n - ref, axis=1)
    return {"mean": float(fds.mean()), "p95": float(np.quantile(fds, 0.95)),
            "rms": float(np.sqrt((ref * (1 - ref)).sum() / n)), "n": n}


class _Encoder(torch.nn.Module):
    """Adapts the judge's encoder to torchmetrics' custom-feature-extractor interface."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    @torch.no_grad()
    def forward(self, x):
        self.judge.eval()
        return self.judge.encode(x).double()


def fid(real: torch.Tensor, fake: torch.Tensor, judge, batch_size: int = 500) -> float:
    """Domain FID between two image sets ``(n, 3, H, W)`` in [0, 1], via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError("fid: need at least 2 images in each set")
    metric = FrechetInceptionDistance(feature=_Encoder(judge), normalize=True)
    for s in range(0, len(real), batch_size):
        metric.update(real[s:s + batch_size].float(), real=True)
    for s in range(0, len(fake), batch_size):
        metric.update(fake[s:s + batch_size].float(), real=False)
    return float(metric.compute())


class _Given(torch.nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID take features computed earlier."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x.double()


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Domain FID from stored judge features ``(n, d)`` (same number as :func:`fid` on the images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid_from_features: need (n, d) features of equal d, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("fid_from_features: need at least 2 feature rows in each set")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def similarity(a: torch.Tensor, b: torch.Tensor, judge) -> torch.Tensor:
    """Per-pair cosine similarity ``(n,)`` of judge features (the CLIP-I stand-in)."""
    if a.shape != b.shape:
        raise ValueError(f"similarity: paired image sets differ in shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(judge.features(a), judge.features(b), dim=1)


def keep_rate(probs_a: dict[str, torch.Tensor], probs_b: dict[str, torch.Tensor], attrs: Sequence[str]) -> float:
    """Share of paired samples whose judged class is unchanged on *every* attribute in ``attrs``."""
    if not attrs:
        raise ValueError("keep_rate: give at least one attribute")
    same = kept(probs_a, probs_b, attrs)
    return int(same.sum()) / len(same)  # exact (a float32 mean reads 475/500 as 0.94999)


def kept(probs_a: dict[str, torch.Tensor], probs_b: dict[str, torch.Tensor], attrs: Sequence[str]) -> torch.Tensor:
    """Per paired sample: is its judged class unchanged on every attribute in ``attrs``? ``(n,)`` bool."""
    if not attrs:
        raise ValueError("kept: give at least one attribute")
    same = None
    for a in attrs:
        s = probs_a[a].argmax(-1) == probs_b[a].argmax(-1)
        same = s if same is None else same & s
    return same


def keep_among(probs_a: dict[str, torch.Tensor], probs_b: dict[str, torch.Tensor], attrs: Sequence[str],
               mask: torch.Tensor) -> float | None:
    """Keep-rate among the samples of ``mask`` only (e.g. those an edit actually changed): samples left alone are
    bit-identical and always kept, so the overall keep-rate rises with every sample a policy does not touch.
    ``None`` when the mask is empty."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if not bool(mask.any()):
        return None
    return int(kept(probs_a, probs_b, attrs)[mask].sum()) / int(mask.sum())


def paired_difference(x: torch.Tensor, y: torch.Tensor, stat, n_boot: int = 2000, ci: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """``stat(x) − stat(y)`` for paired per-sample data (same noise, same order) with a paired percentile
    bootstrap CI: the same resampled sample indices go into both. ``stat`` maps ``(n, ...)`` to a float
    (e.g. FD of class predictions, or the mean of a kept indicator). Returns ``{"diff", "lo", "hi", "n"}``."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if len(x) != len(y):
        raise ValueError(f"paired_difference: {len(x)} and {len(y)} samples; pairs need the same noise and n")
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    diffs = []
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=g)
        diffs.append(stat(x[idx]) - stat(y[idx]))
    d = np.asarray(diffs)
    a = (1 - ci) / 2
    return {"diff": float(stat(x) - stat(y)), "lo": float(np.quantile(d, a)), "hi": float(np.quantile(d, 1 - a)),
            "n": n}


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """McNemar's exact test on paired binary outcomes (e.g. kept by method a / by method b, sample by sample):
    only the discordant pairs count. Returns the counts and the two-sided binomial p-value."""
    from scipy.stats import binomtest

    a, b = torch.as_tensor(a, dtype=torch.bool), torch.as_tensor(b, dtype=torch.bool)
    if a.shape != b.shape:
        raise ValueError("mcnemar: the outcomes must be paired (same shape)")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p}


def matched_setting(rows: Sequence[dict], keep: float, key: str = "keep all", knob: str = "setting") -> dict:
    """The knob value where a method's validation frontier crosses keep-rate ``keep``, by linear interpolation
    between the two settings that bracket it (settings sorted; the first crossing from above is used).

    Returns ``{"setting": float | None, "why": str}``: ``None`` with the reason when the grid never reaches
    the keep-rate (every setting below it) or never leaves it (every setting above it: the grid must extend).
    """
    pts = sorted((float(r[knob]), float(r[key])) for r in rows)
    if not pts:
        raise ValueError("matched_setting: no validation rows")
    if all(k < keep for _, k in pts):
        return {"setting": None, "why": f"every setting keeps less than {keep} (best {max(k for _, k in pts):.3f})"}
    for (s0, k0), (s1, k1) in zip(pts, pts[1:]):
        if k0 >= keep > k1:
            return {"setting": s0 + (k0 - keep) / (k0 - k1) * (s1 - s0), "why": "interpolated"}
    if all(k >= keep for _, k in pts):
        return {"setting": None, "why": f"every setting keeps at least {keep}: extend the grid past {pts[-1][0]:g}"}
    return {"setting": None, "why": "the frontier is not monotone around this keep-rate"}


def confident_share(probs: dict[str, torch.Tensor], attrs: Sequence[str], threshold: float = 0.9) -> dict[str, float]:
    """Per attribute, the share of samples whose top judged class has probability ≥ ``threshold``."""
    return {a: (probs[a].max(-1).values >= threshold).float().mean().item() for a in attrs}


def marginals(probs: dict[str, torch.Tensor], attrs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per attribute, the share of samples judged in each class (mean one-hot prediction)."""
    out = {}
    for a in attrs:
        k = probs[a].shape[1]
        out[a] = _one_hot(probs[a], k).mean(0)
    return out


def class_shares(probs: dict[str, torch.Tensor], spec, attrs: Sequence[str]) -> dict[str, dict]:
    """Per attribute, the spec's class shares, the judged shares and the largest absolute gap between them."""
    marg = marginals(probs, attrs)
    return {a: {"spec": spec.marginal(a).tolist(), "model": marg[a].tolist(),
                "max_abs_gap": float(np.abs(marg[a] - spec.marginal(a)).max())} for a in attrs}


def quality_report(samples: torch.Tensor, judge, spec, reference: torch.Tensor, floor_reference: torch.Tensor,
                   attrs: Sequence[str] = ("gender", "age", "race"), threshold: float = 0.9,
                   n_boot: int = 2000) -> dict:
    """Everything chapter 1 reports about a model's samples, in one dict.

    ``reference`` and ``floor_reference`` are two independent sets of fresh renders from
    ``spec``, the same size as ``samples``: FID(samples, reference) is shown next to
    FID(floor_reference, reference), the value two sets of true renders give.
    """
    probs = judge.predict(samples)
    ref_probs = judge.predict(reference)
    shares = class_shares(probs, spec, attrs)
    out = {"n": len(samples), "confident": confident_share(probs, attrs, threshold), "attributes": {}}
    for a in attrs:
        k = probs[a].shape[1]
        out["attributes"][a] = {
            **shares[a],
            "fd_model": fd_bootstrap(probs[a], k, n_boot=n_boot),
            "fd_data": fd_bootstrap(ref_probs[a], k, n_boot=n_boot),
            "fd_spec": float(np.linalg.norm(spec.marginal(a) - 1.0 / k)),
            "fd_floor": fd_floor(len(samples), k),
        }
    out["fid"] = fid(reference, samples, judge)
    out["fid_floor"] = fid(reference, floor_reference, judge)
    return out


# ----------------------------------------------------------------------------- monosemanticity (ch. 2–3)
def _quantile_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Discretize one unit's activations into ≤ ``bins`` quantile bins (ties, e.g. many zeros, merge)."""
    edges = torch.quantile(x.float(), torch.linspace(0, 1, bins + 1)[1:-1])
    return torch.bucketize(x.float(), torch.unique(edges), right=True)


def _mi(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plug-in mutual information (nats, torchmetrics) minus the Miller–Madow bias (bx−1)(by−1)/2n."""
    from torchmetrics.functional.clustering import mutual_info_score

    n = len(x)
    if n < 2:
        return 0.0
    bx, by = len(torch.unique(x)), len(torch.unique(y))
    if bx < 2 or by < 2:
        return 0.0
    return max(0.0, mutual_info_score(x, y).item() - (bx - 1) * (by - 1) / (2 * n))


def _entropy(y: torch.Tensor) -> float:
    p = torch.bincount(y).float()
    p = p[p > 0] / len(y)
    return float(-(p * p.log()).sum())


def unit_attribute_nmi(acts: torch.Tensor, labels: dict[str, torch.Tensor], bins: int = 8) -> "pd.DataFrame":
    """How much each unit tells about each attribute: ``I(unit; attr) / H(attr)`` in [0, 1].

    ``acts`` is ``(n, units)`` (a channel's or latent's activation per sample), ``labels``
    maps attribute → ``(n,)`` class ids. The unit's activation is binned into ``bins``
    quantiles; mutual information comes from torchmetrics' ``mutual_info_score`` minus the
    Miller–Madow estimate of its small-sample bias, and is divided by the attribute's entropy
    so attributes with different class counts compare (1 = the unit alone determines it).
    Returns a DataFrame with one row per unit and one column per attribute.
    """
    import warnings

    import pandas as pd

    if acts.ndim != 2:
        raise ValueError(f"unit_attribute_nmi: acts must be (samples, units), got {tuple(acts.shape)}")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        binned = [_quantile_bins(acts[:, u], bins) for u in range(acts.shape[1])]
        for a, y in labels.items():
            y = torch.as_tensor(y).long()
            if len(y) != len(acts):
                raise ValueError(f"unit_attribute_nmi: {a} has {len(y)} labels for {len(acts)} samples")
            h = _entropy(y)
            out[a] = [_mi(b, y) / h if h > 0 else 0.0 for b in binned]
    return pd.DataFrame(out)


def conditional_nmi(acts: torch.Tensor, labels: dict[str, torch.Tensor], given: str, bins: int = 8) -> "pd.DataFrame":
    """``I(unit; attr | given) / H(attr | given)`` for every unit and every attribute other than ``given``.

    What a unit knows about ``attr`` *beyond* what ``given`` explains. Needed because the world's
    attributes are correlated (the backdrop depends on gender, glasses on age): a pure gender unit
    still has mutual information with the backdrop, but none once gender is fixed.
    """
    import warnings

    import pandas as pd

    g = torch.as_tensor(labels[given]).long()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        binned = [_quantile_bins(acts[:, u], bins) for u in range(acts.shape[1])]
        for a, y in labels.items():
            if a == given:
                continue
            y = torch.as_tensor(y).long()
            groups = [(g == c).nonzero().flatten() for c in torch.unique(g)]
            hy = sum(len(ix) / len(y) * _entropy(y[ix]) for ix in groups)
            col = []
            for b in binned:
                mi = sum(len(ix) / len(y) * _mi(b[ix], y[ix]) for ix in groups)
                col.append(mi / hy if hy > 0 else 0.0)
            out[a] = col
    return pd.DataFrame(out)


def selectivity(acts: torch.Tensor, labels: dict[str, torch.Tensor], informative: float = 0.05,
                bins: int = 8) -> "pd.DataFrame":
    """Per unit: its best attribute and what it knows about any *other* attribute beyond that one.

    * ``best`` — the highest :func:`unit_attribute_nmi`; the unit is *informative* when ≥ ``informative``;
    * ``second`` / ``second_attribute`` — the highest :func:`conditional_nmi` given the best attribute;
    * *polysemantic* — informative and ``second`` ≥ ``informative`` too;
    * ``purity`` — best / (best + sum of the conditional scores): 1 = everything it knows is one attribute.
    """
    import pandas as pd

    nmi = unit_attribute_nmi(acts, labels, bins)
    best_attr = nmi.idxmax(axis=1)
    rows = []
    for a in nmi.columns:
        units = best_attr.index[best_attr == a]
        if len(units) == 0:
            continue
        cond = conditional_nmi(acts[:, list(units)], labels, a, bins)
        cond.index = units
        for u in units:
            c = cond.loc[u]
            best = nmi.loc[u, a]
            rows.append({"unit": u, "best_attribute": a, "best": best, "second_attribute": c.idxmax(),
                         "second": c.max(), "purity": best / (best + c.sum()) if best + c.sum() > 0 else 0.0})
    df = pd.DataFrame(rows).set_index("unit").loc[nmi.index]
    df["informative"] = df["best"] >= informative
    df["polysemantic"] = df["informative"] & (df["second"] >= informative)
    return df
