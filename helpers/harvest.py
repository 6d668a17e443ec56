"""Harvest: sample a model with h captured at a hook site, then judge what it drew (chapters 2–4).

For each sample the harvest keeps ``h`` at the site (by default the bottleneck) at every sampling
step, or at ``shard_steps`` only (one shard per batch, so memory stays flat and an interrupted
harvest resumes), the final image, and the judge's reading of it. A small
*summary* — images, judge probabilities and the spatial mean of ``h`` per step — is what the
chapters load; the full shards feed SAE training.

:func:`cached` keys the folder by the settings and by fingerprints of the model and judge
weights, so a retrained model never reuses a stale harvest.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import cache, hooks, io, models

HARVEST_SEED = 1_234  # noise seed of the harvest set (distinct from evaluation seeds)


@dataclass
class HarvestSettings:
    n: int = 1000  # samples
    steps: int = 25  # DDIM steps (every step is captured)
    seed: int = HARVEST_SEED
    batch_size: int = 100  # samples per sampling batch (one shard each: the unit a resumed harvest skips)
    shard_dtype: str = "float16"  # dtype of the stored h shards
    shard_steps: tuple[int, ...] | None = None  # steps whose full h is stored (None: all); pooled h keeps every step
    site: str = hooks.DEFAULT_SITE  # where h is captured (helpers.hooks.sites)


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


_OURS = {"summary.safetensors", "shards", "harvest.json", "batches", cache.MARKER}  # what a harvest folder may hold


def _work_folder(folder: Path) -> Path:
    """Where an unfinished harvest into ``folder`` keeps its finished batches (a resume picks them up)."""
    return folder.parent / f".{folder.name}.harvest-partial"


def _claim(folder: Path) -> None:
    """Refuse to write over a folder this project did not make."""
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"harvest: {folder} is a file; pass a new folder for the harvest")
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OURS)
        if foreign:
            raise FileExistsError(
                f"harvest: {folder} already holds files a harvest did not write ({foreign[:5]}); "
                "pass a new or empty folder (nothing there is deleted)")


def run(model: models.Diffusion, settings: HarvestSettings, folder, judge, progress: bool = True,
        meta: dict | None = None, sample_ids: torch.Tensor | None = None) -> Path:
    """Harvest into ``folder``; returns the folder. ``judge`` reads every image (its ``.attributes``).

    Resumable batch by batch: each finished batch (its h shard, images and pooled h) is saved in a hidden
    work folder next to ``folder``; an interrupted harvest rerun with the same settings samples only the
    batches that are missing. ``folder`` appears only when the harvest is complete. An existing ``folder``
    holding anything but a previous harvest's files is refused, never deleted.

    ``sample_ids`` harvests only those samples of the ``settings.n`` (one process's share under a
    multi-GPU launcher; :func:`merge` joins the parts); the summary's rows follow that order.
    """
    import shutil

    from tqdm.auto import tqdm

    if judge is None:
        raise ValueError("harvest.run: pass the judge that reads the images (helpers.judges.load(...)); "
                         "there is no default judge")
    s = settings
    folder = Path(folder)
    _claim(folder)
    unet = model.unet
    all_ids = torch.arange(s.n) if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.long)
    work = _work_folder(folder)
    key = {"settings": asdict(s), "ids": cache.key(all_ids.tolist()), "model": model.name, "prompt": model.prompt,
           "guidance_scale": model.guidance_scale, "negative_prompt": model.negative_prompt, "dtype": str(unet.dtype)}
    if work.exists():
        old = work / "harvest.json"
        if not old.is_file() or json.loads(old.read_text()) != json.loads(json.dumps(key)):
            shutil.rmtree(work)  # our own work folder from other settings: nothing in it can be reused
    (work / "shards").mkdir(parents=True, exist_ok=True)
    (work / "batches").mkdir(exist_ok=True)
    io.write_json(work / "harvest.json", key)
    noise = models.make_noise(s.n, model.sample_size, s.seed, unet.config.in_channels)
    starts = list(range(0, len(all_ids), s.batch_size))
    done = {b for b in range(len(starts)) if (work / "batches" / f"batch-{b:05d}.safetensors").is_file()
            and (work / "shards" / f"shard-{b:05d}.safetensors").is_file()}
    bar = tqdm(total=len(all_ids), desc="harvest", unit="sample", disable=not progress)
    bar.update(sum(min(s.batch_size, len(all_ids) - starts[b]) for b in done))
    for b, start in enumerate(starts):
        if b in done:
            continue
        ids = all_ids[start:start + s.batch_size]
        buf = {"h": [], "step": [], "timestep": [], "sample": []}
        pooled, timesteps = {}, {}

        def keep(h, info, ids=ids):
            t = float(torch.as_tensor(info.timestep).flatten()[0])
            if s.shard_steps is None or info.step in s.shard_steps:
                buf["h"].append(h.detach().to("cpu", getattr(torch, s.shard_dtype)))
                buf["step"].append(torch.full((len(ids),), info.step, dtype=torch.long))
                buf["timestep"].append(torch.full((len(ids),), t))
                buf["sample"].append(ids.clone())
            pooled[info.step] = h.detach().float().mean((2, 3)).to(torch.float16).cpu()
            timesteps[info.step] = t
            return None

        with hooks.site_hooks(unet, keep, site=s.site):
            imgs = models.sample(model, noise=noise[ids], steps=s.steps, batch_size=len(ids),
                                 progress=progress and model.text_conditioned)
        if sorted(pooled) != list(range(s.steps)):
            raise RuntimeError(f"harvest: the hook at {s.site!r} fired at steps {sorted(pooled)}, expected "
                               f"0..{s.steps - 1} (one UNet call per sampling step)")
        io.save_tensors(work / "shards" / f"shard-{b:05d}.safetensors",
                        {k: torch.cat(v) for k, v in buf.items()} if buf["h"] else
                        {"h": torch.zeros(0, pooled[0].shape[1], 1, 1), "step": torch.zeros(0, dtype=torch.long),
                         "timestep": torch.zeros(0), "sample": torch.zeros(0, dtype=torch.long)})
        io.save_tensors(work / "batches" / f"batch-{b:05d}.safetensors",
                        {"images": (imgs * 255).round().to(torch.uint8),
                         "pooled": torch.stack([pooled[t] for t in range(s.steps)], 1),
                         "timesteps": torch.tensor([timesteps[t] for t in range(s.steps)])})
        bar.update(len(ids))
    bar.close()
    parts = [io.load_tensors(work / "batches" / f"batch-{b:05d}.safetensors")[0] for b in range(len(starts))]
    images = torch.cat([p["images"] for p in parts])
    stored = s.steps if s.shard_steps is None else len(s.shard_steps)  # captures per sample in a shard
    shards = [{"file": f"shard-{b:05d}.safetensors", "rows": len(all_ids[start:start + s.batch_size]) * stored}
              for b, start in enumerate(starts)]
    full_meta = {"settings": asdict(s), **(meta or {})}
    io.write_json(work / "shards" / "manifest.json",
                  {"shards": shards, "rows": sum(x["rows"] for x in shards), "meta": full_meta})
    tensors = {"images": images, "pooled": torch.cat([p["pooled"] for p in parts]),
               "timesteps": parts[0]["timesteps"], "sample": all_ids}
    tensors.update(io.prefixed("probs", judge.predict(images.float() / 255)))
    io.save_tensors(work / "summary.safetensors", tensors, meta=full_meta)
    if folder.exists():  # a previous harvest's files only (checked by _claim): replaced
        old = folder.parent / f".{folder.name}.harvest-old"
        if old.exists():  # our own leftover from an interrupted replacement
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(work, folder)
        shutil.rmtree(old)
    else:
        os.replace(work, folder)
    shutil.rmtree(folder / "batches")  # the summary holds them now; harvest.json stays as the harvest's record
    return folder


def rejudge(folder, judge, meta: dict | None = None) -> Path:
    """Re-read a finished harvest's images with another ``judge`` (no re-sampling); rewrites its summary."""
    folder = Path(folder)
    t, m = io.load_tensors(folder / "summary.safetensors")
    t = {k: v for k, v in t.items() if not k.startswith("probs.")}
    t.update(io.prefixed("probs", judge.predict(t["images"].float() / 255)))
    io.save_tensors(folder / "summary.safetensors", t, meta={**m, **(meta or {})})
    return folder


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
    _claim(Path(folder))
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


