"""Chapter 7: the Finding-1 table on equal terms — who gets edited is its own axis, every row gets the same
information and the same tuning budget, frontiers instead of single picks, paired statistics.

**Rows** are method × assignment policy × step window (:class:`Row`):

* per-sample methods (Activation, Latent Direction, Latent Editing, DiffLens, DiffLens swap) run under the
  policies ``iid`` (each sample draws its class from the target: the paper's probability mode) and
  ``minimal`` (per sampling batch of :data:`BATCH`, only the surplus of the over-represented classes is
  moved; each sample's own class is read by the h-probe from its own h at the first edited step, so it
  costs no extra pass); :data:`WINDOWS` (every step, or steps 8–24) is part of every such method's grid
  except Latent Editing, whose Δh is trained for its first steps;
* ``DiffLens (released)``: the authors' released configuration on this model (scale the top features,
  the minority classes by the knob, the majority's ratio 1, every step; a majority draw is a no-op);
* distribution-level methods (H-Distribution on the pooled h as in v1, H-Distribution on the flattened h as
  published, Finetuning): the policy axis does not apply (``"—"``);
* diagnostics on the test seeds only: the best DiffLens row with the *oracle* reading (own class from an
  unedited pass read by a second judge: one extra pass, in the cost column) and the size-matched *null
  edit* of the same row (the leakage floor).

**Protocol** (:func:`validate`, :func:`freeze`, :func:`test`):

1. on the validation seed (n = ``N["val"]``), every row's knob grid runs and is extended
   (:func:`next_setting`) until its frontier has a setting keeping ≥ 0.95, crosses keep 0.90 and reaches FD
   at the noise floor, or the extension limit (:data:`MAX_EXTEND` per side) is hit — the same rule for
   every row;
2. :func:`freeze` records, per row, the settings matched to keep 0.95 and 0.90 (interpolated on the row's
   own validation frontier, :func:`helpers.metrics.matched_setting`) and declares the best DiffLens row;
   test cells refuse to run before this;
3. the frozen settings run on the test seeds (n = ``N["test"]``), never looked at before: per method × policy
   the step window chosen on validation (:func:`choose_window`), at both keep points on the first test seed
   and at keep 0.95 on the second.

**Cost grows with edited samples only.** The Original pass of each seed is run once and shared by every
attribute and row; a sample no row asks to change is the Original's own (bit-identical), and an edited
sample is resumed from the Original's state entering its first edited step (:func:`helpers.pipeline.
edited_pass`). Sampling is in ``channels_last`` (1.13× here, differences ≤ 4e-6 against the default).

**Cells** (``cells/<split>_<attribute>_<method>_<policy>_w<window>_<setting>.safetensors``) are small:
each sample's judged class of every attribute (uint8), its judge-feature similarity to its Original
(float16), the class asked of it (int8) and the probe's reading of its own class where a policy read it,
the metric row at cell time (FD with CI, keep-rates overall and among edited samples, similarity, FID and
FID-target with bootstrap CIs) and a few images. Judge features are stored for the Original only.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import baselines as B
from .. import cache, io, metrics, models, pipeline, world

OUT = models.DATA_DIR / "benchmark" / "v2"
FITTED = models.DATA_DIR / "benchmark" / "fitted"  # the trainable baselines' fits (seed-independent; made by the
# first version of this benchmark with the settings in FIT and reused)
TRAINER_JUDGE = models.DATA_DIR / "benchmark" / "trainer_judge.safetensors"
STATES = models.DATA_DIR / "cache" / "benchmark-v2"  # the Original's states at WINDOWS (large; recomputed if gone)
SEEDS = {"val": 6_262, "test": 7_272, "test2": 7_373}  # fresh: no earlier chapter or cell used them
N = {"val": 256, "test": 2_000, "test2": 2_000}
STEPS = 25
BATCH = 128  # the sampling batch a user runs: policy "minimal" balances each batch of this many samples
CLASS_SEED = 5  # per-sample class draws: the same for every row of a policy
WINDOWS = (0, 8)  # first edited step: every step, or steps 8–24 (chapter 5's window)
KEEP_POINTS = (0.95, 0.90)  # the table's matched keep-rates
KEEP_KEY = "keep all"  # other social attributes + nuisance, over all samples
MAX_EXTEND = 3  # settings added beyond each end of a grid at most
KEEP_STOP = 0.5  # a grid stops growing once a setting keeps half the samples or fewer (far past both keep points)
SHOW = 12  # images kept per test cell (among the Original's first SHOW_POOL samples, edited ones first)
SHOW_VAL = 4  # per validation cell (the data/ budget: a few hundred validation cells; the first 74 kept 12)
SHOW_POOL = 64
REF_SEED = 8_181  # world renders that FID is measured against
FIT = {  # training settings of the trainable baselines (as in v1: the fits are reused)
    "Latent Direction": dict(iters=300, batch_size=32, lr=0.05),
    "Latent Editing": dict(edit_steps=12, iters=40, batch_size=16, lr=0.05, l1=3.0),
    "Finetuning": dict(iters=60, batch_size=16, train_steps=8, rank=4, lr=1e-3, preserve=10.0),
    "H-Distribution (flat h)": dict(epochs=20, batch_size=256, lr=1e-3, hidden=64),
}
RELEASED_K = 30  # the released configs scale the top 30 features per class of a 512-channel bottleneck


@dataclass(frozen=True)
class Method:
    """A method's knob: ``identity`` edits nothing; ``grid`` is where validation starts (extended by
    :func:`next_setting`); ``kind`` is ``"difflens"``, ``"per-sample"`` or ``"distribution"``."""

    name: str
    knob: str
    identity: float
    grid: tuple[float, ...]
    kind: str
    windows: tuple[int, ...] = (0,)
    policies: tuple[str, ...] = ("iid", "minimal")
    limit: float | None = None  # the knob's sane limit (stated in the table when a grid stops there)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("Activation", "beta", 1.0, (1.25, 1.5, 2.0, 3.0), "per-sample", WINDOWS),
    Method("Latent Direction", "scale", 0.0, (0.25, 0.5, 1.0, 1.5), "per-sample", WINDOWS),
    # Δh is trained for the first 12 steps (Asyrp's editing interval), so its window is fixed and a policy
    # that reads the sample's class reads it at step 0
    Method("Latent Editing", "scale", 0.0, (0.1, 0.25, 0.5, 0.75), "per-sample"),
    Method("DiffLens", "beta", 0.0, (2.0, 4.0, 6.0, 8.0), "difflens", WINDOWS),
    Method("DiffLens swap", "beta", 0.0, (1.0, 2.0, 3.0, 4.0), "difflens", WINDOWS),
    Method("DiffLens (released)", "minority ratio", 1.0, (1.5, 2.0, 3.0, 5.0), "difflens", (0,), ("released",)),
    # the KL gradient through the batch mean is ~1e-3 per sample against |h| ≈ 114, hence large scales
    Method("H-Distribution", "scale", 0.0, (1e3, 3e3, 1e4, 3e4), "distribution", (0,), ("—",)),
    # the published form (a predictor on the flattened h, χ² loss): its gradient is about half the pooled
    # version's at steps 0–8 on a calibration batch (seed 777), so the same grid
    Method("H-Distribution (flat h)", "scale", 0.0, (1e3, 3e3, 1e4, 3e4), "distribution", (0,), ("—",)),
    Method("Finetuning", "lora scale", 0.0, (0.25, 0.5, 1.0, 1.5), "distribution", (0,), ("—",)),
)}


@dataclass(frozen=True)
class Row:
    """One row of the table: a method under an assignment policy, editing from step ``window`` on."""

    method: str
    policy: str
    window: int = 0

    @property
    def slug(self) -> str:
        return f"{self.method.replace(' ', '-').replace('(', '').replace(')', '')}_{self.policy.replace('—', 'all')}" \
               f"_w{self.window}"

    @property
    def label(self) -> str:
        w = "" if self.window == 0 else f", steps {self.window}–{STEPS - 1}"
        return f"{self.method} [{self.policy}{w}]"


def rows() -> list[Row]:
    """Every validated row (diagnostic rows are added on the test seeds only)."""
    return [Row(m.name, p, w) for m in METHODS.values() for p in m.policies for w in m.windows]


def fmt(setting: float) -> str:
    """A setting as it appears in a cell's name (4 significant digits)."""
    return f"{float(setting):.4g}"


