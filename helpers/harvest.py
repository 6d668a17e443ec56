"""Harvest: sample a model with the bottleneck captured, then judge what it drew (chapters 2–4).

For each sample the harvest keeps ``h`` at every sampling step (streamed to disk in
shards, so memory stays flat), the final image, and the judge's reading of it. A small
*summary* — images, judge probabilities and the spatial mean of ``h`` per step — is what the
chapters load; the full shards feed SAE training.

:func:`cached` keys the folder by the settings and by fingerprints of the model and judge
weights, so a retrained model never reuses a stale harvest.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import cache, hooks, io, models
from . import judge as J

HARVEST_SEED = 1_234  # noise seed of the harvest set (distinct from evaluation seeds)


@dataclass
class HarvestSettings:
    n: int = 1000  # samples
    steps: int = 25  # DDIM steps (every step is captured)
    seed: int = HARVEST_SEED
    batch_size: int = 100  # samples per sampling batch
    shard_dtype: str = "float16"  # dtype of the stored h shards
    shard_rows: int = 2000  # (sample, step) captures per shard
    shard_steps: tuple[int, ...] | None = None  # steps whose full h is stored (None: all); pooled h keeps every step


@dataclass
class Summary:
    """What chapters load: one row per sample."""

    images: torch.Tensor  # (n, 3, H, W) uint8
    probs: dict[str, torch.Tensor]  # judge probabilities per attribute, (n, classes)
    pooled: torch.Tensor  # (n, steps, C) spatial mean of h at each step (float16)
    timesteps: torch.Tensor  # (steps,)
    settings: dict

    def labels(self) -> dict[str, torch.Tensor]:
        """Judged class per sample and attribute."""
        return {a: p.argmax(-1) for a, p in self.probs.items()}


def run(model: models.Diffusion, settings: HarvestSettings, folder, judge=None, progress: bool = True,
        meta: dict | None = None, sample_ids: torch.Tensor | None = None) -> Path:
    """Harvest into ``folder`` (built atomically); returns the folder.

    ``sample_ids`` harvests only those samples of the ``settings.n`` (one process's share under a
    multi-GPU launcher; :func:`merge` joins the parts); the summary's rows follow that order.
    """
    from tqdm.auto import tqdm

    judge = judge or J.load_judge()
    s = settings
    unet = model.unet
    all_ids = torch.arange(s.n) if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.long)
    noise = models.make_noise(s.n, model.sample_size, s.seed, unet.config.in_channels)
    width = unet.config.block_out_channels[-1]
    pooled = torch.zeros(len(all_ids), s.steps, width, dtype=torch.float16)
    timesteps = torch.zeros(s.steps)
    images = []
    with cache.building(folder) as tmp:
        writer = hooks.ShardWriter(tmp / "shards", rows=s.shard_rows, dtype=getattr(torch, s.shard_dtype),
                                   meta={"settings": asdict(s), **(meta or {})})
        bar = tqdm(total=len(all_ids), desc="harvest", unit="sample", disable=not progress)
        for start in range(0, len(all_ids), s.batch_size):
            rows = torch.arange(start, min(len(all_ids), start + s.batch_size))
            ids = all_ids[rows]

            def keep(h, info, ids=ids, rows=rows):
                if s.shard_steps is None or info.step in s.shard_steps:
                    writer.add(h, info.step, info.timestep, sample=ids)
                pooled[rows, info.step] = h.detach().float().mean((2, 3)).to(torch.float16).cpu()
                timesteps[info.step] = float(torch.as_tensor(info.timestep).flatten()[0])
                return None

            with hooks.bottleneck_hooks(unet, keep):
                imgs = models.sample(model, noise=noise[ids], steps=s.steps, batch_size=len(ids))
            images.append((imgs * 255).round().to(torch.uint8))
            bar.update(len(ids))
        bar.close()
        writer.close()
        images = torch.cat(images)
        probs = judge.predict(images.float() / 255)
        tensors = {"images": images, "pooled": pooled, "timesteps": timesteps, "sample": all_ids}
        tensors.update(io.prefixed("probs", probs))
        io.save_tensors(tmp / "summary.safetensors", tensors, meta={"settings": asdict(s), **(meta or {})})
    return Path(folder)


def merge(parts, folder) -> Path:
    """Join per-process harvests (:func:`run` with ``sample_ids``) into one ``folder``, rows in sample order.

    The shards stay where they are: the merged manifest points at them (``../part/shards/...``)."""
    parts = [Path(p) for p in parts]
    sums = [io.load_tensors(p / "summary.safetensors") for p in parts]
    ids = torch.cat([t["sample"] for t, _ in sums])
    order = torch.argsort(ids)
    if not torch.equal(ids[order], torch.arange(len(ids))):
        raise ValueError(f"merge: the parts do not cover samples 0..{len(ids) - 1} exactly once")
    t0, meta = sums[0]
    merged = {k: torch.cat([t[k] for t, _ in sums])[order] for k in t0 if k != "timesteps"}
    merged["timesteps"] = t0["timesteps"]
    shards, rows = [], 0
    for p in parts:
        man = json.loads((p / "shards" / "manifest.json").read_text())
        shards += [{"file": f"../../{p.name}/shards/{s['file']}", "rows": s["rows"]} for s in man["shards"]]
        rows += man["rows"]
    with cache.building(folder) as tmp:
        (tmp / "shards").mkdir()
        io.write_json(tmp / "shards" / "manifest.json", {"shards": shards, "rows": rows, "meta": {"parts": len(parts)}})
        io.save_tensors(tmp / "summary.safetensors", merged, meta=meta)
    return Path(folder)


def load_summary(path) -> Summary:
    """Read ``summary.safetensors`` (a harvest folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"load_summary: no harvest summary at {path}; run the harvest (chapter 2) first")
    t, meta = io.load_tensors(path)
    probs = io.unprefixed("probs", t)
    return Summary(images=t["images"], probs=probs, pooled=t["pooled"], timesteps=t["timesteps"],
                   settings=meta.get("settings", {}))


