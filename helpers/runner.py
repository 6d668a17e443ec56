"""Headless runner: the whole DiffLens pipeline on one model from a config file (chapter 8).

    python -m helpers run config.toml                 every stage, resuming finished ones
    python -m helpers run config.toml --stages probe attribution
    python -m helpers example-config sd > sd.toml     a commented starting point (sd | ddpm | p2 | embedded)
    accelerate launch -m helpers run config.toml      harvest split over every GPU

Stages, in order; each writes under `out` and is skipped on the next run unless its settings, or
those of a stage before it, changed:

    harvest       sample with h captured at [model] site; judge the images     harvest/
    sae           TopK SAE on the harvested h                                  sae.safetensors
    probe         per-step linear probe on pooled h                            probe.safetensors
    attribution   IG over SAE latents -> ranked features and footprints        attribution/
    intervention  original, DiffLens-edited and baseline samples, same noise   intervention/, grid_<attr>.png
    metrics       FD, keep-rates, similarity, FID, CLIP-T (CLIP judges)        metrics.json, report.md

`out` is relative to the config file (``~`` expands); the run prints its absolute path and holds a lock
on it (`out/.lock`), so a second run on the same folder refuses to start; nothing the runner did not
write there is ever deleted. Every setting is checked before anything is loaded, and all problems are
reported at once. Changing
only the judge re-reads the stored images instead of sampling again; an interrupted harvest resumes
batch by batch. Under `accelerate launch` (or `torchrun`) every process harvests its share of the
samples into harvest-part-<rank>; the main process merges them and runs the remaining stages.

Weights are never downloaded by this package. The layout the examples and errors use:

    weights/sd15/        hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir weights/sd15
    weights/clip/        hf download openai/clip-vit-large-patch14 --local-dir weights/clip
    weights/celebahq/    hf download google/ddpm-celebahq-256 --local-dir weights/celebahq
    weights/fairface/    res34_fair_align_multi_7_20190809.pt from github.com/dchen236/FairFace
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import io

STAGES = ("harvest", "sae", "probe", "attribution", "intervention", "metrics")
SITE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")  # a module path; the model itself confirms it exists
DEGENERATE_SHARE = 0.98  # a judge reading one class for more than this share of the harvest is an error


@dataclass
class ModelCfg:
    path: str = "embedded"  # "embedded", a local diffusers folder (see the weights layout), or a Hub repo id
    prompt: str | None = None  # text-to-image models only
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "float32"  # "float16" on a GPU
    site: str = "mid_block"  # hook site: mid_block, down_blocks.2, up_blocks.0.resnets.1, up_blocks.1.skips.0, ...
    arch: str = "diffusers"  # "diffusers" (a folder or repo id) or "guided-diffusion" (a P2 .pt state dict)
    arch_settings: dict = field(default_factory=dict)  # guided-diffusion only: overrides of helpers.guided.P2_CELEBAHQ


@dataclass
class JudgeCfg:
    spec: str = "world"  # "world", "clip:weights/clip", "fairface:weights/fairface/<file>.pt", "python:<mod>:<fn>"
    prompts: dict = field(default_factory=dict)  # CLIP only: {attribute: [one prompt per class]}
    classes: dict = field(default_factory=dict)  # CLIP only: {attribute: [class names]} (default: the prompts)


@dataclass
class HarvestCfg:
    n: int = 1000
    steps: int = 25
    seed: int = 1234
    batch_size: int = 100  # also the unit a resumed harvest skips
    shard_dtype: str = "float16"
    # steps whose full h is stored for the SAE and IG (empty: every step). SD at 50 steps stores
    # 50 × 64 positions × 1280 channels × 2 bytes = 8 MB per sample for all steps; pick a few.
    shard_steps: list[int] = field(default_factory=list)


@dataclass
class SAECfg:
    expansion: int = 8
    k: int = 0  # 0: scaled to the width (helpers.sae.scaled_k)
    train_steps: int = 5000
    batch_size: int = 4096
    lr: float = 4e-4
    max_rows: int = 0  # 0: every harvested row


@dataclass
class ProbeCfg:
    epochs: int = 300
    train_share: float = 0.9  # leading share of the harvest that trains the SAE and the probe


@dataclass
class AttributionCfg:
    steps: list[int] = field(default_factory=lambda: [0, 6, 12, 18, 24])  # sampling steps attributed
    per_class: int = 48
    ig_steps: int = 32


@dataclass
class InterventionCfg:
    k: int = 8  # features per class
    beta: float = 3.0  # footprint add strength
    from_step: int = 8  # edit sampling steps from_step .. end
    n: int = 128
    seed: int = 4242
    batch_size: int = 64
    baselines: list[str] = field(default_factory=list)  # run next to DiffLens on the same noise, e.g. ["Activation"]
    baseline_settings: dict = field(default_factory=dict)  # {method: knob value}; default: the method's own
    baseline_fit: dict = field(default_factory=dict)  # {method: {fit setting: value}}, e.g. {"Latent Direction": {iters = 100}}
    grid: int = 8  # samples per row of grid_<attribute>.png


@dataclass
class Config:
    out: str = "runs/difflens"
    attributes: list[str] = field(default_factory=lambda: ["gender"])
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    model: ModelCfg = field(default_factory=ModelCfg)
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    harvest: HarvestCfg = field(default_factory=HarvestCfg)
    sae: SAECfg = field(default_factory=SAECfg)
    probe: ProbeCfg = field(default_factory=ProbeCfg)
    attribution: AttributionCfg = field(default_factory=AttributionCfg)
    intervention: InterventionCfg = field(default_factory=InterventionCfg)


SECTIONS = {"model": ModelCfg, "judge": JudgeCfg, "harvest": HarvestCfg, "sae": SAECfg, "probe": ProbeCfg,
            "attribution": AttributionCfg, "intervention": InterventionCfg}


class ConfigError(ValueError):
    """Every problem of a config at once."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        head = f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(head + "".join(f"\n  - {p}" for p in problems))