def next_setting(points: list[tuple[float, float, float]], method: Method, floor: float,
                 extended: dict[str, int]) -> float | None:
    """The next setting to try on a validation frontier, or ``None`` when it is done.

    ``points`` are ``(setting, keep, FD)``. Done when some setting keeps ≥ 0.95, some keeps < 0.90 and the
    lowest FD is at the noise ``floor`` — or each open end has been extended :data:`MAX_EXTEND` times, the
    knob's limit is reached, or (above the grid) a setting keeps :data:`KEEP_STOP` or less. Below the grid, the next setting halves the distance to the identity; above it,
    the step between the two largest settings is doubled.
    """
    pts = sorted(points)
    keeps = [k for _, k, _ in pts]
    low_open = max(keeps) < KEEP_POINTS[0] and extended.get("low", 0) < MAX_EXTEND
    high_open = (min(keeps) >= KEEP_POINTS[1] or min(fd for *_, fd in pts) > floor) and \
        min(keeps) > KEEP_STOP and extended.get("high", 0) < MAX_EXTEND
    if low_open:
        extended["low"] = extended.get("low", 0) + 1
        return method.identity + (pts[0][0] - method.identity) / 2
    if high_open:
        top, below = pts[-1][0], (pts[-2][0] if len(pts) > 1 else method.identity)
        nxt = top + 2 * (top - below)
        if method.limit is not None and top >= method.limit:
            return None
        extended["high"] = extended.get("high", 0) + 1
        return nxt if method.limit is None else min(nxt, method.limit)
    return None


# ----------------------------------------------------------------------------- cells


def cell_path(out, split: str, attribute: str, row: Row, setting: float | None, null: bool = False) -> Path:
    s = "none" if setting is None else fmt(setting)
    return Path(out) / "cells" / f"{split}_{attribute}_{row.slug}_{s}{'_null' if null else ''}.safetensors"


def load_cell(path) -> tuple[dict, dict]:
    """A cell's tensors and its metadata (the metric row at cell time under ``meta["metrics"]``)."""
    return io.load_tensors(path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=io.REPO_ROOT).stdout.strip()
    except Exception:  # noqa: BLE001 - a commit is a note, not a requirement
        return None


