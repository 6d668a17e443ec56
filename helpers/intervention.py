"""Error-preserving SAE interventions while sampling (chapters 4–5).

At every chosen step the bottleneck output h is encoded by the SAE, chosen latents are edited
(z → z′), and only the edit's change is added back:

    h ← h + Dec(z′) − Dec(z)

so the SAE's reconstruction error stays in h and an edit that changes nothing gives exactly
the unedited h. Two edit modes, as in the paper: **scale** (s ← β·s) and **add** (s ← s + β).

**Per-sample class targeting.** An :class:`Edit` may carry a target distribution over the
classes of its attribute; every sample then draws its own class (exact counts by largest
remainder, shuffled, seeded) and that class's features are edited in that sample only. The
paper's released code drew one class per batch. Several :class:`Edit` objects (several
attributes) apply together.

**Where to add.** The paper adds β at every position of h. Our features are local (in one image
a top feature is active at two or three of the 8×8 positions), so adding it everywhere paints it
into the backdrop. ``Edit.footprint`` (add mode only) gives, per class, a map per feature of where
and how strongly it fires in images of that class (:func:`footprint`, the mean activation map);
the edit then adds ``β · map`` instead of a flat β. Chapter 4 measures both.

**Swap** (``Edit.suppress_others``, not in the paper). Adding class c's features to a sample leaves
the features of the class it already shows in place. On this model that is enough to turn male
samples female, but added "male" features barely turn female samples male: the long-hair features
stay and the judge still reads female (chapter 7 measures the hit rate per original → asked-for
class). With ``suppress_others`` every other class's ranked features are also set to 0 in a sample
assigned class c. Features that are not active are unaffected, so this needs no knowledge of the
sample's own class; it costs one SAE encode per step (the zeroing is a sparse top-k edit).

Cost: one UNet pass per step (no second pass). Add edits are linear in the latents, so they need
only the edited latents' decoder rows; scale edits encode h with the SAE and decode only the
changed active latents.
``bench/intervention_overhead.py`` measures both against plain sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from . import hooks, models
from .sae import TopKSAE, from_rows, to_rows


@dataclass
class Edit:
    """Edit ``features[c]`` of ``attribute`` for samples assigned class ``c``.

    Give either ``target`` (a distribution over the attribute's classes; each sample draws its
    class) or ``cls`` (every sample gets that class). ``steps`` limits the edit to those
    sampling steps (``None`` = all).
    """

    attribute: str
    features: dict[int, Sequence[int]]  # class -> SAE latent ids
    beta: float | Sequence[float]  # one strength, or one per class (the released configs' per-class ratios)
    mode: str = "scale"  # "scale" (s ← β·s) or "add" (s ← s + β)
    target: Sequence[float] | None = None
    cls: int | str | None = None  # a class id or a class name (with classes)
    steps: Sequence[int] | None = None
    footprint: dict[int, torch.Tensor] | None = None  # class -> (len(features[class]), H·W), add mode only
    suppress_others: bool = False  # also set every other class's features to 0 in a sample assigned class c
    source: torch.Tensor | None = None  # (n,) each sample's own (unedited) class: move only the surplus
    classes: Sequence[str] | None = None  # the attribute's class names (e.g. judge.attributes[attribute])
    policy: str = "quota"  # who gets edited, with a target: see POLICIES
    probe: object | None = None  # policy "minimal": the h-probe that reads each sample's own class
    read_step: int | None = None  # policy "minimal": the step whose h the probe reads (default: the first edited)
    assigned: torch.Tensor | None = None  # (n,) the class asked of each sample, decided beforehand (-1: none)

    def n_classes(self) -> int:
        """How many classes the attribute has: from ``classes``, else ``target``, else the largest class id used."""
        if self.classes is not None:
            return len(self.classes)
        if self.target is not None:
            return len(self.target)
        ids = [c for c in self.features if isinstance(c, int)] + ([self.cls] if isinstance(self.cls, int) else [])
        return max(ids, default=0) + 1

    def _names(self) -> str:
        return f" {list(self.classes)}" if self.classes is not None else ""

    def betas(self) -> list[float] | None:
        """Per-class strengths, or ``None`` when one β serves every class."""
        if isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool):
            return None
        return [float(b) for b in self.beta]

    def first_step(self) -> int:
        return 0 if self.steps is None else min(int(s) for s in self.steps)

    def _check_types(self) -> None:
        """Every argument is of the kind it says, before anything else reads it (one ValueError naming it)."""
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not number(self.beta) and not (isinstance(self.beta, (list, tuple)) and self.beta
                                          and all(number(b) for b in self.beta)):
            raise ValueError(f"Edit: beta must be a number or one number per class, got {self.beta!r}")
        if self.steps is not None:
            if isinstance(self.steps, (str, bytes, dict)) or not hasattr(self.steps, "__iter__"):
                raise ValueError(f"Edit: steps must be None (every step) or sampling step indices, got {self.steps!r}")
            steps = tuple(self.steps)  # once: an iterator would be used up here and never fire
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
                raise ValueError(f"Edit: steps must be integer sampling step indices, got {list(steps)!r}")
            self.steps = steps
        if self.target is not None and not (isinstance(self.target, (list, tuple, torch.Tensor))
                                            and all(number(float(t)) for t in self.target)):
            raise ValueError(f"Edit: target must be a list of class probabilities, got {self.target!r}")
        if isinstance(self.cls, str):  # a class name
            if self.classes is None or self.cls not in self.classes:
                raise ValueError(f"Edit: cls {self.cls!r} is not a class name of {self.attribute!r}"
                                 f"{self._names() or ' (give classes=... to name classes)'}")
            self.cls = list(self.classes).index(self.cls)
        if not isinstance(self.features, dict) or not all(
                isinstance(f, (list, tuple, range, torch.Tensor)) for f in self.features.values()):
            raise ValueError("Edit: features must map each class id to a list of SAE latent ids")

    def validate(self, d_sae: int) -> None:
        self._check_types()
        k = self.n_classes()
        if self.policy not in POLICIES:
            raise ValueError(f"Edit: policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.policy != "quota" and self.target is None:
            raise ValueError(f"Edit: policy {self.policy!r} assigns classes from a target distribution; give target")
        if self.policy == "minimal":
            if self.source is not None:
                raise ValueError("Edit: policy 'minimal' reads each sample's class with the probe; drop source "
                                 "(source is the oracle reading of policy 'quota')")
            if self.probe is None or self.attribute not in getattr(self.probe, "classes", {}):
                raise ValueError(f"Edit: policy 'minimal' needs an h-probe with a head for {self.attribute!r} (probe=...)")
            if self.probe.classes[self.attribute] != k:
                raise ValueError(f"Edit: the probe's {self.attribute!r} head has {self.probe.classes[self.attribute]} "
                                 f"classes, the edit {k}")
            rs = self.first_step() if self.read_step is None else int(self.read_step)
            if rs > self.first_step():
                raise ValueError(f"Edit: read_step {rs} comes after the first edited step {self.first_step()}; the "
                                 "class must be read before the sample is edited")
        bs = self.betas()
        if bs is not None and len(bs) != k:
            raise ValueError(f"Edit: beta has {len(bs)} per-class strengths for {k} classes{self._names()}")
        if self.classes is not None and (isinstance(self.classes, str) or len(self.classes) < 2):
            raise ValueError(f"Edit: classes must name the attribute's two or more classes, got {self.classes!r}")
        if self.mode not in ("scale", "add"):
            raise ValueError(f"Edit: mode must be 'scale' or 'add', got {self.mode!r}")
        if not all(math.isfinite(float(b)) for b in (self.betas() or [self.beta])):
            raise ValueError(f"Edit: beta must be a finite number (or one per class), got {self.beta!r}")
        for c, feats in self.features.items():
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k:
                raise ValueError(f"Edit: {self.attribute!r} has classes 0..{k - 1}{self._names()}; "
                                 f"features given for class {c!r}")
            notint = [f for f in feats if isinstance(f, bool) or not (isinstance(f, int) or (
                isinstance(f, torch.Tensor) and not f.is_floating_point()) or type(f).__name__.startswith("int"))]
            if notint:
                raise ValueError(f"Edit: feature ids must be integers, got {notint} for class {c}")
            bad = [f for f in feats if not 0 <= int(f) < d_sae]
            if bad:
                raise ValueError(f"Edit: feature ids {bad} out of range; this SAE has latents 0..{d_sae - 1}")
        if (self.target is None) == (self.cls is None):
            raise ValueError("Edit: give exactly one of target (a class distribution) or cls (one class)")
        if self.target is not None:
            t = torch.as_tensor(self.target, dtype=torch.float64)
            if t.ndim != 1 or len(t) != k:
                raise ValueError(f"Edit: target must have {k} probabilities for {self.attribute!r}"
                                 f"{self._names()}, got {list(self.target)}")
            if not torch.isfinite(t).all() or (t < 0).any() or abs(float(t.sum()) - 1) > 1e-6:
                raise ValueError(f"Edit: target must be non-negative and sum to 1, got {list(self.target)} "
                                 f"(sum {float(t.sum()):.6f})")
            if self.source is not None:
                src = torch.as_tensor(self.source)
                in_range = len(src) == 0 or (0 <= int(src.min()) and int(src.max()) < k)
                if src.ndim != 1 or src.dtype.is_floating_point or not in_range:
                    raise ValueError(f"Edit: source must be a 1-d tensor of class ids 0..{k - 1} (each sample's own "
                                     f"class, e.g. a judge's reading of the unedited sample), got {src.dtype} "
                                     f"{tuple(src.shape)}")
        elif self.source is not None:
            raise ValueError("Edit: source (each sample's own class) only applies with a target distribution")
        elif isinstance(self.cls, bool) or not isinstance(self.cls, int) or not 0 <= self.cls < k:
            raise ValueError(f"Edit: cls must be one of 0..{k - 1}{self._names()}, got {self.cls!r}")
        if self.footprint is not None:
            if self.mode != "add":
                raise ValueError("Edit: footprint only applies to mode='add' (it says where to add β)")
            for c, feats in self.features.items():
                fp = self.footprint.get(c)
                if fp is None or fp.ndim != 2 or fp.shape[0] != len(feats):
                    raise ValueError(f"Edit: footprint[{c}] must be a (len(features[{c}]) = {len(feats)}, positions) "
                                     f"tensor, got {None if fp is None else tuple(fp.shape)}; make it with "
                                     "intervention.footprint(...)")
        if self.steps is not None and len(list(self.steps)) == 0:
            raise ValueError("Edit: steps is empty; give None (all steps) or at least one step index")

    def is_noop(self) -> bool:
        identity = 1.0 if self.mode == "scale" else 0.0
        ident = all(float(b) == identity for b in (self.betas() or [self.beta]))
        if self.suppress_others and sum(1 for f in self.features.values() if len(f)) > 1:
            return False  # the suppression edits even at the identity β
        return ident or not any(len(f) for f in self.features.values())


POLICIES = {
    "quota": "each sample is asked for a class; the counts match n·target exactly (largest remainder), order "
             "seeded; with source (each sample's own class, e.g. an unedited pass read by a judge): only the surplus",
    "iid": "each sample draws its class independently from the target (the paper's probability mode)",
    "minimal": "only enough samples of the over-represented classes are moved (the earth-mover minimum), per "
               "sampling batch; each sample's own class is read by the h-probe from its own h at read_step, "
               "inside the same pass",
}


def assign_iid(n: int, target: Sequence[float], seed: int = 0) -> torch.Tensor:
    """``n`` independent draws from ``target`` (seeded)."""
    t = torch.as_tensor(target, dtype=torch.float64)
    return torch.multinomial(t, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def _batch_seed(seed: int, start: int) -> int:
    return seed * 1_000_003 + start  # per batch, reproducible whatever else runs


def assign_minimal(own: torch.Tensor, target: Sequence[float], batch_size: int, seed: int = 0) -> torch.Tensor:
    """Policy "minimal" decided beforehand: per sampling batch of ``batch_size``, only the surplus of the classes
    over ``batch · target`` moves (:func:`assign_surplus`). ``own`` is each sample's own class as the probe reads
    it at the read step (from a stored pass). Gives exactly what the in-pass decision of an :class:`Intervention`
    with the same ``seed`` (``class_seed · 7919 + edit index``) and batch size gives."""
    own = torch.as_tensor(own).long()
    return torch.cat([assign_surplus(own[s:s + batch_size], target, seed=_batch_seed(seed, s))
                      for s in range(0, len(own), batch_size)]) if len(own) else own.clone()


def assign_classes(n: int, target: Sequence[float], seed: int = 0) -> torch.Tensor:
    """``n`` class ids whose counts match ``n · target`` (largest remainder), in seeded random order."""
    t = torch.as_tensor(target, dtype=torch.float64)
    raw = t * n
    counts = raw.floor().long()
    short = n - int(counts.sum())
    if short > 0:
        counts[torch.argsort(raw - counts, descending=True)[:short]] += 1
    ids = torch.repeat_interleave(torch.arange(len(t)), counts)
    return ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def assign_surplus(source: torch.Tensor, target: Sequence[float], seed: int = 0) -> torch.Tensor:
    """Move only the surplus: ``source`` holds each sample's own class; classes with more samples than
    ``n · target`` (largest remainder) give up that many, chosen at random (seeded), and those samples are
    assigned, shuffled, to the classes short of their count. Every other sample gets ``-1`` (no edit).

    With a uniform target over two classes and a 75/25 source, a quarter of the samples is asked to change,
    where independent per-sample draws (:func:`assign_classes`) ask half — including minority samples asked
    to become the majority class.
    """
    source = torch.as_tensor(source).long()
    n = len(source)
    want = torch.bincount(assign_classes(n, target, seed=seed), minlength=len(target))
    have = torch.bincount(source, minlength=len(target))
    g = torch.Generator().manual_seed(seed + 1)
    out = torch.full((n,), -1, dtype=torch.long)
    movers = []
    for c in range(len(target)):
        if have[c] > want[c]:
            idx = (source == c).nonzero().flatten()
            movers.append(idx[torch.randperm(len(idx), generator=g)[: int(have[c] - want[c])]])
    if not movers:
        return out
    movers = torch.cat(movers)
    movers = movers[torch.randperm(len(movers), generator=g)]
    short = torch.repeat_interleave(torch.arange(len(target)), (want - have).clamp(min=0))
    out[movers] = short
    return out


@dataclass
class _Plan:
    edit: Edit
    classes: torch.Tensor  # (n,) class per sample; ``k`` (one past the last class) = not edited
    masks: torch.Tensor  # (classes, d_sae) bool: features edited for each class
    steps: set[int] | None = field(default=None)
    amounts: torch.Tensor | None = None  # (classes, positions, d_sae): footprint maps, add mode
    sel: torch.Tensor | None = None  # ids of the latents any class edits
    coef: torch.Tensor | None = None  # add mode: (classes, positions or 1, len(sel)) amount added per unit β
    zero: torch.Tensor | None = None  # suppress_others: (classes, d_sae) bool, latents set to 0 for each class
    bvec: torch.Tensor | None = None  # per-class β (classes,), the "no edit" row last; None: one β for all
    read_step: int | None = None  # policy "minimal": when the probe reads each sample's class
    seed: int = 0
    decided: torch.Tensor | None = None  # policy "minimal": (n,) whose class has been read
    own: torch.Tensor | None = None  # policy "minimal": (n,) the probe's reading of each sample's own class

    def to(self, device) -> None:
        """Move the edit tensors next to the SAE (once; a no-op when they are already there)."""
        if self.masks.device == torch.device(device):
            return
        self.classes, self.masks = self.classes.to(device), self.masks.to(device)
        self.amounts = None if self.amounts is None else self.amounts.to(device)
        self.sel = None if self.sel is None else self.sel.to(device)
        self.coef = None if self.coef is None else self.coef.to(device)
        self.zero = None if self.zero is None else self.zero.to(device)
        self.bvec = None if self.bvec is None else self.bvec.to(device)
        self.decided = None if self.decided is None else self.decided.to(device)


class Intervention:
    """A set of :class:`Edit` objects bound to an SAE and to ``n`` samples (class draws fixed)."""

    def __init__(self, sae: TopKSAE, edits: Sequence[Edit], n: int, seed: int = 0):
        self.sae = sae
        m = sae.cfg.d_sae
        self.plans: list[_Plan] = []
        for j, e in enumerate(edits):
            e.validate(m)
            k = e.n_classes()
            if e.assigned is not None:
                classes = torch.as_tensor(e.assigned).long().clone()
                if classes.shape != (n,) or (classes < -1).any() or (classes >= k).any():
                    raise ValueError(f"Edit: assigned must hold one class id (-1: no edit) per sample, {n} in all, "
                                     f"within 0..{k - 1}")
            elif e.source is not None:
                if len(e.source) != n:
                    raise ValueError(f"Edit: source has {len(e.source)} classes for {n} samples; give one per sample")
                classes = assign_surplus(e.source, e.target, seed=seed * 7919 + j)
            elif e.policy == "minimal":
                classes = torch.full((n,), -1, dtype=torch.long)  # decided by the probe at read_step, per batch
            elif e.policy == "iid":
                classes = assign_iid(n, e.target, seed=seed * 7919 + j)
            elif e.target is not None:
                classes = assign_classes(n, e.target, seed=seed * 7919 + j)
            else:
                classes = torch.full((n,), e.cls, dtype=torch.long)
            classes = torch.where(classes < 0, k, classes)  # row k of every table below is "no edit"
            k += 1
            masks = torch.zeros(k, m, dtype=torch.bool)
            for c, feats in e.features.items():
                masks[c, list(map(int, feats))] = True
            amounts = None
            if e.footprint is not None:
                pos = next(iter(e.footprint.values())).shape[1]
                amounts = torch.zeros(k, pos, m)
                for c, feats in e.features.items():
                    fp = e.footprint[c].float()
                    if fp.shape[1] != pos:
                        raise ValueError("Edit: every footprint must have the same number of positions")
                    amounts[c][:, list(map(int, feats))] = fp.T
            sel = masks.any(0).nonzero().flatten()
            coef = None
            if e.mode == "add":
                coef = amounts[:, :, sel] if amounts is not None else masks[:, sel].float()[:, None, :]
            zero = None
            if e.suppress_others:  # every class's features but c's own (a latent two classes share stays)
                zero = masks.any(0, keepdim=True) & ~masks
                zero[-1] = False
            bs = e.betas()
            plan = _Plan(e, classes, masks, None if e.steps is None else set(map(int, e.steps)), amounts, sel, coef,
                         zero, None if bs is None else torch.tensor(bs + [1.0 if e.mode == "scale" else 0.0]))
            if e.policy == "minimal" and e.assigned is None:
                plan.read_step = e.first_step() if e.read_step is None else int(e.read_step)
                plan.seed = seed * 7919 + j
                plan.decided = torch.zeros(n, dtype=torch.bool)
            self.plans.append(plan)
        self.active = [p for p in self.plans if not p.edit.is_noop()]

    def _decide(self, p: _Plan, ids: torch.Tensor, h: torch.Tensor, step: int, site: str | None = None) -> None:
        """Policy "minimal": read the batch's own classes with the probe from h at this step, then ask only the
        over-represented classes' surplus (counts for this batch) to change."""
        probe = p.edit.probe
        site = site or self.sae.cfg.site
        if site != probe.cfg.site:
            raise ValueError(f"Edit policy 'minimal': the probe was trained on activations at {probe.cfg.site!r} but "
                             f"the edit is at {site!r}; use the probe trained at the edit's site, or pass the classes "
                             "read elsewhere as Edit.assigned")
        if h.shape[1] != probe.cfg.width:
            raise ValueError(f"Edit policy 'minimal': the probe reads {probe.cfg.width}-channel h, h here has "
                             f"{h.shape[1]}; use the probe trained at this hook site")
        with torch.no_grad():
            probe.to(h.device)
            own = probe(h.float(), step)[p.edit.attribute].argmax(-1).cpu()
        c = assign_surplus(own, p.edit.target, seed=_batch_seed(p.seed, int(ids[0])))
        k = p.masks.shape[0] - 1
        p.classes[ids] = torch.where(c < 0, k, c).to(p.classes.device)
        p.decided[ids] = True
        if p.own is None:
            p.own = torch.full((len(p.classes),), -1, dtype=torch.long)
        p.own[ids.cpu()] = own

    def own_classes(self, attribute: str) -> torch.Tensor | None:
        """Policy "minimal": each sample's own class as the probe read it (``-1`` where not read)."""
        for p in self.plans:
            if p.edit.attribute == attribute:
                return None if p.own is None else p.own.clone()
        raise ValueError(f"Intervention: no edit for {attribute!r}")

    def classes(self, attribute: str) -> torch.Tensor:
        """The class asked of every sample for ``attribute``'s edit (``-1``: not edited)."""
        for p in self.plans:
            if p.edit.attribute == attribute:
                c = p.classes.cpu()
                return torch.where(c == p.masks.shape[0] - 1, -1, c)
        raise ValueError(f"Intervention: no edit for {attribute!r}")

    def fn(self, ids: torch.Tensor, site: str | None = None, null_seed: int | None = None):
        """The hook function for samples ``ids`` (the current sampling batch) at ``site``.

        With ``null_seed`` the edit is replaced by a *null edit* of the same size: each sample's change of h is
        swapped for a random direction (fixed per sample, seeded) with the same norm, at the same steps — the
        control for how often the judge's reading flips under an edit of that size that means nothing.
        """
        real = self._fn(ids, site)
        if null_seed is None:
            return real

        dirs = {}

        def null(h, info):
            new = real(h, info)
            if new is None:
                return None
            delta = (new - h).float()
            norm = delta.flatten(1).norm(dim=1)
            out = h.float().clone()
            for i, sid in enumerate(torch.as_tensor(ids).tolist()):
                if float(norm[i]) == 0.0:
                    continue
                if sid not in dirs:
                    g = torch.Generator().manual_seed(int(null_seed) * 1_000_003 + sid)
                    d = torch.randn(h.shape[1:], generator=g)
                    dirs[sid] = (d / d.norm()).to(h.device)
                out[i] = out[i] + norm[i] * dirs[sid]
            return out.to(h.dtype)
        return null

    def _fn(self, ids: torch.Tensor, site: str | None = None):
        sae = self.sae
        dev = sae.W_dec.device  # on a GPU the plans move there once; sample ids may stay on the CPU
        for p in self.active:
            p.to(dev)
        ids = torch.as_tensor(ids).to(dev)

        def apply(h, info):
            for p in self.active:
                if p.read_step is not None and info.step == p.read_step and not bool(p.decided[ids].all()):
                    self._decide(p, ids, h, info.step, site)
            plans = [p for p in self.active if p.steps is None or info.step in p.steps]
            if not plans:
                return None
            sae.check_h(h, site)
            b = h.shape[0]
            pos = h.shape[2] * h.shape[3]
            for p in plans:
                if p.amounts is not None and p.amounts.shape[1] != pos:
                    raise ValueError(f"Edit footprint has {p.amounts.shape[1]} positions but h has {pos} "
                                     f"({h.shape[2]}×{h.shape[3]}); make the footprint from this model's h")
            zplans = [p for p in plans if p.zero is not None]
            row_sample = torch.arange(b, device=h.device).repeat_interleave(pos)

            def topk_factor(vals, idx, scale_plans):
                # Scaling (and suppression) change only the k active latents of each row: a factor per latent.
                factor = torch.ones_like(vals)
                for p in scale_plans:
                    hit = p.masks[p.classes[ids]][row_sample[:, None], idx]  # (b·pos, k)
                    beta = p.edit.beta if p.bvec is None else p.bvec[p.classes[ids]][row_sample][:, None]
                    factor = torch.where(hit, factor * beta, factor)
                for p in zplans:
                    factor = torch.where(p.zero[p.classes[ids]][row_sample[:, None], idx], 0.0, factor)
                return factor

            if all(p.edit.mode == "add" for p in plans):
                # Adding is linear in z: Dec(z + a) − Dec(z) = a · W_dec, whatever z is. So add edits need no
                # SAE encode, only the edited latents' decoder rows (this is what keeps the overhead small).
                with torch.no_grad():
                    delta = None
                    for p in plans:
                        beta = p.edit.beta if p.bvec is None else p.bvec[p.classes[ids]][:, None, None]
                        d = beta * (p.coef[p.classes[ids]] @ sae.W_dec[p.sel])  # (b, positions or 1, C)
                        delta = d if delta is None else delta + d
                    delta = (delta * sae.input_scale).expand(b, pos, -1).reshape(b * pos, -1)
                    if zplans:  # zeroing active latents of other classes: −s·W_dec on each (relative to the unedited z)
                        vals, idx = sae.encode_topk(to_rows(h).float())
                        w = vals * (topk_factor(vals, idx, []) - 1)
                        delta = delta + F.embedding_bag(idx, sae.W_dec, per_sample_weights=w, mode="sum") * sae.input_scale
                return h + from_rows(delta, h.shape).to(h.dtype)
            rows = to_rows(h).float()
            if all(p.edit.mode == "scale" for p in plans):
                with torch.no_grad():
                    vals, idx = sae.encode_topk(rows)  # (b·pos, k)
                    factor = topk_factor(vals, idx, plans)
                    delta = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals * (factor - 1), mode="sum")
                return h + from_rows(delta * sae.input_scale, h.shape).to(h.dtype)
            with torch.no_grad():  # add and scale edits mixed: the general (dense) path
                z = sae.encode(rows)
                z_new = z.clone()
                for p in plans:
                    mask = p.masks[p.classes[ids]].repeat_interleave(pos, dim=0)  # (b·pos, m)
                    beta = p.edit.beta if p.bvec is None else p.bvec[p.classes[ids]].repeat_interleave(pos)[:, None]
                    if p.amounts is not None:
                        edited = z_new + beta * p.amounts[p.classes[ids]].reshape(b * pos, -1)
                    else:
                        edited = z_new * beta if p.edit.mode == "scale" else z_new + beta
                    z_new = torch.where(mask, edited, z_new)
                for p in zplans:
                    z_new = torch.where(p.zero[p.classes[ids]].repeat_interleave(pos, dim=0), 0.0, z_new)
                delta = ((z_new - z) @ sae.W_dec) * sae.input_scale  # Dec(z') − Dec(z); b_dec cancels
            return h + from_rows(delta, h.shape).to(h.dtype)

        def checked(h, info):
            new = apply(h, info)
            if new is not None and not bool(torch.isfinite(new).all()):
                betas = {p.edit.attribute: p.edit.beta for p in self.active}
                raise ValueError(f"the edit made h non-finite at sampling step {info.step} (β {betas}); lower β")
            return new

        return checked