def load_config(path) -> Config:
    """Read and check a ``.toml`` or ``.json`` config; every mistake is reported, all at once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist; write one with `python -m helpers example-config sd`")
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    elif path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        raise ValueError(f"config {path}: use a .toml or .json file")
    if isinstance(raw, dict) and isinstance(raw.get("out"), str) and raw["out"].strip():
        out = Path(raw["out"]).expanduser()  # a relative out is relative to the config file, not the shell
        raw["out"] = str(out if out.is_absolute() else (path.parent / out).resolve())
    return config_from_dict(raw, str(path))


def _type_ok(value, default) -> bool:
    if default is None:
        return value is None or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))


def config_from_dict(raw: dict, where: str = "config", check_files: bool = True) -> Config:
    """A :class:`Config` from a dict, after checking every setting (see :func:`problems`)."""
    errs: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(where, [f"the config must be a table of settings, got {type(raw).__name__}"])
    top = {"out", "attributes", "stages"}
    unknown = set(raw) - top - set(SECTIONS)
    if unknown:
        errs.append(f"unknown key(s) {sorted(unknown)}; known: {sorted(top | set(SECTIONS))}")
    parts = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            errs.append(f"[{name}] must be a table of settings, got {values!r}")
            continue
        known = {f.name: f for f in fields(cls)}
        bad = set(values) - set(known)
        if bad:
            errs.append(f"unknown setting(s) {sorted(bad)} in [{name}]; known: {sorted(known)}")
        default = cls()
        good = {}
        for k, v in values.items():
            if k not in known:
                continue
            if not _type_ok(v, getattr(default, k)):
                errs.append(f"[{name}] {k} = {v!r}: expected {type(getattr(default, k)).__name__}")
                continue
            good[k] = float(v) if isinstance(getattr(default, k), float) else v
        parts[name] = cls(**good)
    cfg = Config(**{k: raw[k] for k in top if k in raw}, **parts)
    errs += problems(cfg, check_files=check_files)
    if errs:
        raise ConfigError(where, errs)
    return cfg


def _model_index(path: str) -> dict | None:
    p = Path(path).expanduser()
    f = p / "model_index.json"
    return json.loads(f.read_text()) if f.is_file() else None


def problems(cfg: Config, check_files: bool = True) -> list[str]:
    """Every problem of ``cfg`` that can be seen without loading a model or a judge; with ``check_files``
    also whether the weights it names exist and its device is there."""
    from . import baselines, judges

    errs = []
    if not isinstance(cfg.out, str) or not cfg.out.strip():
        errs.append('out is empty; give the folder the run writes to, e.g. out = "runs/sd15-doctor"')
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        errs.append(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
    if not isinstance(cfg.attributes, list) or not cfg.attributes:
        errs.append("attributes is empty; name at least one attribute the judge reads")
    # the judge's attributes, from its spec (no weights loaded)
    j = cfg.judge
    schema = None
    try:
        schema = judges.schema(j.spec, j.prompts or None, j.classes or None)
    except ValueError as e:
        errs.append(f"[judge] {e}")
    except Exception as e:  # a python:<module>:<fn> judge that fails to build
        errs.append(f"[judge] spec {j.spec!r} could not be built: {type(e).__name__}: {e}")
    if j.spec.partition(":")[0] != "clip" and (j.prompts or j.classes):
        errs.append("[judge] prompts and classes apply to CLIP judges only (spec = \"clip:weights/clip\")")
    if schema is not None and isinstance(cfg.attributes, list):
        missing = [a for a in cfg.attributes if a not in schema]
        if missing:
            hint = ("; a world-only attribute needs the world's judge and model" if j.spec != "world" else
                    "; for other attributes use a CLIP judge with [judge] prompts")
            errs.append(f"unknown attribute(s) {missing}: judge {j.spec!r} reads {list(schema)}{hint}")
    if check_files:
        w = judges.weights_path(j.spec)
        if w is not None and not w.exists():
            how = ("hf download openai/clip-vit-large-patch14 --local-dir weights/clip"
                   if j.spec.startswith("clip") else "download res34_fair_align_multi_7_20190809.pt from "
                   "github.com/dchen236/FairFace into weights/fairface/")
            errs.append(f"[judge] spec {j.spec!r}: nothing at {w}; {how}")
    # the model
    m = cfg.model
    first = Path(m.path).expanduser().parts[0] if m.path else ""
    looks_repo = (m.path.count("/") == 1 and not m.path.startswith((".", "/", "~")) and not Path(m.path).suffix
                  and first != "weights" and not Path(first).exists())
    index = None
    if check_files and m.path != "embedded":
        p = Path(m.path).expanduser()
        if p.exists():
            index = _model_index(m.path) if p.is_dir() else None
            if p.is_file() and m.arch != "guided-diffusion":
                errs.append(f"[model] path {m.path!r} is a file; pass the diffusers model folder, or for a "
                            'guided-diffusion checkpoint (the paper\'s P2 .pt) set arch = "guided-diffusion"')
            if p.is_dir() and m.arch == "guided-diffusion":
                errs.append(f"[model] arch = \"guided-diffusion\" takes the .pt checkpoint file; {m.path!r} is a folder")
        elif not looks_repo:
            errs.append(f"[model] path {m.path!r}: no such folder; pass 'embedded', a local diffusers folder "
                        "(e.g. weights/sd15) or a Hub repo id")
    text_model = index is not None and index.get("text_encoder") is not None
    if text_model and not m.prompt:
        errs.append(f"[model] {m.path!r} is a text-to-image pipeline; give it a prompt, e.g. "
                    'prompt = "a photo of a doctor"')
    if (index is not None and not text_model or m.path == "embedded") and m.prompt:
        errs.append(f"[model] {m.path!r} is unconditional; drop prompt")
    if m.arch not in ("diffusers", "guided-diffusion"):
        errs.append(f"[model] arch must be \"diffusers\" or \"guided-diffusion\", got {m.arch!r}")
    elif m.arch_settings and m.arch != "guided-diffusion":
        errs.append("[model] arch_settings apply to arch = \"guided-diffusion\" only")
    elif m.arch == "guided-diffusion":
        from . import guided

        try:
            guided.unet_config(guided.settings_from(m.arch_settings))
        except (ValueError, TypeError) as e:
            errs.append(f"[model] arch_settings: {e}")
    if m.dtype not in ("float32", "float16", "bfloat16"):
        errs.append(f"[model] dtype must be float32, float16 or bfloat16, got {m.dtype!r}")
    dev = m.device
    if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", dev):
        errs.append(f"[model] device must be cpu, cuda, cuda:<n> or mps, got {dev!r}")
    elif dev.startswith("cuda") and check_files:
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            errs.append(f"[model] device = {dev!r} but {why}; set device = \"cpu\", or install the CUDA build of "
                        "torch into .venv (README)")
        elif ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
            errs.append(f"[model] device = {dev!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev == "mps" and check_files and not torch.backends.mps.is_available():
        errs.append("[model] device = \"mps\" but MPS is not available here; set device = \"cpu\"")
    if dev == "cpu" and m.dtype == "float16":
        errs.append("[model] dtype float16 on the CPU is slow and unsupported by some layers; use float32")
    if not SITE_PATTERN.match(m.site):
        errs.append(f"[model] site {m.site!r} is not a hook site name; e.g. mid_block, down_blocks.2, "
                    "up_blocks.0.resnets.1, up_blocks.1.skips.0 (helpers.hooks.sites(unet) lists a model's)")
    # numbers
    h = cfg.harvest
    for name, v, lo in (("[harvest] n", h.n, 2), ("[harvest] steps", h.steps, 1), ("[harvest] batch_size", h.batch_size, 1),
                        ("[sae] expansion", cfg.sae.expansion, 1), ("[sae] train_steps", cfg.sae.train_steps, 1),
                        ("[sae] batch_size", cfg.sae.batch_size, 1), ("[probe] epochs", cfg.probe.epochs, 1),
                        ("[attribution] per_class", cfg.attribution.per_class, 1),
                        ("[attribution] ig_steps", cfg.attribution.ig_steps, 1), ("[intervention] k", cfg.intervention.k, 1),
                        ("[intervention] n", cfg.intervention.n, 1), ("[intervention] batch_size", cfg.intervention.batch_size, 1),
                        ("[intervention] grid", cfg.intervention.grid, 1), ("[sae] k", cfg.sae.k, 0),
                        ("[sae] max_rows", cfg.sae.max_rows, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            errs.append(f"{name} must be an integer ≥ {lo}, got {v!r}")
    if h.shard_dtype not in ("float16", "float32", "bfloat16"):
        errs.append(f"[harvest] shard_dtype must be float16, float32 or bfloat16, got {h.shard_dtype!r}")
    if not 0 < cfg.probe.train_share < 1:
        errs.append(f"[probe] train_share must be in (0, 1) so that some samples are held out, got {cfg.probe.train_share}")
    if not cfg.sae.lr > 0:
        errs.append(f"[sae] lr must be > 0, got {cfg.sae.lr}")
    steps = h.steps if isinstance(h.steps, int) else 0
    late = [s for s in cfg.attribution.steps if not (isinstance(s, int) and 0 <= s < steps)]
    if late:
        errs.append(f"[attribution] steps {late} are outside the harvest's 0..{steps - 1}")
    stored = h.shard_steps
    bad = [s for s in stored if not (isinstance(s, int) and 0 <= s < steps)]
    if bad:
        errs.append(f"[harvest] shard_steps {bad} are outside 0..{steps - 1}")
    missing = [s for s in cfg.attribution.steps if stored and s not in stored]
    if missing:
        errs.append(f"[attribution] steps {missing} are not in [harvest] shard_steps {stored}; "
                    "add them there (IG needs the full h of those steps)")
    if not cfg.attribution.steps:
        errs.append("[attribution] steps is empty; list the sampling steps to attribute")
    if not (isinstance(cfg.intervention.from_step, int) and 0 <= cfg.intervention.from_step < max(steps, 1)):
        errs.append(f"[intervention] from_step must be in 0..{steps - 1}")
    import math

    from .pipeline import K_MAX

    if isinstance(cfg.intervention.k, int) and cfg.intervention.k > K_MAX:
        errs.append(f"[intervention] k = {cfg.intervention.k}: at most {K_MAX} ranked features per class are stored")
    if not math.isfinite(cfg.intervention.beta):
        errs.append(f"[intervention] beta must be a finite number, got {cfg.intervention.beta}")
    for b in cfg.intervention.baselines:
        if b not in baselines.METHODS:
            errs.append(f"[intervention] baselines: unknown method {b!r}; the baselines are {list(baselines.METHODS)}")
    if baselines.HDistributionFlat.name in cfg.intervention.baselines and stored and \
            sorted(set(stored)) != list(range(steps)):
        errs.append(f"[intervention] baselines: {baselines.HDistributionFlat.name!r} trains on the full h of every "
                    f"step; [harvest] shard_steps {stored} stores only some (set shard_steps = [] to store all)")
    import inspect

    for b, kw in cfg.intervention.baseline_fit.items():
        if b not in cfg.intervention.baselines:
            errs.append(f"[intervention] baseline_fit names {b!r}, which is not in baselines")
            continue
        if not isinstance(kw, dict):
            errs.append(f"[intervention] baseline_fit {b!r} must be a table of fit settings, got {kw!r}")
            continue
        cls = baselines.METHODS[b]
        params = inspect.signature(cls.from_context).parameters
        known = {n for n, q in params.items() if n != "ctx" and q.kind != q.VAR_KEYWORD}
        if any(q.kind == q.VAR_KEYWORD for q in params.values()):  # the rest goes to fit()
            known |= set(inspect.signature(cls.fit).parameters) - {
                "cls", "model", "judge", "attribute", "target", "progress", "images_of", "classes", "site", "steps",
                "h_by_step", "labels"}
        bad = sorted(set(kw) - known)
        if bad:
            errs.append(f"[intervention] baseline_fit {b!r}: unknown setting(s) {bad}; known: {sorted(known)}")
    if "Latent Editing" in cfg.intervention.baselines:
        es = cfg.intervention.baseline_fit.get("Latent Editing", {}).get("edit_steps", 12)
        if isinstance(es, int) and isinstance(h.steps, int) and not 0 < es <= h.steps:
            errs.append(f"[intervention] Latent Editing edits the first edit_steps = {es} of {h.steps} sampling steps; "
                        "set baseline_fit = {\"Latent Editing\" = {edit_steps = ...}} to at most [harvest] steps")
    for b, v in cfg.intervention.baseline_settings.items():
        if b not in cfg.intervention.baselines:
            errs.append(f"[intervention] baseline_settings names {b!r}, which is not in baselines")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            errs.append(f"[intervention] baseline_settings {b!r} = {v!r}: give a finite number")
    return errs


EXAMPLES = {
    "sd": '''# Stable Diffusion v1.5 on one GPU: "a photo of a doctor", gender, age and glasses, CLIP judge
out = "runs/sd15-doctor"   # relative to this config file (~ expands)
attributes = ["gender", "age", "eyewear"]

[model]
path = "weights/sd15"     # hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir weights/sd15
prompt = "a photo of a doctor"
guidance_scale = 7.5
device = "cuda"
dtype = "float16"
site = "mid_block"        # or up_blocks.0, down_blocks.2.resnets.1, up_blocks.1.skips.0, ...

[judge]
spec = "clip:weights/clip"   # hf download openai/clip-vit-large-patch14 --local-dir weights/clip

[judge.prompts]              # CLIP zero-shot: one prompt per class; gender/age/race have defaults
eyewear = ["a photo of a person", "a photo of a person wearing glasses"]

[judge.classes]
eyewear = ["no glasses", "glasses"]

[harvest]
n = 2000
steps = 50
batch_size = 32
shard_steps = [0, 10, 20, 30, 40]   # full h of these steps only: 2000 × 5 × 64 × 1280 × 2 B = 1.6 GB

[sae]
expansion = 4        # SD's mid block is 1280 channels at 8x8: 5120 latents
train_steps = 20000

[attribution]
steps = [0, 10, 20, 30, 40]

[intervention]
k = 16
beta = 3.0
from_step = 10
n = 500
baselines = ["Activation", "H-Distribution"]
''',
    "ddpm": '''# An unconditional CelebA-HQ pixel DDPM (256x256, google/ddpm-celebahq-256), FairFace judge. Not the paper's
# model: the paper's main table is on P2 (python -m helpers example-config p2).
out = "runs/celebahq"   # relative to this config file
attributes = ["gender", "age", "race"]

[model]
path = "weights/celebahq"   # hf download google/ddpm-celebahq-256 --local-dir weights/celebahq
device = "cuda"
dtype = "float16"

[judge]
spec = "fairface:weights/fairface/res34_fair_align_multi_7_20190809.pt"   # github.com/dchen236/FairFace

[harvest]
n = 2000
steps = 50
batch_size = 64
shard_steps = [0, 10, 20, 30, 40]

[attribution]
steps = [0, 10, 20, 30, 40]

[intervention]
from_step = 10
n = 500
baselines = ["Activation", "H-Distribution", "Latent Direction"]
''',
    "p2": '''# The paper's own model: P2 on CelebA-HQ 256 (OpenAI guided-diffusion UNet trained with P2 weighting), the
# model of the paper's main table; FairFace judge. One GPU.
out = "runs/p2-celebahq"   # relative to this config file
attributes = ["gender", "age", "race"]

[model]
path = "weights/p2/celebahq_p2.pt"   # the P2 authors' CelebA-HQ checkpoint (github.com/jychoi118/P2-weighting)
arch = "guided-diffusion"            # converted once into weights/p2/celebahq_p2-diffusers/ (safetensors)
device = "cuda"
dtype = "float16"
# arch_settings: the P2 CelebA-HQ settings are the defaults (helpers.guided.P2_CELEBAHQ) --
#   image_size 256, num_channels 128, num_res_blocks 1, attention_resolutions "16", num_head_channels 64,
#   resblock_updown, use_scale_shift_norm, learn_sigma (the variance half is dropped: DDIM uses eps only),
#   linear schedule over 1000 steps. A different guided-diffusion model: e.g.
# arch_settings = {image_size = 64, channel_mult = "1,2,3,4", attention_resolutions = "32,16,8"}

[judge]
spec = "fairface:weights/fairface/res34_fair_align_multi_7_20190809.pt"   # github.com/dchen236/FairFace

[harvest]
n = 2000
steps = 50          # the paper samples with DDIM respaced to 50 steps
batch_size = 64
shard_steps = [0, 10, 20, 30, 40]   # h is 512 x 8 x 8 per step: 2000 x 5 x 32768 x 2 B = 0.66 GB

[sae]
expansion = 8       # 4096 latents on the 512-channel bottleneck, k = 32 (the paper's)

[attribution]
steps = [0, 10, 20, 30, 40]

[intervention]
k = 30              # the released DiffLens configs edit the top 30 features per class
from_step = 10
n = 500
baselines = ["Activation", "H-Distribution", "Latent Direction"]
''',
    "embedded": '''# The book's own portrait model on CPU: ~3 minutes on 2 cores with these small settings, which check the
# plumbing but are too small to move the distribution much. Chapters 3-5 use 1000 samples x 25 steps and
# 5000 SAE steps.
out = "runs/embedded-small"   # relative to this config file
attributes = ["gender"]

[harvest]
n = 200
steps = 10
batch_size = 100

[sae]
train_steps = 300
batch_size = 1024

[attribution]
steps = [0, 5, 9]
per_class = 16

[intervention]
from_step = 3
n = 64
baselines = ["Activation"]
''',
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(msg, flush=True)


LOCK = ".lock"


def _lock(out: Path):
    """An exclusive lock on ``out`` (``out/.lock``, ``flock``): a second run on the same folder refuses to start.
    The operating system drops the lock when its process ends, so a killed run leaves no stale lock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system (Windows): no lock, said once
        _say(f"note: no file locking on this system; do not start two runs on {out} at once")
        return None
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"out {out} is in use by another run ({who}); wait for it to finish or give this run "
                           "another out") from None
    f.seek(0)
    f.truncate()
    import platform

    f.write(f"pid {os.getpid()} on {platform.node()}\n")
    f.flush()
    return f