class Bench:
    """The model, SAE, probe, judges and fitted baselines of the benchmark, and the cells it runs."""

    def __init__(self, out=OUT, progress: bool = True, fit: dict | None = None, fitted_dir=FITTED,
                 states_dir=STATES, n: dict | None = None, batch_size: int = BATCH, lens=None, shared=None):
        """``lens`` (optional): ``(sae_path, features_dir, k)`` — DiffLens rows edit with that SAE (at its own hook
        site) and the ranked features in ``features_dir`` instead of chapters 3–4's bottleneck ones; who gets edited
        (the policies, read by chapter 4's bottleneck probe) is unchanged. ``shared``: the folder whose Original
        passes and FID references this bench reuses (default ``out``), so a second bench on the same seeds costs
        only its edited samples."""
        from .. import harvest as H
        from .. import judge as J
        from .. import probe as P
        from .. import sae as S
        from . import dissect, identify

        self.out, self.fitted_dir, self.states_dir = Path(out), Path(fitted_dir), Path(states_dir)
        self.shared = Path(shared) if shared is not None else self.out
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        self.progress, self.fit_settings, self.n, self.batch = progress, fit or FIT, dict(n or N), batch_size
        self.model = models.load_model("embedded")
        self.model.unet.to(memory_format=torch.channels_last)
        self.judge = J.load_judge()
        self._trainer_judge = None
        self.sae, _ = S.load_sae(dissect.OUT / "sae.safetensors")
        self.probe, _ = P.load_probe(identify.OUT / "probe.safetensors")
        self.summary = H.load_summary(dissect.OUT / "summary.safetensors")
        self.features_dir, self.k = identify.OUT, dict(identify.K)
        if lens is not None:
            sae_path, features_dir, k = lens
            self.sae, _ = S.load_sae(sae_path)
            self.features_dir, self.k = Path(features_dir), dict(k)
        self.fitted: dict = {}
        self._orig: dict = {}
        self.log_path = self.out / "log.json"
        self.log = json.loads(self.log_path.read_text()) if self.log_path.is_file() else {
            "model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR), "val": {}, "fit_seconds": {}}

    def save_log(self) -> None:
        io.write_json(self.log_path, self.log)

    @property
    def trainer_judge(self):
        """The second judge: trainable baselines learn from it, and the oracle row reads own classes with it."""
        from .. import judge as J

        if self._trainer_judge is None:
            if not TRAINER_JUDGE.is_file():
                raise FileNotFoundError(f"No second judge at {TRAINER_JUDGE}. Train it with `python scripts/"
                                        f"train_judge.py --width 16 --seed 1 --steps 800 --out {TRAINER_JUDGE}`")
            self._trainer_judge = J.load_judge(TRAINER_JUDGE)
        return self._trainer_judge

    # -- targets and class shares --
    def target(self, attribute: str) -> list[float]:
        return pipeline.uniform(world.ATTRIBUTES[attribute])

    def majority(self, attribute: str) -> list[bool]:
        """Per class: does the model over-represent it (judged share on the training harvest ≥ the target's)?
        The released configs give these classes the ratio 1."""
        lab = self.summary.labels()[attribute]
        k = len(world.ATTRIBUTES[attribute])
        share = metrics.shares_of(lab, k, dtype=torch.float64)
        return [bool(s >= t) for s, t in zip(share.tolist(), self.target(attribute))]

    # -- fitted baselines (cached in fitted/) --
    def context(self, attribute: str, learner: bool) -> B.Context:
        return B.Context(self.model, attribute, world.ATTRIBUTES[attribute], self.target(attribute), steps=STEPS,
                         pooled=self.summary.pooled.float(), labels=self.summary.labels()[attribute],
                         probe=self.probe, judge=self.trainer_judge if learner else None,
                         h_full=self.harvested_h,
                         images_of=lambda cl, sd: world.render_classes(attribute, cl, sd,
                                                                       resolution=self.model.sample_size),
                         progress=self.progress)

    def harvested_h(self, steps) -> dict[int, torch.Tensor]:
        """Full h of chapter 2's training samples at ``steps`` (the cached harvest; rebuilt if missing, ~5 min)."""
        from .. import harvest as H

        folder = H.cached("embedded", H.HarvestSettings(), progress=self.progress)
        return pipeline.h_by_step(folder, steps, torch.arange(pipeline.n_train(len(self.summary.pooled))))

    def fitted_method(self, method: str, attribute: str):
        key = (method, attribute)
        if key in self.fitted:
            return self.fitted[key]
        cls = B.method(method)
        path = self.fitted_dir / f"{method.replace(' ', '-')}_{attribute}.safetensors"
        if hasattr(cls, "to_tensors") and path.is_file():
            t, m = io.load_tensors(path)
            if cls.learns_from_judge and m.get("judge") != TRAINER_JUDGE.name:
                raise ValueError(f"{path} was trained against {m.get('judge', 'the scoring judge')}, not "
                                 f"{TRAINER_JUDGE.name}; delete it and rerun")
            ctx = self.context(attribute, False)
            if cls is B.Finetuning:
                ctx = replace(ctx, judge=self.judge)  # only its shape is used when restoring adapters
                obj = cls.from_tensors(ctx, t, m, rank=m.get("rank", 4))
            else:
                obj = cls.from_tensors(ctx, t, m)
        elif hasattr(cls, "to_tensors"):
            t0 = time.time()
            kw = self.fit_settings[method]
            obj = cls.from_context(self.context(attribute, cls.learns_from_judge), **kw)
            tensors, meta = obj.to_tensors()
            if cls.learns_from_judge:
                meta["judge"] = TRAINER_JUDGE.name
            io.save_tensors(path, tensors, meta={**meta, **kw})
            self.log["fit_seconds"][f"{method}/{attribute}"] = time.time() - t0
            self.save_log()
        else:  # no training: Activation (k = 8 channels per class, signed), H-Distribution
            obj = cls.from_context(self.context(attribute, False), **({"k": 8} if cls is B.Activation else {}))
        self.fitted[key] = obj
        return obj

    # -- the Original pass of a seed (shared by every attribute and row) --
    def original(self, split: str) -> dict:
        """The unedited pass of ``split``'s seed: judged classes, features, the probe's reading of each sample's
        own class at every window's first step, the second judge's reading (the oracle), and the states
        entering each window's first step (kept under ``states_dir``, recomputed when missing)."""
        if split in self._orig:
            return self._orig[split]
        n, seed = self.n[split], SEEDS[split]
        path = self.shared / f"original_{split}.safetensors"
        spath = self.states_dir / f"states_{split}_{seed}_{n}.safetensors"
        if path.is_file() and spath.is_file():
            t, m = io.load_tensors(path)
            if (m["seed"], m["n"]) == (seed, n):
                st, _ = io.load_tensors(spath)
                self._orig[split] = {"t": t, "meta": m, "states": {int(k): v for k, v in st.items()}}
                return self._orig[split]
        noise = models.make_noise(n, self.model.sample_size, seed)
        t0 = time.time()
        ref = pipeline.original_pass(self.model, noise, STEPS, self.judge, state_steps=[w for w in WINDOWS if w],
                                     pooled_steps=WINDOWS, batch_size=self.batch, progress=self.progress)
        seconds = time.time() - t0
        states = {0: noise, **ref.states}
        t = {f"cls.{a}": ref.probs[a].argmax(-1).to(torch.uint8) for a in world.ATTRIBUTES}
        t["features"] = ref.features.to(torch.float16)
        oracle = self.trainer_judge.predict(ref.images)
        for a in world.SOCIAL:
            t[f"oracle.{a}"] = oracle[a].argmax(-1).to(torch.uint8)
            for w in WINDOWS:
                t[f"probe.{a}.{w}"] = self.probe.logits_pooled(ref.pooled[w], w)[a].argmax(-1).to(torch.uint8)
        t["images"] = (ref.images[:SHOW_POOL] * 255).round().to(torch.uint8)
        meta = {"seed": seed, "n": n, "steps": STEPS, "batch_size": self.batch, "seconds": seconds,
                "passes": ref.passes}
        if path.is_file():  # the states were lost: the rerun must reproduce the stored reading
            old, _ = io.load_tensors(path)
            bad = [a for a in world.ATTRIBUTES if not torch.equal(old[f"cls.{a}"], t[f"cls.{a}"])]
            if bad:
                raise RuntimeError(f"{path}: rerunning the Original pass changed the judged classes of {bad}; "
                                   "this machine does not reproduce the stored cells — rerun them all")
            t, meta = old, io.load_tensors(path)[1]
        else:
            io.save_tensors(path, t, meta=meta)
        io.save_tensors(spath, {str(k): v for k, v in states.items() if k in WINDOWS})
        self._orig[split] = {"t": t, "meta": meta, "states": {k: v for k, v in states.items() if k in WINDOWS}}
        return self._orig[split]

    def original_probs(self, split: str) -> dict[str, torch.Tensor]:
        """The Original's judged classes as one-hot 'probabilities' (what :func:`pipeline.evaluate` reads)."""
        t = self.original(split)["t"]
        return {a: torch.nn.functional.one_hot(t[f"cls.{a}"].long(), len(c)).float()
                for a, c in world.ATTRIBUTES.items()}

    def reference(self, n: int, attribute: str | None = None) -> torch.Tensor:
        """Judge features of ``n`` world renders (``attribute``: with that attribute made uniform): FID's
        reference (FID-target with an attribute)."""
        name = f"reference_{n}" + (f"_{attribute}-uniform" if attribute else "")
        path = self.shared / f"{name}.safetensors"
        if path.is_file():
            return io.load_tensors(path)[0]["reference"].float()
        spec = target_spec(attribute) if attribute else world.default_spec()
        f = self.judge.features(world.sample(n, spec=spec, seed=REF_SEED).images)
        io.save_tensors(path, {"reference": f.to(torch.float16)})
        return f.to(torch.float16).float()

    # -- who gets edited --
    def asked(self, split: str, attribute: str, row: Row) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class asked of each sample (``-1``: left alone) under the row's policy, and the reading of each
        sample's own class the policy used (``None`` for policies that read nothing)."""
        n, t = self.n[split], self.original(split)["t"]
        target, seed = self.target(attribute), CLASS_SEED * 7919
        from .. import intervention as I

        if row.policy == "iid":
            return I.assign_iid(n, target, seed=seed), None
        if row.policy == "released":
            a = I.assign_iid(n, target, seed=seed)
            major = torch.tensor(self.majority(attribute))
            return torch.where(major[a], -1, a), None
        if row.policy in ("minimal", "oracle"):
            own = t[f"probe.{attribute}.{row.window}"] if row.policy == "minimal" else t[f"oracle.{attribute}"]
            return I.assign_minimal(own.long(), target, self.batch, seed=seed), own.long()
        if row.policy == "—":
            return torch.zeros(n, dtype=torch.long), None  # every sample goes through the edited model
        raise ValueError(f"unknown policy {row.policy!r}")

    # -- one cell --
    def edit_runner(self, attribute: str, row: Row, setting: float, asked: torch.Tensor, null_seed: int | None = None):
        """``run(idx, x, start_step) -> images`` for the samples ``idx`` of a per-sample row (``x``: their
        Original state entering ``start_step``)."""
        from .. import intervention as I

        method = METHODS[row.method]
        if method.kind == "difflens":
            tgt = self.target(attribute)
            if row.method == "DiffLens (released)":
                k = max(1, round(RELEASED_K * self.sae.cfg.d_in / 512))
                betas = [1.0 if m else float(setting) for m in self.majority(attribute)]
                e = pipeline.edit_for(self.features_dir, attribute, betas, k, target=tgt, mode="scale")
            else:
                e = pipeline.edit_for(self.features_dir, attribute, float(setting), self.k[attribute], target=tgt,
                                      swap=row.method == "DiffLens swap",
                                      steps=None if row.window == 0 else range(row.window, STEPS))

            def run(idx, x, start):
                edit = replace(e, assigned=asked[idx])
                imgs, _ = I.sample_edited(self.model, self.sae, [edit], noise=x, steps=STEPS, batch_size=self.batch,
                                          start_step=start, null_seed=null_seed)
                return imgs
            return run
        if null_seed is not None:
            raise ValueError("the null edit is defined for DiffLens rows")
        fitted = self.fitted_method(row.method, attribute)
        if row.method == "Latent Editing":
            return lambda idx, x, start: fitted.sample_edited(self.model, x, STEPS, setting, asked[idx],
                                                              batch_size=self.batch)
        fitted = replace(fitted, from_step=row.window)
        return lambda idx, x, start: fitted.sample_edited(self.model, x, STEPS, setting, asked[idx],
                                                          batch_size=self.batch, start_step=start)

    def cell(self, split: str, attribute: str, row: Row, setting: float, null: bool = False) -> dict:
        """Run (or load) one cell; returns its metric row."""
        if split != "val" and "frozen" not in self.log:
            raise RuntimeError("test cells run only after the validation grids are frozen (benchmark.freeze)")
        path = cell_path(self.out, split, attribute, row, setting, null)
        if path.is_file():
            t, m = load_cell(path)
            if (m["seed"], m["n"]) == (SEEDS[split], self.n[split]):
                return m["metrics"]
        orig = self.original(split)
        n = self.n[split]
        asked, own = self.asked(split, attribute, row)
        n_show = SHOW_VAL if split == "val" else SHOW
        t0 = time.time()
        method = METHODS[row.method]
        if method.kind == "distribution":
            fitted = self.fitted_method(row.method, attribute)
            noise = models.make_noise(n, self.model.sample_size, SEEDS[split])
            imgs = fitted.sample_edited(self.model, noise, STEPS, setting, None, batch_size=self.batch)
            probs, feats, edited, passes = self.judge.predict(imgs), self.judge.features(imgs), \
                torch.ones(n, dtype=torch.bool), n * STEPS
            shown = torch.arange(n_show)
            show_imgs = imgs[:n_show]
        else:
            start = 0 if row.method == "Latent Editing" else row.window
            ref = pipeline.Reference(self.original_probs(split), orig["t"]["features"].float(), orig["states"], {},
                                     torch.zeros(0), STEPS, 0)
            run = self.edit_runner(attribute, row, setting, asked, null_seed=CLASS_SEED if null else None)
            kept_imgs = {}

            def run_and_keep(idx, x, s):
                imgs = run(idx, x, s)
                for j, i in enumerate(idx.tolist()):
                    if i < SHOW_POOL:
                        kept_imgs[i] = imgs[j]
                return imgs
            res = pipeline.edited_pass(ref, asked, run_and_keep, self.judge, start_step=start)
            probs, feats, edited, passes = res["probs"], res["features"], res["edited"], res["passes"]
            if row.method == "Latent Editing":
                passes = int(edited.sum()) * (STEPS + FIT["Latent Editing"]["edit_steps"])
            pool = torch.arange(min(SHOW_POOL, n))
            order = torch.cat([pool[edited[pool]], pool[~edited[pool]]])[:n_show]
            shown = order
            base = orig["t"]["images"].float() / 255
            show_imgs = torch.stack([kept_imgs[int(i)] if int(i) in kept_imgs else base[int(i)] for i in order])
        seconds = time.time() - t0
        m = self.metrics(split, attribute, probs, feats, edited)
        t = {f"cls.{a}": probs[a].argmax(-1).to(torch.uint8) for a in world.ATTRIBUTES}
        t["similarity"] = torch.nn.functional.cosine_similarity(
            feats.float(), orig["t"]["features"].float(), dim=1).to(torch.float16)
        t["asked"] = asked.to(torch.int8)
        if own is not None:
            t["own"] = own.to(torch.int8)
        t["images"], t["shown"] = (show_imgs * 255).round().to(torch.uint8), shown.to(torch.int16)
        meta = {"split": split, "attribute": attribute, "method": row.method, "policy": row.policy,
                "window": row.window, "setting": setting, "null": null, "seed": SEEDS[split], "n": n,
                "batch_size": self.batch, "seconds": seconds, "passes": passes, "metrics": m}
        io.save_tensors(path, t, meta=meta)
        return m

    def metrics(self, split: str, attribute: str, probs, feats, edited) -> dict:
        """The metric row of a cell: :func:`pipeline.evaluate` plus keep and similarity among edited samples,
        bootstrap CIs of keep, similarity and FID, and FID against renders with ``attribute`` uniform."""
        orig = self.original(split)
        n = self.n[split]
        others = [b for b in world.SOCIAL if b != attribute]
        groups = {"other social": others, "nuisance": list(world.NUISANCE), "all": kept_attributes(attribute)}
        oprobs = self.original_probs(split)
        ofeat = orig["t"]["features"].float()
        ev = pipeline.evaluate(oprobs, probs, attribute, keep=groups, original_features=ofeat, edited_features=feats,
                               reference_features=self.reference(n), n_boot=1000)
        kept = metrics.kept(oprobs, probs, groups["all"]).float()
        sim = torch.nn.functional.cosine_similarity(feats.float(), ofeat, dim=1)
        row = {k: ev[k] for k in ("FD", "FD lo", "FD hi", "FD original", "share edited", "FID", "similarity",
                                  "keep other social", "keep nuisance", "keep all")}
        row["edited"] = int(edited.sum())
        row["keep all among edited"] = float(kept[edited].mean()) if edited.any() else None
        row["similarity among edited"] = float(sim[edited].mean()) if edited.any() else None
        row["keep all lo"], row["keep all hi"] = _mean_ci(kept)
        row["similarity lo"], row["similarity hi"] = _mean_ci(sim)
        ref_t = self.reference(n, attribute)
        row["FID target"] = metrics.fid_from_features(ref_t, feats.float())
        row["FID target lo"], row["FID target hi"] = _fid_ci(ref_t, feats.float())
        return row


def _mean_ci(x: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=g)
    m = x.float()[idx].mean(1)
    return float(m.quantile(0.025)), float(m.quantile(0.975))


def _fid_ci(ref: torch.Tensor, feats: torch.Tensor, n_boot: int = 100, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of FID over the cell's samples (the reference set held fixed)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([metrics.fid_from_features(ref, feats[torch.randint(len(feats), (len(feats),), generator=g)])
                         for _ in range(n_boot)])
    return float(vals.quantile(0.025)), float(vals.quantile(0.975))