def footprint(sae: TopKSAE, h_by_step: dict[int, torch.Tensor], labels: torch.Tensor, cls: int,
              features: Sequence[int]) -> torch.Tensor:
    """Mean activation map ``(len(features), H·W)`` of each feature over samples judged ``cls``.

    ``h_by_step`` maps step → h ``(N, C, H, W)`` (e.g. from the harvest), ``labels`` ``(N,)``
    the judged classes; the map is averaged over the class's samples and the given steps.
    """
    maps = [z.mean(0) for z in class_latents(sae, h_by_step, labels, cls, features)]
    return (sum(maps) / len(maps)).T.contiguous()


def class_latents(sae: TopKSAE, h_by_step: dict[int, torch.Tensor], labels: torch.Tensor, cls: int,
                  features: Sequence[int]):
    """Per step: the listed features' latents ``(samples judged cls, H·W, len(features))``."""
    labels = torch.as_tensor(labels).long()
    ids = (labels == cls).nonzero().flatten()
    if len(ids) == 0:
        raise ValueError(f"footprint: no sample is judged class {cls}; cannot tell where its features fire")
    feats = torch.as_tensor(list(map(int, features)), dtype=torch.long)
    dev = sae.W_dec.device
    for h in h_by_step.values():
        hb = h[ids].float().to(dev)
        with torch.no_grad():
            yield sae.encode(to_rows(hb)).view(len(hb), hb.shape[2] * hb.shape[3], -1)[:, :, feats.to(dev)].cpu()


