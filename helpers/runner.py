"""Headless runner: the whole DiffLens pipeline on one model from a config file (chapter 7).

    python -m helpers run config.toml                 # every stage, resuming finished ones
    python -m helpers run config.toml --stages probe attribution
    python -m helpers example-config sd > sd.toml     # a commented starting point (sd | ddpm | embedded)
    accelerate launch -m helpers run config.toml      # harvest split over every GPU (see below)

Stages, in order (each writes under ``out``; a finished stage is skipped on the next run unless its
settings — or those of a stage before it — changed, in which case it and everything after it rerun):

================ ================================================== ==========================================
stage            does                                               writes
================ ================================================== ==========================================
``harvest``      sample with the bottleneck captured; judge images  ``harvest/`` (summary + h shards)
``sae``          train a TopK SAE on the harvested h                ``sae.safetensors`` (held-out in metadata)
``probe``        per-step linear probe on pooled h                  ``probe.safetensors``
``attribution``  IG over SAE latents → ranked features, footprints  ``attribution/``
``intervention`` original and edited samples from the same noise    ``intervention/``
``metrics``      FD, keep-rate, similarity (CLIP-I with a CLIP      ``metrics.json``
                 judge), CLIP-T, FID of edited vs original
================ ================================================== ==========================================

Multi-GPU: under ``accelerate launch`` (or ``torchrun``) every process harvests its share of the
samples (``accelerate.PartialState.split_between_processes``) into ``harvest-part-<rank>``; the main
process merges them and runs the remaining stages (SAE, probe and IG are minutes on one GPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import io, world

STAGES = ("harvest", "sae", "probe", "attribution", "intervention", "metrics")


@dataclass
class ModelCfg:
    path: str = "embedded"  # "embedded", a local diffusers folder, or a Hub repo id
    prompt: str | None = None  # text-to-image models only
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "float32"  # "float16" on a GPU


@dataclass
class JudgeCfg:
    spec: str = "world"  # "world", "clip:<folder>", "fairface:<weights>"


@dataclass
class HarvestCfg:
    n: int = 1000
    steps: int = 25
    seed: int = 1234
    batch_size: int = 100
    shard_dtype: str = "float16"
    # steps whose full h is stored for the SAE and IG (empty: every step). SD at 50 steps stores
    # 50 × 64 positions × 1280 channels × 2 bytes = 8 MB per sample for all steps; pick a few.
    shard_steps: list[int] = field(default_factory=list)


@dataclass
class SAECfg:
    expansion: int = 8
    k: int = 0  # 0: scaled to the bottleneck width (helpers.sae.scaled_k)
    train_steps: int = 5000
    batch_size: int = 4096
    lr: float = 4e-4
    max_rows: int = 0  # 0: every harvested row


@dataclass
class ProbeCfg:
    epochs: int = 300
    train_share: float = 0.9


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


def _section(name: str, cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: [{name}] must be a table of settings, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    return cls(**values)


def load_config(path) -> Config:
    """Read and check a ``.toml`` or ``.json`` config; every mistake gets one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist; write one with `python -m helpers example-config sd`")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"config {path}: reading TOML needs Python 3.11+; write the same settings as .json") from None

        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"config {path}: use a .toml or .json file")
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, where: str = "config") -> Config:
    sections = {"model": ModelCfg, "judge": JudgeCfg, "harvest": HarvestCfg, "sae": SAECfg, "probe": ProbeCfg,
                "attribution": AttributionCfg, "intervention": InterventionCfg}
    top = {"out", "attributes", "stages"}
    unknown = set(raw) - top - set(sections)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(top | set(sections))}")
    cfg = Config(**{k: raw[k] for k in top if k in raw},
                 **{k: _section(k, c, raw[k], where) for k, c in sections.items() if k in raw})
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ValueError(f"{where}: unknown stage(s) {bad}; stages are {list(STAGES)}")
    if not cfg.attributes:
        raise ValueError(f"{where}: attributes is empty; name at least one of {list(world.SOCIAL)}")
    bad = [a for a in cfg.attributes if a not in world.SOCIAL]
    if bad:
        raise ValueError(f"{where}: unknown attribute(s) {bad}; the judges read {list(world.SOCIAL)}")
    if cfg.model.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{where}: [model] dtype must be float32, float16 or bfloat16, got {cfg.model.dtype!r}")
    steps = cfg.harvest.steps
    late = [s for s in cfg.attribution.steps if not 0 <= s < steps]
    if late:
        raise ValueError(f"{where}: [attribution] steps {late} are outside the harvest's 0..{steps - 1}")
    stored = cfg.harvest.shard_steps
    bad = [s for s in stored if not 0 <= s < steps]
    if bad:
        raise ValueError(f"{where}: [harvest] shard_steps {bad} are outside 0..{steps - 1}")
    missing = [s for s in cfg.attribution.steps if stored and s not in stored]
    if missing:
        raise ValueError(f"{where}: [attribution] steps {missing} are not in [harvest] shard_steps {stored}; "
                         "add them there (IG needs the full h of those steps)")
    if not 0 <= cfg.intervention.from_step < steps:
        raise ValueError(f"{where}: [intervention] from_step must be in 0..{steps - 1}")
    return cfg