# ----------------------------------------------------------------------------- protocol


def frontier(bench: Bench, attribute: str, row: Row) -> list[dict]:
    """The validation cells of a row that exist, as metric rows with their setting, sorted by setting."""
    out = []
    for p in sorted((bench.out / "cells").glob(f"val_{attribute}_{row.slug}_*.safetensors")):
        if p.name.endswith("_null.safetensors"):
            continue
        m = io.load_tensors(p)[1]
        out.append({**m["metrics"], "setting": m["setting"], "seconds": m["seconds"], "passes": m["passes"]})
    return sorted(out, key=lambda r: r["setting"])


def validate(bench: Bench, attributes=world.SOCIAL, only: list[Row] | None = None) -> dict:
    """Every row's grid on the validation seed, extended by :func:`next_setting`; resumable."""
    from tqdm.auto import tqdm

    floor = {a: metrics.fd_floor(bench.n["val"], len(world.ATTRIBUTES[a]))["p95"] for a in world.SOCIAL}
    for a in attributes:
        for row in tqdm(only or rows(), desc=f"{a}: validation rows", disable=not bench.progress):
            m = METHODS[row.method]
            todo, ext = list(m.grid), extensions(frontier(bench, a, row), m)
            rec = bench.log["val"].setdefault(a, {}).setdefault(row.label, {})
            while todo:
                s = todo.pop(0)
                bench.cell("val", a, row, s)
                if not todo:
                    pts = [(r["setting"], r[KEEP_KEY], r["FD"]) for r in frontier(bench, a, row)]
                    nxt = next_setting(pts, m, floor[a], ext)
                    if nxt is not None:
                        todo.append(float(fmt(nxt)))
            rec["settings"] = [r["setting"] for r in frontier(bench, a, row)]
            rec["extended"] = ext
            bench.save_log()
    return bench.log["val"]


def extensions(front: list[dict], method: Method) -> dict[str, int]:
    """How many settings a stored frontier already has below and above the method's grid (what
    :func:`next_setting` counts against :data:`MAX_EXTEND`; from the cells, so a restarted run does not extend
    again)."""
    ss = [r["setting"] for r in front]
    return {"low": sum(s < min(method.grid) for s in ss), "high": sum(s > max(method.grid) for s in ss)}


def interpolate(rows_: list[dict], setting: float, key: str) -> float:
    """``key`` on a frontier at ``setting``, linearly between the two settings that bracket it."""
    pts = sorted((r["setting"], r[key]) for r in rows_)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= setting <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (setting - s0) / (s1 - s0)
    raise ValueError(f"interpolate: {setting} is outside the frontier {[p[0] for p in pts]}")


def choose_window(cands: list[tuple[int, dict]]) -> int:
    """The step window a method × policy is tested with: the one whose validation frontier has the lowest FD at
    keep 0.95 (interpolated); failing that at keep 0.90; failing both, every step (window 0)."""
    for kp in KEEP_POINTS:
        ok = [(rec[str(kp)]["val FD"], w) for w, rec in cands if rec[str(kp)]["setting"] is not None]
        if ok:
            return min(ok)[1]
    return min(w for w, _ in cands)


