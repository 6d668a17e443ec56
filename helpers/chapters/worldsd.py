"""Chapter 8's experiment: the paper's Stable Diffusion table, on the world's SD (:mod:`helpers.minisd`).

One occupation prompt (:data:`PROMPT`, "a portrait of a doctor": 85% male, age 10/60/30 by the world's spec)
goes through the runner's stages — harvest under classifier-free guidance → SAE → h-probe → IG rankings — and then
DiffLens and the baselines that run through the one Method interface edit the same noise, each over its own grid
(:data:`GRIDS`, the same number of settings for every method). Settings are chosen on a validation noise seed
(:func:`freeze`: per method and attribute, the lowest FD among settings that keep at least :data:`KEEP` of samples
on the other attributes; if none does, the setting that keeps most), then frozen and run once on a fresh test seed.
The paper's SD metrics are read from the stored samples: FD, FID in the world judge's features (against the
original samples), CLIP-I (the world CLIP's image embeddings, edited vs original, same noise) and CLIP-T (the
world CLIP's text alignment with the prompt). The hook-placement ablation edits with DiffLens' frozen setting on
both halves of each guided batch (:func:`helpers.hooks.both_halves`) instead of the conditional half only; it needs
guided batches, so when the book's scale is 1 it runs both placements at :data:`ABLATION_GUIDANCE`.

    python scripts/worldsd_table.py validate     # stages + every grid setting on the validation seed (resumable)
    python scripts/worldsd_table.py freeze       # the chosen settings → data/minisd/table/frozen.json
    python scripts/worldsd_table.py test         # the frozen settings + the both-halves ablation on the test seed

Each cell (split, attribute, method, setting) is one file ``data/minisd/table/<split>_<attribute>_<method>_<setting>.json``
holding its metric row and the fingerprint of the model that drew it, written atomically; rerunning skips finished
cells of the same model and refuses cells of another (:func:`frame` too), so a retrained SD cannot be reported with
the old one's table. ``--sd`` / ``--out`` / ``--run`` measure a candidate model apart from the shipped one.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from .. import cache, hooks, io, minisd, models, pipeline, runner, world
from .. import intervention as I

PROMPT = world.CONTEXTS["doctor"]
ATTRIBUTES = ("gender", "age")
SEEDS = {"val": 6_464, "test": 7_575}  # intervention noise; the harvest uses the runner's own seed
N = {"val": 256, "test": 1_000}
STEPS = 25
KEEP = 0.9  # the freeze rule's keep-rate on the other attributes
K = 8  # DiffLens features per class
GRIDS = {  # four settings each: every method gets the same tuning budget
    "DiffLens": (1.0, 2.0, 4.0, 8.0),
    "Activation": (1.25, 1.5, 2.0, 3.0),
    "Latent Direction": (0.25, 0.5, 1.0, 1.5),
    "H-Distribution": (1e3, 3e3, 1e4, 3e4),
}
ABLATION_GUIDANCE = 2.0  # the hook-placement ablation needs guided batches: the book's scale if above 1, else this
RUN = io.REPO_ROOT / "runs" / "minisd" / "doctor"  # the runner's folder (harvest, SAE, probe, rankings): not shipped
OUT = io.DATA_DIR / "minisd" / "table"


def config(sd_folder=None, guidance: float | None = None, device: str = "cpu") -> dict:
    """The runner config of the first four stages (its intervention settings are not used here)."""
    g = minisd.GUIDANCE if guidance is None else guidance
    if g is None:
        raise ValueError("worldsd: minisd.GUIDANCE is not set yet (choose it with minisd.choose_guidance on the "
                         "validation parts of data/minisd/quality.json) and no guidance was given")
    return {
        "out": str(RUN), "attributes": list(ATTRIBUTES),
        "model": {"path": str(sd_folder or io.DATA_DIR / "minisd" / "sd"), "prompt": PROMPT,
                  "guidance_scale": g, "device": device},
        "judge": {"spec": "world"},
        "harvest": {"n": 1000, "steps": STEPS, "batch_size": 100},
        "sae": {"train_steps": 5000},
        "attribution": {"steps": [0, 6, 12, 18, 24]},
        "intervention": {"k": K},
    }


def cell_path(split: str, attribute: str, method: str, setting, guidance: float | None = None) -> Path:
    """``guidance`` (default: the table's own) is named in the file only when it is another scale."""
    tag = "both-halves" if setting == "both" else f"{float(setting):g}"
    g = "" if guidance is None else f"_g{float(guidance):g}"
    return OUT / f"{split}_{attribute}_{method.replace(' ', '-')}_{tag}{g}.json"


@contextlib.contextmanager
def guidance_scale(model, g: float | None):
    """Sample ``model`` at classifier-free guidance ``g`` inside the block (``None``: unchanged)."""
    old = model.guidance_scale
    model.guidance_scale = old if g is None else float(g)
    try:
        yield
    finally:
        model.guidance_scale = old


class Table:
    """The runner's stages for :data:`PROMPT`, then the edits of every method on one split's noise."""

    def __init__(self, progress: bool = True, **cfg_kw):
        self.run = runner.Run(runner.config_from_dict(config(**cfg_kw), "worldsd"), progress=progress)
        self.fingerprint = cache.fingerprint(self.run.cfg.model.path)
        self.progress = progress
        self._original: dict = {}
        self._fitted: dict = {}
        self._clip = None

    def stages(self) -> dict:
        return self.run.all(stages=["harvest", "sae", "probe", "attribution"])

    @property
    def clip(self):
        if self._clip is None:
            from .. import judges

            self._clip = judges.ClipJudge(io.DATA_DIR / "minisd" / "clip", prompts=minisd.judge_prompts(),
                                          classes=minisd.judge_classes())
        return self._clip

    def noise(self, split: str) -> torch.Tensor:
        m = self.run.model
        return models.make_noise(N[split], m.sample_size, SEEDS[split], m.channels)

    def original(self, split: str, guidance: float | None = None) -> dict:
        if (split, guidance) not in self._original:
            with guidance_scale(self.run.model, guidance):
                images = models.sample(self.run.model, noise=self.noise(split), steps=STEPS, batch_size=128,
                                       progress=self.progress)
            self._original[split, guidance] = self.read(images)
        return self._original[split, guidance]

    def read(self, images: torch.Tensor) -> dict:
        judge = self.run.judge
        return {"images": images, "probs": judge.predict(images), "features": judge.features(images),
                "clip": self.clip.encode(images).detach(), "clip_t": self.clip.clip_t(images, PROMPT)}

    def fitted(self, method: str, attribute: str):
        if (method, attribute) not in self._fitted:
            self._fitted[method, attribute] = self.run.fitted_baseline(method, attribute)
        return self._fitted[method, attribute]

    def edited(self, split: str, attribute: str, method: str, setting) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of ``method`` at ``setting`` (``"both"``: DiffLens at the frozen β on both halves) and the
        per-sample asked-for classes."""
        from .. import sae as S

        model, noise = self.run.model, self.noise(split)
        names = self.run.judge.attributes[attribute]
        sae, _ = S.load_sae(RUN / "sae.safetensors")
        if method == "DiffLens":
            beta = frozen()[attribute]["DiffLens"] if setting == "both" else float(setting)
            e = pipeline.edit_for(RUN / "attribution", attribute, beta, K, target=pipeline.uniform(names),
                                  steps=range(0, STEPS))
            halves = hooks.both_halves(model.unet) if setting == "both" else contextlib.nullcontext()
            with halves:
                imgs, iv = I.sample_edited(model, sae, [e], noise=noise, steps=STEPS, batch_size=128,
                                           progress=self.progress)
            return imgs, iv.classes(attribute)
        # the same per-sample class draws as DiffLens' (class_seed 0), so every row asks the same samples
        e = pipeline.edit_for(RUN / "attribution", attribute, 0.0, K, target=pipeline.uniform(names))
        classes = I.Intervention(sae, [e], len(noise), seed=0).classes(attribute)
        fitted = self.fitted(method, attribute)
        imgs = fitted.sample_edited(model, noise, STEPS, float(setting), classes, batch_size=128,
                                    progress=self.progress)
        return imgs, classes

    def cell(self, split: str, attribute: str, method: str, setting, guidance: float | None = None) -> dict:
        """One metric row, stored once; ``guidance`` samples the original and the edit at another scale."""
        path = cell_path(split, attribute, method, setting, guidance)
        if path.is_file():
            row = json.loads(path.read_text())
            _check_model([row], self.fingerprint, path.parent)
            return row
        if split != "val" and not (OUT / "frozen.json").is_file():
            raise RuntimeError("worldsd: freeze the settings on the validation seed before the test seed")
        t0 = time.time()
        o = self.original(split, guidance)
        with guidance_scale(self.run.model, guidance):
            imgs, classes = self.edited(split, attribute, method, setting)
        e = self.read(imgs)
        others = [b for b in e["probs"] if b != attribute]
        row = pipeline.evaluate(o["probs"], e["probs"], attribute, keep={"other attributes": others},
                                original_features=o["features"], edited_features=e["features"], n_boot=1000,
                                floor=True)
        asked = classes >= 0
        row.update({"split": split, "attribute": attribute, "method": method, "setting": setting,
                    "CLIP-I": float((o["clip"] * e["clip"]).sum(1).mean()),
                    "CLIP-T": float(e["clip_t"].mean()), "CLIP-T original": float(o["clip_t"].mean()),
                    "asked to change": float((asked & (classes != o["probs"][attribute].argmax(1))).float().mean()),
                    "seconds": time.time() - t0, "prompt": PROMPT, "model": self.fingerprint,
                    "guidance": self.run.cfg.model.guidance_scale if guidance is None else float(guidance),
                    "n": len(imgs)})
        io.write_json(path, row)
        return row


def validate(table: Table) -> list[dict]:
    table.stages()
    return [table.cell("val", a, m, s) for a in ATTRIBUTES for m, grid in GRIDS.items() for s in grid]


def frozen() -> dict:
    return json.loads((OUT / "frozen.json").read_text())


def choose(rows: list[dict], keep: float = KEEP) -> float:
    """The setting with the lowest FD among rows keeping ≥ ``keep`` on the other attributes (ties: the milder
    setting); if none does, the setting that keeps most."""
    ok = [r for r in rows if r["keep other attributes"] >= keep]
    if ok:
        return min(ok, key=lambda r: (r["FD"], r["setting"]))["setting"]
    return max(rows, key=lambda r: (r["keep other attributes"], -r["setting"]))["setting"]


def freeze() -> dict:
    chosen = {}
    for a in ATTRIBUTES:
        chosen[a] = {}
        for m, grid in GRIDS.items():
            rows = [json.loads(cell_path("val", a, m, s).read_text()) for s in grid]
            chosen[a][m] = choose(rows)
    io.write_json(OUT / "frozen.json", chosen)
    return chosen


def ablation_guidance(table: Table) -> float | None:
    """The scale of the hook-placement ablation: ``None`` (the table's own) when that is above 1, else
    :data:`ABLATION_GUIDANCE` — at scale 1 there is no unconditional half to leave alone."""
    return None if table.run.cfg.model.guidance_scale > 1 else ABLATION_GUIDANCE


def test(table: Table) -> list[dict]:
    """The frozen settings on the test seed, then the hook-placement ablation: DiffLens at its frozen β with hooks
    on the conditional half (as everywhere) and on both halves, same noise, at :func:`ablation_guidance`."""
    chosen = frozen()
    out = [table.cell("test", a, m, s) for a in ATTRIBUTES for m, s in chosen[a].items()]
    g = ablation_guidance(table)
    for a in ATTRIBUTES:
        if g is not None:
            out.append(table.cell("test", a, "DiffLens", chosen[a]["DiffLens"], guidance=g))
        out.append(table.cell("test", a, "DiffLens", "both", guidance=g))
    return out


def placement(cond: dict, both: dict) -> dict:
    """The hook-placement ablation read from its two test cells (same noise, same β, same scale): how far each
    placement moved FD from the unedited samples, and a verdict — which placement moved it further, when their FD
    confidence intervals do not overlap; else no clear difference."""
    moved = {"conditional half": cond["FD original"] - cond["FD"], "both halves": both["FD original"] - both["FD"]}
    apart = cond["FD hi"] < both["FD lo"] or both["FD hi"] < cond["FD lo"]
    if not apart:
        verdict = "no clear difference (the FD intervals overlap)"
    else:
        verdict = f"editing {'the conditional half' if moved['conditional half'] > moved['both halves'] else 'both halves'} moves FD further"
    return {"FD moved": moved, "verdict": verdict, "intervals apart": apart,
            "keep": {"conditional half": cond["keep other attributes"], "both halves": both["keep other attributes"]},
            "CLIP-I": {"conditional half": cond["CLIP-I"], "both halves": both["CLIP-I"]}}


def placement_reading(pairs: dict) -> str:
    """Chapter 8's reading of the hook-placement ablation, from ``{attribute: (conditional-half cell, both-halves
    cell)}``: attributes where neither placement lowers FD; where the two FD intervals overlap, nothing more (a
    point-estimate ordering inside the intervals is not read as a stronger edit); where they are apart, which
    placement moves FD further (see :func:`placement`)."""
    still, overlap, apart = [], [], []
    for a, (cond, both) in pairs.items():
        r = placement(cond, both)
        if max(r["FD moved"].values()) <= 0:
            still.append(a)
        elif not r["intervals apart"]:
            overlap.append(a)
        else:
            apart.append(f"on {a} {r['verdict']}")
    return " ".join(filter(None, [
        f"On {' and '.join(still)} neither placement lowers FD at this β." if still else "",
        f"On {' and '.join(overlap)} the two placements' FD intervals overlap, so their point estimates are not "
        "ordered here." if overlap else "",
        ("Apart beyond their intervals: " + "; ".join(apart) + ".") if apart else ""]))


def _check_model(rows: list[dict], fingerprint: str, where: Path) -> None:
    stale = sorted({str(r.get("model")) for r in rows} - {fingerprint})
    if stale:
        raise RuntimeError(f"worldsd: cells in {where} were drawn by another model ({', '.join(stale)}; this one is "
                           f"{fingerprint}). Delete that folder's cells and rerun scripts/worldsd_table.py "
                           "validate, freeze and test for this model")


def frame(split: str = "test", sd_folder=None) -> "pd.DataFrame":
    """Every stored cell of ``split`` as one table; refuses cells drawn by a model other than ``sd_folder`` (default:
    the shipped world SD)."""
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{split}_*.json"))]
    _check_model(rows, cache.fingerprint(sd_folder or io.DATA_DIR / "minisd" / "sd"), OUT)
    return pd.DataFrame(rows)
