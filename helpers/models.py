"""Diffusion models: load the embedded portrait model or any diffusers UNet, sample, train.

Introduced in chapter 1. ``load_model("embedded")`` gives the small pixel-space
``UNet2DModel`` this project trains on the portrait world (weights in ``data/embedded``);
``load_model(path_or_repo_id)`` loads any diffusers ``UNet2DModel`` or pipeline with
``from_pretrained``. :func:`sample` runs deterministic DDIM from given or seeded noise.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from . import io, world

REPO_ROOT, DATA_DIR = io.REPO_ROOT, io.DATA_DIR
EMBEDDED_DIR = DATA_DIR / "embedded"


@dataclass
class EmbeddedConfig:
    """Architecture and training settings of the embedded portrait model."""

    resolution: int = 32  # image side; the mid block sees resolution / 4
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # last entry = bottleneck (h-space) width
    layers_per_block: int = 1  # resnets per down block
    norm_num_groups: int = 16  # GroupNorm groups
    num_train_timesteps: int = 1000  # DDPM steps
    beta_schedule: str = "squaredcos_cap_v2"  # noise schedule
    prediction_type: str = "v_prediction"  # "epsilon" or "v_prediction" (better conditioned at high noise)
    batch_size: int = 64  # images per step, rendered fresh from the spec
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 200  # linear warm-up
    lr_decay: str = "constant"  # after warm-up: "constant" or "cosine" (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.1  # floor of the cosine decay, as a fraction of lr
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 disables
    ema_decay: float = 0.999  # EMA max decay (with warm-up)
    spec: str = "default"  # world spec name ("default" or a JSON file)
    seed: int = 0  # data and init seed


@dataclass
class Diffusion:
    """A denoising UNet plus its (training) noise scheduler."""

    unet: torch.nn.Module
    scheduler: object  # a diffusers scheduler; sampling uses DDIM built from its config
    name: str = "model"
    pipeline: object | None = None  # the full diffusers pipeline when one was loaded
    # text-to-image pipelines (Stable Diffusion): what every sample is generated from
    prompt: str | None = None  # e.g. "a photo of a doctor"; required to sample a text-conditioned model
    guidance_scale: float = 7.5  # classifier-free guidance (1 = none)
    negative_prompt: str | None = None
    # DDIM re-derives ε from the clipped x0 prediction (guided-diffusion's DDIM, used by the paper's P2 model)
    clipped_eps: bool = False

    @property
    def sample_size(self) -> int:
        s = self.unet.config.sample_size
        return s if isinstance(s, int) else s[0]

    @property
    def text_conditioned(self) -> bool:
        """True for a text-to-image pipeline (a UNet that takes ``encoder_hidden_states``)."""
        return self.pipeline is not None and getattr(self.pipeline, "text_encoder", None) is not None

    @property
    def channels(self) -> int:
        """Channels of the noise the UNet denoises (3 for pixel models, 4 for SD's latents)."""
        return int(self.unet.config.in_channels)


def build_unet(cfg: EmbeddedConfig) -> UNet2DModel:
    """A fresh pixel-space UNet with a mid block at ``resolution / 4``."""
    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=cfg.resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=32,
    )


def build_scheduler(cfg: EmbeddedConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True)


# ----------------------------------------------------------------------------- loading