class Run:
    """One configured pipeline run; :meth:`stage` runs one stage, :meth:`all` the configured ones."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out).expanduser().absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = None
        # under torchrun / accelerate launch every process harvests its share; only rank 0 does the rest
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        if self.is_main:
            self._lock = _lock(self.out)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self._model = self._judge = None
        self.device = cfg.model.device  # this process's device (one GPU per process under a launcher)

    def close(self) -> None:
        """Release ``out``'s lock (also when the run object is dropped or the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- what each stage depends on (its settings and every earlier stage's) --
    def key(self, stage: str) -> str:
        c = asdict(self.cfg)
        upto = STAGES[: STAGES.index(stage) + 1]
        m = {k: v for k, v in c["model"].items() if k != "device"}  # where it runs does not change results
        parts = {"model": m}
        if stage not in ("harvest", "sae"):  # the images (and the SAE on their h) do not depend on the judge
            parts["judge"] = c["judge"]
        if stage != "harvest":  # which samples train the SAE and the probe
            parts["train_share"] = c["probe"]["train_share"]
        if stage not in ("harvest", "sae"):  # adding an attribute must not redo a (GPU-hours) harvest
            parts["attributes"] = c["attributes"]
        parts.update({s: c[s] for s in upto if s in c})
        return _hash(parts)

    def judge_key(self) -> str:
        return _hash(asdict(self.cfg.judge))

    def done(self, stage: str) -> bool:
        st = self.state.get(stage, {})
        if stage == "harvest":
            return st.get("key") == self.key(stage) and st.get("judge") == self.judge_key()
        return st.get("key") == self.key(stage)

    def _mark(self, stage: str, info: dict) -> None:
        self.state[stage] = {"key": self.key(stage), **info}
        if stage == "harvest":
            self.state[stage]["judge"] = self.judge_key()
        if self.is_main:
            io.write_json(self.state_path, self.state)

    @property
    def model(self):
        from . import models

        if self._model is None:
            m = self.cfg.model
            self._model = models.load_model(m.path, device=self.device, dtype=getattr(torch, m.dtype), prompt=m.prompt,
                                            guidance_scale=m.guidance_scale, negative_prompt=m.negative_prompt,
                                            arch=m.arch if m.arch == "guided-diffusion" else None,
                                            arch_settings=m.arch_settings or None)
            from . import hooks

            hooks.resolve(self._model.unet, m.site)  # a site this UNet does not have: one clear error, now
        return self._model

    @property
    def judge(self):
        from . import judges

        if self._judge is None:
            j = self.cfg.judge
            self._judge = judges.load(j.spec, prompts=j.prompts or None, classes=j.classes or None,
                                      device=self.device)
        return self._judge

    def all(self, stages=None) -> dict:
        for s in stages or self.cfg.stages:
            self.stage(s)
        return self.state

    def stage(self, name: str) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
        if name != "harvest" and not self.is_main:
            return
        for before in STAGES[: STAGES.index(name)]:
            if not self.done(before):
                raise RuntimeError(f"stage {name!r} needs {before!r} first (not run, or its settings changed); "
                                   f"run `python -m helpers run <config> --stages {before} {name}`")
        if self.done(name):
            _say(f"[{name}] up to date, skipped")
            return
        t0 = time.time()
        info = getattr(self, f"_{name}")() or {}
        info["seconds"] = time.time() - t0
        self._mark(name, info)
        _say(f"[{name}] done in {info['seconds']:.1f} s")

    # -- stages --
    def _harvest(self) -> dict:
        from . import harvest as H

        h = self.cfg.harvest
        folder = self.out / "harvest"
        st = self.state.get("harvest", {})
        if st.get("key") == self.key("harvest") and (folder / "summary.safetensors").is_file():
            info = {k: v for k, v in st.items() if k not in ("key", "judge", "seconds")} | {"rejudged": True}
            if not self.is_main:
                return info
            _say("[harvest] only the judge changed: re-reading the stored images")
            H.rejudge(folder, self.judge)
            self._check_judged(folder)
            return info
        self._warn_world_judge()
        settings = H.HarvestSettings(n=h.n, steps=h.steps, seed=h.seed, batch_size=h.batch_size,
                                     shard_dtype=h.shard_dtype, shard_steps=tuple(h.shard_steps) or None,
                                     site=self.cfg.model.site)
        try:
            from accelerate import PartialState

            # cpu=True lets torchrun / accelerate start several CPU processes (gloo); on GPUs each
            # process takes its own device
            state = PartialState(cpu=self.cfg.model.device == "cpu")
        except Exception:  # accelerate missing or no launcher: one process
            state = None
        if state is not None and state.num_processes > 1 and self.cfg.model.device.startswith("cuda"):
            self.device = str(state.device)
        if state is None or state.num_processes == 1:
            H.run(self.model, settings, folder, judge=self.judge, progress=self.progress)
            self._sampled({"samples": h.n, "processes": 1})
            self._check_judged(folder)
            return {"samples": h.n, "processes": 1}
        # one part per process, merged by the main process
        with state.split_between_processes(list(range(h.n))) as ids:
            H.run(self.model, settings, self.out / f"harvest-part-{state.process_index}", judge=self.judge,
                  progress=self.progress and state.is_main_process, sample_ids=torch.tensor(ids))
        state.wait_for_everyone()
        if state.is_main_process:
            H.merge([self.out / f"harvest-part-{r}" for r in range(state.num_processes)], folder)
        state.wait_for_everyone()
        # the remaining stages run on rank 0 alone: leave the process group, or torchmetrics would
        # try to sync its FID state with processes that have finished
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if state.is_main_process:
            self._sampled({"samples": h.n, "processes": state.num_processes})
            self._check_judged(folder)
        return {"samples": h.n, "processes": state.num_processes}

    def _sampled(self, info: dict) -> None:
        """Record a finished sampling before the judge is checked: a rejected judge then costs a re-read, not a
        re-harvest."""
        self.state["harvest"] = {"key": self.key("harvest"), "judge": None, **info}
        if self.is_main:
            io.write_json(self.state_path, self.state)

    def _warn_world_judge(self) -> None:
        from . import models

        if (self.cfg.judge.spec == "world" and self.cfg.model.path != "embedded"
                and not models.trained_on_world(self.cfg.model.path)):
            from . import judge as J

            _say(f"[harvest] warning: the portrait world's judge reads {self.cfg.model.path!r}'s images resized to "
                 f"{J.JudgeConfig.resolution}×{J.JudgeConfig.resolution}; it was trained on renders of the world "
                 "only, so its labels mean little for another model's images. Use a CLIP or FairFace judge there.")

    def _check_judged(self, folder) -> None:
        """A judge that reads (nearly) one class for every image gives nothing to learn: stop with the reason."""
        from . import harvest as H

        summary = H.load_summary(folder)
        for a in self.cfg.attributes:
            y = summary.probs[a].argmax(-1)
            counts = torch.bincount(y, minlength=summary.probs[a].shape[1])
            top = int(counts.argmax())
            if counts[top] > DEGENERATE_SHARE * len(y) or int((counts >= 2).sum()) < 2:
                names = self.judge.attributes[a]
                raise RuntimeError(
                    f"the judge reads {a!r} as {names[top]!r} for {int(counts[top])} of {len(y)} harvested images "
                    f"(counts {dict(zip(names, counts.tolist()))}): the probe and IG cannot learn the other classes. "
                    "Check the judge (its weights, or its [judge] prompts for this model's images), or harvest more "
                    "samples ([harvest] n) if the model really draws that class this often.")

    def _labels_split(self):
        """The harvest summary, its labels and the number of leading samples that train the SAE and the probe."""
        from . import harvest as H
        from . import pipeline

        summary = H.load_summary(self.out / "harvest")
        return summary, summary.labels(), pipeline.n_train(len(summary.pooled), self.cfg.probe.train_share)

    def _sae(self) -> dict:
        from . import pipeline
        from . import sae as S

        c = self.cfg.sae
        summary, _, n_train = self._labels_split()
        width = summary.pooled.shape[2]
        cfg = S.SAEConfig(d_in=width, expansion=c.expansion, k=c.k or S.scaled_k(width), site=self.cfg.model.site)
        tc = S.SAETrainConfig(steps=c.train_steps, batch_size=c.batch_size, lr=c.lr)
        sae, _, ev, n = pipeline.train_sae(self.out / "harvest", n_train, cfg, tc, max_rows=c.max_rows or None,
                                           device=self.device, progress=self.progress)
        S.save_sae(sae, self.out / "sae.safetensors", meta={"held_out": ev, "rows": n})
        return {"held_out": ev}

    def _probe(self) -> dict:
        from . import pipeline
        from . import probe as P

        summary, _, n = self._labels_split()
        attrs = {a: self.judge.attributes[a] for a in self.cfg.attributes}
        probe, acc = pipeline.train_probe(summary, attrs, n, epochs=self.cfg.probe.epochs, progress=self.progress)
        acc_d = None if acc is None else acc.to_dict(orient="list")
        P.save_probe(probe, self.out / "probe.safetensors", meta={"held_out_accuracy": acc_d, "train_samples": n})
        return {"held_out_accuracy": acc_d}

    def _attribution(self) -> dict:
        from . import pipeline
        from . import probe as P
        from . import sae as S

        summary, labels, n = self._labels_split()
        sae, _ = S.load_sae(self.out / "sae.safetensors")
        probe, _ = P.load_probe(self.out / "probe.safetensors")
        c = self.cfg.attribution
        ranks = pipeline.rank_and_footprints(sae, probe, self.out / "harvest", labels, self.cfg.attributes, c.steps, n,
                                             self.out / "attribution", per_class=c.per_class, ig_steps=c.ig_steps,
                                             device=self.device, progress=self.progress)
        return {"samples_per_class": {a: r.counts for a, r in ranks.items()}}

    def fitted_baseline(self, name: str, attribute: str):
        """Baseline ``name`` fitted for ``attribute`` on this run's harvest (its training split) and probe, as the
        intervention stage fits it (with the config's ``baseline_fit`` settings); needs the harvest and probe
        stages done. For experiments beyond the runner's own stage, e.g. a grid of settings."""
        summary, labels, n_train = self._labels_split()
        from . import probe as P

        probe = P.load_probe(self.out / "probe.safetensors")[0]
        return self._baseline(name, attribute, summary, labels, n_train, probe)

    def _baseline(self, name: str, attribute: str, summary, labels, n_train, probe):
        from . import baselines as B
        from . import pipeline

        cls = B.method(name)
        ctx = B.Context(self.model, attribute, tuple(self.judge.attributes[attribute]),
                        pipeline.uniform(self.judge.attributes[attribute]), steps=self.cfg.harvest.steps,
                        site=self.cfg.model.site, pooled=summary.pooled[:n_train].float(),
                        labels=labels[attribute][:n_train], images=summary.images[:n_train], probe=probe,
                        judge=self.judge if cls.learns_from_judge else None, progress=self.progress,
                        h_full=lambda steps: pipeline.h_by_step(self.out / "harvest", steps, torch.arange(n_train)))
        return cls.from_context(ctx, **self.cfg.intervention.baseline_fit.get(name, {}))

    def _intervention(self) -> dict:
        from . import intervention as I
        from . import models, pipeline
        from . import sae as S

        c, folder = self.cfg.intervention, self.out / "intervention"
        folder.mkdir(exist_ok=True)
        sae, _ = S.load_sae(self.out / "sae.safetensors")
        sae.to(self.device)
        steps = self.cfg.harvest.steps
        model = self.model
        noise = models.make_noise(c.n, model.sample_size, c.seed, model.channels)
        _say("[intervention] original samples")
        orig = models.sample(model, noise=noise, steps=steps, batch_size=c.batch_size, progress=self.progress)
        self._save_images(folder / "original.safetensors", orig, None)
        summary, labels, n_train = self._labels_split()
        probe = None
        if c.baselines:
            from . import probe as P

            probe = P.load_probe(self.out / "probe.safetensors")[0]
        skipped, made = {}, {}
        for a in self.cfg.attributes:
            names = self.judge.attributes[a]
            try:
                e = pipeline.edit_for(self.out / "attribution", a, c.beta, c.k, target=pipeline.uniform(names),
                                      steps=range(c.from_step, steps))
            except pipeline.NoRanking as err:  # a class the harvest never produced has no ranked features
                skipped[a] = str(err)
                _say(f"[intervention] {a}: skipped ({err})")
                continue
            _say(f"[intervention] {a}: DiffLens")
            imgs, iv = I.sample_edited(model, sae, [e], noise=noise, steps=steps, batch_size=c.batch_size,
                                       progress=self.progress)
            classes = iv.classes(a)
            self._save_images(folder / f"edited_{a}.safetensors", imgs, classes)
            rows = [("original", orig), ("DiffLens", imgs)]
            files = {"DiffLens": f"edited_{a}.safetensors"}
            for b in c.baselines:
                _say(f"[intervention] {a}: {b}")
                fitted = self._baseline(b, a, summary, labels, n_train, probe)
                setting = c.baseline_settings.get(b, fitted.default)
                bimgs = fitted.sample_edited(model, noise, steps, setting, classes, batch_size=c.batch_size,
                                             progress=self.progress)
                files[b] = f"baseline_{b.replace(' ', '-')}_{a}.safetensors"
                self._save_images(folder / files[b], bimgs, classes if fitted.per_sample else None,
                                  meta={"method": b, "setting": setting})
                rows.append((b, bimgs))
            _grid_png(self.out / f"grid_{a}.png", rows, c.grid, title=f"{a}: asked-for class per column: " +
                      ", ".join(names[int(k)] if k >= 0 else "-" for k in classes[: c.grid]))
            made[a] = files
        if not made:
            raise RuntimeError("every attribute's edit was skipped: " + "; ".join(f"{a}: {m}" for a, m in skipped.items())
                               + ". The harvest judged too few samples in some class; harvest more samples.")
        return {"made": made, **({"skipped": skipped} if skipped else {})}

    def _save_images(self, path, images, classes, meta: dict | None = None):
        probs = self.judge.predict(images)
        t = io.prefixed("probs", probs)
        t["features"] = self.judge.features(images)
        t["images"] = (images * 255).round().to(torch.uint8)
        if classes is not None:
            t["classes"] = classes
        io.save_tensors(path, t, meta=meta)

    def _metrics(self) -> dict:
        from . import pipeline

        folder = self.out / "intervention"
        o, _ = io.load_tensors(folder / "original.safetensors")
        oprobs = io.unprefixed("probs", o)
        res = {}
        made = self.state["intervention"]["made"]  # this run's files only, never an earlier run's leftovers
        for a in self.cfg.attributes:
            for method, name in made.get(a, {}).items():
                e, meta = io.load_tensors(folder / name)
                eprobs = io.unprefixed("probs", e)
                others = [b for b in eprobs if b != a]
                row = pipeline.evaluate(oprobs, eprobs, a, keep={"other attributes": others},
                                        original_features=o["features"], edited_features=e["features"], n_boot=500,
                                        floor=True)
                row = {"attribute": a, "method": method, "setting": meta.get("setting", self.cfg.intervention.beta),
                       "classes": list(self.judge.attributes[a]), **row}
                if hasattr(self.judge, "clip_t") and self.cfg.model.prompt:
                    row["CLIP-T original"] = float(self.judge.clip_t(o["images"], self.cfg.model.prompt).mean())
                    row["CLIP-T edited"] = float(self.judge.clip_t(e["images"], self.cfg.model.prompt).mean())
                res[f"{a}/{method}"] = row
        io.write_json(self.out / "metrics.json", res)
        io.write_text(self.out / "report.md", _report(self.cfg, res))
        return {"rows": list(res)}