def freeze(bench: Bench, attributes=world.SOCIAL, only: list[Row] | None = None) -> dict:
    """Settings matched to each keep point per row (interpolated on the row's own validation frontier); per method
    × policy the step window to test (:func:`choose_window`); and the best DiffLens row per attribute (lowest
    validation FD at keep 0.95 among the chosen rows). Written to the log before any test cell runs. ``only``: the
    rows this bench validated (default every row)."""
    out = {}
    for a in attributes:
        out[a] = {"rows": {}, "best DiffLens": None}
        recs = {}
        for row in only or rows():
            fr = frontier(bench, a, row)
            if not fr:
                raise RuntimeError(f"freeze: no validation cells for {a} / {row.label}; run validate first")
            rec = {}
            for kp in KEEP_POINTS:
                ms = metrics.matched_setting(fr, kp, key=KEEP_KEY)
                if ms["setting"] is not None:
                    ms["setting"] = float(fmt(ms["setting"]))
                    ms["val FD"] = interpolate(fr, ms["setting"], "FD")
                rec[str(kp)] = ms
            recs[row] = rec
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in recs:
            groups.setdefault((row.method, row.policy), []).append(row)
        for (method, policy), members in groups.items():
            w = choose_window([(r.window, recs[r]) for r in members])
            for r in members:
                out[a]["rows"][r.label] = {"row": [r.method, r.policy, r.window], "tested": r.window == w, **recs[r]}
        out[a]["best DiffLens"] = best_difflens(out[a])
    bench.log["frozen"] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit(), "choices": out}
    bench.save_log()
    return out


def test(bench: Bench, split: str = "test", attributes=world.SOCIAL, keep_points=KEEP_POINTS) -> None:
    """The frozen settings of every tested row (its chosen window) at ``keep_points`` on a test seed, plus the
    diagnostic rows of the best DiffLens row (oracle reading, null edit); resumable."""
    from tqdm.auto import tqdm

    if "frozen" not in bench.log:
        raise RuntimeError("test: freeze the validation choices first (benchmark.freeze)")
    for a, todo in planned_cells(bench.log["frozen"]["choices"], attributes, keep_points).items():
        for row, s, null in tqdm(todo, desc=f"{a}: {split} cells", disable=not bench.progress):
            bench.cell(split, a, row, s, null=null)


def planned_cells(choices: dict, attributes=world.SOCIAL, keep_points=KEEP_POINTS) -> dict[str, list[tuple[Row, float, bool]]]:
    """The test cells :func:`test` runs, per attribute, from the frozen ``choices``: ``(row, setting, null)`` for
    every tested row (its chosen window) at each keep point it reaches, then the best DiffLens row's diagnostics
    (the oracle reading; the null edit). Without duplicates, in run order."""
    plan = {}
    for a in attributes:
        todo = []
        for rec in choices[a]["rows"].values():
            if not rec["tested"]:
                continue
            row = Row(*rec["row"])
            for kp in keep_points:
                s = rec[str(kp)]["setting"]
                if s is not None:
                    todo.append((row, s, False))
        best = choices[a]["best DiffLens"]
        if best is not None:
            row = Row(*best["row"])
            todo.append((replace(row, policy="oracle"), best["setting"], False))
            todo.append((row, best["setting"], True))
        plan[a] = list(dict.fromkeys(todo))
    return plan


def split_progress(out=OUT, split: str = "test2", keep_points=KEEP_POINTS[:1]) -> "pd.DataFrame":
    """Per attribute, how many of :func:`planned_cells`'s cells exist on ``split`` (the second seed runs the keep-0.95
    settings only): ``planned``, ``done``, ``complete``."""
    import pandas as pd

    log = json.loads((Path(out) / "log.json").read_text())
    recs = []
    for a, todo in planned_cells(log["frozen"]["choices"], list(log["frozen"]["choices"]), keep_points).items():
        done = sum(cell_path(out, split, a, row, s, null=null).exists() for row, s, null in todo)
        recs.append({"attribute": a, "planned": len(todo), "done": done, "complete": done == len(todo)})
    return pd.DataFrame(recs).set_index("attribute")


# ----------------------------------------------------------------------------- reading the cells


def target_spec(attribute: str) -> world.BiasSpec:
    """The world's default spec with ``attribute`` uniform (every other factor, correlations included,
    unchanged): what a perfect debiasing of ``attribute`` would produce — FID-target's reference."""
    spec = world.default_spec()
    return replace(spec, probs={**spec.probs, attribute: pipeline.uniform(world.ATTRIBUTES[attribute])},
                   name=f"default, {attribute} uniform")


def user_passes(row: Row) -> int:
    """UNet passes per image when a user runs the row on its own (no Original to reuse): every row samples all
    :data:`STEPS`; Latent Editing adds its second pass on each edited step; the oracle adds an unedited pass."""
    extra = FIT["Latent Editing"]["edit_steps"] if row.method == "Latent Editing" else 0
    return STEPS + extra + (STEPS if row.policy == "oracle" else 0)


def cells(out=OUT, split: str = "val", attribute: str | None = None) -> list[dict]:
    """Every stored cell of ``split`` (optionally one attribute): ``{"row", "setting", "null", "t", "meta"}``."""
    found = []
    for p in sorted((Path(out) / "cells").glob(f"{split}_{attribute or '*'}_*.safetensors")):
        t, m = io.load_tensors(p)
        found.append({"row": Row(m["method"], m["policy"], m["window"]), "setting": m["setting"],
                      "null": m.get("null", False), "t": t, "meta": m})
    return found


def find(found: list[dict], attribute: str, row: Row, setting: float, null: bool = False) -> dict:
    for c in found:
        if c["meta"]["attribute"] == attribute and c["row"] == row and c["null"] == null and \
                fmt(c["setting"]) == fmt(setting):
            return c
    raise KeyError(f"no cell for {attribute} / {row.label} at {fmt(setting)}{' (null edit)' if null else ''}")


def kept_attributes(attribute: str) -> list[str]:
    """What "kept" is judged on when ``attribute`` is edited (:data:`KEEP_KEY`): the other social attributes,
    then the nuisance ones."""
    return [x for x in world.SOCIAL if x != attribute] + list(world.NUISANCE)


def _kept(orig_t: dict, cell_t: dict, attrs) -> torch.Tensor:
    same = None
    for a in attrs:
        s = orig_t[f"cls.{a}"] == cell_t[f"cls.{a}"]
        same = s if same is None else same & s
    return same


def class_shares(cls_: torch.Tensor, attribute: str) -> torch.Tensor:
    """The share of samples judged in each class of ``attribute`` (its classes' order), from judged class indices."""
    return metrics.shares_of(cls_, len(world.ATTRIBUTES[attribute]))


def _fd(cls_: torch.Tensor, k: int) -> float:
    return metrics.fairness_discrepancy(cls_.long(), k)


def pass_seconds(found: list[dict]) -> dict[str, float]:
    """Seconds per UNet pass (one image, one step) per method: the median over ``found``'s cells of
    seconds / passes run. A cell's own seconds swing with whatever else the machine ran beside it; the median
    rate times a cell's passes is its cost on a machine doing nothing else."""
    per: dict[str, list[float]] = {}
    for c in found:
        m = c["meta"]
        if m.get("passes"):
            per.setdefault(m["method"], []).append(m["seconds"] / m["passes"])
    return {k: float(torch.tensor(v).median()) for k, v in per.items()}