def load_model(name_or_path: str | os.PathLike = "embedded", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, prompt: str | None = None, guidance_scale: float = 7.5,
               negative_prompt: str | None = None, arch: str | None = None, arch_settings: dict | None = None) -> Diffusion:
    """Load a diffusion model ready to sample.

    ``"embedded"`` loads the shipped portrait model. Otherwise ``name_or_path`` is a local
    folder or a Hub repo id holding either a diffusers pipeline (``model_index.json``) or a
    bare ``UNet2DModel`` (``config.json``; a ``scheduler/`` or ``scheduler_config.json`` next
    to it is used when present, else a default DDPM scheduler). Examples:

    * ``load_model("google/ddpm-celebahq-256")`` — an unconditional pixel DDPM (``DDPMPipeline``);
    * ``load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16,
      prompt="a photo of a doctor")`` — Stable Diffusion: a text-conditioned ``UNet2DConditionModel``
      in the VAE's latent space, sampled with classifier-free guidance; :func:`sample` returns the
      VAE-decoded images and the bottleneck hooks see the conditional half (see
      :func:`helpers.hooks.guided`). Its safety checker is switched off (it blanks images the
      judge must read).

    * ``load_model("weights/celebahq_p2.pt", arch="guided-diffusion")`` — the paper's P2 model, a guided-diffusion
      state dict: converted once into ``weights/celebahq_p2-diffusers/`` (safetensors; :mod:`helpers.guided`), which
      later loads read. ``arch_settings`` overrides the P2 CelebA-HQ settings (:class:`helpers.guided.GuidedSettings`).

    ``dtype=torch.float16`` halves memory on a GPU; on CPU keep float32.
    """
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix in (".pt", ".pth", ".ckpt"):
        if arch != "guided-diffusion":
            raise ValueError(f"load_model: {name!r} is a PyTorch checkpoint; say what it is: arch='guided-diffusion' "
                             "(the paper's P2 model; settings via arch_settings) converts it to a diffusers folder")
        from . import guided

        folder = guided.convert_file(p, settings=guided.settings_from(arch_settings))
        return _with_prompt(_load_local(folder, name, device, dtype), prompt, guidance_scale, negative_prompt)
    if p.is_dir() and (p / "converted_from.json").is_file():  # a converted guided-diffusion folder
        return _with_prompt(_load_local(p, name, device, dtype), prompt, guidance_scale, negative_prompt)
    if arch not in (None, "diffusers"):
        raise ValueError(f"load_model: arch {arch!r} applies to a .pt checkpoint file; {name!r} is not one")
    if name == "embedded":
        if not (EMBEDDED_DIR / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"The embedded model is missing from {EMBEDDED_DIR}. It ships with the repository, not with a "
                "pip-installed package: set DIFFLENS_DATA to a checkout's data/ folder, restore it with "
                "`git checkout data/embedded`, or retrain it with `python scripts/train_embedded.py`."
            )
        path = EMBEDDED_DIR
    else:
        path = Path(name).expanduser()
    if path.exists():
        return _with_prompt(_load_local(path, name, device, dtype), prompt, guidance_scale, negative_prompt)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.suffix
    if not looks_like_repo:
        raise FileNotFoundError(
            f"load_model: no such folder {name!r}. Pass 'embedded', a local diffusers folder "
            "(with model_index.json or config.json), or a Hub repo id like 'google/ddpm-celebahq-256'."
        )
    try:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(name, **_dtype_kw(dtype))
    except Exception as e:  # network or Hub errors: say what to do instead
        raise OSError(
            f"load_model: could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Without internet, download it elsewhere and pass the local folder instead."
        ) from None
    return _with_prompt(_from_pipeline(pipe, name, device), prompt, guidance_scale, negative_prompt)


def _with_prompt(model: Diffusion, prompt, guidance_scale, negative_prompt) -> Diffusion:
    if prompt is not None and not model.text_conditioned:
        raise ValueError(f"load_model: {model.name!r} is unconditional; it takes no prompt (drop prompt=...)")
    model.prompt, model.guidance_scale, model.negative_prompt = prompt, float(guidance_scale), negative_prompt
    return model


def _dtype_kw(dtype: torch.dtype) -> dict:
    """``from_pretrained`` dtype argument; diffusers renamed ``torch_dtype`` to ``dtype`` in 0.36."""
    if dtype == torch.float32:
        return {}
    import diffusers
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    return {key: dtype}


def _load_local(path: Path, name: str, device, dtype) -> Diffusion:
    if not path.is_dir():
        raise ValueError(f"load_model: {name!r} is a file; pass the diffusers model folder that contains it")
    if (path / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(path, **_dtype_kw(dtype))
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"load_model: the pipeline in {path} cannot be loaded ({type(e).__name__}: "
                             f"{str(e)[:300]}); a part's weights or config are truncated or missing — restore the "
                             "folder") from None
        return _from_pipeline(pipe, name, device)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"load_model: {name!r} is not a diffusers model folder (no model_index.json, config.json "
            "or unet/config.json). Save a model with `pipeline.save_pretrained(folder)` or "
            "`unet.save_pretrained(folder)` and pass that folder."
        )
    try:
        cls = json.loads(cfg_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"load_model: {cfg_file} is not a JSON object ({e}); restore the model folder") from None
    if cls != "UNet2DModel":
        raise ValueError(
            f"load_model: {cfg_file} describes a {cls!r}, not a UNet2DModel; pass a pipeline folder "
            "(model_index.json) for text-conditioned models."
        )
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, **_dtype_kw(dtype))
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ValueError(f"load_model: the UNet in {unet_dir} cannot be loaded ({type(e).__name__}: "
                         f"{str(e)[:300]}); its weights or config.json are truncated or do not match — restore "
                         "the folder") from None
    bad = [n for n, p_ in unet.named_parameters() if not bool(torch.isfinite(p_).all())]
    if bad:
        raise ValueError(f"load_model: the UNet weights in {unet_dir} hold NaN or inf ({bad[:3]}); restore the folder")
    sched = None
    for cand in (path / "scheduler", unet_dir / "scheduler", path):
        if (cand / "scheduler_config.json").is_file():
            try:
                sched = DDPMScheduler.from_pretrained(cand)
            except (OSError, ValueError) as e:
                raise ValueError(f"load_model: {cand / 'scheduler_config.json'} cannot be read ({e}); restore "
                                 "it") from None
            break
    if sched is None:
        sched = DDPMScheduler(num_train_timesteps=1000)
    unet.to(device).eval().requires_grad_(False)
    return Diffusion(unet=unet, scheduler=sched, name=name, clipped_eps=(path / "converted_from.json").is_file())