def load_rows(folder, steps=None, max_rows: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAE training rows from a harvest's shards: ``{"x": (N, C), "sample", "step", "position": (N,)}``.

    Every spatial position of every captured ``h`` is a row. ``steps`` keeps only those
    sampling steps; ``max_rows`` draws that many rows at random (seeded).
    """
    sh = hooks.load_shards(Path(folder) / "shards")
    h = sh["h"]
    keep = torch.ones(len(h), dtype=torch.bool)
    if steps is not None:
        keep = torch.isin(sh["step"], torch.as_tensor(list(steps)))
    h = h[keep]
    b, c, hh, ww = h.shape
    x = h.permute(0, 2, 3, 1).reshape(-1, c)
    rep = hh * ww
    out = {"x": x, "sample": sh["sample"][keep].repeat_interleave(rep), "step": sh["step"][keep].repeat_interleave(rep),
           "position": torch.arange(rep).repeat(b)}
    if max_rows is not None and max_rows < len(x):
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_rows]
        out = {k: v[pick] for k, v in out.items()}
    return out


def cached(model_name: str = "embedded", settings: HarvestSettings | None = None, recompute: bool = False,
           judge_path=J.JUDGE_PATH, root=None, progress: bool = True) -> Path:
    """The harvest folder for ``model_name`` and ``settings``, made on first use (or when ``recompute``)."""
    settings = settings or HarvestSettings()
    model_dir = models.EMBEDDED_DIR if model_name == "embedded" else Path(model_name)
    key_settings = {"settings": asdict(settings), "model": cache.fingerprint(model_dir) if model_dir.exists()
                    else str(model_name), "judge": cache.fingerprint(judge_path)}
    folder = cache.folder_for("harvest", key_settings, root)
    if recompute or not (folder / "summary.safetensors").is_file():
        model = models.load_model(model_name)
        run(model, settings, folder, judge=J.load_judge(judge_path), progress=progress,
            meta={"key": key_settings, "model_name": str(model_name)})
    return folder