def _grid_png(path, rows, n: int, title: str = "") -> Path:
    """One row of ``n`` images per method (first row: the original samples), labelled on the left."""
    from PIL import Image, ImageDraw

    imgs = [(r[1][:n].clamp(0, 1) * 255).round().to(torch.uint8) for r in rows]
    side = imgs[0].shape[-1]
    scale = max(1, 64 // side)
    cell = side * scale
    left, top = 130, 22
    canvas = Image.new("RGB", (left + n * (cell + 2), top + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title[:160], fill="black")
    for i, ((name, _), x) in enumerate(zip(rows, imgs)):
        draw.text((4, top + i * (cell + 2) + cell // 2 - 6), name[:20], fill="black")
        for j in range(min(n, len(x))):
            im = Image.fromarray(x[j].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(im, (left + j * (cell + 2), top + i * (cell + 2)))
    return io.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def _report(cfg: Config, res: dict) -> str:
    def f(v):
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# DiffLens run: {cfg.model.path}", "",
             f"Prompt: {cfg.model.prompt or '(unconditional)'} · judge: {cfg.judge.spec} · hook site: "
             f"`{cfg.model.site}` · harvest {cfg.harvest.n} samples × {cfg.harvest.steps} steps · edits on "
             f"{cfg.intervention.n} samples from noise seed {cfg.intervention.seed}, each asked for a class drawn "
             "from the uniform target.", "",
             "FD is the distance of the judged class shares from uniform (lower is fairer; `FD floor` is what a "
             "perfectly uniform sampler shows at this n). `keep other attributes`: share of samples whose judged "
             "class of every other attribute is unchanged. `similarity`: mean cosine similarity of each edited "
             "sample's judge features to its original's; FID of edited against original samples.", "",
             "| attribute | method | setting | FD original | FD [95% CI] | FD floor | keep other attributes | "
             "similarity | FID |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.values():
        lines.append(f"| {r['attribute']} | {r['method']} | {f(r['setting'])} | {f(r['FD original'])} | "
                     f"{f(r['FD'])} [{f(r['FD lo'])}, {f(r['FD hi'])}] | {f(r['FD floor']['mean'])} | "
                     f"{f(r['keep other attributes'])} | {f(r.get('similarity'))} | {f(r.get('FID'))} |")
    lines += ["", "Class shares (original → edited):", ""]
    for r in res.values():
        shares = ", ".join(f"{c} {o:.2f} → {e:.2f}" for c, o, e in zip(r["classes"], r["share original"],
                                                                       r["share edited"]))
        lines.append(f"- {r['attribute']} / {r['method']}: {shares}")
    from . import baselines as B

    learners = [b for b in cfg.intervention.baselines if B.METHODS[b].learns_from_judge]
    if learners:
        lines += ["", f"{' and '.join(learners)} learned from the same judge that scores them here; the book's "
                  "benchmark (chapter 7) trains them against a second judge, because a method trained against the "
                  "scoring judge can learn that judge's blind spots instead of the attribute."]
    lines += ["", "Image grids: " + ", ".join(f"`grid_{a}.png`" for a in cfg.attributes) +
              " (first row: original samples; the rows below: the same noise, edited).", ""]
    return "\n".join(lines)


HELP = {
    "run": "Run the pipeline from a config file (.toml or .json); finished stages are skipped.",
    "example-config": "Print a commented example config: sd (Stable Diffusion + CLIP), ddpm (a pixel DDPM + "
                      "FairFace; not the paper's model), p2 (the paper's P2 guided-diffusion model + FairFace) or embedded "
                      "(the book's model on CPU).",
}


def main(argv=None) -> int:
    import argparse

    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(prog="python -m helpers", description=doc[0].strip(),
                                 epilog="\n\n".join(p.strip("\n") for p in doc[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{run,example-config}")
    r = sub.add_parser("run", help=HELP["run"], description=HELP["run"])
    r.add_argument("config", help="path to the config file")
    r.add_argument("--stages", nargs="+", metavar="STAGE", help=f"only these stages, of: {', '.join(STAGES)}")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = sub.add_parser("example-config", help=HELP["example-config"], description=HELP["example-config"])
    e.add_argument("kind", choices=sorted(EXAMPLES))
    a = ap.parse_args(argv)
    if a.cmd == "example-config":
        print(EXAMPLES[a.kind], end="")
        return 0
    try:
        cfg = load_config(a.config)
        if a.stages:
            bad = [s for s in a.stages if s not in STAGES]
            if bad:
                raise ValueError(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
        _say(f"run: writing to {Path(cfg.out).expanduser().absolute()}")
        with Run(cfg, progress=not a.no_progress) as run:
            state = run.all(a.stages)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as err:
        print(f"error: {err}", flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(cfg.out).expanduser()
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("key", "judge")} for k, v in state.items()},
                         indent=1))
        if (out / "report.md").is_file():
            print(f"report: {out / 'report.md'}")
    return 0