def _from_pipeline(pipe, name: str, device) -> Diffusion:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"load_model: the pipeline in {name!r} has no `unet`; only UNet-based models are supported")
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it replaces flagged images by black ones, which the judge would then read
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for part in ("unet", "vae", "text_encoder"):
        m = getattr(pipe, part, None)
        if m is not None:
            m.eval().requires_grad_(False)
    return Diffusion(unet=unet, scheduler=pipe.scheduler, name=name, pipeline=pipe)


# ----------------------------------------------------------------------------- sampling


def compile_blocks(model: Diffusion, keep: str = "mid_block", **compile_kw) -> Diffusion:
    """``torch.compile`` the UNet's blocks in place, leaving the modules a hook at site ``keep`` needs eager.

    The hooks (:mod:`helpers.hooks`) are Python callbacks on ``unet`` and on the module of a site;
    compiling a module as a whole would make torch.compile skip hooks installed on it later (it does not
    guard on module hooks), so edits would silently do nothing — the hooks refuse such a UNet. Here every
    down, mid and up block is compiled except the modules on the path to ``keep`` (e.g. for
    ``"mid_block"``: the mid block stays eager, its resnets and attentions are compiled). Returns ``model``.
    """
    from . import hooks

    unet = model.unet
    path, _ = hooks._skip_site(keep)
    hooks.resolve(unet, keep)
    parts = path.split(".")
    on_path = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

    def visit(name: str, mod: torch.nn.Module) -> None:
        if name in on_path or isinstance(mod, torch.nn.ModuleList):
            for child, sub in mod.named_children():
                visit(f"{name}.{child}", sub)
        else:
            mod.compile(**compile_kw)

    for top in ("down_blocks", "mid_block", "up_blocks"):
        mod = getattr(unet, top, None)
        if mod is not None:
            visit(top, mod)
    return model


