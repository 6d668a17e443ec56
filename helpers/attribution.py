"""Integrated gradients over SAE latents: which features make the probe see a class (chapter 4).

The path runs latents → SAE decoder → h → probe head → probability of one class. The SAE's
reconstruction error of each sample is held fixed along the path, so at the end point the
probe sees the real h. The baseline is all-zero latents (option: a contrasting sample's
latents). Captum's ``IntegratedGradients`` does the integration, batched over samples, and
returns the convergence delta that checks completeness (attributions sum to f(z) − f(baseline)).

Scores are summed over the 8×8 positions, averaged over the samples judged to be in the
class, and averaged over the chosen sampling steps, giving one ranked feature list per class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import io
from .probe import HProbe
from .sae import TopKSAE, from_rows, to_rows


def _latent_maps(sae: TopKSAE, h: torch.Tensor):
    """Dense latents ``(B, P, m)`` of h and its reconstruction error ``(B, C, H, W)``."""
    b, c, hh, ww = h.shape
    with torch.no_grad():
        z = sae.encode(to_rows(h)).view(b, hh * ww, -1)
        err = h - from_rows(sae.decode(z.view(-1, z.shape[-1])), h.shape)
    return z, err


def latent_ig(sae: TopKSAE, probe: HProbe, h: torch.Tensor, step: int, attribute: str, cls: int,
              baseline: torch.Tensor | None = None, n_steps: int = 32, internal_batch_size: int = 64,
              output: str = "prob"):
    """Integrated gradients of P(``cls`` of ``attribute``) w.r.t. the SAE latents of ``h``.

    ``h`` is ``(B, C, H, W)`` captured at sampling ``step``. Returns ``(attributions, delta)``:
    ``(B, H·W, latents)`` and captum's convergence delta ``(B,)``.
    """
    from captum.attr import IntegratedGradients

    probe.check_class(attribute, cls)
    if h.ndim != 4 or h.shape[1] != sae.cfg.d_in:
        raise ValueError(f"latent_ig: h must be (batch, {sae.cfg.d_in}, H, W), got {tuple(h.shape)}")
    shape = h.shape
    z, err = _latent_maps(sae, h.float())
    if baseline is None:
        baseline = torch.zeros_like(z)
    elif baseline.shape != z.shape:
        baseline = baseline.expand_as(z)

    def f(zz, e):
        hh = from_rows(sae.decode(zz.reshape(-1, zz.shape[-1])), (len(zz), *shape[1:])) + e
        return probe.class_prob(hh, step, attribute, cls, output)

    ig = IntegratedGradients(f)
    attr, delta = ig.attribute(z, baselines=baseline, additional_forward_args=(err,), n_steps=n_steps,
                               internal_batch_size=internal_batch_size, return_convergence_delta=True)
    return attr.detach(), delta.detach()


def channel_ig(probe: HProbe, h: torch.Tensor, step: int, attribute: str, cls: int, n_steps: int = 32):
    """The same attribution over raw channels (baseline: h with every channel at zero): ``(B, C)``."""
    from captum.attr import IntegratedGradients

    probe.check_class(attribute, cls)
    ig = IntegratedGradients(lambda x: probe.class_prob(x, step, attribute, cls))
    attr, delta = ig.attribute(h.float(), baselines=torch.zeros_like(h, dtype=torch.float), n_steps=n_steps,
                               return_convergence_delta=True)
    return attr.sum((2, 3)).detach(), delta.detach()


@dataclass
class Ranking:
    """Ranked features per class of one attribute, with the settings that made them."""

    attribute: str
    scores: torch.Tensor  # (classes, units): mean attribution per class
    counts: list[int]  # samples per class that were attributed
    delta: dict = field(default_factory=dict)  # convergence-delta summary
    settings: dict = field(default_factory=dict)
    unit: str = "latent"

    def top(self, cls: int, k: int) -> list[int]:
        """The ``k`` units that push hardest towards class ``cls``."""
        return self.scores[cls].topk(k).indices.tolist()

    def save(self, path) -> Path:
        return io.save_tensors(path, {"scores": self.scores}, meta={
            "attribute": self.attribute, "counts": self.counts, "delta": self.delta,
            "settings": self.settings, "unit": self.unit})

    @classmethod
    def load(cls, path) -> "Ranking":
        t, m = io.load_tensors(path)
        return cls(attribute=m["attribute"], scores=t["scores"], counts=m["counts"], delta=m["delta"],
                   settings=m["settings"], unit=m.get("unit", "latent"))


def rank(sae: TopKSAE | None, probe: HProbe, h_by_step: dict[int, torch.Tensor], labels: torch.Tensor,
         attribute: str, per_class: int = 64, n_steps: int = 32, batch: int = 16, seed: int = 0,
         progress: bool = True) -> Ranking:
    """Rank SAE latents (or raw channels when ``sae`` is None) for every class of ``attribute``.

    ``h_by_step`` maps sampling step → h ``(N, C, H, W)`` of the same N samples; ``labels``
    ``(N,)`` are their judged classes. For each class, up to ``per_class`` samples judged in it
    are attributed towards that class at every listed step; scores are averaged.
    """
    from tqdm.auto import tqdm

    if attribute not in probe.classes:
        raise ValueError(f"rank: the probe has no head for {attribute!r}; heads: {list(probe.classes)}")
    if not h_by_step:
        raise ValueError("rank: h_by_step is empty; give h for at least one sampling step")
    k = probe.classes[attribute]
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    device = next(probe.parameters()).device  # h batches go where the probe (and SAE) are
    units = sae.cfg.d_sae if sae is not None else next(iter(h_by_step.values())).shape[1]
    scores = torch.zeros(k, units)
    counts, deltas = [], []
    total = sum(min(per_class, int((labels == c).sum())) for c in range(k)) * len(h_by_step)
    bar = tqdm(total=total, desc=f"IG {attribute}", disable=not progress)
    for c in range(k):
        ids = (labels == c).nonzero().flatten()
        ids = ids[torch.randperm(len(ids), generator=g)[:per_class]]
        counts.append(len(ids))
        if len(ids) == 0:
            continue
        for step, h in h_by_step.items():
            for s in range(0, len(ids), batch):
                hb = h[ids[s:s + batch]].float().to(device)
                if sae is not None:
                    a, d = latent_ig(sae, probe, hb, step, attribute, c, n_steps=n_steps)
                    a = a.sum(1)
                else:
                    a, d = channel_ig(probe, hb, step, attribute, c, n_steps=n_steps)
                scores[c] += a.sum(0).cpu()
                deltas.append(d.abs().cpu())
                bar.update(len(hb))
        scores[c] /= len(ids) * len(h_by_step)
    bar.close()
    d = torch.cat(deltas) if deltas else torch.zeros(1)
    return Ranking(attribute=attribute, scores=scores, counts=counts,
                   delta={"mean_abs": d.mean().item(), "max_abs": d.max().item()},
                   settings={"steps": sorted(int(s) for s in h_by_step), "per_class": per_class, "ig_steps": n_steps,
                             "seed": seed, "baseline": "zero"},
                   unit="latent" if sae is not None else "channel")
