"""guided-diffusion checkpoints (the paper's P2 model) as diffusers folders.

The paper's main model is P2 on CelebA-HQ 256: OpenAI's guided-diffusion ``UNetModel`` trained with P2
weighting, saved as a plain state dict (``celebahq_p2.pt``). :func:`convert` maps that state dict onto a
diffusers ``UNet2DModel`` with the same architecture — scale-shift time conditioning
(``use_scale_shift_norm``), ResNet blocks that down/up-sample (``resblock_updown``), attention at the
configured resolutions with 64-channel heads — and builds the scheduler with the same betas. The result is
saved as a diffusers folder with safetensors (:func:`convert_file`), so a later load never touches the
original file. The ``.pt`` is read with ``torch.load(weights_only=True)`` only — PyTorch's restricted unpickler,
which builds tensors and plain containers and refuses any other object or code.

Learned variance (``learn_sigma``): the model's last 3 output channels interpolate the variance; DDIM uses only
ε, so by default the converted UNet keeps the ε channels only (``keep_variance=False``: 3 output channels). With
``keep_variance=True`` all 6 are kept and the scheduler is a DDPM one with ``variance_type="learned_range"``,
for ancestral sampling with diffusers.

The P2 settings (:data:`P2_CELEBAHQ`, from the authors' configs): image_size 256, num_channels 128,
num_res_blocks 1, attention_resolutions "16", num_head_channels 64, resblock_updown, use_scale_shift_norm,
learn_sigma, no class conditioning, dropout 0, a linear schedule over 1,000 steps. Its bottleneck
(``mid_block``) has 512 channels at 8×8. DiffLens samples it with 50-step DDIM (guided-diffusion's ``"ddim50"``
respacing, the same timesteps as diffusers' ``DDIMScheduler.set_timesteps(50)``); P2's own README samples with
250-step ancestral respacing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


@dataclass
class GuidedSettings:
    """The ``create_model`` arguments of guided-diffusion that fix the architecture, and the noise schedule."""

    image_size: int = 256
    num_channels: int = 128
    num_res_blocks: int = 1
    attention_resolutions: str = "16"  # comma-separated image resolutions with attention, e.g. "32,16,8"
    channel_mult: str = ""  # "" = guided-diffusion's default for the image size, else e.g. "1,1,2,2,4,4"
    num_heads: int = 4
    num_head_channels: int = 64  # -1: use num_heads
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    learn_sigma: bool = True
    class_cond: bool = False
    in_channels: int = 3
    use_new_attention_order: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"  # "linear" or "cosine"

    def mults(self) -> tuple[int, ...]:
        if self.channel_mult:
            return tuple(int(m) for m in self.channel_mult.split(","))
        # guided-diffusion's defaults (its 512 default starts at 0.5×, a width UNet2DModel's time embedding
        # cannot express, so it is not offered)
        defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if self.image_size not in defaults:
            raise ValueError(f"GuidedSettings: no default channel_mult for image_size {self.image_size}; give "
                             "channel_mult (e.g. \"1,2,2,2\")")
        return defaults[self.image_size]

    def attention_levels(self) -> set[int]:
        ds = {self.image_size // int(r) for r in self.attention_resolutions.split(",") if r.strip()}
        return {lvl for lvl in range(len(self.mults())) if 2 ** lvl in ds}


P2_CELEBAHQ = GuidedSettings()
CONVERTER_VERSION = 1  # recorded with every conversion: a newer converter rebuilds older folders


def unet_config(s: GuidedSettings, keep_variance: bool = False) -> dict:
    """The ``UNet2DModel`` config of a guided-diffusion model with settings ``s``."""
    if not s.resblock_updown:
        raise ValueError("guided-diffusion: resblock_updown = False (conv/avg-pool resampling) is not supported; the "
                         "P2 models use ResNet blocks that resample (resblock_updown = True)")
    if s.class_cond:
        raise ValueError("guided-diffusion: class-conditional models (class_cond = True) are not supported here")
    mults = s.mults()
    heads_dim = s.num_head_channels if s.num_head_channels > 0 else None
    attn = s.attention_levels()
    if heads_dim is None:
        chans = {s.num_channels * mults[lvl] for lvl in attn} | {s.num_channels * mults[-1]}
        if len({c // s.num_heads for c in chans}) > 1:
            raise ValueError("guided-diffusion: num_head_channels = -1 with attention at several widths gives heads of "
                             "different sizes, which UNet2DModel cannot express; give num_head_channels")
        heads_dim = next(iter(chans)) // s.num_heads
    down = [("AttnDownBlock2D" if lvl in attn else "ResnetDownsampleBlock2D") for lvl in range(len(mults))]
    up = [("AttnUpBlock2D" if lvl in attn else "ResnetUpsampleBlock2D") for lvl in reversed(range(len(mults)))]
    out = s.in_channels * (2 if s.learn_sigma and keep_variance else 1)
    return {"sample_size": s.image_size, "in_channels": s.in_channels, "out_channels": out,
            "layers_per_block": s.num_res_blocks, "block_out_channels": [int(s.num_channels * m) for m in mults],
            "down_block_types": down, "up_block_types": up, "attention_head_dim": heads_dim,
            "resnet_time_scale_shift": "scale_shift" if s.use_scale_shift_norm else "default",
            "downsample_type": "resnet", "upsample_type": "resnet", "flip_sin_to_cos": True, "freq_shift": 0,
            "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5, "add_attention": True, "dropout": 0.0}


def scheduler_config(s: GuidedSettings, keep_variance: bool = False) -> dict:
    """A ``DDPMScheduler`` config with guided-diffusion's betas (the linear schedule scaled to 1,000 steps)."""
    cfg = {"num_train_timesteps": s.diffusion_steps, "prediction_type": "epsilon", "clip_sample": True,
           "variance_type": "learned_range" if s.learn_sigma and keep_variance else "fixed_small"}
    if s.noise_schedule == "linear":
        scale = 1000 / s.diffusion_steps
        return {**cfg, "beta_schedule": "linear", "beta_start": scale * 0.0001, "beta_end": scale * 0.02}
    if s.noise_schedule == "cosine":
        return {**cfg, "beta_schedule": "squaredcos_cap_v2"}
    raise ValueError(f"guided-diffusion: noise_schedule must be 'linear' or 'cosine', got {s.noise_schedule!r}")