def make_noise(n: int, size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Initial noise ``(n, channels, size, size)``; sample ``i`` depends only on ``(seed, i)``.

    Per-sample seeding means a sample's noise does not change with the batch size, so two
    methods run on the "same noise" really start from the same tensors.
    """
    out = torch.empty(n, channels, size, size)
    for i in range(n):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        out[i] = torch.randn(channels, size, size, generator=g)
    return out


@torch.no_grad()
def sample(model: Diffusion, n: int | None = None, steps: int = 25, seed: int = 0,
           noise: torch.Tensor | None = None, batch_size: int = 256, progress: bool = False,
           bar=None, start_step: int = 0, states: dict | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) samples ``(n, 3, H, W)`` in [0, 1].

    Give either ``noise`` (``(n, 3, H, W)``) or ``n`` and ``seed`` (see :func:`make_noise`).
    ``progress`` shows a bar that ticks per denoising step; ``bar`` (a tqdm bar in image-steps) is
    updated instead, so a caller sampling in several calls shows one bar.

    Resuming (pixel models): with ``start_step = s``, ``noise`` is the state x entering step ``s`` (as
    recorded by ``states``) and only steps ``s ..`` run — an edit that starts at step ``s`` then costs
    ``steps − s`` UNet passes per sample instead of ``steps``. ``states`` (a dict ``{step: None}``) is
    filled with the state entering each listed step, ``(n, C, H, W)`` float32 on the CPU.
    """
    if noise is None:
        if n is None:
            raise ValueError("sample: give n (with seed) or an explicit noise tensor")
        noise = make_noise(n, model.sample_size, seed, model.channels)
    own = bar is None
    if own:
        bar = tqdm(total=len(noise) * steps, disable=not progress, desc="DDIM", unit="img-step")
    try:
        if model.text_conditioned:
            if start_step or states:
                raise ValueError("sample: resuming (start_step, states) is for pixel models; text-to-image "
                                 "sampling runs through the diffusers pipeline from the first step")
            return _sample_text(model, noise, steps, batch_size, bar)
        ddim = DDIMScheduler.from_config(model.scheduler.config)
        ddim.set_timesteps(steps)
        if not 0 <= start_step < steps:
            raise ValueError(f"sample: start_step must be in 0..{steps - 1}, got {start_step}")
        keep = {int(k): [] for k in (states or {})}
        bad = [k for k in keep if not start_step <= k < steps]
        if bad:
            raise ValueError(f"sample: states {bad} are outside the sampled steps {start_step}..{steps - 1}")
        dev = next(model.unet.parameters()).device
        dtype = next(model.unet.parameters()).dtype
        outs = []
        for s in range(0, len(noise), batch_size):
            x = noise[s:s + batch_size].to(dev, torch.float32)  # the DDIM recursion in float32 whatever the UNet's dtype
            for i, t in enumerate(ddim.timesteps):
                if i < start_step:
                    continue
                if i in keep:
                    keep[i].append(x.float().cpu())
                eps = model.unet(x.to(dtype), t).sample.float()
                if eps.shape[1] == 2 * x.shape[1]:  # learned variance (guided-diffusion, keep_variance): DDIM uses ε
                    eps = eps[:, : x.shape[1]]
                x = ddim.step(eps, t, x, eta=0.0, use_clipped_model_output=model.clipped_eps).prev_sample
                bar.update(len(x))
            outs.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
        if states is not None:
            for k, v in keep.items():
                states[k] = torch.cat(v) if v else noise.new_zeros((0, *noise.shape[1:]))
        return torch.cat(outs) if outs else noise.new_zeros((0, *noise.shape[1:]))
    finally:
        if own:
            bar.close()


def _sample_text(model: Diffusion, noise: torch.Tensor, steps: int, batch_size: int, bar) -> torch.Tensor:
    """Text-to-image DDIM through the diffusers pipeline itself (prompt encoding, classifier-free
    guidance, VAE decoding), from the given latent noise; bottleneck hooks see the conditional half."""
    from . import hooks

    if model.prompt is None:
        raise ValueError(f"sample: {model.name!r} is a text-to-image model; give it a prompt, e.g. "
                         "load_model(path, prompt='a photo of a doctor') or model.prompt = '...'")
    pipe = model.pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    outs = []
    for s in range(0, len(noise), batch_size):
        x = noise[s:s + batch_size].to(dev, dtype)
        b = len(x)

        def tick(pipe_, i, t, kw, b=b):
            bar.update(b)
            return kw

        with hooks.guided(pipe.unet, active=model.guidance_scale > 1):
            img = pipe(prompt=[model.prompt] * b, negative_prompt=None if model.negative_prompt is None
                       else [model.negative_prompt] * b, latents=x, num_inference_steps=steps,
                       guidance_scale=model.guidance_scale, eta=0.0, output_type="pt",
                       callback_on_step_end=tick).images
        outs.append(img.float().clamp(0, 1).cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 3, 1, 1)


# ----------------------------------------------------------------------------- differentiable pieces


def denoiser(model: Diffusion, unet: torch.nn.Module | None = None):
    """``f(x, t) -> UNet output`` as sampling uses it, differentiable: a pixel model's plain UNet call, or for a
    text-to-image model the prompt-conditioned call with classifier-free guidance (one batch ``[uncond; cond]``
    marked :func:`helpers.hooks.guided`, so site hooks see and edit the conditional half, as when sampling).

    ``unet`` replaces the model's own (e.g. a LoRA-adapted copy). The learned baselines train through this.
    """
    from . import hooks

    unet = unet if unet is not None else model.unet
    if not model.text_conditioned:
        return lambda x, t: unet(x, t).sample
    if model.prompt is None:
        raise ValueError(f"{model.name!r} is a text-to-image model; give it a prompt")
    pipe = model.pipeline
    dev = next(unet.parameters()).device
    guided = model.guidance_scale > 1
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(model.prompt, dev, 1, guided, negative_prompt=model.negative_prompt)

    def f(x, t):
        b = len(x)
        if not guided:
            return unet(x, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
        with hooks.guided(unet):
            out = unet(torch.cat([x, x]), t,
                       encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])).sample
        u, c = out.chunk(2)
        return u + model.guidance_scale * (c - u)
    return f