def sample_edited(model: models.Diffusion, sae: TopKSAE, edits: Sequence[Edit], n: int | None = None,
                  steps: int = 25, seed: int = 0, noise: torch.Tensor | None = None, batch_size: int = 250,
                  class_seed: int = 0, progress: bool = False, site: str | None = None, start_step: int = 0,
                  null_seed: int | None = None):
    """DDIM samples with ``edits`` applied at ``site`` (default: where the SAE was trained); returns
    ``(images, intervention)``.

    Same noise convention as :func:`helpers.models.sample`, so edited and unedited samples from
    the same ``seed`` are paired. ``intervention.classes(attr)`` tells which class each sample drew.
    With ``start_step = s`` (no edit before ``s``), ``noise`` is the unedited run's state entering step ``s``
    (``models.sample(..., states={s: None})``) and only steps ``s ..`` run: the same images for a fraction
    of the UNet passes. ``null_seed`` runs the size-matched null edit instead (:meth:`Intervention.fn`).
    """
    from tqdm.auto import tqdm

    site = site or sae.cfg.site
    if noise is None:
        if n is None:
            raise ValueError("sample_edited: give n (with seed) or an explicit noise tensor")
        noise = models.make_noise(n, model.sample_size, seed, model.unet.config.in_channels)
    iv = Intervention(sae, edits, len(noise), seed=class_seed)
    for p in iv.plans:
        out = sorted(s for s in (p.steps or ()) if not 0 <= s < steps)
        if out:
            raise ValueError(f"sample_edited: the edit of {p.edit.attribute!r} names steps {out}, outside this "
                             f"{steps}-step schedule (0..{steps - 1})")
    early = [p.edit.attribute for p in iv.active if min([p.edit.first_step()] + ([p.read_step] if p.read_step is not None
                                                                                   else [])) < start_step]
    if early:
        raise ValueError(f"sample_edited: the edits of {early} act (or read) before start_step {start_step}; resume "
                         "only from a step at or before the first edited one")
    outs = []
    bar = tqdm(total=len(noise) * steps, disable=not progress, desc="edited DDIM", unit="img-step")
    for s in range(0, len(noise), batch_size):
        ids = torch.arange(s, min(len(noise), s + batch_size))
        if iv.active:
            with hooks.edit(model.unet, iv.fn(ids, site, null_seed), site=site, first_step=start_step):
                outs.append(models.sample(model, noise=noise[ids], steps=steps, batch_size=len(ids), bar=bar,
                                          start_step=start_step))
        else:
            outs.append(models.sample(model, noise=noise[ids], steps=steps, batch_size=len(ids), bar=bar,
                                      start_step=start_step))
    bar.close()
    return torch.cat(outs), iv