EXAMPLES = {
    "sd": '''# Stable Diffusion v1.5 on one GPU: "a photo of a doctor", gender and age, CLIP judge
out = "runs/sd15-doctor"
attributes = ["gender", "age"]

[model]
path = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # or the local folder you downloaded it to
prompt = "a photo of a doctor"
guidance_scale = 7.5
device = "cuda"
dtype = "float16"

[judge]
spec = "clip:weights/clip-vit-large-patch14"   # hf download openai/clip-vit-large-patch14 --local-dir ...

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
''',
    "ddpm": '''# An unconditional CelebA-HQ pixel DDPM (256x256), FairFace judge
out = "runs/celebahq"
attributes = ["gender", "age", "race"]

[model]
path = "google/ddpm-celebahq-256"
device = "cuda"
dtype = "float16"

[judge]
spec = "fairface:weights/res34_fair_align_multi_7_20190809.pt"

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
''',
    "embedded": '''# The book's own portrait model on CPU: ~3 minutes on 2 cores with these small settings, which check the
# plumbing but are too small to move the distribution (measured: FD 0.287 before and after; the SAE
# reaches FVU 0.44 in 300 steps). Chapters 3-5 use 1000 samples x 25 steps and 5000 SAE steps.
out = "runs/embedded-small"
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
''',
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """One configured pipeline run; :meth:`stage` runs one stage, :meth:`all` the configured ones."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self._model = self._judge = None
        self.device = cfg.model.device  # this process's device (one GPU per process under a launcher)
        # under torchrun / accelerate launch every process harvests its share; only rank 0 does the rest
        self.is_main = int(os.environ.get("RANK", "0")) == 0

    # -- what each stage depends on (its settings and every earlier stage's) --
    def key(self, stage: str) -> str:
        c = asdict(self.cfg)
        upto = STAGES[: STAGES.index(stage) + 1]
        parts = {"model": c["model"], "judge": c["judge"]}
        if stage not in ("harvest", "sae"):  # adding an attribute must not redo a (GPU-hours) harvest
            parts["attributes"] = c["attributes"]
        parts.update({s: c[s] for s in upto if s in c})
        return _hash(parts)

    def done(self, stage: str) -> bool:
        return self.state.get(stage, {}).get("key") == self.key(stage)

    def _mark(self, stage: str, info: dict) -> None:
        self.state[stage] = {"key": self.key(stage), **info}
        if self.is_main:
            io.write_json(self.state_path, self.state)

    @property
    def model(self):
        from . import models

        if self._model is None:
            m = self.cfg.model
            self._model = models.load_model(m.path, device=self.device, dtype=getattr(torch, m.dtype), prompt=m.prompt,
                                            guidance_scale=m.guidance_scale, negative_prompt=m.negative_prompt)
        return self._model

    @property
    def judge(self):
        from . import judges

        if self._judge is None:
            kw = {} if self.cfg.judge.spec == "world" else {"device": self.device}
            self._judge = judges.load(self.cfg.judge.spec, **kw)
            missing = [a for a in self.cfg.attributes if a not in self._judge.attributes]
            if missing:
                raise ValueError(f"judge {self.cfg.judge.spec!r} does not read {missing}")
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
            print(f"[{name}] up to date, skipped", flush=True)
            return
        t0 = time.time()
        info = getattr(self, f"_{name}")() or {}
        info["seconds"] = time.time() - t0
        self._mark(name, info)
        print(f"[{name}] done in {info['seconds']:.1f} s", flush=True)

    # -- stages --
    def _harvest(self) -> dict:
        from . import harvest as H

        h = self.cfg.harvest
        settings = H.HarvestSettings(n=h.n, steps=h.steps, seed=h.seed, batch_size=h.batch_size,
                                     shard_dtype=h.shard_dtype, shard_steps=tuple(h.shard_steps) or None)
        folder = self.out / "harvest"
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
        return {"samples": h.n, "processes": state.num_processes}

    def _sae(self) -> dict:
        from . import harvest as H
        from . import sae as S

        c, folder = self.cfg.sae, self.out / "harvest"
        _, _, n_train = self._labels_split()
        rows = H.load_rows(folder, max_rows=c.max_rows or None)
        train = rows["sample"] < n_train
        x, held = rows["x"][train].float(), rows["x"][~train].float()
        width = x.shape[1]
        cfg = S.SAEConfig(d_in=width, expansion=c.expansion, k=c.k or S.scaled_k(width))
        tc = S.SAETrainConfig(steps=c.train_steps, batch_size=min(c.batch_size, len(x)), lr=c.lr,
                              dead_rows=min(S.SAETrainConfig.dead_rows, 50 * len(x)))
        dev = self.device
        sae, hist = S.train_sae(x.to(dev), cfg, tc, progress=self.progress)
        ev = S.evaluate(sae, held.to(dev)) if len(held) else {}
        S.save_sae(sae.cpu(), self.out / "sae.safetensors", meta={"held_out": ev, "rows": len(x)})
        return {"held_out": ev}

    def _labels_split(self):
        """The harvest summary, its labels and the number of leading samples that train the SAE and the
        probe (the rest are held out); the one place the split is computed."""
        from . import harvest as H

        summary = H.load_summary(self.out / "harvest")
        n_train = int(self.cfg.probe.train_share * len(summary.pooled))
        return summary, summary.labels(), n_train

    def _probe(self) -> dict:
        from . import probe as P

        summary, labels, n = self._labels_split()
        attrs = tuple(self.cfg.attributes)
        probe = P.train_probe(summary.pooled[:n], {a: labels[a][:n] for a in attrs},
                              attributes={a: self.judge.attributes[a] for a in attrs},
                              epochs=self.cfg.probe.epochs)
        acc = P.accuracy(probe, summary.pooled[n:], {a: labels[a][n:] for a in attrs}) if n < len(summary.pooled) \
            else None
        acc_d = None if acc is None else acc.to_dict(orient="list")
        P.save_probe(probe, self.out / "probe.safetensors", meta={"held_out_accuracy": acc_d, "train_samples": n})
        return {"held_out_accuracy": acc_d}

    def _attribution(self) -> dict:
        from . import attribution as A
        from . import identify as ID
        from . import probe as P
        from . import sae as S

        summary, labels, n = self._labels_split()
        sae, _ = S.load_sae(self.out / "sae.safetensors")
        probe, _ = P.load_probe(self.out / "probe.safetensors")
        sae.to(self.device)
        probe.to(self.device)
        hs = ID.h_by_step(self.out / "harvest", self.cfg.attribution.steps, torch.arange(n))
        folder = self.out / "attribution"
        folder.mkdir(exist_ok=True)
        tr = {a: labels[a][:n] for a in self.cfg.attributes}
        ranks, counts = {}, {}
        for a in self.cfg.attributes:
            r = A.rank(sae, probe, hs, tr[a], a, per_class=self.cfg.attribution.per_class,
                       n_steps=self.cfg.attribution.ig_steps, progress=self.progress)
            r.save(folder / f"rank_latents_{a}.safetensors")
            ranks[a], counts[a] = r, r.counts
        ID.save_footprints(sae, ranks, hs, tr, folder)
        return {"samples_per_class": counts}

    def _intervention(self) -> dict:
        from . import identify as ID
        from . import intervention as I
        from . import models
        from . import sae as S

        c, folder = self.cfg.intervention, self.out / "intervention"
        folder.mkdir(exist_ok=True)
        sae, _ = S.load_sae(self.out / "sae.safetensors")
        sae.to(self.device)
        steps = self.cfg.harvest.steps
        noise = models.make_noise(c.n, self.model.sample_size, c.seed, self.model.channels)
        orig = models.sample(self.model, noise=noise, steps=steps, batch_size=c.batch_size, progress=self.progress)
        self._save_images(folder / "original.safetensors", orig, None)
        skipped = {}
        for a in self.cfg.attributes:
            k = len(world.ATTRIBUTES[a])
            try:
                e = ID.edit_for(a, c.beta, target=[1 / k] * k, k=c.k, steps=range(c.from_step, steps),
                                folder=self.out / "attribution")
            except ValueError as err:  # a class the harvest never produced has no ranked features
                skipped[a] = str(err)
                continue
            imgs, iv = I.sample_edited(self.model, sae, [e], noise=noise, steps=steps, batch_size=c.batch_size)
            self._save_images(folder / f"edited_{a}.safetensors", imgs, iv.classes(a))
        return {"skipped": skipped} if skipped else {}

    def _save_images(self, path, images, classes):
        probs = self.judge.predict(images)
        t = io.prefixed("probs", probs)
        t["features"] = self.judge.features(images)
        t["images"] = (images * 255).round().to(torch.uint8)
        if classes is not None:
            t["classes"] = classes
        io.save_tensors(path, t)

    def _metrics(self) -> dict:
        from . import metrics as M

        folder = self.out / "intervention"
        o, _ = io.load_tensors(folder / "original.safetensors")
        oprobs = io.unprefixed("probs", o)
        res = {}
        for a in self.cfg.attributes:
            p = folder / f"edited_{a}.safetensors"
            if not p.is_file():
                continue
            e, _ = io.load_tensors(p)
            eprobs = io.unprefixed("probs", e)
            k = eprobs[a].shape[1]
            others = [b for b in eprobs if b != a]
            row = {"FD original": M.fairness_discrepancy(oprobs[a].argmax(-1), k),
                   "FD edited": M.fairness_discrepancy(eprobs[a].argmax(-1), k),
                   "FD edited CI": M.fd_bootstrap(eprobs[a].argmax(-1), k, n_boot=500),
                   "FD floor": M.fd_floor(len(eprobs[a]), k, n_sim=2000),
                   "share original": torch.bincount(oprobs[a].argmax(-1), minlength=k).div(len(oprobs[a])).tolist(),
                   "share edited": torch.bincount(eprobs[a].argmax(-1), minlength=k).div(len(eprobs[a])).tolist(),
                   "keep other attributes": M.keep_rate(oprobs, eprobs, others) if others else None,
                   "similarity": float(torch.nn.functional.cosine_similarity(
                       e["features"].float(), o["features"].float(), dim=1).mean()),
                   "FID edited vs original": M.fid_from_features(o["features"].float(), e["features"].float())
                   if len(o["features"]) > 1 else None}
            if hasattr(self.judge, "clip_t") and self.cfg.model.prompt:
                row["CLIP-T original"] = float(self.judge.clip_t(o["images"], self.cfg.model.prompt).mean())
                row["CLIP-T edited"] = float(self.judge.clip_t(e["images"], self.cfg.model.prompt).mean())
            res[a] = row
        io.write_json(self.out / "metrics.json", res)
        return {"attributes": list(res)}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline from a config file")
    r.add_argument("config")
    r.add_argument("--stages", nargs="+", help=f"only these stages (of {', '.join(STAGES)})")
    r.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("example-config", help="print an example config")
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
        state = Run(cfg, progress=not a.no_progress).all(a.stages)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in state.items()}, indent=1))
    return 0
