"""A Stable Diffusion of the portrait world, trained here (chapter 8, issue 18).

No Stable Diffusion or CLIP weights can be downloaded here, but the world can be captioned
(:func:`helpers.world.sample_captioned`), so the paper's text-to-image setting is rebuilt small, in the same
classes the real one uses, and every line of the SD path (prompt encoding, classifier-free guidance, the
cross-attention UNet, the VAE, the CLIP judge, CLIP-T) runs on weights whose outputs mean something:

1. :func:`train_clip` — a transformers ``CLIPModel`` (small vision and text towers) trained contrastively on
   (render, caption) pairs; exported as a CLIP folder that :class:`helpers.judges.ClipJudge` loads unchanged.
2. :func:`train_vae` — a diffusers ``AutoencoderKL`` on renders (32×32 → 4×16×16 latents; L1 reconstruction +
   SD's small KL term — SD's VAE also has perceptual and adversarial losses, this one does not).
3. :func:`train_unet` — a ``UNet2DConditionModel`` on the VAE's latents, conditioned on the CLIP text encoder's
   last hidden states (frozen, as in SD), captions dropped to "" 10% of the time so classifier-free guidance works;
   by default ε-prediction with SD v1.5's scaled-linear betas, or (``UNetSettings.zero_snr``, the shipped UNet: the
   first fine-tuned so) those betas rescaled to zero terminal SNR with v-prediction and trailing timesteps;
   cross-attention at 8×8, 4×4 and the mid block (not at 16×16).
4. :func:`assemble` — a ``StableDiffusionPipeline`` folder (DDIM scheduler, no safety checker) that both
   ``diffusers.StableDiffusionPipeline.from_pretrained`` and :func:`helpers.models.load_model` load.

Each stage trains in the background and resumes: its state (weights, EMA, optimizer, step, loss history) is
rewritten atomically every few hundred steps to ``<run>/<stage>.safetensors``; its export folder is swapped in
whole (:func:`helpers.cache.building`). Training captions mix the five contexts of :data:`helpers.world.CONTEXTS`
uniformly, each with its own bias, and name each attribute with a per-batch rate from :data:`MENTION_RATES`, so a
bare prompt ("a portrait of a doctor") carries its context's bias and explicit words ("… a woman … wearing
glasses") are learned for CLIP-T.

Like the world, this is a controlled stand-in: its "doctors" are cartoon renders whose drawn cues follow shares
we chose (:data:`helpers.world.CONTEXTS`), not a measurement of any real model or population.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import cache, io, models, tiny, world

MENTION_RATES = (0.0, 0.15, 0.4, 0.8)  # share of attributes named in a caption; one rate per slice of a batch
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's own normalisation, kept so ClipJudge's defaults apply
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESOLUTION = 32
# classifier-free guidance of the book's sampler (DDIM, 25 steps), chosen by :func:`choose_guidance` on the validation
# seed's parts of data/minisd/quality.json; tests/test_minisd.py recomputes the choice from the stored parts.
# The grid was first 1, 2, 3, 5 (FIRST_GRID). On the shipped model's validation samples, 1 drew the majority gender
# less often than the spec on 4 of 5 prompts and 2 more often on 4 of 5, so 1.25, 1.5 and 1.75 were added between
# them. The first test draw (FIRST_TEST, at the first grid's choice: 2 of 5 prompts within 0.05) had been seen by then,
# so the quality bar moved to a fresh test seed, drawn after the new choice was frozen.
FIRST_GRID = (1.0, 2.0, 3.0, 5.0)
GUIDANCE_CANDIDATES = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 5.0)
GUIDANCE_VAL = {"n": 300, "steps": 25, "seed": 31_000}
GUIDANCE = 1.25  # choose_guidance on the validation parts of data/minisd/quality.json (tests/test_minisd.py recomputes it)
QUALITY_TEST = {"n": 2000, "steps": 25, "seed": 41_000}  # the quality bar, at GUIDANCE, drawn after it was frozen
ABLATION = {"n": 500, "steps": 25, "seed": 41_000}  # the test noise's first 500, at guidance 1 (none) and at GUIDANCE
# the first test draw: guidance 1 (the first grid's choice), seed 31337; both UNets were judged on it, so the
# before/after comparison of the zero-SNR fine-tune reads it
FIRST_TEST = {"n": 2000, "steps": 25, "seed": 31_337, "guidance": 1.0}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ClipSettings:
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    patch: int = 4
    projection: int = 64
    max_length: int = 32
    batch: int = 128
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 200
    seed: int = 0


@dataclass(frozen=True)
class VaeSettings:
    block_out_channels: tuple[int, ...] = (32, 64)  # two levels: 32×32 images → 16×16 latents
    latent_channels: int = 4
    layers_per_block: int = 1
    kl_weight: float = 1e-6
    batch: int = 32
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0


@dataclass(frozen=True)
class DecoderSettings:
    """Fine-tuning the VAE's decoder only, as SD's ft-MSE/ft-EMA VAEs were: the encoder — so the latent space the UNet
    learned — is unchanged. L1 plus a perceptual term (LPIPS-like: unit-normalised activations of three layers of a
    frozen classifier of the world, the *second* judge, data/benchmark/trainer_judge.safetensors — not the judge that
    scores the reconstructions)."""

    perceptual: float = 1.0
    batch: int = 32
    steps: int = 1500
    lr: float = 2e-4
    warmup: int = 50
    seed: int = 0


@dataclass(frozen=True)
class UNetSettings:
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # 16×16 latents → mid block at 4×4
    layers_per_block: int = 1
    attention_head_dim: int = 4  # diffusers' legacy name: the number of heads
    uncond_rate: float = 0.1  # captions replaced by "" (the unconditional prompt of classifier-free guidance)
    batch: int = 64
    steps: int = 5000
    lr: float = 5e-4
    warmup: int = 200
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    seed: int = 0
    # a UNet2DConditionModel folder whose weights start the run ("" = a fresh initialisation): continuing a shipped
    # UNet, e.g. the H200 run's, for more steps on another machine. Its optimizer state is not shipped, so AdamW's
    # moments and the learning-rate schedule (warm-up, then cosine over ``steps``) start afresh.
    init_from: str = ""
    # SD v1.5's schedule leaves signal at its last timestep (ᾱ_999 ≈ 0.0047), so training never shows the UNet pure
    # noise while sampling starts from it. The world's latents have per-channel means far from 0 (about −0.6 / −1.3 /
    # −1.3 / −0.6) that carry coarse content such as hair grey, so samples drift toward the mean (the young
    # over-draw). True: betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2024,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed"); the pipeline folder's DDIM then says the same.
    zero_snr: bool = False


# ----------------------------------------------------------------------------- data


def caption_words() -> list[str]:
    """Every word a caption of the world can use (for the tokenizer's merges)."""
    texts = list(world.CONTEXTS.values()) + [w for ws in world.WORDS.values() for w in ws] + ["a an , person"]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+|[^\sa-z]+", t.lower())})


def batch(n: int, seed: int, rates: tuple[float, ...] = MENTION_RATES) -> tuple[torch.Tensor, list[str], dict]:
    """``n`` captioned renders: contexts drawn uniformly, split into ``len(rates)`` slices with their mention
    rates; returns images in [0, 1] ``(n, 3, 32, 32)``, captions and labels (with ``context`` as an index)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 11)
    ctx = torch.randint(0, len(world.CONTEXTS), (n,), generator=g)
    rate = torch.arange(n) % len(rates)
    images, caps, labels = torch.empty(n, 3, RESOLUTION, RESOLUTION), [""] * n, {}
    for ci, name in enumerate(world.CONTEXTS):
        for ri, r in enumerate(rates):
            idx = torch.nonzero((ctx == ci) & (rate == ri)).flatten()
            if len(idx) == 0:
                continue
            b = world.sample_captioned(len(idx), name, seed=int(seed) * 101 + ci * 11 + ri, mention_rate=r,
                                       resolution=RESOLUTION)
            images[idx] = b.images
            for j, i in enumerate(idx.tolist()):
                caps[i] = b.captions[j]
            for a, v in b.labels.items():
                labels.setdefault(a, torch.zeros(n, dtype=torch.long))[idx] = v
    labels["context"] = ctx
    return images, caps, labels


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Renders in [0, 1] → CLIP's normalised pixels (what ClipJudge feeds the vision tower)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------- a resumable training loop


class _Stage:
    """Checkpointed state of one stage: ``<run>/<name>.safetensors`` (weights, optional EMA, optimizer, step,
    history, settings, seconds), rewritten atomically; a checkpoint made with other settings is refused."""

    def __init__(self, run: Path, name: str, module: torch.nn.Module, params, settings, ema_decay: float | None):
        from diffusers.training_utils import EMAModel

        self.path = Path(run) / f"{name}.safetensors"
        self.name, self.module, self.settings = name, module, json.loads(json.dumps(asdict(settings)))
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.ema = EMAModel(self.params, decay=ema_decay, use_ema_warmup=True, power=2 / 3) if ema_decay else None
        self.step, self.history, self.seconds = 0, [], 0.0
        if self.path.is_file():
            tensors, meta = io.load_tensors(self.path)
            if meta["settings"] != self.settings:
                raise ValueError(f"minisd: {self.path} was trained with other settings ({meta['settings']}); "
                                 "pass another run folder or the same settings")
            io.load_state(module, io.unprefixed("model", tensors), self.path, f"{name} weights")
            io.unflatten_optimizer(self.opt, tensors, meta["optimizer"])
            if self.ema is not None:
                self.ema.shadow_params = [tensors[f"ema.{i}"].clone() for i in range(len(self.params))]
                self.ema.optimization_step = meta["ema_step"]
            self.step, self.history, self.seconds = meta["step"], meta["history"], meta["seconds"]

    def save(self) -> None:
        tensors = io.prefixed("model", self.module.state_dict())
        opt_t, opt_meta = io.flatten_optimizer(self.opt)
        tensors.update(opt_t)
        meta = {"settings": self.settings, "optimizer": opt_meta, "step": self.step, "history": self.history,
                "seconds": self.seconds}
        if self.ema is not None:
            tensors.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
            meta["ema_step"] = self.ema.optimization_step
        io.save_tensors(self.path, tensors, meta)

    def run(self, loss_fn, steps: int, lr: float, warmup: int, export, checkpoint_every: int = 250,
            max_minutes: float | None = None, progress: bool = True, data=None, workers: int = 0) -> dict:
        """Train to ``steps`` (cosine decay to 10% after ``warmup``); ``loss_fn(step)`` → (loss, logs), or
        ``loss_fn(step, data(step))`` when ``data`` is given; ``workers`` > 0 renders ``data(step)`` ahead in that
        many processes (the same batches in the same order: each is a function of its step alone), which keeps a GPU
        fed. ``export(module)`` runs at every checkpoint with the EMA weights swapped in (if any)."""
        t0 = time.time()
        bar = tqdm(range(self.step, steps), initial=self.step, total=steps, desc=f"train {self.name}",
                   disable=not progress, mininterval=10)
        feed = _prefetch(data, self.step, steps, workers) if data is not None else None
        running: dict = {}
        self.module.train()
        for step in bar:
            frac = min(1.0, step / max(1, steps - 1))
            for group in self.opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            loss, logs = loss_fn(step) if feed is None else loss_fn(step, next(feed))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            if self.ema is not None:
                self.ema.step(self.params)
            for k, v in {"loss": loss.item(), **logs}.items():
                running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
            bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
            self.step = step + 1
            if self.step % 50 == 0:
                self.history.append([self.step, {k: round(v, 6) for k, v in running.items()}])
            late = max_minutes is not None and (time.time() - t0) / 60 > max_minutes
            if self.step % checkpoint_every == 0 or self.step == steps or late:
                self.seconds += time.time() - t0
                t0 = time.time()
                self.save()
                self._export(export)
            if late:
                break
        bar.close()
        self.module.eval()
        return {"step": self.step, "seconds": self.seconds, "history": self.history}

    def _export(self, export) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            export(self.module)
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)

    @property
    def record(self) -> dict:
        return {"stage": self.name, "settings": self.settings, "steps": self.step, "train_seconds": self.seconds,
                "loss_history": self.history}


class _Steps(torch.utils.data.Dataset):
    def __init__(self, fn, start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.fn(self.start + i)


def _one_thread(_):
    torch.set_num_threads(1)


def _prefetch(fn, start: int, stop: int, workers: int):
    """``fn(step)`` for ``start ≤ step < stop`` in order, rendered ahead by ``workers`` forked processes."""
    if workers <= 0:
        return (fn(step) for step in range(start, stop))
    loader = torch.utils.data.DataLoader(_Steps(fn, start, stop), batch_size=None, num_workers=workers,
                                         prefetch_factor=4, multiprocessing_context="fork",
                                         worker_init_fn=_one_thread, collate_fn=lambda x: x)
    return iter(loader)


# ----------------------------------------------------------------------------- 1. CLIP


def build_clip(s: ClipSettings, tokenizer_folder: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_folder)
    v = len(tok)
    torch.manual_seed(s.seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=s.hidden, intermediate_size=4 * s.hidden,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, max_position_embeddings=s.max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=s.hidden, intermediate_size=4 * s.hidden, num_hidden_layers=s.layers,
                           num_attention_heads=s.heads, image_size=RESOLUTION, patch_size=s.patch),
        projection_dim=s.projection)
    return CLIPModel(cfg), tok


def clip_loss(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every identical caption in the batch counted as a positive (captions
    such as the bare "a portrait of a doctor" repeat, and calling their copies negatives would be wrong)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    k = torch.tensor([ids[c] for c in captions])
    same = (k[:, None] == k[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def train_clip(folder, run, s: ClipSettings = ClipSettings(), **loop) -> dict:
    """Train (or resume) the world's CLIP; export a CLIP folder (model, tokenizer, image processor) to ``folder``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    run = Path(run)
    tok_dir = tiny.write_tokenizer(run / "tokenizer", words=caption_words(), max_length=s.max_length)
    model, tok = build_clip(s, tok_dir)
    stage = _Stage(run, "clip", model, model.parameters(), s, ema_decay=None)

    def loss_fn(step):
        images, caps, _ = batch(s.batch, seed=s.seed * 7_777_777 + step)
        t = tok(caps, padding=True, truncation=True, return_tensors="pt")
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=clip_pixels(images))
        loss = clip_loss(out.logits_per_image, caps)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss, {"scale": model.logit_scale.exp().item()}

    def export(m):
        with cache.building(folder) as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            proc = CLIPImageProcessor(size={"shortest_edge": RESOLUTION},
                                      crop_size={"height": RESOLUTION, "width": RESOLUTION},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
            CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(tmp)
            io.write_json(tmp / "training.json", stage.record)

    return stage.run(loss_fn, s.steps, s.lr, s.warmup, export, **loop)


# ----------------------------------------------------------------------------- 2. VAE


def build_vae(s: VaeSettings):
    from diffusers import AutoencoderKL

    torch.manual_seed(s.seed)
    n = len(s.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                         block_out_channels=tuple(s.block_out_channels), layers_per_block=s.layers_per_block,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         norm_num_groups=8, sample_size=RESOLUTION)


@torch.no_grad()
def latent_scale(vae, n: int = 1024, seed: int = 99) -> float:
    """SD's ``scaling_factor``: 1 / the standard deviation of the encoder's latents (means) on renders."""
    images, _, _ = batch(n, seed=seed)
    return float(1 / vae.encode(images * 2 - 1).latent_dist.mean.std())


def train_vae(folder, run, s: VaeSettings = VaeSettings(), **loop) -> dict:
    """Train (or resume) the world's VAE; export a diffusers ``AutoencoderKL`` folder (with SD's ``scaling_factor``
    measured on renders) to ``folder``."""
    vae = build_vae(s)
    stage = _Stage(Path(run), "vae", vae, vae.parameters(), s, ema_decay=None)

    def loss_fn(step):
        images, _, _ = batch(s.batch, seed=s.seed * 5_555_555 + step)
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        g = torch.Generator().manual_seed(s.seed * 3_333_333 + step)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        out = vae.decode(z).sample
        rec = F.l1_loss(out, x)  # SD's reconstruction term (it adds LPIPS and a GAN loss; this VAE does not)
        kl = post.kl().mean() / x[0].numel()  # per pixel, so kl_weight is SD's (its losses are sums per image)
        return rec + s.kl_weight * kl, {"l1": rec.item(), "mse": F.mse_loss(out.detach(), x).item(), "kl": kl.item()}

    def export(m):
        m.eval()
        m.register_to_config(scaling_factor=latent_scale(m))
        m.train()
        with cache.building(folder) as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            io.write_json(tmp / "training.json", stage.record)

    return stage.run(loss_fn, s.steps, s.lr, s.warmup, export, **loop)


def _perceptual_features(net, x: torch.Tensor) -> list[torch.Tensor]:
    """Unit-normalised (over channels) activations after the 2nd, 4th and 6th trunk blocks of a world judge."""
    feats, h = [], x
    for i, block in enumerate(net.trunk):
        h = block(h)
        if i % 2 == 1:
            feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-8))
    return feats