# ----------------------------------------------------------------------------- weights


def _resnet(src: dict, old: str, new: str, out: dict, used: set) -> None:
    pairs = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    for a, b in pairs.items():
        for p in ("weight", "bias"):
            k = f"{old}.{a}.{p}"
            if k in src:
                out[f"{new}.{b}.{p}"] = src[k]
                used.add(k)


def _attention(src: dict, old: str, new: str, out: dict, used: set, head_dim: int, new_order: bool) -> None:
    w, b = src[f"{old}.qkv.weight"], src[f"{old}.qkv.bias"]
    used.update({f"{old}.qkv.weight", f"{old}.qkv.bias"})
    ch = w.shape[0] // 3
    heads = ch // head_dim
    w, b = w.reshape(3 * ch, -1), b.reshape(3 * ch)
    if new_order:  # [q of every head, k ..., v ...]
        (wq, wk, wv), (bq, bk, bv) = w.chunk(3), b.chunk(3)
    else:  # the legacy order: per head [q, k, v] (QKVAttentionLegacy)
        w4, b4 = w.reshape(heads, 3, head_dim, -1), b.reshape(heads, 3, head_dim)
        wq, wk, wv = (w4[:, i].reshape(ch, -1) for i in range(3))
        bq, bk, bv = (b4[:, i].reshape(ch) for i in range(3))
    for name, t in (("to_q", (wq, bq)), ("to_k", (wk, bk)), ("to_v", (wv, bv))):
        out[f"{new}.{name}.weight"], out[f"{new}.{name}.bias"] = t[0].contiguous(), t[1].contiguous()
    out[f"{new}.group_norm.weight"], out[f"{new}.group_norm.bias"] = src[f"{old}.norm.weight"], src[f"{old}.norm.bias"]
    pw = src[f"{old}.proj_out.weight"]
    out[f"{new}.to_out.0.weight"] = pw.reshape(pw.shape[0], -1)
    out[f"{new}.to_out.0.bias"] = src[f"{old}.proj_out.bias"]
    used.update({f"{old}.norm.weight", f"{old}.norm.bias", f"{old}.proj_out.weight", f"{old}.proj_out.bias"})


