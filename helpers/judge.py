"""The judge: attribute classifiers trained on rendered ground truth, plus an image encoder.

Introduced in chapter 1. It plays the role FairFace's classifier plays in DiffLens: it reads
every social and nuisance attribute off an image, independently of the diffusion model.
Its penultimate layer is the image feature encoder used for this world's FID (through
torchmetrics) and for image similarity (our stand-in for CLIP-I).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import io, world
from .io import DATA_DIR

JUDGE_PATH = DATA_DIR / "judge.safetensors"


class Batched:
    """``predict`` and ``features`` for every judge (this world's and the real-image ones in
    :mod:`helpers.judges`): batched, in eval mode, without grad, results on the CPU.

    A judge supplies ``attributes`` (``{attr: class names}``), ``forward(images) -> {attr: logits}``
    and ``encode(images) -> (batch, features)``, and moves a batch to its own device itself.
    """

    attributes: dict[str, tuple[str, ...]]
    batch_size = 512

    def _batches(self, images: torch.Tensor, batch_size: int | None, fn):
        bs = batch_size or self.batch_size
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return [fn(images[s:s + bs]) for s in range(0, len(images), bs)]
        finally:
            self.train(was)

    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Class probabilities ``{attr: (batch, n_classes)}``."""
        outs = self._batches(images, batch_size,
                             lambda x: {a: v.float().softmax(-1).cpu() for a, v in self(x).items()})
        return {a: torch.cat([o[a] for o in outs]) if outs else torch.zeros(0, len(c))
                for a, c in self.attributes.items()}

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """``encode`` batched: ``(batch, features)``."""
        return torch.cat(self._batches(images, batch_size, lambda x: self.encode(x).float().cpu()))


@dataclass
class JudgeConfig:
    """Judge architecture and training settings."""

    resolution: int = 32  # input side
    width: int = 32  # channels of the first conv; doubles twice
    features: int = 128  # encoder output size (FID / similarity features)
    steps: int = 1200  # optimizer steps on fresh uniform renders
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # AdamW learning rate (cosine decay)
    noise: float = 0.06  # max std of additive Gaussian noise augmentation
    seed: int = 0  # data seed


class Judge(Batched, nn.Module):
    """A CNN trunk with one linear head per attribute in :data:`world.ATTRIBUTES`.

    ``forward(images)`` takes ``(batch, 3, H, W)`` in [0, 1] and returns
    ``{attr: logits (batch, n_classes)}``; :meth:`encode` returns ``(batch, features)``.
    """

    def __init__(self, cfg: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(
            block(3, w, 1), block(w, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),
            block(2 * w, 4 * w, 1), block(4 * w, 4 * w, 2),
        )
        side = cfg.resolution // 8
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, cfg.features), nn.SiLU())
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.features, len(c)) for a, c in world.ATTRIBUTES.items()})
        self.num_features = cfg.features  # read by torchmetrics' FrechetInceptionDistance
        self.attributes = dict(world.ATTRIBUTES)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        r = self.cfg.resolution
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Judge: expected images (batch, 3, {r}, {r}), got {tuple(images.shape)}")
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images.float(), size=(r, r), mode="bilinear", antialias=True,
                                   align_corners=False)
        if images.dtype == torch.uint8:
            images = images.float() / 255
        return images.float().to(self.proj[1].weight.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image features ``(batch, features)`` for FID and similarity."""
        return self.proj(self.trunk(self._check(images) * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.encode(images)
        return {a: h(f) for a, h in self.heads.items()}


def augment(x: torch.Tensor, g: torch.Generator, max_noise: float) -> torch.Tensor:
    """Noise, slight blur and tiny colour shifts, so the judge tolerates diffusion artefacts."""
    n = len(x)
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    k = torch.tensor([0.25, 0.5, 0.25])
    kern = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kern, groups=3)
    x = torch.where(blur, 0.5 * x + 0.5 * xb, x)
    x = x + 0.02 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * max_noise
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def train(cfg: JudgeConfig = JudgeConfig(), progress: bool = True) -> tuple[Judge, dict]:
    """Train a judge on fresh renders from the uniform spec; returns it with a training log."""
    torch.manual_seed(cfg.seed)
    judge = Judge(cfg)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    spec = world.uniform_spec()
    g = torch.Generator().manual_seed(cfg.seed + 77)
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="train judge", disable=not progress, mininterval=5)
    for step in bar:
        b = world.sample(cfg.batch_size, spec, seed=10_000 + cfg.seed * 1_000_003 + step, resolution=cfg.resolution)
        logits = judge(augment(b.images, g, cfg.noise))
        loss = sum(F.cross_entropy(logits[a], b.labels[a]) for a in world.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval()
    return judge, {"minutes": (time.time() - t0) / 60, "final_loss": loss.item()}


def accuracy(judge: Judge, n: int = 10_000, seed: int = 123_456, spec: world.BiasSpec | None = None) -> dict[str, float]:
    """Held-out accuracy per attribute on ``n`` fresh renders (seeds never used in training)."""
    b = world.sample(n, spec or world.uniform_spec(), seed=seed, resolution=judge.cfg.resolution)
    probs = judge.predict(b.images)
    return {a: (probs[a].argmax(-1) == b.labels[a]).float().mean().item() for a in world.ATTRIBUTES}


def save(judge: Judge, path: str | Path = JUDGE_PATH, meta: dict | None = None) -> Path:
    return io.save_tensors(path, judge.state_dict(), meta={"config": asdict(judge.cfg), **(meta or {})})


def load_judge(path: str | Path = JUDGE_PATH) -> Judge:
    """Load the shipped judge (``data/judge.safetensors``) in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No judge weights at {path}. They ship with the repository, not with a pip-installed package: set "
            "DIFFLENS_DATA to a checkout's data/ folder, restore them with `git checkout data/judge.safetensors`, "
            "or retrain with `python scripts/train_judge.py`."
        )
    tensors, meta = io.load_tensors(path)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"load_judge: {path} is not a judge (no config in its metadata)")
    try:
        judge = Judge(JudgeConfig(**meta["config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_judge: {path} has a bad config ({e}); restore or retrain the judge") from None
    io.load_state(judge, tensors, path, "judge weights")
    judge.meta = meta
    return judge.eval().requires_grad_(False)