def train_decoder(folder, run, vae_folder, s: DecoderSettings = DecoderSettings(), trainer_judge=None,
                  device: str = "cpu", workers: int = 0, **loop) -> dict:
    """Fine-tune (or resume) the decoder of the VAE at ``vae_folder``; export the whole VAE (encoder unchanged) to
    ``folder``. ``device`` trains there (random draws stay on the CPU, so a batch is the same on any device up to
    float rounding); ``workers`` render batches ahead in that many processes."""
    from diffusers import AutoencoderKL

    from . import judge as J

    vae = AutoencoderKL.from_pretrained(vae_folder).to(device)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    net = J.load_judge(trainer_judge or io.DATA_DIR / "benchmark" / "trainer_judge.safetensors").eval().to(device)
    net.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    stage = _Stage(Path(run), "decoder", vae, params, s, ema_decay=None)

    def data(step):
        return batch(s.batch, seed=s.seed * 2_222_221 + step + 17)[0]

    def loss_fn(step, images):
        x = images.to(device) * 2 - 1
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            g = torch.Generator().manual_seed(s.seed * 6_666_661 + step)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        out = vae.decode(z).sample
        rec = F.l1_loss(out, x)
        per = sum(F.mse_loss(a, b.detach()).mul(a.shape[1]) for a, b in
                  zip(_perceptual_features(net, out.clamp(-1, 1)), _perceptual_features(net, x)))
        return rec + s.perceptual * per, {"l1": rec.item(), "perceptual": float(per)}

    def export(m):
        with cache.building(folder) as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            io.write_json(tmp / "training.json", {**stage.record, "encoder_from": str(vae_folder), "device": str(device)})

    return stage.run(loss_fn, s.steps, s.lr, s.warmup, export, data=data, workers=workers, **loop)