def convert_state_dict(sd: dict, s: GuidedSettings, keep_variance: bool = False) -> dict:
    """guided-diffusion ``UNetModel`` weights → ``UNet2DModel`` weights (see :func:`unet_config`)."""
    cfg = unet_config(s, keep_variance)
    out, used = {}, set()
    hd = cfg["attention_head_dim"]
    n_res, mults, attn = s.num_res_blocks, s.mults(), s.attention_levels()

    def take(a, b):
        out[b] = sd[a]
        used.add(a)

    for i in (0, 2):
        take(f"time_embed.{i}.weight", f"time_embedding.linear_{i // 2 + 1}.weight")
        take(f"time_embed.{i}.bias", f"time_embedding.linear_{i // 2 + 1}.bias")
    take("input_blocks.0.0.weight", "conv_in.weight")
    take("input_blocks.0.0.bias", "conv_in.bias")
    k = 1
    for lvl in range(len(mults)):
        for j in range(n_res):
            _resnet(sd, f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", out, used)
            if lvl in attn:
                _attention(sd, f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", out, used, hd,
                           s.use_new_attention_order)
            k += 1
        if lvl != len(mults) - 1:
            _resnet(sd, f"input_blocks.{k}.0", f"down_blocks.{lvl}.downsamplers.0", out, used)
            k += 1
    _resnet(sd, "middle_block.0", "mid_block.resnets.0", out, used)
    _attention(sd, "middle_block.1", "mid_block.attentions.0", out, used, hd, s.use_new_attention_order)
    _resnet(sd, "middle_block.2", "mid_block.resnets.1", out, used)
    k = 0
    for i, lvl in enumerate(reversed(range(len(mults)))):
        for j in range(n_res + 1):
            _resnet(sd, f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", out, used)
            if lvl in attn:
                _attention(sd, f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", out, used, hd,
                           s.use_new_attention_order)
            if j == n_res and lvl != 0:
                _resnet(sd, f"output_blocks.{k}.{2 if lvl in attn else 1}", f"up_blocks.{i}.upsamplers.0", out, used)
            k += 1
    take("out.0.weight", "conv_norm_out.weight")
    take("out.0.bias", "conv_norm_out.bias")
    w, b = sd["out.2.weight"], sd["out.2.bias"]
    used.update({"out.2.weight", "out.2.bias"})
    n_out = cfg["out_channels"]
    out["conv_out.weight"], out["conv_out.bias"] = w[:n_out].contiguous(), b[:n_out].contiguous()
    left = sorted(set(sd) - used)
    if left:
        raise KeyError(left)
    return out


def _explain(sd: dict, s: GuidedSettings) -> str:
    """What the checkpoint's own shapes say about its settings (for an error message)."""
    hints = []
    if "input_blocks.0.0.weight" in sd:
        ch = sd["input_blocks.0.0.weight"].shape[0]
        if ch != s.num_channels:
            hints.append(f"num_channels = {ch}")
    if "out.2.weight" in sd:
        o = sd["out.2.weight"].shape[0]
        if (o == 2 * s.in_channels) != s.learn_sigma:
            hints.append(f"learn_sigma = {o == 2 * s.in_channels}")
    emb = next((k for k in sd if k.endswith("emb_layers.1.weight")), None)
    if emb is not None:
        conv = sd[emb.replace("emb_layers.1", "out_layers.3")] if emb.replace("emb_layers.1", "out_layers.3") in sd \
            else None
        if conv is not None and (sd[emb].shape[0] == 2 * conv.shape[0]) != s.use_scale_shift_norm:
            hints.append(f"use_scale_shift_norm = {sd[emb].shape[0] == 2 * conv.shape[0]}")
    if "label_emb.weight" in sd:
        hints.append("class_cond = True (not supported)")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")}
    if blocks:
        hints.append(f"{max(blocks) + 1} input blocks (num_res_blocks × levels + downsamplers + 1: check "
                     "num_res_blocks and channel_mult)")
    attn = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if ".qkv." in k})
    if attn:
        hints.append(f"attention in {attn[:6]} (check attention_resolutions)")
    return "; ".join(hints)