def conditioning(model: Diffusion, batch: int) -> dict:
    """Keyword arguments a training call of the UNet needs: the prompt's embeddings for a text-to-image model."""
    if not model.text_conditioned:
        return {}
    dev = next(model.unet.parameters()).device
    with torch.no_grad():
        cond, _ = model.pipeline.encode_prompt(model.prompt, dev, 1, False)
    return {"encoder_hidden_states": cond.expand(batch, -1, -1)}


WORLD_DATA = "the portrait world (helpers.world)"  # what a model folder trained here on renders records as its data


def trained_on_world(path) -> bool:
    """Whether the model folder at ``path`` was trained here on the portrait world (its ``training.json`` says so):
    the world's judge is then the right reader of its images."""
    f = Path(path) / "training.json"
    try:
        return json.loads(f.read_text()).get("data") == WORLD_DATA
    except (OSError, ValueError, AttributeError):
        return False


def to_images(model: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from a clean sample in the model's space (the VAE decodes latents), differentiable."""
    if model.channels == 3 and not model.text_conditioned:
        return (x0.clamp(-1, 1) + 1) / 2
    vae = model.pipeline.vae
    img = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample
    return (img.float().clamp(-1, 1) + 1) / 2


def to_model_space(model: Diffusion, images: torch.Tensor) -> torch.Tensor:
    """Clean samples x0 in the model's space from images in [-1, 1] (the VAE encodes them for a latent model)."""
    if model.channels == 3 and not model.text_conditioned:
        return images
    vae = model.pipeline.vae
    size = vae.config.sample_size if isinstance(vae.config.sample_size, int) else vae.config.sample_size[0]
    x = images.to(next(vae.parameters()).device, vae.dtype)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def with_unet(model: Diffusion, unet: torch.nn.Module) -> Diffusion:
    """The same model with another UNet (a text-to-image pipeline is rebuilt around it; the original is untouched)."""
    from dataclasses import replace

    if model.pipeline is None:
        return replace(model, unet=unet)
    import inspect

    extra = {}
    if "requires_safety_checker" in inspect.signature(type(model.pipeline).__init__).parameters:
        extra["requires_safety_checker"] = False  # load_model switched the checker off; keep it off, quietly
    pipe = type(model.pipeline)(**{**model.pipeline.components, "unet": unet}, **extra)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return replace(model, unet=unet, pipeline=pipe)


# ----------------------------------------------------------------------------- training


def _spec(name: str) -> world.BiasSpec:
    if name == "default":
        return world.default_spec()
    if name == "uniform":
        return world.uniform_spec()
    return world.BiasSpec.from_json(Path(name).read_text())


def diffusion_loss(unet, sched, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   min_snr_gamma: float = 5.0, **unet_kw) -> torch.Tensor:
    """Denoising MSE at timesteps ``t`` for the scheduler's prediction type, Min-SNR-γ weighted.

    ``epsilon``: target ε, weight min(SNR, γ)/SNR; ``v_prediction``: target v, weight
    min(SNR, γ)/(SNR + 1) (Hang et al. 2023). γ = 0 gives the plain MSE.
    """
    xt = sched.add_noise(x0, eps, t)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        target = sched.get_velocity(x0, eps, t)
    else:
        raise ValueError(f"diffusion_loss: unsupported prediction_type {kind!r}")
    per = F.mse_loss(unet(xt, t, **unet_kw).sample, target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        alphas = sched.alphas_cumprod.to(x0.device)
        snr = (alphas[t] / (1 - alphas[t])).float()
        per = per * snr.clamp(max=min_snr_gamma) / (snr + 1 if kind == "v_prediction" else snr.clamp(min=1e-8))
    return per.mean()


def train(cfg: EmbeddedConfig, out_dir: str | Path, steps: int, checkpoint_every: int = 250,
          export_dir: str | Path | None = None, progress: bool = True, max_minutes: float | None = None,
          init_from: str | Path | None = None) -> dict:
    """Train (or resume) the embedded model; returns a summary dict.

    State (weights, EMA, optimizer, step, loss history) lives in ``out_dir/checkpoint.safetensors``
    and is rewritten atomically every ``checkpoint_every`` steps; rerunning resumes from it.
    At each checkpoint the EMA weights are also exported as a diffusers folder ``export_dir``.
    ``init_from`` (a diffusers folder exported by this function) warm-starts a *new* run from
    those weights, e.g. to continue an ``epsilon`` model as a ``v_prediction`` one; its
    ``training.json`` is kept in the new export as ``init_from``.
    """
    from diffusers.training_utils import EMAModel

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint.safetensors"
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg)
    sched = build_scheduler(cfg)
    lineage = None
    if init_from is not None and not ckpt.is_file():  # warm start: load weights before EMA copies them
        init_from = Path(init_from)
        src = UNet2DModel.from_pretrained(init_from / "unet")
        if tuple(src.config.block_out_channels) != tuple(unet.config.block_out_channels):
            raise ValueError(f"train: {init_from} has another architecture; cannot warm-start from it")
        unet.load_state_dict(src.state_dict())
        lineage = json.loads((init_from / "training.json").read_text())
        lineage.pop("loss_history", None)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, history, seconds_before = 0, [], 0.0
    if ckpt.is_file():
        tensors, meta = io.load_tensors(ckpt)
        if meta["config"] != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"train: {ckpt} was made with a different config; use another out_dir")
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema_params = [tensors[f"ema.{i}"] for i in range(len(list(unet.parameters())))]
        ema.shadow_params = [p.clone() for p in ema_params]
        ema.optimization_step = meta["ema_step"]
        io.unflatten_optimizer(opt, tensors, meta["optimizer"])
        start, history = meta["step"], meta["history"]
        seconds_before = meta.get("seconds", 0.0)
        lineage = meta.get("init_from")
    if cfg.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"train: lr_decay must be 'constant' or 'cosine', got {cfg.lr_decay!r}")

    def lr_at(s: int) -> float:
        warm = min(1.0, (s + 1) / cfg.warmup_steps)
        if cfg.lr_decay == "constant":
            return cfg.lr * warm
        frac = min(1.0, s / max(1, steps - 1))
        return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    spec = _spec(cfg.spec)
    t0 = time.time()
    unet.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train embedded", disable=not progress,
               mininterval=5)
    running = None
    step = start
    for step in bar:
        batch = world.sample(cfg.batch_size, spec, seed=cfg.seed * 1_000_003 + step, resolution=cfg.resolution)
        x0 = batch.images * 2 - 1
        g = torch.Generator().manual_seed(10_000_019 * (cfg.seed + 1) + step)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (len(x0),), generator=g)
        loss = diffusion_loss(unet, sched, x0, eps, t, cfg.min_snr_gamma)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if done % 50 == 0:
            history.append([done, running])
        last = done == steps
        out_of_time = max_minutes is not None and (time.time() - t0) / 60 > max_minutes
        if done % checkpoint_every == 0 or last or out_of_time:
            seconds = seconds_before + time.time() - t0
            _save_checkpoint(ckpt, unet, ema, opt, done, history, cfg, seconds, lineage)
            if export_dir is not None:
                export(unet, ema, sched, export_dir, meta={"steps": done, "config": asdict(cfg),
                                                           "train_seconds": seconds, "loss_history": history,
                                                           "init_from": lineage})
        if out_of_time:
            break
    bar.close()
    return {"step": step + 1 if steps > start else start, "history": history,
            "minutes": (time.time() - t0) / 60}


def _save_checkpoint(path, unet, ema, opt, step, history, cfg, seconds, lineage=None):
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
    opt_t, opt_meta = io.flatten_optimizer(opt)
    tensors.update(opt_t)
    io.save_tensors(path, tensors, meta={"step": step, "history": history, "config": asdict(cfg),
                                         "ema_step": ema.optimization_step, "optimizer": opt_meta,
                                         "seconds": seconds, "init_from": lineage})


def export(unet, ema, sched, export_dir, meta: dict) -> None:
    """Write EMA weights as a diffusers folder (``unet/`` + ``scheduler/``), swapping it in atomically."""
    import shutil
    import tempfile

    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=export_dir.parent, prefix=f".{export_dir.name}."))
    try:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        ema.restore(unet.parameters())
        sched.save_pretrained(tmp / "scheduler")
        io.write_json(tmp / "training.json", meta)
        old = export_dir.with_name(f".{export_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if export_dir.exists():
            os.replace(export_dir, old)
        os.replace(tmp, export_dir)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