def _cache_folder(model_name, settings: HarvestSettings, judge_path, root=None) -> tuple[Path, dict]:
    model_dir = models.EMBEDDED_DIR if model_name == "embedded" else Path(model_name)
    key_settings = {"settings": asdict(settings), "model": cache.fingerprint(model_dir) if model_dir.exists()
                    else str(model_name), "judge": cache.fingerprint(judge_path)}
    return cache.folder_for("harvest", key_settings, root), key_settings


def is_cached(model_name: str = "embedded", settings: HarvestSettings | None = None, judge_path=None,
              root=None) -> bool:
    """Whether :func:`cached` would find a finished harvest for these settings (without making one)."""
    from . import judge as J

    folder, _ = _cache_folder(model_name, settings or HarvestSettings(),
                              J.JUDGE_PATH if judge_path is None else judge_path, root)
    return (folder / "summary.safetensors").is_file()


def cached(model_name: str = "embedded", settings: HarvestSettings | None = None, recompute: bool = False,
           judge_path=None, root=None, progress: bool = True) -> Path:
    """The harvest folder for ``model_name`` and ``settings``, made on first use (or when ``recompute``).

    The judge is the world's (``judge_path``, default ``data/judge.safetensors``): this cache serves the
    portrait-world models of chapters 2–7; other models go through :mod:`helpers.pipeline` with their judge.
    """
    from . import judge as J

    settings = settings or HarvestSettings()
    judge_path = J.JUDGE_PATH if judge_path is None else judge_path
    folder, key_settings = _cache_folder(model_name, settings, judge_path, root)
    if recompute or not (folder / "summary.safetensors").is_file():
        model = models.load_model(model_name)
        run(model, settings, folder, judge=J.load_judge(judge_path), progress=progress,
            meta={"key": key_settings, "model_name": str(model_name)})
    return folder