def table(out=OUT, split: str = "test", attributes=world.SOCIAL):
    """The Finding-1 table from the frozen choices: per attribute, row and keep point, the test cell's FD, keep
    overall, keep and similarity among the edited samples, FID-target (each with its bootstrap CI), the share of
    samples edited and the cost (UNet passes per image as a user runs the row; seconds per 1,000 images as this
    run spent them and at the method's median rate over every validation and ``split`` cell,
    :func:`pass_seconds`). A row whose frontier never reached a keep point says why instead."""
    import pandas as pd

    path = Path(out) / "log.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    if "frozen" not in log:
        raise RuntimeError("table: the validation choices are not frozen yet (benchmark.freeze)")
    found = cells(out, split)
    rate = pass_seconds(found + cells(out, "val"))  # hundreds of cells: robust to the ones that ran beside others
    recs, orig = [], None
    for a in attributes:
        for label, rec in log["frozen"]["choices"][a]["rows"].items():
            if not rec["tested"]:
                continue
            row = Row(*rec["row"])
            for kp in KEEP_POINTS:
                ms = rec[str(kp)]
                base = {"attribute": a, "row": row.label, "method": row.method, "policy": row.policy,
                        "window": row.window, "keep point": kp, "setting": ms["setting"], "note": ms["why"]}
                if ms["setting"] is None:
                    recs.append(base)
                    continue
                try:
                    c = find(found, a, row, ms["setting"])
                except KeyError:
                    recs.append({**base, "note": "test cell not run yet"})
                    continue
                m, meta = c["meta"]["metrics"], c["meta"]
                edited = c["t"]["asked"] >= 0
                if orig is None:
                    orig = io.load_tensors(Path(out) / f"original_{split}.safetensors")[0]
                kept_e = _kept(orig, c["t"], kept_attributes(a))[edited]
                sim_e = c["t"]["similarity"][edited]
                ci_k = _mean_ci(kept_e) if len(kept_e) else (math.nan, math.nan)
                ci_s = _mean_ci(sim_e) if len(sim_e) else (math.nan, math.nan)
                recs.append({**base, "n": meta["n"], **{k: m[k] for k in (
                    "FD", "FD lo", "FD hi", "keep all", "keep all lo", "keep all hi", "keep all among edited",
                    "similarity among edited", "FID target", "FID target lo", "FID target hi")},
                    "keep all among edited lo": ci_k[0], "keep all among edited hi": ci_k[1],
                    "similarity among edited lo": ci_s[0], "similarity among edited hi": ci_s[1],
                    "edited share": m["edited"] / meta["n"], "passes / image": user_passes(row),
                    "s / 1000 images (as run)": 1000 * meta["seconds"] / meta["n"],
                    "s / 1000 images (median rate)": 1000 * meta["passes"] / meta["n"] * rate.get(row.method, math.nan)})
    return pd.DataFrame(recs)


def replication(first: "pd.DataFrame", second: "pd.DataFrame", keep_point: float = KEEP_POINTS[0]) -> "pd.DataFrame":
    """Two seeds' :func:`table` frames side by side at ``keep_point``, per attribute × row: FD and its CI on each
    seed and whether the two intervals overlap (``NaN`` where a seed has no test cell for the row)."""
    cols = ["FD", "FD lo", "FD hi"]
    pick = lambda t: t[t["keep point"] == keep_point].set_index(["attribute", "row"]).reindex(columns=cols)  # noqa: E731
    rep = pick(first).join(pick(second), rsuffix=" (seed 2)")
    both = rep["FD"].notna() & rep["FD (seed 2)"].notna()
    overlap = (rep["FD lo"] <= rep["FD hi (seed 2)"]) & (rep["FD lo (seed 2)"] <= rep["FD hi"])
    rep["intervals overlap"] = overlap.astype(object).where(both, None)
    return rep


def paired(out, split: str, attribute: str, a: tuple[Row, float], b: tuple[Row, float], n_boot: int = 2000,
           out_b=None, shared=None) -> dict:
    """Row ``a`` minus row ``b`` on the same noise: FD and overall keep with paired bootstrap CIs, McNemar's
    test on the per-sample keep outcomes, and each row's FD minus the Original's (paired, same noise). ``out_b``: where ``b``'s cells are when another bench ran it (default
    ``out``); ``shared``: the folder holding the Original passes both share (default ``out``)."""
    found = cells(out, split, attribute)
    orig = io.load_tensors(Path(shared or out) / f"original_{split}.safetensors")[0]
    ca = find(found, attribute, *a)
    cb = find(found if out_b is None else cells(out_b, split, attribute), attribute, *b)
    k = len(world.ATTRIBUTES[attribute])
    others = kept_attributes(attribute)
    ka, kb = _kept(orig, ca["t"], others), _kept(orig, cb["t"], others)
    xa, xb = ca["t"][f"cls.{attribute}"].long(), cb["t"][f"cls.{attribute}"].long()
    fd = metrics.paired_difference(xa, xb, lambda c: _fd(c, k), n_boot=n_boot)
    keep = metrics.paired_difference(ka.float(), kb.float(), lambda v: float(v.mean()), n_boot=n_boot)
    xo = orig[f"cls.{attribute}"].long()
    return {"FD": fd, "keep all": keep, "mcnemar keep": metrics.mcnemar(ka, kb),
            "FD at matched keep": matched_keep_fd(xo, xa, ka, xb, kb, k, n_boot=n_boot),
            "FD a − Original": metrics.paired_difference(xa, xo, lambda c: _fd(c, k), n_boot=n_boot),
            "FD b − Original": metrics.paired_difference(xb, xo, lambda c: _fd(c, k), n_boot=n_boot)}


def diluted_fd(x_orig: torch.Tensor, x: torch.Tensor, kept: torch.Tensor, keep: float, k: int) -> float:
    """FD of a row *diluted* to the keep-rate ``keep``: its edit applied to a random share ``p`` of the samples
    and the Original kept for the rest, with ``p`` such that the expected keep-rate is ``keep`` (any method can
    be run this way). The class distribution is the mixture ``(1 − p)·Original + p·row``, so the FD is exact
    in expectation, and never above the chord from the Original to the row (the norm is convex)."""
    own = float(kept.float().mean())
    p = 1.0 if own >= 1.0 else min(1.0, max(0.0, (1.0 - keep) / (1.0 - own)))
    share = lambda c: torch.bincount(c.long(), minlength=k).double() / len(c)  # noqa: E731
    return metrics.fd_of_shares(((1 - p) * share(x_orig) + p * share(x)).numpy())  # as _fd, on the mixture