# ----------------------------------------------------------------------------- 3. UNet


def train_scheduler(zero_snr: bool = False):
    """SD v1.5's training noise schedule (scaled-linear betas 0.00085 → 0.012, 1,000 steps, ε-prediction); with
    ``zero_snr`` the betas are rescaled to zero terminal SNR and the UNet predicts v, with trailing timesteps
    (:attr:`UNetSettings.zero_snr`)."""
    from diffusers import DDPMScheduler

    extra = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing") \
        if zero_snr else dict(prediction_type="epsilon")
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, **extra)


def sampling_scheduler(zero_snr: bool = False):
    """The DDIM a pipeline folder ships for a UNet trained under :func:`train_scheduler` (``zero_snr`` the same):
    SD's own settings (no clipping, ᾱ of the step before the first is not forced to 1, ``steps_offset`` 1, which
    trailing spacing ignores); under zero terminal SNR, trailing timesteps, so sampling starts at the pure-noise
    step."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(train_scheduler(zero_snr).config, clip_sample=False, set_alpha_to_one=False,
                                     steps_offset=1)


def build_unet(s: UNetSettings, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    n = len(s.block_out_channels)
    torch.manual_seed(s.seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=s.layers_per_block,
        block_out_channels=tuple(s.block_out_channels),
        # cross-attention at the lower resolutions (8×8, 4×4 and the mid block): at 16×16 it cost 1.6× the step time
        # on this CPU for no need the world has (SD v1.5 has it at all but its lowest resolution)
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=s.attention_head_dim, norm_num_groups=8)


class TextEncoder:
    """The frozen CLIP text tower as SD's pipeline calls it: captions padded to the tokenizer's max length, the
    last hidden states (after the final layer norm) are the cross-attention context."""

    def __init__(self, clip_folder, device: str = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
        self.model = CLIPTextModel.from_pretrained(clip_folder).eval().requires_grad_(False).to(device)
        self.device = device
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if new:
            t = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            for c, e in zip(new, self.model(t.input_ids.to(self.device))[0]):
                self._memo[c] = e
            if len(self._memo) > 50_000:
                self._memo.clear()
        return torch.stack([self._memo[c] for c in captions])


def train_unet(folder, run, clip_folder, vae_folder, s: UNetSettings = UNetSettings(), device: str = "cpu",
               workers: int = 0, **loop) -> dict:
    """Train (or resume) the world SD's UNet on the VAE's latents; export a ``UNet2DConditionModel`` folder (EMA
    weights) to ``folder``. ``device`` and ``workers`` as in :func:`train_decoder`."""
    from diffusers import AutoencoderKL

    text = TextEncoder(clip_folder, device=device)
    vae = AutoencoderKL.from_pretrained(vae_folder).eval().requires_grad_(False).to(device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(s, text.model.config.hidden_size, RESOLUTION // factor)
    if s.init_from and not (Path(run) / "unet.safetensors").is_file():  # a checkpoint, once there, wins
        from diffusers import UNet2DConditionModel

        start = UNet2DConditionModel.from_pretrained(s.init_from)
        try:
            unet.load_state_dict(start.state_dict())
        except RuntimeError as e:
            raise ValueError(f"minisd: init_from={s.init_from!r} is not a UNet of these settings "
                             f"(block_out_channels={s.block_out_channels}, layers_per_block={s.layers_per_block}): "
                             f"{str(e)[:200]}") from None
    unet = unet.to(device)
    sched = train_scheduler(s.zero_snr)
    stage = _Stage(Path(run), "unet", unet, unet.parameters(), s, ema_decay=s.ema_decay)

    def data(step):
        images, caps, _ = batch(s.batch, seed=s.seed * 9_999_991 + step)
        return images, caps

    def loss_fn(step, item):
        images, caps = item
        g = torch.Generator().manual_seed(s.seed * 4_444_447 + step)
        drop = torch.rand(len(caps), generator=g) < s.uncond_rate
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        with torch.no_grad():
            post = vae.encode(images.to(device) * 2 - 1).latent_dist
            noise = torch.randn(post.mean.shape, generator=g).to(device)
            x0 = (post.mean + post.std * noise) * vae.config.scaling_factor
        eps = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g).to(device)
        loss = models.diffusion_loss(unet, sched, x0, eps, t, s.min_snr_gamma, encoder_hidden_states=text(caps))
        return loss, {}

    def export(m):
        with cache.building(folder) as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            rec = {**stage.record, "device": str(device)}
            if s.init_from:
                rec["continued_from"] = _record(s.init_from, "unet")
            io.write_json(tmp / "training.json", rec)

    return stage.run(loss_fn, s.steps, s.lr, s.warmup, export, data=data, workers=workers, **loop)


# ----------------------------------------------------------------------------- 4. the pipeline folder


def _record(folder, key: str) -> dict:
    """A stage's training record: ``<folder>/training.json``, or — for a component of an assembled pipeline
    folder, which keeps one record for all — ``<folder>/../training.json[key]``."""
    own, parent = Path(folder) / "training.json", Path(folder).parent / "training.json"
    if own.is_file():
        return json.loads(own.read_text())
    if parent.is_file() and key in json.loads(parent.read_text()):
        return json.loads(parent.read_text())[key]
    raise FileNotFoundError(f"minisd: no training record for {folder} (neither {own} nor {key!r} in {parent})")


def unet_lineage(record: dict) -> dict[str, dict]:
    """A UNet's training record and every run it continued from (``continued_from``, nested), oldest first, each
    named by what it trained: ``"unet (ε-prediction, SD's schedule)"`` for a run on SD v1.5's schedule and
    ``"unet fine-tune k (zero terminal SNR, v-prediction)"`` for the k-th zero-SNR run. Each entry is its own run's
    record without the nested one."""
    runs = []
    while record is not None:
        runs.append({k: v for k, v in record.items() if k != "continued_from"})
        record = record.get("continued_from")
    out, k, e = {}, 0, 0
    for r in reversed(runs):
        if r["settings"].get("zero_snr"):
            k += 1
            out[f"unet fine-tune {k} (zero terminal SNR, v-prediction)"] = r
        else:
            e += 1
            out["unet (ε-prediction, SD's schedule)" + (f", run {e}" if e > 1 else "")] = r
    return out


def assemble(folder, clip_folder, vae_folder, unet_folder) -> Path:
    """Write a ``StableDiffusionPipeline`` folder from the three exports (text encoder and tokenizer from the CLIP
    folder, DDIM with SD's settings, no safety checker) plus ``training.json`` with each stage's record."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    text = TextEncoder(clip_folder)
    sched = sampling_scheduler(_record(unet_folder, "unet")["settings"].get("zero_snr", False))
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel.from_pretrained(unet_folder),
                                   vae=AutoencoderKL.from_pretrained(vae_folder), text_encoder=text.model,
                                   tokenizer=text.tokenizer, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    records = {k: _record(f, k) for k, f in (("clip", clip_folder), ("vae", vae_folder), ("unet", unet_folder))}
    for r in records.values():
        r.pop("loss_history", None)
        r.get("continued_from", {}).pop("loss_history", None)
    with cache.building(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        io.write_json(tmp / "training.json", {"data": models.WORLD_DATA, **records})
    return Path(folder)


# ----------------------------------------------------------------------------- reading the world's CLIP


def judge_prompts() -> dict[str, tuple[str, ...]]:
    """One prompt per class for every attribute, in the captions' own words ("a portrait of a man", "a portrait of a
    person with dark skin", …): what :class:`helpers.judges.ClipJudge` gets as ``prompts`` for the world's CLIP."""
    out = {}
    for a, classes in world.ATTRIBUTES.items():
        labels = {b: 0 for b in world.ATTRIBUTES}
        out[a] = tuple(world.caption({**labels, a: k}, "person", (a,)) for k in range(len(classes)))
    return out


def judge_classes() -> dict[str, tuple[str, ...]]:
    """The world's class names per attribute, for :class:`helpers.judges.ClipJudge`'s ``classes``."""
    return {a: tuple(c) for a, c in world.ATTRIBUTES.items()}


@torch.no_grad()
def clip_report(folder, n: int = 2000, seed: int = 424_242) -> dict:
    """The world CLIP read as a zero-shot judge on ``n`` fresh renders of the unbiased world (every class equally
    likely, so a judge that always says the majority is not rewarded): accuracy per attribute; and caption retrieval
    — for renders of the five contexts with every attribute named, the share whose own caption ranks first among the
    distinct captions of the batch (ties among identical captions count as correct)."""
    from .judges import ClipJudge

    judge = ClipJudge(folder, prompts=judge_prompts(), classes=judge_classes())
    b = world.sample(n, world.uniform_spec(), seed=seed, resolution=RESOLUTION)
    logits = {a: [] for a in world.ATTRIBUTES}
    for i in range(0, n, 256):
        for a, v in judge(b.images[i:i + 256]).items():
            logits[a].append(v)
    acc = {a: float((torch.cat(v).argmax(1) == b.labels[a]).float().mean()) for a, v in logits.items()}
    hits, total = 0, 0
    for ci, ctx in enumerate(world.CONTEXTS):
        c = world.sample_captioned(n // len(world.CONTEXTS), ctx, seed=seed + 1 + ci, mention_rate=1.0)
        uniq = list(dict.fromkeys(c.captions))
        text = judge.embed_text(uniq)
        img = judge.encode(c.images)
        best = (img @ text.T).argmax(1)
        hits += sum(uniq[j] == cap for j, cap in zip(best.tolist(), c.captions))
        total += len(c.captions)
    return {"zero_shot_accuracy": acc, "retrieval_top1": hits / total, "n": n, "seed": seed}


# ----------------------------------------------------------------------------- the quality bar of the world's SD


def load(folder=None, prompt: str = "a portrait of a person", guidance_scale: float = 3.0,
         device="cpu"):
    """The shipped world SD as a :class:`helpers.models.Diffusion` (``data/minisd/sd``)."""
    return models.load_model(str(folder or io.DATA_DIR / "minisd" / "sd"), device=device, prompt=prompt,
                             guidance_scale=guidance_scale)


def prompt_shares(sd_folder, judge, n: int = 2000, steps: int = 25, guidance: float = 3.0, seed: int = 31_337,
                  contexts=tuple(world.CONTEXTS), batch_size: int = 250, progress: bool = True,
                  device: str = "cpu") -> dict:
    """The quality bar per prompt: ``n`` samples of each bare context prompt at DDIM ``steps`` and classifier-free
    ``guidance``, read by ``judge`` (the world judge), against that context's spec — class shares and their largest
    gap, confident shares, FD, and FID in judge features next to the FID two sets of true renders give."""
    from . import metrics

    out = {"settings": {"n": n, "steps": steps, "guidance": guidance, "seed": seed}, "prompts": {}}
    model = load(sd_folder, guidance_scale=guidance, device=device)
    for ctx in contexts:
        ci = list(world.CONTEXTS).index(ctx)
        model.prompt = world.CONTEXTS[ctx]
        t0 = time.time()
        images = models.sample(model, n, steps, seed=seed + ci, batch_size=batch_size, progress=progress)
        seconds = time.time() - t0
        spec = world.context_spec(ctx)
        ref = world.sample(n, spec, seed=seed + 100 + ci, resolution=RESOLUTION).images
        floor = world.sample(n, spec, seed=seed + 200 + ci, resolution=RESOLUTION).images
        rep = metrics.quality_report(images, judge, spec, ref, floor, attrs=world.SOCIAL, n_boot=500)
        rep["prompt"], rep["sample_seconds"] = world.CONTEXTS[ctx], seconds
        rep["max_abs_gap"] = max(v["max_abs_gap"] for v in rep["attributes"].values())
        out["prompts"][ctx] = rep
    return out


def prompt_words(sd_folder, judge, clip_judge, per_class: int = 50, steps: int = 25, guidance: float = 3.0,
                 seed: int = 77_777, progress: bool = True, device: str = "cpu") -> dict:
    """Text alignment with explicit words: for every class of gender, age and skin tone, ``per_class`` samples of
    prompts naming it (spread over the five contexts, e.g. "a portrait of a nurse, a man"); reported per attribute:
    the share the judge reads as the named class, and the share whose CLIP-T with the matching prompt is above its
    CLIP-T with every prompt naming another class of that attribute (same context)."""
    out = {"settings": {"per_class": per_class, "steps": steps, "guidance": guidance, "seed": seed}, "attributes": {}}
    ctxs = list(world.CONTEXTS)
    base = {a: 0 for a in world.ATTRIBUTES}
    model = load(sd_folder, guidance_scale=guidance, device=device)
    for ai, a in enumerate(world.SOCIAL):
        k = len(world.ATTRIBUTES[a])
        read, above, n = 0, 0, 0
        for c in range(k):
            for ci, ctx in enumerate(ctxs):
                m = per_class // len(ctxs) + (ci < per_class % len(ctxs))
                if m == 0:
                    continue
                prompts = [world.caption({**base, a: j}, ctx, (a,)) for j in range(k)]
                model.prompt = prompts[c]
                images = models.sample(model, m, steps, seed=seed + 1000 * ai + 100 * c + ci)
                read += int((judge.predict(images)[a].argmax(1) == c).sum())
                sims = torch.stack([clip_judge.clip_t(images, p) for p in prompts], 1)
                others = torch.cat([sims[:, :c], sims[:, c + 1:]], 1).max(1).values
                above += int((sims[:, c] > others).sum())
                n += m
        out["attributes"][a] = {"judge_reads_named_class": read / n, "clip_t_match_above_mismatch": above / n, "n": n}
    return out


@torch.no_grad()
def vae_report(vae_folder, judge, n: int = 2000, seed: int = 515_151) -> dict:
    """The VAE's reconstructions of ``n`` fresh renders of the unbiased world read by ``judge``: per attribute, the
    share read as the same class as the render itself; and the pixel MSE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    b = world.sample(n, world.uniform_spec(), seed=seed, resolution=RESOLUTION)
    rec = torch.cat([(vae.decode(vae.encode(b.images[i:i + 250] * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
                     for i in range(0, n, 250)])
    p0, p1 = judge.predict(b.images), judge.predict(rec)
    same = {a: float((p0[a].argmax(1) == p1[a].argmax(1)).float().mean()) for a in p0}
    return {"same_class": same, "mse": float(F.mse_loss(rec, b.images)), "n": n, "seed": seed,
            "latent_shape": list(vae.encode(b.images[:1] * 2 - 1).latent_dist.mean.shape[1:]),
            "scaling_factor": vae.config.scaling_factor}


# ----------------------------------------------------------------------------- verdicts for chapter 8


def load_quality(sd_folder=None, path=None) -> dict:
    """``data/minisd/quality.json`` (or ``path``), checked to hold only parts drawn by ``sd_folder`` (default: the
    shipped world SD): a retrained model must not be reported with the old one's samples."""

    sd_folder = Path(sd_folder or io.DATA_DIR / "minisd" / "sd")
    path = Path(path or io.DATA_DIR / "minisd" / "quality.json")
    quality, fp = json.loads(path.read_text()), cache.fingerprint(sd_folder)
    stale = sorted(k for k, v in quality.items() if v.get("model") != fp)
    if stale:
        raise ValueError(f"minisd: {path} holds {len(stale)} parts not drawn by {sd_folder} ({fp}), e.g. {stale[0]!r}; "
                         f"rerun scripts/evaluate_minisd.py for this model into a fresh file")
    return quality


def _largest_gap(quality: dict, guidance: float, n: int, steps: int, seed: int) -> float | None:
    """The largest class-share gap over the five prompts' parts at these settings; ``None`` if a prompt lacks one."""
    parts = [quality.get(f"shares/{c}/n={n}/steps={steps}/guidance={guidance:g}/seed={seed}") for c in world.CONTEXTS]
    return None if any(p is None for p in parts) else max(p["max_abs_gap"] for p in parts)


def choose_guidance(quality: dict, candidates=GUIDANCE_CANDIDATES, n: int = GUIDANCE_VAL["n"],
                    steps: int = GUIDANCE_VAL["steps"], seed: int = GUIDANCE_VAL["seed"], tol: float = 0.05) -> float:
    """The book's guidance scale, from the validation parts of ``quality.json``: the largest candidate whose largest
    class-share gap over every prompt is within ``tol`` (guidance is what SD samples with; more of it is kept as long
    as each prompt's bias stays what its spec says); if none is, the candidate with the smallest such gap. Every
    candidate needs all five prompts at these settings."""
    gaps = {g: _largest_gap(quality, g, n, steps, seed) for g in candidates}
    for g, gap in gaps.items():
        if gap is None:
            raise ValueError(f"choose_guidance: guidance {g:g} lacks validation parts (n={n}, steps={steps}, "
                             f"seed={seed}); run scripts/evaluate_minisd.py --n {n} --seed {seed} --guidance {g:g}")
    ok = [g for g, v in gaps.items() if v <= tol]
    return max(ok) if ok else min(gaps, key=gaps.get)


def share_frame(quality: dict, n: int, steps: int, seed: int, guidance=None) -> "pd.DataFrame":
    """Every judged class share next to its spec, one row per (guidance, prompt, attribute, class), from
    ``quality.json``'s parts at these settings (``guidance``: one scale, a list, or ``None`` for every stored one);
    ``gap`` = model − spec (positive: the model draws that class more often than the prompt's spec says)."""
    import pandas as pd

    want = None if guidance is None else {float(g) for g in np.atleast_1d(guidance)}
    rows = []
    for key, part in quality.items():
        if not key.startswith("shares/"):
            continue
        st = part["settings"]
        if (st["n"], st["steps"], st["seed"]) != (n, steps, seed) or (want is not None and float(st["guidance"]) not in want):
            continue
        ctx = key.split("/")[1]
        for a, v in part["attributes"].items():
            for k, (sp, mo) in enumerate(zip(v["spec"], v["model"])):
                rows.append({"guidance": float(st["guidance"]), "prompt": world.CONTEXTS[ctx], "context": ctx,
                             "attribute": a, "class": world.ATTRIBUTES[a][k], "spec": sp, "model": mo,
                             "gap": mo - sp})
    return pd.DataFrame(rows, columns=["guidance", "prompt", "context", "attribute", "class", "spec", "model", "gap"])


def mean_start_frame(diagnosis: dict) -> "pd.DataFrame":
    """The causal test of ``scripts/diagnose_minisd.py`` (one model's ``"mean start"`` part): per prompt and social
    attribute, the largest class-share gap to the spec when sampling starts as the pipeline does (``plain``) and
    when the first latent carries the data's expected mean (``mean start``), the same noise otherwise; ``closer``:
    the mean start's gap is smaller."""
    import pandas as pd

    rows = []
    for ctx, r in diagnosis["prompts"].items():
        for a, spec in r["spec"].items():
            gap = {k: float(np.max(np.abs(np.asarray(r[k][a]) - np.asarray(spec)))) for k in ("plain", "mean start")}
            rows.append({"context": ctx, "attribute": a, "gap plain": gap["plain"], "gap mean start": gap["mean start"],
                         "closer": gap["mean start"] < gap["plain"]})
    return pd.DataFrame(rows).set_index(["context", "attribute"])


def diagnosis_verdicts(record: dict, flip_tol: float = 0.05) -> dict:
    """The two explanations of the age over-draw, judged on one model's record of ``scripts/diagnose_minisd.py``.

    ``detail loss`` (the UNet drops the forehead line that tells an adult from a young face): ``"refuted"`` when at
    every SDEdit strength below 1 at most ``flip_tol`` of true adults are read as young, else ``"holds"``.
    ``mean drift`` (samples drift toward the latents' zero mean): ``"holds"`` when starting from noise that carries
    the data's mean brings the age gap closer to the spec on most prompts, else ``"refuted"``. Also the numbers
    each verdict reads."""
    flip = max(m[1][0] for s, m in record["sdedit"]["strengths"].items() if float(s) < 1)  # adult → young
    ms = mean_start_frame(record["mean start"]).xs("age", level="attribute")
    closer = int(ms["closer"].sum())
    return {"detail loss": "refuted" if flip <= flip_tol else "holds",
            "adult read young, largest below strength 1": flip,
            "mean drift": "holds" if closer > len(ms) / 2 else "refuted",
            "prompts closer on age": closer, "prompts": len(ms)}


def load_before() -> dict:
    """The first UNet's record, kept when the zero-SNR fine-tune replaced it (``data/minisd/before_zero_snr.json``):
    its pipeline folder's ``fingerprint`` (its diagnosis is stored under it in ``diagnosis.json``) and the quality
    parts it was judged by."""
    return json.loads((io.DATA_DIR / "minisd" / "before_zero_snr.json").read_text())


def load_candidates() -> dict:
    """UNets judged on the validation noise and not shipped (``data/minisd/candidates.json``), by pipeline-folder
    fingerprint: what each was, its own training record and its validation parts (each carrying that fingerprint)."""
    return json.loads((io.DATA_DIR / "minisd" / "candidates.json").read_text())


def validation_worst(models: dict[str, dict], candidates=GUIDANCE_CANDIDATES, n: int = GUIDANCE_VAL["n"],
                     steps: int = GUIDANCE_VAL["steps"], seed: int = GUIDANCE_VAL["seed"]) -> "pd.DataFrame":
    """One row per model (``{name: quality parts}``), one column per guidance scale: the largest class-share gap over
    the five prompts on the validation parts — what :func:`choose_guidance` compares within a model, here across
    models. NaN where a model was not judged at that scale (or lacks a prompt there); ``best``: the smallest."""
    import pandas as pd

    frame = pd.DataFrame({name: {f"guidance {g:g}": _largest_gap(quality, g, n, steps, seed) for g in candidates}
                          for name, quality in models.items()}).T.astype(float)  # None (not judged there) → NaN
    frame["best"] = frame.min(axis=1)
    return frame


def before_after(before: dict, after: dict, n: int, steps: int, guidance: float, seed: int) -> "pd.DataFrame":
    """Two models' quality parts at the same settings (same prompts, same noise), one row per prompt: the largest
    class-share gap to the spec of each (``closer``: the second's is smaller), each one's share of the young class
    next to the spec's, and each one's FID in the judge's features. A prompt missing from either is an error, not a row."""
    import pandas as pd

    young = world.ATTRIBUTES["age"].index("young")
    rows = {}
    for ctx, prompt in world.CONTEXTS.items():
        key = f"shares/{ctx}/n={n}/steps={steps}/guidance={guidance:g}/seed={seed}"
        if key not in before or key not in after:
            raise KeyError(f"before_after: {key!r} is missing from the {'first' if key not in before else 'second'} "
                           "model's parts")
        b, a = before[key], after[key]
        rows[prompt] = {"gap before": b["max_abs_gap"], "gap after": a["max_abs_gap"],
                        "closer": a["max_abs_gap"] < b["max_abs_gap"],
                        "young before": b["attributes"]["age"]["model"][young],
                        "young after": a["attributes"]["age"]["model"][young],
                        "young spec": a["attributes"]["age"]["spec"][young],
                        "FID before": b["fid"], "FID after": a["fid"]}
    return pd.DataFrame(rows).T.astype({"closer": bool})


def bar_verdicts(quality: dict, n: int, steps: int, guidance: float, seed: int, tol: float = 0.05,
                 confident: float = 0.95) -> "pd.DataFrame":
    """One row per prompt of the quality bar (issue 18) from ``quality.json``'s parts at these settings: the largest
    gap of a judged class share to the prompt's spec and whether it is within ``tol``; the smallest confident share
    over gender, age and skin tone and whether it reaches ``confident``; FID in judge features next to its floor.
    A prompt with no part at these settings is a row of NaN (not a pass)."""
    import pandas as pd

    rows = {}
    for ctx, prompt in world.CONTEXTS.items():
        part = quality.get(f"shares/{ctx}/n={n}/steps={steps}/guidance={guidance:g}/seed={seed}")
        if part is None:
            rows[prompt] = {"max gap": float("nan"), "within": False, "min confident": float("nan"),
                            "confident ok": False, "FID": float("nan"), "FID floor": float("nan")}
            continue
        conf = min(part["confident"][a] for a in world.SOCIAL)
        rows[prompt] = {"max gap": part["max_abs_gap"], "within": part["max_abs_gap"] <= tol,
                        "min confident": conf, "confident ok": conf >= confident,
                        "FID": part["fid"], "FID floor": part["fid_floor"]}
    return pd.DataFrame(rows).T
