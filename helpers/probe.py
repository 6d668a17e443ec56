"""A light per-timestep classifier on h (chapter 4).

One linear head per sampling step and attribute reads the spatial mean of h (its channels,
standardised per step) and predicts the class the judge will see in the final image. The
attributes and their classes are data (``{name: class names}``, from the judge), stored with the
probe. The number of steps is whatever the harvest used; nothing is hard-coded. The probe
is the differentiable stand-in for the judge inside the sampling loop: integrated gradients
run through it (``helpers.attribution``), and H-Distribution guidance (chapter 7) steers with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import io


@dataclass
class ProbeConfig:
    n_steps: int  # sampling steps (one head per step)
    width: int  # channels of h
    attributes: dict[str, tuple[str, ...]]  # attribute -> its class names (one head each)
    site: str = "mid_block"  # the hook site whose activations it reads (helpers.hooks.sites)


def schema(attributes) -> dict[str, tuple[str, ...]]:
    """``{attribute: class names}`` checked: at least one attribute, each with two or more distinct classes."""
    if not isinstance(attributes, dict) or not attributes:
        raise ValueError(f"attributes must be a non-empty {{name: [class names]}} mapping (e.g. a judge's "
                         f"`.attributes`), got {attributes!r}")
    out = {}
    for a, names in attributes.items():
        if isinstance(names, str) or len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"attribute {a!r}: give two or more distinct class names, got {names!r}")
        out[str(a)] = tuple(str(n) for n in names)
    return out


class HProbe(nn.Module):
    """Per-step linear heads on spatially pooled, standardised h."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        cfg.attributes = schema(cfg.attributes)
        self.cfg = cfg
        self.class_names = dict(cfg.attributes)
        self.classes = {a: len(c) for a, c in cfg.attributes.items()}
        k = sum(self.classes.values())
        self.weight = nn.Parameter(torch.zeros(cfg.n_steps, cfg.width, k))
        self.bias = nn.Parameter(torch.zeros(cfg.n_steps, k))
        self.register_buffer("mean", torch.zeros(cfg.n_steps, cfg.width))
        self.register_buffer("std", torch.ones(cfg.n_steps, cfg.width))

    def _split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.classes, logits.split(list(self.classes.values()), dim=-1)))

    def _step(self, step: int) -> int:
        if not 0 <= int(step) < self.cfg.n_steps:
            raise ValueError(f"HProbe: step {step} out of range; this probe has heads for steps 0..{self.cfg.n_steps - 1}")
        return int(step)

    def logits_pooled(self, pooled: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Logits from pooled h ``(B, C)`` at ``step``."""
        s = self._step(step)
        x = (pooled - self.mean[s]) / self.std[s]
        return self._split(x @ self.weight[s] + self.bias[s])

    def forward(self, h: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Logits per attribute from h ``(B, C, H, W)`` at sampling step ``step``."""
        if h.ndim != 4 or h.shape[1] != self.cfg.width:
            raise ValueError(f"HProbe: expected h of shape (batch, {self.cfg.width}, H, W), got {tuple(h.shape)}")
        return self.logits_pooled(h.mean((2, 3)), step)

    def class_prob(self, h: torch.Tensor, step: int, attribute: str, cls: int, output: str = "prob") -> torch.Tensor:
        """Probability (or, with ``output="logit"``, the logit) ``(B,)`` of one class.

        This is the quantity integrated gradients explains.
        """
        self.check_class(attribute, cls)
        if output not in ("prob", "logit"):
            raise ValueError(f"HProbe: output must be 'prob' or 'logit', got {output!r}")
        logits = self(h, step)[attribute]
        return (logits.softmax(-1) if output == "prob" else logits)[:, cls]


    def check_class(self, attribute: str, cls: int) -> None:
        """A clear error unless ``attribute`` has a head and ``cls`` is one of its class ids."""
        if attribute not in self.classes:
            raise ValueError(f"HProbe: no head for {attribute!r}; heads: {list(self.classes)}")
        k = self.classes[attribute]
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < k:
            raise ValueError(f"{attribute!r} has classes 0..{k - 1} {self.class_names[attribute]}; got {cls!r}")


def train_probe(pooled: torch.Tensor, labels: dict[str, torch.Tensor], attributes: dict[str, tuple[str, ...]],
                epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, progress: bool = False,
                site: str = "mid_block") -> HProbe:
    """Fit every head at once on pooled h ``(n, steps, C)`` and judged ``labels`` (full batch, Adam).

    ``attributes`` is ``{name: class names}`` (a judge's ``.attributes``, or a subset of it); ``site`` is where
    ``pooled`` was captured (the probe refuses to read activations from another site during an edit)."""
    if pooled.ndim != 3:
        raise ValueError(f"train_probe: pooled must be (samples, steps, channels), got {tuple(pooled.shape)}")
    n, s, c = pooled.shape
    probe = HProbe(ProbeConfig(n_steps=s, width=c, attributes=attributes, site=site))
    x = pooled.float()
    with torch.no_grad():
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0).clamp_min(1e-6))
    xs = (x - probe.mean) / probe.std  # (n, s, c)
    ys = {a: torch.as_tensor(labels[a]).long() for a in attributes}
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=0)
    for _ in tqdm(range(epochs), disable=not progress, desc="probe"):
        logits = probe._split(torch.einsum("nsc,sck->nsk", xs, probe.weight) + probe.bias)
        loss = sum(F.cross_entropy(logits[a].reshape(n * s, -1), ys[a].repeat_interleave(s)) for a in attributes)
        loss = loss + weight_decay * probe.weight.pow(2).sum() / s
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    return probe


@torch.no_grad()
def accuracy(probe: HProbe, pooled: torch.Tensor, labels: dict[str, torch.Tensor]) -> "pd.DataFrame":
    """Accuracy per step (rows) and attribute (columns)."""
    import pandas as pd

    out = {a: [] for a in probe.classes}
    for s in range(probe.cfg.n_steps):
        lg = probe.logits_pooled(pooled[:, s].float(), s)
        for a in probe.classes:
            out[a].append((lg[a].argmax(-1) == torch.as_tensor(labels[a])).float().mean().item())
    df = pd.DataFrame(out)
    df.index.name = "step"
    return df


def save_probe(probe: HProbe, path, meta: dict | None = None) -> Path:
    from dataclasses import asdict

    return io.save_tensors(path, dict(probe.state_dict()), meta={"probe_config": asdict(probe.cfg), **(meta or {})})


def load_probe(path) -> tuple[HProbe, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_probe: no probe at {path}; train one (chapter 4) or fix the path")
    t, meta = io.load_tensors(path)
    cfg = meta.pop("probe_config", None)
    if not isinstance(cfg, dict):
        raise ValueError(f"load_probe: {path} is not a probe (no probe_config in its metadata)")
    if not isinstance(cfg.get("attributes"), dict):
        raise ValueError(f"load_probe: {path} names its attributes without their classes (an older format); "
                         "retrain the probe (chapter 4, or the runner's probe stage)")
    try:
        probe = HProbe(ProbeConfig(**cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_probe: {path} has a bad probe_config ({e}); retrain the probe") from None
    io.load_state(probe, t, path, "probe weights")
    probe.eval()
    return probe, meta