def matched_keep_fd(x_orig, xa, ka, xb, kb, k: int, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """FD of row a minus FD of row b at the same keep-rate — the higher of the two, the row that keeps less
    :func:`diluted_fd` to it — with a paired bootstrap CI (the same resampled samples for both rows, the
    dilution recomputed on each resample). ``{"diff", "lo", "hi", "n", "a keeps more"}``."""
    import numpy as np

    def stat(idx):
        sa, sb = float(ka[idx].float().mean()), float(kb[idx].float().mean())
        target = max(sa, sb)
        fa = diluted_fd(x_orig[idx], xa[idx], ka[idx], target, k)
        fb = diluted_fd(x_orig[idx], xb[idx], kb[idx], target, k)
        return fa - fb

    n = len(xa)
    g = torch.Generator().manual_seed(seed)
    d = np.asarray([stat(torch.randint(n, (n,), generator=g)) for _ in range(n_boot)])
    return {"diff": stat(torch.arange(n)), "lo": float(np.quantile(d, 0.025)), "hi": float(np.quantile(d, 0.975)),
            "n": n, "a keeps more": bool(ka.float().mean() >= kb.float().mean())}


def leakage(out, split: str, attribute: str, row: Row, setting: float, shared=None) -> "pd.DataFrame":
    """Among the samples a row edited: how often each other attribute's judged class flipped, under the real
    edit and under its size-matched null edit (same samples, steps and ‖Δh‖, random direction), and the
    difference — the leakage above the floor an edit of that size gives whatever it means. ``shared``: the folder
    holding the Original pass (default ``out``)."""
    import pandas as pd

    found = cells(out, split, attribute)
    orig = io.load_tensors(Path(shared or out) / f"original_{split}.safetensors")[0]
    real, null = find(found, attribute, row, setting), find(found, attribute, row, setting, null=True)
    edited = real["t"]["asked"] >= 0
    recs = []
    for b in world.ATTRIBUTES:
        if b == attribute:
            continue
        fr = float((orig[f"cls.{b}"] != real["t"][f"cls.{b}"])[edited].float().mean())
        fn = float((orig[f"cls.{b}"] != null["t"][f"cls.{b}"])[edited].float().mean())
        recs.append({"attribute": b, "flips (edit)": fr, "flips (null edit)": fn, "above the floor": fr - fn,
                     "edited samples": int(edited.sum())})
    return pd.DataFrame(recs)


def frontier_frame(out=OUT, attributes=world.SOCIAL):
    """Every validation cell as one row of a frame (attribute, row label, method, policy, window, setting and
    its metrics): the frontiers of chapter 7's plot."""
    import pandas as pd

    recs = []
    for c in cells(out, "val"):
        if c["null"]:
            continue
        m = c["meta"]
        if m["attribute"] not in attributes:
            continue
        recs.append({"attribute": m["attribute"], "row": c["row"].label, "method": m["method"], "policy": m["policy"],
                     "window": m["window"], "setting": m["setting"], **{k: v for k, v in m["metrics"].items()
                                                                         if not isinstance(v, list)}})
    return pd.DataFrame(recs).sort_values(["attribute", "row", "setting"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- the goals, checked

# The paper's main table (DiffLens, CVPR 2025, Table 1: P2 on CelebA-HQ, FD against the uniform distribution), quoted
# beside ours in chapter 7; their judge is a FairFace/CelebA classifier on real faces, ours the world's judge.
PAPER_P2_FD = {"Original": {"gender": 0.226, "age": 0.592, "race": 0.718},
               "DiffLens": {"gender": 0.002, "age": 0.401, "race": 0.447}}
GOAL_FD = 0.03  # best DiffLens row, gender and age, at keep ≥ GOAL_KEEP overall and ≥ GOAL_KEEP_EDITED among edited
GOAL_KEEP, GOAL_KEEP_EDITED = 0.95, 0.90
GOAL_COST = 0.35  # a minimal-policy cell's UNet passes, as a share of a full cell's


def original_fid_target(out, split: str, attribute: str) -> float:
    """FID-target of the unedited samples of ``split`` (against renders with ``attribute`` uniform)."""
    o = io.load_tensors(Path(out) / f"original_{split}.safetensors")
    ref = io.load_tensors(Path(out) / f"reference_{o[1]['n']}_{attribute}-uniform.safetensors")[0]["reference"]
    return metrics.fid_from_features(ref.float(), o[0]["features"].float())


def goals(out=OUT, split: str = "test", attributes=world.SOCIAL) -> "pd.DataFrame":
    """Each goal of issue 15 checked on the stored cells: one row per (goal, attribute) with the measured value,
    the bar, and whether it is met. The best DiffLens row is the one declared on validation before any test cell
    (the log's frozen choice), read at its keep-0.95 setting. A missing test cell is a row that is not met, with
    the reason."""
    import pandas as pd

    log = json.loads((Path(out) / "log.json").read_text())
    if "frozen" not in log:
        raise RuntimeError("goals: the validation choices are not frozen yet (benchmark.freeze)")
    found = cells(out, split)
    recs = []
    for a in attributes:
        best = log["frozen"]["choices"][a]["best DiffLens"]
        base = {"attribute": a, "row": best["label"] if best else None}
        if best is None:
            recs.append({**base, "goal": "best DiffLens FD", "met": False, "note": "no DiffLens row reached keep 0.95"})
            continue
        try:
            m = find(found, a, Row(*best["row"]), best["setting"])["meta"]["metrics"]
        except KeyError:
            recs.append({**base, "goal": "best DiffLens FD", "met": False, "note": "test cell not run yet"})
            continue
        fd_bar = GOAL_FD if a in ("gender", "age") else None
        recs.append({**base, "goal": "best DiffLens FD", "value": m["FD"], "bar": fd_bar,
                     "met": None if fd_bar is None else m["FD"] <= fd_bar,
                     "note": "" if fd_bar else "no bar: as low as the method reaches"})
        recs.append({**base, "goal": "keep overall", "value": m["keep all"], "bar": GOAL_KEEP,
                     "met": m["keep all"] >= GOAL_KEEP})
        ke = m["keep all among edited"]
        recs.append({**base, "goal": "keep among edited", "value": ke, "bar": GOAL_KEEP_EDITED,
                     "met": ke is not None and ke >= GOAL_KEEP_EDITED})
        if fd_bar is not None:  # the goal is joint: the FD bar at both keep bars
            recs.append({**base, "goal": "FD bar at both keep bars", "value": m["FD"], "bar": fd_bar,
                         "met": m["FD"] <= fd_bar and m["keep all"] >= GOAL_KEEP and ke is not None
                         and ke >= GOAL_KEEP_EDITED})
        fo = original_fid_target(out, split, a)
        recs.append({**base, "goal": "FID-target ≤ the Original's", "value": m["FID target"], "bar": fo,
                     "met": m["FID target"] <= fo})
        for c in found:
            if c["meta"]["attribute"] != a or c["row"].policy != "minimal" or c["null"]:
                continue
            share = c["meta"]["passes"] / (c["meta"]["n"] * STEPS)
            recs.append({"attribute": a, "row": c["row"].label, "goal": "minimal cell cost ≤ 35% of a full cell",
                         "value": share, "bar": GOAL_COST, "met": share <= GOAL_COST, "setting": c["setting"]})
    return pd.DataFrame(recs)


def best_difflens(choice: dict, policy: str | None = None, keep_point: float = KEEP_POINTS[0]) -> dict | None:
    """The best DiffLens row of one attribute's frozen choices (``log["frozen"]["choices"][attribute]``) by
    :func:`freeze`'s rule — among the tested DiffLens rows with a setting at ``keep_point``, the lowest
    validation FD there — restricted to ``policy`` when given (``None`` at keep 0.95: the row :func:`freeze`
    declared). Reads validation numbers only, so a per-policy best is as blind to the test seeds as the
    declared one. ``{"row", "label", "setting", "val FD"}`` or ``None``."""
    best = None
    for label, rec in choice["rows"].items():
        row = Row(*rec["row"])
        r95 = rec[str(keep_point)]
        if not rec["tested"] or METHODS[row.method].kind != "difflens" or r95["setting"] is None:
            continue
        if policy is not None and row.policy != policy:
            continue
        if best is None or r95["val FD"] < best["val FD"]:
            best = {"row": [row.method, row.policy, row.window], "label": label, "setting": r95["setting"],
                    "val FD": r95["val FD"]}
    return best


def best_baseline(choice: dict, keep_point: float = KEEP_POINTS[0]) -> dict | None:
    """The baseline (any non-DiffLens tested row) with the lowest validation FD at ``keep_point`` in one
    attribute's frozen choices: the same rule that declares the best DiffLens row, applied to the baselines."""
    best = None
    for label, rec in choice["rows"].items():
        row = Row(*rec["row"])
        r = rec[str(keep_point)]
        if not rec["tested"] or METHODS[row.method].kind == "difflens" or r["setting"] is None:
            continue
        if best is None or r["val FD"] < best["val FD"]:
            best = {"row": [row.method, row.policy, row.window], "label": label, "setting": r["setting"],
                    "val FD": r["val FD"]}
    return best


def outcome(matched_lo: float, matched_hi: float, fd_lo: float, fd_hi: float, row_keeps_more: bool) -> str:
    """A row against the best DiffLens row, from paired 95% intervals of ``row − best``: ``matched`` — FD at the
    same keep-rate, the higher of the two, the side that keeps less diluted to it (:func:`matched_keep_fd`) —
    and ``fd`` — FD as run. A side is better only where an interval excludes 0:

    * the side that keeps less wins outright if, diluted to the other's keep-rate, it still has the lower FD;
    * the side that keeps more wins at its own keep-rate; if the other reaches a lower FD as run (at its lower
      keep-rate), that is a ``"trade-off"``, otherwise it wins outright;
    * neither wins at the matched keep-rate: the side that keeps less wins if it reaches a lower FD as run,
      else ``"no difference"``.

    Returns ``"row better"``, ``"DiffLens better"``, ``"trade-off"`` or ``"no difference"``. Diluting (editing a
    random share of the samples) is open to every method, so a row that keeps more samples unchanged only because
    it edits less does not count as a trade-off."""
    low, high = ("best", "row") if row_keeps_more else ("row", "best")
    at_matched = "row" if matched_hi < 0 else "best" if matched_lo > 0 else None
    low_reaches_lower = (fd_hi < 0) if low == "row" else (fd_lo > 0)
    if at_matched == low:
        winner = low
    elif at_matched == high:
        winner = "trade-off" if low_reaches_lower else high
    else:
        winner = low if low_reaches_lower else None
    return {"row": "row better", "best": "DiffLens better", "trade-off": "trade-off", None: "no difference"}[winner]


UNREACHED = "never reached this keep-rate on validation"  # its smallest setting already keeps less
UNFINISHED = "grid unfinished at this keep-rate"  # the extension limit or a non-monotone frontier: undecided


def against_best(out=OUT, split: str = "test", attribute: str = "gender", keep_point: float = KEEP_POINTS[0],
                 policy: str = "minimal", n_boot: int = 2000) -> "pd.DataFrame":
    """Every tested row of ``policy`` (and the distribution-level rows) minus the best DiffLens row *of the same
    policy* (:func:`best_difflens`) at the same matched keep point, on the same noise and draws: FD and overall
    keep differences with paired bootstrap CIs, the FD difference at the same keep-rate (:func:`matched_keep_fd`),
    McNemar's p on per-sample keep, whether the row lowers FD below the Original's at all (paired CI), who wins on
    FD as run (the CI excludes 0) and the :func:`outcome`. A row with no setting at the keep point has the outcome
    :data:`UNREACHED` (its smallest setting keeps less) or :data:`UNFINISHED`. ``attrs["best"]``: the best row
    compared against (``None``, and an empty frame, when the policy has no DiffLens row at the keep point)."""
    import pandas as pd

    log = json.loads((Path(out) / "log.json").read_text())
    ch = log["frozen"]["choices"][attribute]
    best = best_difflens(ch, policy, keep_point)
    if best is None:  # nothing to compare against: an empty frame says so
        frame = pd.DataFrame(columns=["row", "kind", "outcome", "note"])
        frame.attrs["best"] = None
        return frame
    brow = Row(*best["row"])
    bset = ch["rows"][best["label"]][str(keep_point)]["setting"]
    recs = []
    for label, rec in ch["rows"].items():
        row = Row(*rec["row"])
        if not rec["tested"] or row == brow or row.policy not in (policy, "—"):
            continue
        s = rec[str(keep_point)]["setting"]
        kind = "DiffLens" if METHODS[row.method].kind == "difflens" else "baseline"
        if s is None:
            why = rec[str(keep_point)]["why"]
            recs.append({"row": label, "kind": kind, "note": why,
                         "outcome": UNREACHED if why.startswith("every setting keeps less") else UNFINISHED})
            continue
        try:
            d = paired(out, split, attribute, (row, s), (brow, bset), n_boot=n_boot)
        except KeyError as e:
            recs.append({"row": label, "kind": kind, "outcome": "test cell not run yet", "note": str(e)})
            continue
        fd, kp, mk = d["FD"], d["keep all"], d["FD at matched keep"]
        recs.append({"row": label, "kind": kind, "FD diff": fd["diff"], "FD lo": fd["lo"], "FD hi": fd["hi"],
                     "keep diff": kp["diff"], "keep lo": kp["lo"], "keep hi": kp["hi"],
                     "FD diff at matched keep": mk["diff"], "matched lo": mk["lo"], "matched hi": mk["hi"],
                     "McNemar p (keep)": d["mcnemar keep"]["p"], "row lowers FD": d["FD a − Original"]["hi"] < 0,
                     "FD winner": best["label"] if fd["lo"] > 0 else label if fd["hi"] < 0 else "neither (CI spans 0)",
                     "outcome": outcome(mk["lo"], mk["hi"], fd["lo"], fd["hi"], mk["a keeps more"])})
    frame = pd.DataFrame(recs)
    frame.attrs["best"] = best["label"]
    return frame


OUTCOMES = ("DiffLens better", "row better", "trade-off", "no difference")
# every key a :func:`finding1` result lists baseline rows under: the outcomes, then why a row was not compared
OUTCOME_KEYS = (*OUTCOMES, UNREACHED, UNFINISHED, "test cell not run yet")


def finding1(d: "pd.DataFrame") -> dict:
    """The paper's Finding 1 — DiffLens beats every baseline — judged on one :func:`against_best` frame (its
    baseline rows; DiffLens variants are not opponents). Baselines that cannot run at the keep point
    (:data:`UNREACHED`) are left out of the comparison and listed. ``"holds"``: the best DiffLens row is better
    than every compared baseline (one at least); ``"fails"``: a baseline is better; ``"undecided"``: a compared
    baseline's test cell is missing, its grid is unfinished, or nothing is compared; else ``"partly"`` (ties or
    trade-offs, none better). Also the baseline rows per outcome (every key always present)."""
    base = d[d["kind"] == "baseline"] if len(d) else d
    by = {k: sorted(base.loc[base["outcome"] == k, "row"]) if len(base) else []
          for k in OUTCOME_KEYS}
    compared = len(base) - len(by[UNREACHED])
    if by["row better"]:
        verdict = "fails"
    elif compared == 0 or by[UNFINISHED] or by["test cell not run yet"]:
        verdict = "undecided"
    elif len(by["DiffLens better"]) == compared:
        verdict = "holds"
    else:
        verdict = "partly"
    return {"verdict": verdict, "baselines": len(base), "compared": compared, **by}


def verdict_replication(first: dict, second: dict) -> "pd.DataFrame":
    """Finding 1 on two test seeds: ``first`` and ``second`` map ``(attribute, policy)`` to :func:`finding1`'s
    result on each seed. Per pair: both verdicts, ``same verdict`` (``None`` where either seed is ``"undecided"``)
    and the baseline rows whose outcome differs between the seeds (``"row: first → second"``)."""
    import pandas as pd

    def outcomes(f: dict) -> dict[str, str]:
        return {row: k for k in OUTCOME_KEYS for row in f.get(k, [])}

    recs = []
    for key in first:
        a, b = first[key], second.get(key, {"verdict": "undecided"})
        oa, ob = outcomes(a), outcomes(b)
        changed = [f"{r}: {oa[r]} → {ob.get(r, 'missing')}" for r in sorted(oa) if oa[r] != ob.get(r, "missing")]
        same = None if "undecided" in (a["verdict"], b["verdict"]) else a["verdict"] == b["verdict"]
        recs.append({"attribute": key[0], "policy": key[1], "seed 1": a["verdict"], "seed 2": b["verdict"],
                     "same verdict": same, "outcomes that changed": "; ".join(changed) or "none"})
    return pd.DataFrame(recs).set_index(["attribute", "policy"])


def headline(out=OUT, split: str = "test", keep_point: float = KEEP_POINTS[0]) -> "pd.DataFrame":
    """Results at a glance, per social attribute: the Original's FD on ``split``, and the test cells of the
    best DiffLens row and the best baseline (:func:`best_baseline`; both chosen on validation, before any test
    cell) at ``keep_point``: FD with its CI and keep overall. A missing cell reads as NaN."""
    import pandas as pd

    log = json.loads((Path(out) / "log.json").read_text())
    found = cells(out, split)
    orig = io.load_tensors(Path(out) / f"original_{split}.safetensors")[0]
    recs = []
    for a, ch in log["frozen"]["choices"].items():
        k = len(world.ATTRIBUTES[a])
        rec = {"attribute": a, "FD original": _fd(orig[f"cls.{a}"], k)}
        for who, pick in (("DiffLens", best_difflens(ch, None, keep_point)), ("baseline", best_baseline(ch, keep_point))):
            rec[f"{who} row"] = pick["label"] if pick else None
            s = None if pick is None else ch["rows"][pick["label"]][str(keep_point)]["setting"]
            m = {}
            if s is not None:
                try:
                    m = find(found, a, Row(*pick["row"]), s)["meta"]["metrics"]
                except KeyError:
                    pass
            for key in ("FD", "FD lo", "FD hi", "keep all"):
                rec[f"{who} {key}"] = m.get(key, float("nan"))
        recs.append(rec)
    return pd.DataFrame(recs).set_index("attribute")
