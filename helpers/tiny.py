"""Tiny, randomly initialised stand-ins of the real pipelines (chapter 8 and the tests).

No weights can be downloaded here, so the Stable Diffusion and CelebA-HQ code paths are
exercised on pipelines of the same diffusers classes, built from random weights and saved with
``save_pretrained`` — then loaded back through :func:`helpers.models.load_model`, exactly as a
downloaded folder would be. They draw noise, not faces: they test plumbing, not results.

* :func:`build_sd` — ``StableDiffusionPipeline``: a small ``UNet2DConditionModel`` (with a
  cross-attention mid block), ``AutoencoderKL``, ``CLIPTextModel`` and a ``CLIPTokenizer`` whose
  vocabulary (single characters) is written here.
* :func:`build_ddpm` — ``DDPMPipeline`` with a small ``UNet2DModel``, the shape of
  ``google/ddpm-celebahq-256``.
* :func:`build_clip` — a small ``CLIPModel`` + processor folder for the CLIP zero-shot judge.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def write_tokenizer(folder, words=(), max_length: int = 32) -> Path:
    """A ``CLIPTokenizer`` folder whose vocabulary is every printable character (and its word-final form), CLIP's
    two special tokens last, and — given ``words`` — BPE merges learned on them (``tokenizers``' BPE trainer, CLIP's
    ``</w>`` word ends), so each word becomes one token. ``words`` are split the way CLIP's tokenizer splits text
    (letter runs, digits, punctuation). Without ``words``: characters only, no merges."""
    import re

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    pieces = sorted({w for t in words for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", str(t).lower())})
    if pieces:
        from tokenizers import Tokenizer, models as tkm, pre_tokenizers, trainers

        bad = sorted({c for w in pieces for c in w} - set(chars))
        if bad:
            raise ValueError(f"write_tokenizer: characters {bad} are outside the vocabulary")
        bpe = Tokenizer(tkm.BPE(end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        bpe.train_from_iterator(pieces, trainers.BpeTrainer(
            vocab_size=len(vocab) + 2 * sum(len(w) for w in pieces), min_frequency=1, initial_alphabet=chars,
            end_of_word_suffix="</w>", show_progress=False))
        learned = json.loads(bpe.to_str())["model"]
        for a, b in (m.split(" ") if isinstance(m, str) else m for m in learned["merges"]):
            merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
    for tok in SPECIAL:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return folder


def _text_encoder(vocab_size: int, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         projection_dim=hidden)
    return CLIPTextModel(cfg).eval()


def build_sd(folder, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (latents ``4 × sample_size²``, images 4× larger)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tok_dir = write_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text = _text_encoder(len(tokenizer), seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=4 * sample_size)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_ddpm(folder, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a tiny ``DDPMPipeline`` (a ``UNet2DModel`` with attention blocks, like the CelebA-HQ DDPM)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return Path(folder)


def build_clip(folder, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny ``CLIPModel`` with its tokenizer and image processor (for :class:`helpers.judges.ClipJudge`)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "_tokenizer_src"))
    v = len(tokenizer)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=v - 2, eos_token_id=v - 1,
                         pad_token_id=v - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=proc, tokenizer=tokenizer).save_pretrained(folder)
    return folder