def load_pt(path) -> dict:
    """A guided-diffusion ``.pt`` state dict, read with ``torch.load(weights_only=True)`` (never unpickled)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated file, not a torch file
        raise ValueError(f"{path} cannot be read as a plain state dict of tensors ({type(e).__name__}: "
                         f"{str(e)[:200]}); only torch.load(weights_only=True) is used, so a file holding code or "
                         "objects is refused") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def convert(sd: dict, s: GuidedSettings = P2_CELEBAHQ, keep_variance: bool = False, where: str = "checkpoint"):
    """``(UNet2DModel, DDPMScheduler)`` from a guided-diffusion state dict and its settings."""
    from diffusers import DDPMScheduler, UNet2DModel

    cfg = unet_config(s, keep_variance)
    try:
        new = convert_state_dict(sd, s, keep_variance)
    except KeyError as e:
        raise ValueError(f"{where}: its keys do not match a guided-diffusion UNetModel with {s} — "
                         f"{'unexpected' if isinstance(e.args[0], list) else 'missing'} key(s) "
                         f"{(e.args[0] if isinstance(e.args[0], list) else [e.args[0]])[:5]}. The checkpoint itself "
                         f"says: {_explain(sd, s) or 'nothing more'}") from None
    unet = UNet2DModel(**cfg)
    try:
        unet.load_state_dict(new, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: the weights do not fit a guided-diffusion UNetModel with {s} ({str(e)[:300]}). "
                         f"The checkpoint itself says: {_explain(sd, s) or 'nothing more'}") from None
    return unet.eval(), DDPMScheduler(**scheduler_config(s, keep_variance))


def convert_file(pt, out=None, settings: GuidedSettings = P2_CELEBAHQ, keep_variance: bool = False) -> Path:
    """Convert ``pt`` into a diffusers folder (``unet/`` and ``scheduler/``, safetensors); default ``out``:
    ``<pt without suffix>-diffusers`` next to it. Written atomically; an existing folder this function did not
    write is refused, never replaced. Returns the folder."""
    pt = Path(pt).expanduser()
    out = Path(out).expanduser() if out else pt.with_name(pt.stem + "-diffusers")
    marker = out / "converted_from.json"
    import hashlib

    h = hashlib.sha256()
    with open(pt, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    record = {"file": pt.name, "sha256": h.hexdigest(), "settings": asdict(settings), "keep_variance": keep_variance,
              "converter": CONVERTER_VERSION}
    if out.exists():
        if marker.is_file() and json.loads(marker.read_text()) == record:
            return out
        if not marker.is_file():
            raise FileExistsError(f"{out} exists and was not written by the converter; pass another out")
    unet, sched = convert(load_pt(pt), settings, keep_variance, where=str(pt))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial."))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        sched.save_pretrained(tmp / "scheduler")
        (tmp / "converted_from.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            if (out / "converted_from.json").is_file() and json.loads((out / "converted_from.json").read_text()) == record:
                return out  # another process (a torchrun rank) converted the same file meanwhile
            shutil.rmtree(out)  # our own earlier conversion of another file or with other settings
        try:
            os.replace(tmp, out)
        except OSError:  # another process's conversion landed between the check and the rename
            if (out / "converted_from.json").is_file() and json.loads((out / "converted_from.json").read_text()) == record:
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def settings_from(kw: dict | None) -> GuidedSettings:
    """:data:`P2_CELEBAHQ` with ``kw`` overriding (unknown names are an error naming them)."""
    kw = dict(kw or {})
    known = set(GuidedSettings.__dataclass_fields__)
    bad = sorted(set(kw) - known)
    if bad:
        raise ValueError(f"guided-diffusion settings: unknown {bad}; known: {sorted(known)}")
    return replace(P2_CELEBAHQ, **kw)
