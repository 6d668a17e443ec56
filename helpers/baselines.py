"""The paper's baselines, behind one interface, on any model and at any hook site (chapter 7, chapter 8).

Each is the cheapest faithful version of its published method; deviations are stated here and
in chapter 7. Every method is fitted from one :class:`Context` (``Method.from_context(ctx)``: the model,
the attribute and its classes, the harvest, the probe, a judge to learn from) and samples with
``fitted.sample_edited(model, noise, steps, setting, classes)`` from the same noise tensor, with the
same per-sample class draws (:func:`helpers.intervention.assign_classes`) where the method has them.
:data:`METHODS` maps names to the classes; callers choose by object, never by matching names. On a
text-to-image model the learned methods train through :func:`helpers.models.denoiser` (prompt,
classifier-free guidance), in the VAE's latent space, judging VAE-decoded images.

* :class:`Activation` — rank bottleneck channels by the difference of their mean activation between
  a class and the rest; move the class's top channels towards it by a factor β (β where the class mean is
  positive, 1/β where it is negative; per-sample class targeting, like DiffLens).
* :class:`LatentDirection` (Li et al., CVPR 2024) — one learned vector per class added to h at every
  step, trained with the denoising loss on images of that class, UNet frozen. Their images of a class
  came from prompting Stable Diffusion; ours are renders of the world conditioned on the class (chapter 7)
  or the model's own harvested images the judge read as that class (the runner).
* :class:`HDistribution` (Parihar et al., CVPR 2024) — at each step, h moves along the gradient of a
  distribution loss between the batch-mean probe prediction and the target distribution. Deviation: the
  original guides with a linear classifier on the *flattened* h of each step; ours is the book's h-probe,
  which reads the *spatially pooled* h, so its gradient is the same at every position — a flat shift of
  h, the same fault chapter 4 finds in flat adds. Its loss is on a *batch mean*, so its effect depends on
  the batch size: compare runs at equal batch size.
* :class:`HDistributionFlat` — H-Distribution in its published form: an attribute distribution predictor
  (a small MLP with a step embedding) on the *flattened* h of each step, trained on the harvest's full h
  and the judge's labels, and a χ² loss between the batch's mean prediction and the target; its gradient
  differs from position to position. Deviation: the original's predictor architecture and loss weights are
  not reproduced exactly (a 64-unit hidden layer here).
* :class:`LatentEditing` (Kwon et al., ICLR 2023, "Asyrp") — a learned Δh per step and class, used in
  their asymmetric reverse process (the predicted x0 uses the edited h, the direction term the
  unedited one) over the first part of sampling. Deviations: their Δh comes from a small network of h and
  t; ours is a free tensor per (class, step). Their CLIP directional loss needs CLIP weights we cannot
  have; the attribute loss is the judge's cross-entropy on the predicted x0 plus an L1 term to the
  unedited predicted x0.
* :class:`Finetuning` (Shen et al., ICLR 2024) — a LoRA adapter (peft) on the up-blocks' convolutions,
  trained through a few differentiable DDIM steps to align the judged attribute distribution with the
  target (their dynamic target assignment: each batch's samples are assigned target classes in the
  target proportions at least cost), with an image-space preservation loss against the frozen model
  from the same noise. Deviation: trained through ``train_steps`` (8) DDIM steps for CPU cost, evaluated
  at the sampler's 25. It changes the model, so it has no per-sample class.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from . import hooks, models
from .intervention import assign_classes
from .probe import HProbe


@dataclass
class Context:
    """What every method may use to fit — one object, so every method gets the same information.

    A method is fitted with ``Method.from_context(ctx, **fit_settings)`` and then gives images with
    ``fitted.sample_edited(model, noise, steps, setting, classes)``: ``setting`` is its strength knob
    (``Method.knob``), ``classes`` the per-sample asked-for class (``-1``: leave that sample alone), which
    methods that edit the whole batch or the model (``per_sample = False``) ignore.
    """

    model: models.Diffusion
    attribute: str
    classes: tuple[str, ...]  # the attribute's class names (the judge's)
    target: Sequence[float]  # target distribution over the classes
    steps: int = 25  # sampling steps
    site: str = hooks.DEFAULT_SITE  # where the hook-based methods act
    pooled: torch.Tensor | None = None  # (N, steps, C) harvested spatial-mean h at the site
    labels: torch.Tensor | None = None  # (N,) judged classes of the harvested samples
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8 harvested images (training data where needed)
    probe: HProbe | None = None  # the h-probe (H-Distribution steers with it)
    h_full: Callable | None = None  # steps -> {step: (N, C, H, W)} full harvested h of the training samples
    judge: object | None = None  # the judge learned methods train against (chapter 7: a second judge)
    images_of: Callable | None = None  # (classes, seed) -> images in [-1, 1] of those classes; default: harvested
    progress: bool = True

    def need(self, method: str, *fields_: str) -> None:
        missing = [f for f in fields_ if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{method} needs {missing} in its fitting context (the harvest, probe or judge)")

    def training_images(self, classes: torch.Tensor, seed: int) -> torch.Tensor:
        """Images in [-1, 1] of the given classes: ``images_of`` if set, else harvested images judged so."""
        if self.images_of is not None:
            return self.images_of(classes, seed)
        self.need("training images", "images", "labels")
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(len(classes), *self.images.shape[1:])
        for c in torch.as_tensor(classes).unique():
            pool = (self.labels == c).nonzero().flatten()
            if len(pool) == 0:
                raise ValueError(f"no harvested image is judged {self.classes[int(c)]!r}; cannot train on that class")
            rows = (torch.as_tensor(classes) == c).nonzero().flatten()
            out[rows] = self.images[pool[torch.randint(len(pool), (len(rows),), generator=g)]].float() / 255
        return out * 2 - 1


def _check_attribute(attribute: str, classes: Sequence[str] | None) -> int:
    if classes is None or isinstance(classes, str) or len(classes) < 2:
        raise ValueError(f"{attribute!r}: give the attribute's class names (classes=..., e.g. "
                         f"judge.attributes[{attribute!r}]), got {classes!r}")
    return len(classes)


def _judge_classes(judge, attribute: str, classes: Sequence[str] | None) -> Sequence[str] | None:
    if classes is None and judge is not None and attribute in getattr(judge, "attributes", {}):
        return judge.attributes[attribute]
    return classes


def _check_target(attribute: str, target: Sequence[float], classes: Sequence[str] | None = None) -> torch.Tensor:
    k = _check_attribute(attribute, classes if classes is not None else [str(i) for i in range(len(target))])
    t = torch.as_tensor(target, dtype=torch.float64)
    if t.ndim != 1 or len(t) != k or (t < 0).any() or abs(float(t.sum()) - 1) > 1e-6:
        raise ValueError(f"target for {attribute!r} must be {k} non-negative probabilities summing to 1, "
                         f"got {list(target)}")
    return t.float()


@contextmanager
def _frozen(*modules):
    """Every parameter of ``modules`` has ``requires_grad`` off inside the block, and back as it was after."""
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)


# ----------------------------------------------------------------------------- DDIM pieces


def ddim(model: models.Diffusion, steps: int) -> DDIMScheduler:
    s = DDIMScheduler.from_config(model.scheduler.config)
    s.set_timesteps(steps)
    return s


def split_output(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, kind: str, clip: float | None,
                 clipped_eps: bool = False):
    """Predicted ``(x0, eps)`` from a UNet output under ``kind`` (epsilon / v_prediction / sample).

    Matches diffusers' DDIM: with ``clip`` the x0 estimate is clamped and eps is left as predicted
    (``use_clipped_model_output=False``), or, with ``clipped_eps``, re-derived from the clamped x0 (guided-diffusion's
    DDIM, :attr:`helpers.models.Diffusion.clipped_eps`). A learned-variance output (twice the channels) is cut
    to its first half.
    """
    if out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    if kind == "epsilon":
        x0, eps = (x - b * out) / a, out
    elif kind == "v_prediction":
        x0, eps = a * x - b * out, a * out + b * x
    elif kind == "sample":
        x0, eps = out, (x - a * out) / b
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        if clipped_eps:
            eps = (x - a * x0) / b
    return x0, eps


def _alphas(sched: DDIMScheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
    a = sched.alphas_cumprod[int(t)]
    ap = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    return a, ap


def ddim_step(sched: DDIMScheduler, out_x0: torch.Tensor, out_eps: torch.Tensor, t, x: torch.Tensor,
              clipped_eps: bool = False):
    """One deterministic DDIM step, x0 from ``out_x0`` and the direction from ``out_eps`` (UNet outputs).

    With the same output for both this is diffusers' ``DDIMScheduler.step(eta=0,
    use_clipped_model_output=clipped_eps)`` — what :func:`helpers.models.sample` does for the model; with
    different ones it is Asyrp's asymmetric step. Differentiable.
    """
    a, ap = _alphas(sched, t)
    kind = sched.config.prediction_type
    clip = sched.config.clip_sample_range if sched.config.clip_sample else None
    x0, eps = split_output(out_x0, x, a, kind, clip, clipped_eps)
    if out_eps is not out_x0:
        _, eps = split_output(out_eps, x, a, kind, clip, clipped_eps)
    return ap.sqrt() * x0 + (1 - ap).sqrt() * eps, x0


def sample(model: models.Diffusion, noise: torch.Tensor, steps: int = 25, hook: Callable | None = None,
           batch_size: int = 128, progress: bool = False, site: str = hooks.DEFAULT_SITE, from_step: int = 0,
           start_step: int = 0) -> torch.Tensor:
    """DDIM samples from ``noise``; ``hook(ids)`` returns the edit at ``site`` for samples ``ids``, applied at
    steps ``from_step ..``. With ``start_step`` (≤ ``from_step``), ``noise`` is the unedited state entering that
    step and only the steps from there run (:func:`helpers.models.sample`)."""
    if start_step > from_step:
        raise ValueError(f"sample: resuming at step {start_step} would skip edited steps from {from_step}")
    from tqdm.auto import tqdm

    outs = []
    bar = tqdm(total=len(noise) * steps, disable=not progress, desc="sample", unit="img-step")
    for s in range(0, len(noise), batch_size):
        ids = torch.arange(s, min(len(noise), s + batch_size))
        if hook is None:
            outs.append(models.sample(model, noise=noise[ids], steps=steps, batch_size=len(ids), bar=bar,
                                      start_step=start_step))
        else:
            with hooks.edit(model.unet, hook(ids), site=site, first_step=start_step,
                            steps=None if from_step == 0 else range(from_step, steps)):
                outs.append(models.sample(model, noise=noise[ids], steps=steps, batch_size=len(ids), bar=bar,
                                          start_step=start_step))
    bar.close()
    return torch.cat(outs)


def _asked(classes: torch.Tensor | None, n: int) -> torch.Tensor:
    if classes is None:
        raise ValueError("this method edits each sample towards its own asked-for class; pass classes (n,)")
    classes = torch.as_tensor(classes).long()
    if len(classes) != n:
        raise ValueError(f"classes has {len(classes)} entries for {n} samples")
    return classes


# ----------------------------------------------------------------------------- Activation


@dataclass
class Activation:
    """Push the top channels of each sample's asked-for class towards that class, by a factor ``beta``.

    Channels are ranked by the difference of their mean (spatial and over steps) between the class and the
    rest. Scaling a channel by β > 1 moves it away from zero, which moves it towards the class only when the
    class's mean of that channel is positive; where it is negative the channel is scaled by 1/β instead
    (``signs``), so every edited channel moves in the direction of its class difference. (The first version
    multiplied every channel by β: for most minority classes five of eight channels have a negative class
    mean, so the edit pushed those samples away from the class — chapter 7's first Activation cells.)
    """

    attribute: str
    channels: dict[int, list[int]]
    beta: float = 2.0
    name: str = "Activation"
    site: str = hooks.DEFAULT_SITE
    signs: dict[int, list[float]] | None = None  # per class and channel: +1 (scale by β) or −1 (by 1/β); None: all +1
    from_step: int = 0  # the edit acts at sampling steps from_step .. (0: every step, as published)
    knob: ClassVar[str] = "beta"
    default: ClassVar[float] = 2.0
    per_sample: ClassVar[bool] = True
    learns_from_judge: ClassVar[bool] = False

    @classmethod
    def fit(cls, pooled: torch.Tensor, labels: torch.Tensor, attribute: str, k: int = 8, beta: float = 2.0,
            classes: Sequence[str] | None = None, site: str = hooks.DEFAULT_SITE):
        """``pooled`` ``(N, steps, C)`` spatial-mean h of harvested samples, ``labels`` their judged classes."""
        kc = _check_attribute(attribute, classes)
        labels = torch.as_tensor(labels).long()
        m = pooled.float().mean(1)  # (N, C): mean over steps
        chans, signs = {}, {}
        for c in range(kc):
            if (labels == c).sum() == 0 or (labels != c).sum() == 0:
                raise ValueError(f"Activation.fit: class {c} of {attribute!r} has no (or only) samples")
            mean_c = m[labels == c].mean(0)
            diff = mean_c - m[labels != c].mean(0)
            chans[c] = diff.topk(min(k, m.shape[1])).indices.tolist()
            signs[c] = [1.0 if float(mean_c[j]) >= 0 else -1.0 for j in chans[c]]
        return cls(attribute, chans, beta, site=site, signs=signs)

    @classmethod
    def from_context(cls, ctx: Context, k: int = 8):
        ctx.need(cls.name, "pooled", "labels")
        return cls.fit(ctx.pooled, ctx.labels, ctx.attribute, k=k, classes=ctx.classes, site=ctx.site)

    def sample_edited(self, model, noise, steps, setting=None, classes=None, batch_size=128, progress=False,
                      start_step=0):
        """Samples with the asked-for class's channels moved by a factor ``setting`` (β); ``start_step``: resume
        from the unedited state entering that step (``noise`` is that state)."""
        me = self if setting is None else replace(self, beta=setting)
        return sample(model, noise, steps, me.hook(_asked(classes, len(noise))), batch_size, progress, self.site,
                      self.from_step, start_step)

    def factors(self, c: int) -> torch.Tensor:
        """The multiplier of each of class ``c``'s channels: β, or 1/β where the class mean is negative."""
        sg = torch.ones(len(self.channels[c])) if self.signs is None else torch.tensor(self.signs[c])
        return torch.where(sg >= 0, torch.tensor(float(self.beta)), torch.tensor(1.0 / float(self.beta)))

    def hook(self, classes: torch.Tensor):
        kc = len(self.channels)
        fac = {c: self.factors(c) for c in range(kc)}

        def factory(ids):
            def fn(h, info):
                mult = torch.ones(len(ids), h.shape[1], dtype=h.dtype, device=h.device)
                for c in range(kc):
                    rows = (classes[ids] == c).nonzero().flatten().to(h.device)
                    if len(rows):
                        mult[rows[:, None], torch.tensor(self.channels[c], device=h.device)[None, :]] = \
                            fac[c].to(h.device, h.dtype)[None, :]
                return h * mult[:, :, None, None]
            return fn
        return factory


# ----------------------------------------------------------------------------- Latent Direction


@dataclass
class LatentDirection:
    """One learned h-space vector per class, added to h at every step."""

    attribute: str
    directions: torch.Tensor  # (classes, C, H, W)
    scale: float = 1.0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    name: str = "Latent Direction"
    site: str = hooks.DEFAULT_SITE
    from_step: int = 0  # the edit acts at sampling steps from_step .. (0: every step, as published)
    knob: ClassVar[str] = "scale"
    default: ClassVar[float] = 1.0
    per_sample: ClassVar[bool] = True

    @classmethod
    def fit(cls, model: models.Diffusion, attribute: str, iters: int = 300, batch_size: int = 32, lr: float = 0.05,
            seed: int = 0, progress: bool = True, images_of: Callable | None = None,
            classes: Sequence[str] | None = None, site: str = hooks.DEFAULT_SITE):
        """Denoising loss on images of each class (classes balanced in every batch), UNet frozen.

        ``images_of(classes, seed)`` gives training images in [-1, 1]; default: world renders of the class.
        On a latent (Stable Diffusion) model they are VAE-encoded and the UNet is conditioned on the prompt."""
        from tqdm.auto import tqdm

        kc = _check_attribute(attribute, classes)
        if images_of is None:
            raise ValueError("LatentDirection.fit: give images_of(classes, seed) -> training images in [-1, 1] "
                             "(e.g. the harvested images the judge read as each class, or world renders)")
        unet, sched = model.unet, model.scheduler
        dev = next(unet.parameters()).device
        with hooks.capture(unet, steps=[0], site=site) as cap:
            models.sample(model, 1, steps=1, seed=seed)
        shape = cap.activations[0].shape[1:]
        d = torch.zeros(kc, *shape, device=dev, requires_grad=True)
        opt = torch.optim.Adam([d], lr=lr)
        g = torch.Generator().manual_seed(seed)
        hist, t0 = [], time.time()
        with _frozen(unet):
            for it in tqdm(range(iters), disable=not progress, desc=f"Latent Direction {attribute}"):
                classes = torch.arange(batch_size) % kc
                x0 = models.to_model_space(model, images_of(classes, seed * 100_003 + it)).float()
                eps = torch.randn(x0.shape, generator=g)
                t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
                x0, eps, t = x0.to(dev, unet.dtype), eps.to(dev, unet.dtype), t.to(dev)
                with hooks.edit(unet, lambda h, info: h + d[classes.to(dev)].to(h.dtype), site=site):
                    loss = models.diffusion_loss(unet, sched, x0, eps, t, **models.conditioning(model, batch_size))
                opt.zero_grad()
                loss.backward()
                opt.step()
                hist.append(loss.item())
        return cls(attribute, d.detach().cpu(), 1.0, hist, time.time() - t0, site=site)

    @classmethod
    def from_context(cls, ctx: Context, **fit):
        return cls.fit(ctx.model, ctx.attribute, images_of=ctx.training_images, classes=ctx.classes, site=ctx.site,
                       progress=ctx.progress, **fit)

    learns_from_judge: ClassVar[bool] = False

    def to_tensors(self) -> tuple[dict, dict]:
        return {"directions": self.directions}, {"history": self.history, "site": self.site}

    @classmethod
    def from_tensors(cls, ctx: Context, tensors: dict, meta: dict):
        return cls(ctx.attribute, tensors["directions"], history=meta["history"], site=meta.get("site", ctx.site))

    def sample_edited(self, model, noise, steps, setting=None, classes=None, batch_size=128, progress=False,
                      start_step=0):
        """Samples with the asked-for class's direction added at every step (from ``from_step``), times
        ``setting``; ``start_step``: resume from the unedited state entering that step."""
        me = self if setting is None else replace(self, scale=setting)
        return sample(model, noise, steps, me.hook(_asked(classes, len(noise))), batch_size, progress, self.site,
                      self.from_step, start_step)

    def hook(self, classes: torch.Tensor):
        d = torch.cat([self.directions, torch.zeros_like(self.directions[:1])])  # class -1: nothing added

        def factory(ids):
            add = self.scale * d[torch.where(classes[ids] < 0, len(d) - 1, classes[ids])]
            return lambda h, info: h + add.to(h.device, h.dtype)
        return factory


# ----------------------------------------------------------------------------- H-Distribution


@dataclass
class HDistribution:
    """Distribution guidance in h: ``h ← h − scale · ∇_h KL(target ‖ mean_batch softmax(probe(h)))``."""

    attribute: str
    probe: HProbe
    target: Sequence[float]
    scale: float = 1.0
    name: str = "H-Distribution"
    site: str = hooks.DEFAULT_SITE  # where the probe's pooled h was harvested
    knob: ClassVar[str] = "scale"
    default: ClassVar[float] = 1e4
    per_sample: ClassVar[bool] = False
    learns_from_judge: ClassVar[bool] = False

    @classmethod
    def from_context(cls, ctx: Context):
        ctx.need(cls.name, "probe")
        return cls(ctx.attribute, ctx.probe, list(ctx.target), site=ctx.site)

    def sample_edited(self, model, noise, steps, setting=None, classes=None, batch_size=128, progress=False):
        """Samples guided towards the target distribution with strength ``setting`` (whole batch; ``classes`` unused)."""
        me = self if setting is None else replace(self, scale=setting)
        return sample(model, noise, steps, me.hook(), batch_size, progress, self.site)

    def hook(self, classes: torch.Tensor | None = None):
        if self.attribute not in self.probe.classes:
            raise ValueError(f"HDistribution: the probe has no head for {self.attribute!r}")
        t0 = _check_target(self.attribute, self.target, self.probe.class_names[self.attribute])

        def factory(ids):
            def fn(h, info):
                if info.step >= self.probe.cfg.n_steps:
                    raise ValueError(f"HDistribution: sampling step {info.step} but the probe has heads for "
                                     f"{self.probe.cfg.n_steps} steps; sample with that many steps")
                with torch.enable_grad():
                    self.probe.to(h.device)
                    t = t0.to(h.device)
                    hh = h.detach().float().requires_grad_(True)
                    p = self.probe(hh, info.step)[self.attribute].softmax(-1).mean(0)
                    loss = (t * (t.clamp(min=1e-8).log() - p.clamp(min=1e-8).log())).sum()
                    (grad,) = torch.autograd.grad(loss, hh)
                return (h - self.scale * grad).to(h.dtype)
            return fn
        return factory


class DistributionPredictor(torch.nn.Module):
    """H-Distribution's attribute distribution predictor: an MLP on the flattened h, standardised per step, with
    a learned step embedding (one network for every step)."""

    def __init__(self, n_steps: int, shape: Sequence[int], n_classes: int, hidden: int = 64):
        super().__init__()
        d = int(torch.tensor(shape).prod())
        self.shape = tuple(int(x) for x in shape)
        self.register_buffer("mean", torch.zeros(n_steps, d))
        self.register_buffer("std", torch.ones(n_steps, d))
        self.inp = torch.nn.Linear(d, hidden)
        self.step = torch.nn.Embedding(n_steps, hidden)
        self.out = torch.nn.Linear(hidden, n_classes)

    @property
    def n_steps(self) -> int:
        return self.mean.shape[0]

    def forward(self, h: torch.Tensor, step: int) -> torch.Tensor:
        x = (h.flatten(1).float() - self.mean[step]) / self.std[step]
        return self.out(F.silu(self.inp(x) + self.step.weight[step]))


@dataclass
class HDistributionFlat:
    """Distribution guidance in h as published: ``h ← h − scale · ∇_h χ²(mean_batch softmax(ADP(h, t)), target)``,
    the predictor reading every position of h."""

    attribute: str
    predictor: DistributionPredictor
    target: Sequence[float]
    scale: float = 1.0
    accuracy: list = field(default_factory=list)  # held-out accuracy per step
    name: str = "H-Distribution (flat h)"
    site: str = hooks.DEFAULT_SITE
    knob: ClassVar[str] = "scale"
    default: ClassVar[float] = 1.0
    per_sample: ClassVar[bool] = False
    learns_from_judge: ClassVar[bool] = False

    @classmethod
    def fit(cls, h_by_step: dict[int, torch.Tensor], labels: torch.Tensor, attribute: str, target: Sequence[float],
            classes: Sequence[str], held_out: float = 0.1, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
            hidden: int = 64, seed: int = 0, site: str = hooks.DEFAULT_SITE, progress: bool = False):
        """Train the predictor on ``h_by_step`` (step → ``(N, C, H, W)``, every sampling step) and the judge's
        ``labels`` ``(N,)``; the last ``held_out`` share of the samples measures its accuracy per step."""
        from tqdm.auto import tqdm

        kc = _check_attribute(attribute, classes)
        steps = sorted(h_by_step)
        if steps != list(range(len(steps))):
            raise ValueError(f"HDistributionFlat.fit: give h at every sampling step 0..n-1, got steps {steps}")
        labels = torch.as_tensor(labels).long()
        n = len(labels)
        n_tr = n - max(1, int(held_out * n))
        shape = h_by_step[0].shape[1:]
        net = DistributionPredictor(len(steps), shape, kc, hidden)
        with torch.no_grad():
            for s in steps:
                x = h_by_step[s][:n_tr].flatten(1).float()
                net.mean[s], net.std[s] = x.mean(0), x.std(0).clamp(min=1e-3)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net.inp.reset_parameters(), net.out.reset_parameters()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        for _ in tqdm(range(epochs), disable=not progress, desc=f"H-Distribution predictor {attribute}"):
            # every minibatch from one step (steps and samples shuffled each epoch)
            batches = [(s, ids) for s in steps for ids in torch.randperm(n_tr, generator=g).split(batch_size)]
            for j in torch.randperm(len(batches), generator=g).tolist():
                s, ids = batches[j]
                loss = F.cross_entropy(net(h_by_step[s][ids], s), labels[ids])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval().requires_grad_(False)
        with torch.no_grad():
            acc = [float((net(h_by_step[s][n_tr:], s).argmax(-1) == labels[n_tr:]).float().mean()) for s in steps]
        return cls(attribute, net, list(map(float, target)), accuracy=acc, site=site)

    @classmethod
    def from_context(cls, ctx: Context, **fit):
        ctx.need(cls.name, "h_full", "labels")
        h = ctx.h_full(range(ctx.steps))
        return cls.fit(h, ctx.labels[:len(h[0])], ctx.attribute, ctx.target, ctx.classes, site=ctx.site,
                       progress=ctx.progress, **fit)

    def to_tensors(self) -> tuple[dict, dict]:
        sd = {k: v.to(torch.float16) if k not in ("mean", "std") else v for k, v in self.predictor.state_dict().items()}
        return sd, {"shape": list(self.predictor.shape), "hidden": self.predictor.inp.out_features,
                    "classes": self.predictor.out.out_features, "target": list(self.target), "accuracy": self.accuracy,
                    "site": self.site}

    @classmethod
    def from_tensors(cls, ctx: Context, tensors: dict, meta: dict):
        net = DistributionPredictor(tensors["mean"].shape[0], meta["shape"], meta["classes"], meta["hidden"])
        net.load_state_dict({k: v.float() for k, v in tensors.items()})
        net.eval().requires_grad_(False)
        return cls(ctx.attribute, net, list(ctx.target), accuracy=meta.get("accuracy", []), site=meta.get("site", ctx.site))

    def sample_edited(self, model, noise, steps, setting=None, classes=None, batch_size=128, progress=False):
        """Samples guided towards the target distribution with strength ``setting`` (whole batch; ``classes`` unused)."""
        me = self if setting is None else replace(self, scale=setting)
        return sample(model, noise, steps, me.hook(), batch_size, progress, self.site)

    def loss_grad(self, h: torch.Tensor, step: int) -> torch.Tensor:
        """∇_h of the χ² distance between the batch's mean predicted distribution and the target."""
        t = torch.as_tensor(self.target, dtype=torch.float32, device=h.device)
        with torch.enable_grad():
            self.predictor.to(h.device)
            hh = h.detach().float().requires_grad_(True)
            p = self.predictor(hh, step).softmax(-1).mean(0)
            loss = ((p - t) ** 2 / t.clamp(min=1e-8)).sum()
            (grad,) = torch.autograd.grad(loss, hh)
        return grad

    def hook(self, classes: torch.Tensor | None = None):
        def factory(ids):
            def fn(h, info):
                if info.step >= self.predictor.n_steps:
                    raise ValueError(f"HDistributionFlat: sampling step {info.step} but the predictor knows "
                                     f"{self.predictor.n_steps} steps; sample with that many steps")
                return (h - self.scale * self.loss_grad(h, info.step)).to(h.dtype)
            return fn
        return factory


# ----------------------------------------------------------------------------- Latent Editing (Asyrp)


@dataclass
class LatentEditing:
    """A learned Δh per (class, step) for the first ``edit_steps`` steps, with Asyrp's asymmetric step."""

    attribute: str
    delta: torch.Tensor  # (classes, edit_steps, C, H, W)
    steps: int
    scale: float = 1.0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    name: str = "Latent Editing"
    site: str = hooks.DEFAULT_SITE
    knob: ClassVar[str] = "scale"
    default: ClassVar[float] = 1.0
    per_sample: ClassVar[bool] = True

    @property
    def edit_steps(self) -> int:
        return self.delta.shape[1]

    @classmethod
    def fit(cls, model: models.Diffusion, judge, attribute: str, steps: int = 25, edit_steps: int = 12,
            iters: int = 40, batch_size: int = 16, lr: float = 0.05, l1: float = 3.0, seed: int = 0,
            progress: bool = True, classes: Sequence[str] | None = None, site: str = hooks.DEFAULT_SITE):
        """Train Δh on the unedited chain's x_t: judge CE on the edited x0 estimate + ``l1`` · |x0 − x0_orig|."""
        from tqdm.auto import tqdm

        kc = _check_attribute(attribute, _judge_classes(judge, attribute, classes))
        if not 0 < edit_steps <= steps:
            raise ValueError(f"LatentEditing: edit_steps must be in 1..{steps}, got {edit_steps}")
        unet = model.unet
        sched = ddim(model, steps)
        with hooks.capture(unet, steps=[0], site=site) as cap:
            models.sample(model, 1, steps=1, seed=seed)
        dev = next(unet.parameters()).device
        delta = torch.zeros(kc, edit_steps, *cap.activations[0].shape[1:], device=dev, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        judge.eval()
        den = models.denoiser(model)
        hist, t0 = [], time.time()
        with _frozen(unet, judge):
            for it in tqdm(range(iters), disable=not progress, desc=f"Latent Editing {attribute}"):
                classes = torch.arange(batch_size, device=dev) % kc
                x = models.make_noise(batch_size, model.sample_size, seed * 100_003 + it, model.channels).to(dev, unet.dtype)
                total = 0.0
                for j, t in enumerate(sched.timesteps[:edit_steps]):
                    with torch.no_grad():
                        out = den(x, t)
                    with hooks.edit(unet, lambda h, info: h + delta[classes, j].to(h.dtype), site=site):
                        out_e = den(x, t)
                    a, _ = _alphas(sched, t)
                    clip = sched.config.clip_sample_range if sched.config.clip_sample else None
                    x0e, _ = split_output(out_e, x, a, sched.config.prediction_type, clip)
                    x0, _ = split_output(out, x, a, sched.config.prediction_type, clip)
                    logits = judge(models.to_images(model, x0e))[attribute]
                    loss = F.cross_entropy(logits, classes.to(logits.device)) + l1 * (x0e - x0).float().abs().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    with torch.no_grad():
                        x, _ = ddim_step(sched, out, out, t, x, model.clipped_eps)
                hist.append(total / edit_steps)
        return cls(attribute, delta.detach().cpu(), steps, 1.0, hist, time.time() - t0, site=site)

    learns_from_judge: ClassVar[bool] = True

    @classmethod
    def from_context(cls, ctx: Context, **fit):
        ctx.need(cls.name, "judge")
        return cls.fit(ctx.model, ctx.judge, ctx.attribute, steps=ctx.steps, classes=ctx.classes, site=ctx.site,
                       progress=ctx.progress, **fit)

    def to_tensors(self) -> tuple[dict, dict]:
        return {"delta": self.delta}, {"history": self.history, "steps": self.steps, "site": self.site}

    @classmethod
    def from_tensors(cls, ctx: Context, tensors: dict, meta: dict):
        return cls(ctx.attribute, tensors["delta"], meta["steps"], history=meta["history"],
                   site=meta.get("site", ctx.site))

    def sample_edited(self, model: models.Diffusion, noise: torch.Tensor, steps: int | None = None, setting=None,
                      classes: torch.Tensor | None = None, batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Asymmetric DDIM: for the first ``edit_steps`` steps x0 comes from the edited pass, the
        direction from the unedited one (two UNet passes per edited step); then plain DDIM.
        ``setting`` scales the learned Δh; a sample asked for class ``-1`` is left alone."""
        if setting is not None:
            return replace(self, scale=setting).sample_edited(model, noise, steps, None, classes, batch_size, progress)
        classes = _asked(classes, len(noise))
        steps = steps or self.steps
        if steps != self.steps:
            raise ValueError(f"LatentEditing: trained for {self.steps} sampling steps, asked for {steps}")
        sched = ddim(model, steps)
        den = models.denoiser(model)
        outs = []
        with torch.no_grad():
            for s in range(0, len(noise), batch_size):
                ids = torch.arange(s, min(len(noise), s + batch_size))
                dev, dtype = next(model.unet.parameters()).device, next(model.unet.parameters()).dtype
                x = noise[ids].clone().to(dev, dtype)
                cl = classes[ids]
                d = torch.cat([self.delta, torch.zeros_like(self.delta[:1])]).to(dev)  # class -1: no edit
                cl = torch.where(cl < 0, len(d) - 1, cl).to(dev)
                for j, t in enumerate(sched.timesteps):
                    out = den(x, t)
                    if j < self.edit_steps and self.scale != 0:
                        add = self.scale * d[cl, j]
                        with hooks.edit(model.unet, lambda h, info: h + add.to(h.dtype), site=self.site):
                            out_e = den(x, t)
                    else:
                        out_e = out
                    x, _ = ddim_step(sched, out_e, out, t, x, model.clipped_eps)
                outs.append(models.to_images(model, x).float().cpu())
        return torch.cat(outs)


# ----------------------------------------------------------------------------- Finetuning


def assign_targets(probs: torch.Tensor, target: Sequence[float]) -> torch.Tensor:
    """Shen et al.'s dynamic target assignment: classes in ``target`` proportions (largest remainder)
    given to the batch's samples at least total cost −log p (an optimal assignment, scipy)."""
    from scipy.optimize import linear_sum_assignment

    n = len(probs)
    slots = torch.sort(assign_classes(n, target, seed=0)).values
    cost = -probs.detach().clamp(min=1e-8).log()[:, slots]  # (n samples, n slots)
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(n, dtype=torch.long)
    out[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
    return out


@dataclass
class Finetuning:
    """A LoRA-adapted copy of the UNet (the original model is left untouched)."""

    attribute: str
    unet: torch.nn.Module
    target: Sequence[float]
    history: list = field(default_factory=list)
    seconds: float = 0.0
    name: str = "Finetuning"
    knob: ClassVar[str] = "lora scale"
    default: ClassVar[float] = 1.0
    per_sample: ClassVar[bool] = False

    learns_from_judge: ClassVar[bool] = True

    @classmethod
    def from_context(cls, ctx: Context, **fit):
        ctx.need(cls.name, "judge")
        return cls.fit(ctx.model, ctx.judge, ctx.attribute, list(ctx.target), progress=ctx.progress,
                       classes=ctx.classes, **fit)

    def to_tensors(self) -> tuple[dict, dict]:
        return {n: p.detach() for n, p in self.unet.named_parameters() if "lora_" in n}, {"history": self.history}

    @classmethod
    def from_tensors(cls, ctx: Context, tensors: dict, meta: dict, rank: int = 4):
        ft = cls.fit(ctx.model, ctx.judge, ctx.attribute, list(ctx.target), iters=0, progress=False, rank=rank,
                     classes=ctx.classes)
        missing = set(tensors) - {n for n, _ in ft.unet.named_parameters()}
        if missing:
            raise ValueError(f"adapter weights {sorted(missing)[:3]} do not fit this UNet")
        with torch.no_grad():
            for n, p in ft.unet.named_parameters():
                if n in tensors:
                    p.copy_(tensors[n])
        ft.history = meta["history"]
        return ft

    def sample_edited(self, model, noise, steps, setting=None, classes=None, batch_size=128, progress=False):
        """Samples from the adapted model with the adapters scaled by ``setting`` (``classes`` unused)."""
        return sample(self.model(model, 1.0 if setting is None else setting), noise, steps, None, batch_size, progress)

    @classmethod
    def fit(cls, model: models.Diffusion, judge, attribute: str, target: Sequence[float], iters: int = 60,
            batch_size: int = 16, train_steps: int = 8, rank: int = 4, lr: float = 1e-3, preserve: float = 10.0,
            seed: int = 0, progress: bool = True, classes: Sequence[str] | None = None):
        """Distribution alignment through ``train_steps`` differentiable DDIM steps + image preservation."""
        from peft import LoraConfig, inject_adapter_in_model
        from tqdm.auto import tqdm

        t = _check_target(attribute, target, _judge_classes(judge, attribute, classes))
        unet = copy.deepcopy(model.unet)
        unet.requires_grad_(False)
        convs = [n for n, m in unet.named_modules()
                 if n.startswith("up_blocks") and isinstance(m, torch.nn.Conv2d) and n.endswith(("conv1", "conv2"))]
        if not convs:
            raise ValueError("Finetuning: the UNet has no up-block conv1/conv2 layers to adapt")
        unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=convs), unet)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        judge.eval()
        sched = ddim(model, train_steps)
        den = models.denoiser(model, unet)
        hist, t0 = [], time.time()
        with _frozen(judge):
            for it in tqdm(range(iters), disable=not progress, desc=f"Finetuning {attribute}"):
                noise = models.make_noise(batch_size, model.sample_size, seed * 100_003 + it, model.channels)
                with torch.no_grad():
                    ref = models.sample(model, noise=noise, steps=train_steps, batch_size=batch_size)
                dev = next(unet.parameters()).device
                x, ref = noise.to(dev, next(unet.parameters()).dtype), ref.to(dev)
                for tt in sched.timesteps:
                    out = den(x, tt)
                    x, _ = ddim_step(sched, out, out, tt, x, model.clipped_eps)
                img = models.to_images(model, x)
                logits = judge(img)[attribute]
                assigned = assign_targets(logits.softmax(-1).cpu(), t).to(logits.device)
                loss = F.cross_entropy(logits, assigned) + preserve * F.mse_loss(img.float(), ref.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                hist.append(loss.item())
        unet.requires_grad_(False)
        unet.eval()
        return cls(attribute, unet, list(map(float, t)), hist, time.time() - t0)

    def model(self, base: models.Diffusion, lora_scale: float = 1.0) -> models.Diffusion:
        """The adapted model; ``lora_scale`` multiplies every adapter's contribution (1 = as trained)."""
        for m in self.unet.modules():
            sc = getattr(m, "scaling", None)
            if isinstance(sc, dict) and hasattr(m, "lora_alpha"):
                for name in sc:
                    sc[name] = lora_scale * m.lora_alpha[name] / m.r[name]
        return models.with_unet(base, self.unet)


METHODS = {m.name: m for m in (Activation, LatentDirection, HDistribution, HDistributionFlat, LatentEditing, Finetuning)}


def method(name: str):
    """The baseline class called ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown baseline {name!r}; the baselines are {list(METHODS)}")
    return METHODS[name]
