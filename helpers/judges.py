"""Judges for real images, behind the same interface as the portrait world's judge (chapter 8).

The world's :class:`helpers.judge.Judge` reads attributes off 32×32 renders. On Stable Diffusion
or a CelebA-HQ model the paper reads them with real classifiers; two are pluggable here:

* :class:`ClipJudge` — CLIP zero-shot classification (transformers ``CLIPModel`` from a local
  folder): one text prompt per class, softmax over the scaled cosine similarities. Its image
  embedding gives **CLIP-I** (image–image similarity) and :meth:`ClipJudge.clip_t` **CLIP-T**
  (image–prompt similarity).
* :class:`FairFaceJudge` — the FairFace ResNet-34 (18 outputs: 7 race, 2 gender, 9 age bins),
  from a local weights file (the released torchvision checkpoint, ``.pt`` or ``.safetensors``, or
  a transformers ``ResNetForImageClassification`` folder), with its fine classes grouped into
  the paper's classes (:data:`FAIRFACE_GROUPS`, overridable).

Every judge has ``attributes`` (``{attr: class names}``), ``__call__(images) -> {attr: logits}``
(differentiable, for the learned baselines), ``predict`` (probabilities, batched, no grad),
``features`` (the encoder used for FID and similarity). Images are ``(n, 3, H, W)`` in [0, 1].
Each judge states its attributes and their class names; that schema is what the probe,
attribution, interventions and metrics use (any attribute, any number of classes). ``crop`` (optional) maps images to face crops
before judging — e.g. a face detector's boxes; SD portraits are usually framed well enough without.

:func:`load` picks a judge from a short spec: ``"world"``, ``"clip:<folder>"``, ``"fairface:<file>"``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .judge import Batched

CLASSES = {
    "gender": ("male", "female"),
    "age": ("young", "adult", "old"),
    "race": ("White", "Black", "Asian", "Indian"),
}
CLIP_PROMPTS = {
    "gender": ("a photo of a man", "a photo of a woman"),
    "age": ("a photo of a young person", "a photo of a middle-aged person", "a photo of an old person"),
    "race": ("a photo of a White person", "a photo of a Black person", "a photo of an Asian person",
             "a photo of an Indian person"),
}
# FairFace's 18 outputs: race 0-6, gender 7-8, age 9-17
FAIRFACE_LAYOUT = {
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"),
    "gender": ("Male", "Female"),
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"),
}
# fine classes → the paper's classes; race as in Shen et al. (White incl. Middle Eastern and Latino
# Hispanic, East + Southeast Asian); age bins are this project's choice: young < 30 ≤ adult < 60 ≤ old
FAIRFACE_GROUPS = {
    "gender": (("Male",), ("Female",)),
    "age": (("0-2", "3-9", "10-19", "20-29"), ("30-39", "40-49", "50-59"), ("60-69", "70+")),
    "race": (("White", "Middle Eastern", "Latino_Hispanic"), ("Black",), ("East Asian", "Southeast Asian"),
             ("Indian",)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Base(Batched, torch.nn.Module):
    batch_size = 64

    def __init__(self, crop: Callable | None = None):
        super().__init__()
        self.crop = crop

    def _prep(self, images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected images (batch, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255
        if self.crop is not None:
            images = self.crop(images)
        dev = next(self.parameters()).device
        x = F.interpolate(images.float().to(dev), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        return (x - torch.tensor(mean, device=dev)[:, None, None]) / torch.tensor(std, device=dev)[:, None, None]


def _need(path, what: str, how: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: nothing at {path}. {how}")
    return path


class ClipJudge(_Base):
    """CLIP zero-shot attribute classifier from a local transformers CLIP folder."""

    def __init__(self, folder, prompts: dict[str, tuple[str, ...]] | None = None, crop: Callable | None = None,
                 device="cpu", classes: dict[str, tuple[str, ...]] | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        super().__init__(crop)
        folder = _need(folder, "ClipJudge", "Put a transformers CLIP model folder there (config.json, weights, "
                       "tokenizer and preprocessor_config.json), e.g. on a machine with internet: "
                       "`hf download openai/clip-vit-large-patch14 --local-dir weights/clip`.")
        if not (folder / "config.json").is_file():
            raise ValueError(f"ClipJudge: {folder} has no config.json; pass the folder a CLIP model was saved to")
        self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        pp = folder / "preprocessor_config.json"
        cfg = json.loads(pp.read_text()) if pp.is_file() else {}
        self.mean = tuple(cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
        self.size = int(self.model.config.vision_config.image_size)
        self.attributes, self.prompts = clip_schema(prompts, classes)
        self.text = {a: self.embed_text(list(p)) for a, p in self.prompts.items()}

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return F.normalize(self._as_tensor(self.model.get_text_features(**tok)), dim=-1)

    @staticmethod
    def _as_tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (CLIP-I features)."""
        x = self._prep(images, self.size, self.mean, self.std)
        return F.normalize(self._as_tensor(self.model.get_image_features(pixel_values=x)), dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.encode(images)
        scale = self.model.logit_scale.exp()
        return {a: scale * f @ t.T for a, t in self.text.items()}

    @torch.no_grad()
    def clip_t(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """CLIP-T: cosine similarity of each image with ``prompt`` ``(n,)``."""
        return self.features(images) @ self.embed_text([prompt])[0].cpu()


def clip_schema(prompts: dict | None = None, classes: dict | None = None):
    """``(attributes, prompts)`` of a CLIP zero-shot judge: any attribute, one prompt per class.

    The paper's three attributes with :data:`CLIP_PROMPTS`, plus (or overridden by) ``prompts``: an
    attribute's class prompts; ``classes`` (optional) names its classes — for gender, age and race they
    default to :data:`CLASSES`, otherwise to the prompts themselves. E.g. ``prompts={"eyewear": ["a photo of a person",
    "a photo of a person wearing glasses"]}, classes={"eyewear": ["no glasses", "glasses"]}``.
    """
    prompts = {**CLIP_PROMPTS, **(prompts or {})}
    classes = dict(classes or {})
    extra = sorted(set(classes) - set(prompts))
    if extra:
        raise ValueError(f"ClipJudge: class names given for {extra} but no prompts; give [judge] prompts for them")
    attrs, out = {}, {}
    for a, p in prompts.items():
        if isinstance(p, str) or len(p) < 2:
            raise ValueError(f"ClipJudge: {a!r} needs one prompt per class (two or more), got {p!r}")
        names = tuple(classes.get(a) or (CLASSES[a] if a in CLASSES and len(CLASSES[a]) == len(p) else p))
        if len(names) != len(p):
            raise ValueError(f"ClipJudge: {a!r} needs {len(names)} prompts {names}, got {len(p)}")
        if len(set(names)) != len(names):
            raise ValueError(f"ClipJudge: {a!r} has repeated class names {names}")
        attrs[a], out[a] = names, tuple(p)
    return attrs, out


def _torchvision_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to transformers' ``ResNetForImageClassification`` keys."""
    import re

    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^conv1\.", "resnet.embedder.embedder.convolution.", n)
        n = re.sub(r"^bn1\.", "resnet.embedder.embedder.normalization.", n)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", n)
        if m:
            stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
            rest = re.sub(r"^conv(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.convolution.", rest)
            rest = re.sub(r"^bn(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.normalization.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
            n = f"resnet.encoder.stages.{stage}.layers.{block}.{rest}"
        n = re.sub(r"^fc\.", "classifier.1.", n)
        out[n] = v
    return out


def fairface_resnet(num_labels: int = 18):
    """An untrained transformers ResNet-34 with FairFace's head (18 outputs)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                       num_labels=num_labels, downsample_in_first_stage=False)
    return ResNetForImageClassification(cfg)


class FairFaceJudge(_Base):
    """The FairFace ResNet-34 attribute classifier from local weights, classes grouped as :data:`FAIRFACE_GROUPS`."""

    def __init__(self, weights, groups: dict | None = None, crop: Callable | None = None, device="cpu",
                 image_size: int = 224):
        super().__init__(crop)
        weights = _need(weights, "FairFaceJudge",
                        "Download FairFace's res34_fair_align_multi_7_20190809.pt (github.com/dchen236/FairFace) "
                        "and pass its path; a .safetensors copy or a transformers ResNet folder also works.")
        if weights.is_dir():
            from transformers import ResNetForImageClassification

            self.net = ResNetForImageClassification.from_pretrained(weights)
        else:
            if weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(weights)
            else:  # the released checkpoint is a pickled torchvision state dict; load tensors only
                sd = torch.load(weights, map_location="cpu", weights_only=True)
            if any(k.startswith("layer1.") for k in sd):
                sd = _torchvision_to_transformers(sd)
            self.net = fairface_resnet()
            missing, unexpected = self.net.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"FairFaceJudge: {weights} is not a FairFace ResNet-34 checkpoint "
                                 f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
        if self.net.config.num_labels != 18:
            raise ValueError(f"FairFaceJudge: expected 18 outputs (7 race, 2 gender, 9 age), got {self.net.config.num_labels}")
        self.net.to(device).eval().requires_grad_(False)
        self.size = image_size
        self.groups = groups or FAIRFACE_GROUPS
        self.attributes = {a: CLASSES[a] for a in self.groups}
        self._index = {}
        start = 0
        for a, fine in FAIRFACE_LAYOUT.items():
            pos = {c: start + i for i, c in enumerate(fine)}
            self._index[a] = (start, start + len(fine), pos)
            start += len(fine)
        for a, gs in self.groups.items():
            if len(gs) != len(CLASSES[a]):
                raise ValueError(f"FairFaceJudge: {a!r} needs {len(CLASSES[a])} groups, got {len(gs)}")
            for g in gs:
                bad = [c for c in g if c not in self._index[a][2]]
                if bad:
                    raise ValueError(f"FairFaceJudge: unknown {a} classes {bad}; FairFace's are {FAIRFACE_LAYOUT[a]}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled ResNet features (512-d), used for FID and similarity."""
        x = self._prep(images, self.size, IMAGENET_MEAN, IMAGENET_STD)
        return self.net.resnet(x).pooler_output.flatten(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net.classifier(self.encode(images))
        out = {}
        for a, gs in self.groups.items():
            lo, hi, pos = self._index[a]
            logp = logits[:, lo:hi].log_softmax(-1)
            out[a] = torch.stack([torch.logsumexp(logp[:, [pos[c] - lo for c in g]], -1) for g in gs], -1)
        return out  # grouped log-probabilities (valid logits: softmax gives the grouped probabilities)


def _parse(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a judge spec, or one error naming the accepted forms."""
    kind, _, arg = str(spec).partition(":")
    if (kind == "world" and not arg) or (kind in ("clip", "fairface", "python") and arg):
        return kind, arg
    raise ValueError(f"judge {spec!r}: expected 'world', 'clip:<folder>', 'fairface:<weights file>' or "
                     "'python:<module>:<function>'")


def schema(spec: str = "world", prompts: dict | None = None, classes: dict | None = None) -> dict[str, tuple[str, ...]]:
    """The attributes (``{name: class names}``) the judge ``spec`` reads, without loading any weights."""
    kind, arg = _parse(spec)
    if kind == "world":
        from . import world

        return dict(world.ATTRIBUTES)
    if kind == "clip":
        return clip_schema(prompts, classes)[0]
    if kind == "fairface":
        return {a: CLASSES[a] for a in FAIRFACE_GROUPS}
    return dict(_python_judge(arg).attributes)


def _python_judge(arg: str):
    import importlib

    mod, _, fn = arg.partition(":")
    if not mod or not fn:
        raise ValueError(f"judge 'python:{arg}': give 'python:<module>:<function>' (a function returning a judge)")
    try:
        judge = getattr(importlib.import_module(mod), fn)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge 'python:{arg}': cannot import {fn!r} from {mod!r} ({e})") from None
    if not hasattr(judge, "attributes") or not hasattr(judge, "predict") or not hasattr(judge, "features"):
        raise ValueError(f"judge 'python:{arg}': the object has no attributes/predict/features (subclass "
                         "helpers.judge.Batched)")
    return judge


def weights_path(spec: str) -> Path | None:
    """The weights file or folder a judge ``spec`` needs (``None`` for the world's shipped judge)."""
    kind, _, arg = str(spec).partition(":")
    return Path(arg).expanduser() if kind in ("clip", "fairface") and arg else None


def load(spec: str = "world", prompts: dict | None = None, classes: dict | None = None, **kw):
    """A judge from a short spec: ``"world"`` (the portrait world's), ``"clip:<folder>"`` (with optional
    ``prompts`` / ``classes`` per attribute, :func:`clip_schema`), ``"fairface:<file>"``, or
    ``"python:<module>:<function>"`` (your own judge: a function returning a :class:`helpers.judge.Batched`)."""
    kind, arg = _parse(spec)
    if kind == "world":
        from . import judge as J

        kw.pop("device", None)
        return J.load_judge(**kw)
    if kind == "clip":
        return ClipJudge(arg, prompts=prompts, classes=classes, **kw)
    if kind == "fairface":
        return FairFaceJudge(arg, **kw)
    return _python_judge(arg)
