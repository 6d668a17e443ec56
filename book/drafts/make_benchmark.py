"""Writes book/07_benchmark.ipynb: chapter 7 on the benchmark-v2 cells (issue 15), from data/benchmark/v2
(scripts/benchmark.py validate → freeze → test → test --split test2). Run: python book/drafts/make_benchmark.py
"""
from pathlib import Path

from nbwrite import CODE, MD, write
CELLS = [
(MD, r"""# 7. Benchmark: DiffLens against five baselines, on equal terms

The paper's Finding 1 {cite:p}`shi2025difflens` is a table: on P2 (CelebA-HQ), DiffLens brings the Fairness
Discrepancy of gender, age and race closer to zero than five published debiasing methods while keeping image
quality. This chapter rebuilds that comparison on the embedded model, where every factor of every image is known,
and asks a stricter question than a single table can: **at the same preservation, does DiffLens reach a lower FD
than each baseline — given the same information and the same tuning budget?**

Three things make the comparison fair, and each is its own part of the table:

* **Who gets edited is an axis, not part of a method.** A per-sample method needs to know, for each sample, which
  class to push it to. Under policy `iid` each sample draws its target class from the target distribution (the
  paper's probability mode); under `minimal` only the surplus of the over-represented classes is moved in each
  sampling batch of {glue:text}`batch` samples (the batch a user would run), each sample's own class read by the h-probe from its own h at the first edited step (no extra
  pass). Every per-sample method runs under both.
* **Frontiers, not single picks.** Every method's knob runs on a validation seed until its curve of FD against
  keep-rate brackets the operating points; the table reads each method at the same keep-rates ({glue:text}`kp_hi` and {glue:text}`kp_lo`),
  interpolated on its *own* validation frontier, then runs that setting once on fresh test seeds.
* **Paired statistics.** Every row samples the same noise with the same class draws, so differences between rows
  are paired: bootstrap intervals of the FD and keep-rate differences to the best DiffLens row of the same policy,
  McNemar's test on per-sample outcomes."""),
(CODE, r"""RECOMPUTE = False  # True: fit the baselines and rerun every cell (about a day on 2 CPU cores; resumable)

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from myst_nb import glue

from helpers import metrics, tables, world
from helpers.chapters import benchmark as B
from helpers.plots import show_images

torch.set_num_threads(2)
if RECOMPUTE:
    bench = B.Bench()
    B.validate(bench); B.freeze(bench); B.test(bench, "test"); B.test(bench, "test2", keep_points=B.KEEP_POINTS[:1])
log = json.loads((B.OUT / "log.json").read_text())
front = B.frontier_frame()
for k, v in {"n_val": B.N["val"], "n_test": B.N["test"], "batch": B.BATCH, "steps": B.STEPS}.items():
    glue(k, tables.num(v), display=False)
glue("kp_hi", tables.num(B.KEEP_POINTS[0], sig=2), display=False)  # the table's keep points and the issue's bars
glue("kp_lo", f"{B.KEEP_POINTS[1]:.2f}", display=False)
glue("bar_fd", f"{B.GOAL_FD:g}", display=False)
glue("bar_cost", tables.num(B.GOAL_COST, percent=True), display=False)""", ["hide-output"]),
(MD, r"""## The rows

| row | what it edits | who is edited | deviation from its paper |
|---|---|---|---|
| **DiffLens** | adds β × footprint to the top-k SAE features of the sample's target class | `iid`, `minimal` | one β for all classes; the footprint add of {doc}`chapter 4 <04_finding_features>` |
| **DiffLens swap** | moves the sample's own class features down and the target's up by β | `iid`, `minimal` | a variant, not in the paper |
| **DiffLens (released)** | scales the top features as the authors' released P2 configs do: minority classes by the knob, the majority's ratio 1, every step; a majority draw is a no-op | `released` | top-k scaled to this SAE as {doc}`chapter 3 <03_sae>` scales k |
| **Activation** | scales the bottleneck channels whose class mean differs most, signed as in chapter 4 | `iid`, `minimal` | the paper's raw-activation ablation |
| **Latent Direction** {cite:p}`li2024selfdiscovering` | adds one learned h-vector per class at every step | `iid`, `minimal` | class images are renders of the world, not SD prompts |
| **Latent Editing** (Asyrp; {cite:p}`kwon2023asyrp`) | a learned Δh per step and class, asymmetric reverse process over the first 12 steps | `iid`, `minimal` | free Δh per (class, step); judge loss instead of CLIP's |
| **H-Distribution** {cite:p}`parihar2024balancing` | moves h along the gradient of a batch-distribution loss through the pooled-h probe | — (batch) | pooled h: a flat shift at every position |
| **H-Distribution (flat h)** | the same with the published flattened-h predictor and χ² loss | — (batch) | predictor architecture not reproduced exactly |
| **Finetuning** {cite:p}`shen2024finetuning` | a LoRA {cite:p}`hu2022lora` on the up-blocks, distribution loss through differentiable DDIM | — (model) | trained through 8 DDIM steps, evaluated at 25 |

Per-sample rows also run with edits on steps 8–24 only (the window of {doc}`chapter 5 <05_intervention_sweeps>`);
each method × policy is tested at the window its validation frontier favours. Two diagnostic rows run on the test
seeds only: the best DiffLens row with an **oracle** reading of each sample's class (an unedited pass read by a
second judge: one extra pass per image) and its size-matched **null edit** (a random direction of the same ‖Δh‖ at
the same steps and samples) — the floor for leakage."""),
(MD, r"""## Validation frontiers

Each point is one validation cell ({glue:text}`n_val` samples, its own seed; every cell samples
{glue:text}`steps` DDIM steps): FD against the share of samples whose
other attributes — the other social ones and the four nuisance ones — the judge reads unchanged ("keep all").
Lower and further right is better; the dotted lines are the two keep points the table reads
({numref}`fig-frontiers`)."""),
(CODE, r"""pol_cols = ["iid", "minimal", "released / —"]
methods = list(B.METHODS)
colors = dict(zip(methods, plt.cm.tab10.colors))
attrs = [a for a in world.SOCIAL if a in set(front["attribute"])]
fig, axes = plt.subplots(len(attrs), 3, figsize=(12, 3.2 * len(attrs)), layout="constrained", squeeze=False,
                         sharey="row")
for r, a in enumerate(attrs):
    d = front[front["attribute"] == a]
    for (row, method, policy, window), g in d.groupby(["row", "method", "policy", "window"]):
        col = pol_cols.index(policy) if policy in pol_cols else 2
        g = g.sort_values("setting")
        axes[r, col].plot(g["keep all"], g["FD"], "-o" if window == 0 else "--s", ms=3, color=colors[method],
                          label=f"{method}{'' if window == 0 else ', steps 8–24'}")
    for c, title in enumerate(pol_cols):
        ax = axes[r, c]
        orig = d["FD original"].iloc[0]
        ax.plot([1.0], [orig], "k*", ms=9, label="Original")
        for kp in B.KEEP_POINTS:
            ax.axvline(kp, color="gray", ls=":", lw=1)
        ax.set_title(f"{a} · {title}", fontsize=9)
        ax.set_xlabel("keep all (validation)")
        ax.legend(fontsize=6)
    axes[r, 0].set_ylabel("FD (validation)");""", ["hide-input"],
 {"name": "fig-frontiers", "caption": "Validation frontiers: FD against keep-rate for every row and setting, per "
  "social attribute (rows) and assignment policy (columns); dashed: edits on steps 8–24 only; star: the Original; "
  "dotted: the keep points 0.95 and 0.90."}),
(CODE, r"""ext = pd.DataFrame([{"attribute": a, "row": row, "settings": len(r["settings"]),
                     "extended below": r["extended"].get("low", 0), "extended above": r["extended"].get("high", 0)}
                    for a, rows_ in log["val"].items() for row, r in rows_.items()])
glue("val_cells", tables.num(len(front)), display=False)
glue("val_rows", tables.num(len(ext)), display=False)
tables.frame(ext.set_index(["attribute", "row"]),
             legend="Settings run per row on validation, and how many the extension rule added beyond the start grid.")"""),

(MD, r"""Settings are then frozen: per row, the setting at each keep point on its own frontier, the window each method ×
policy is tested with, and the best DiffLens row — declared here, before any test cell existed (the log records when
and at which commit):"""),
(CODE, r"""fz = log["frozen"]
glue("frozen_at", fz["at"], display=False)
glue("frozen_commit", (fz["commit"] or "unknown")[:7], display=False)
rows_ = []
for a, ch in fz["choices"].items():
    for label, rec in ch["rows"].items():
        if rec["tested"]:
            rows_.append({"attribute": a, "row": label, **{f"setting @ keep {kp}": rec[str(kp)]["setting"]
                                                            for kp in B.KEEP_POINTS},
                          "validation FD @ 0.95": rec["0.95"].get("val FD"), "why none": rec["0.95"]["why"]})
    best = ch["best DiffLens"]
    glue(f"best_{a}", best["label"] if best else "none", display=False)
weak = sorted({f"{label} ({a})" for a, ch in fz["choices"].items() for label, rec in ch["rows"].items()
               if any(rec[str(kp)]["why"].startswith("every setting keeps at least") for kp in B.KEEP_POINTS)})
glue("weak_rows", ", ".join(weak) if weak else "none", display=False)
tables.frame(pd.DataFrame(rows_).set_index(["attribute", "row"]),
             legend=f"Frozen {fz['at']} at commit {(fz['commit'] or 'unknown')[:7]}; — : the row's frontier never "
                    "reached that keep-rate (the last column says why).")"""),
(MD, r"""The extension rule stops a grid after three settings beyond either end; rows whose strongest setting still kept
more than a keep point at that limit — too weak to reach it — are: {glue:text}`weak_rows`. Where such a row is one
window of a method × policy, the other window is the one tested; where the weak window is steps 8–24, the tested
one edits from step 0, where the h-probe that reads who to edit is less accurate (below).

## The table

Every tested row on the first test seed ({glue:text}`n_test` samples), at each keep point: FD with its bootstrap
interval, keep-rate overall and among the samples actually edited (unedited samples are bit-identical to the
Original and always kept), similarity among edited samples, FID against renders with the attribute uniform, the
share of samples edited, and the cost — UNet passes per image when a user runs the row alone, and the seconds per
1,000 images this benchmark spent on 2 CPU cores (edited samples only: unedited ones are the Original's), each cell's
passes at its method's median seconds per pass, since a cell's own clock also counts whatever ran beside it."""),
(CODE, r"""tab = B.table(split="test")


def show_table(t, kp):
    t = t[t["keep point"] == kp].copy()
    out = pd.DataFrame({
        "setting": t["setting"],
        "FD [95% CI]": [tables.ci(f, l, h) for f, l, h in zip(t["FD"], t["FD lo"], t["FD hi"])],
        "keep all [95% CI]": [tables.ci(f, l, h) for f, l, h in zip(t["keep all"], t["keep all lo"], t["keep all hi"])],
        "keep among edited [95% CI]": [tables.ci(*r) for r in t[["keep all among edited", "keep all among edited lo",
                                                                   "keep all among edited hi"]].values],
        "similarity among edited [95% CI]": [tables.ci(*r) for r in t[["similarity among edited",
                                                                       "similarity among edited lo",
                                                                       "similarity among edited hi"]].values],
        "FID-target [95% CI]": [tables.ci(f, l, h) for f, l, h in zip(t["FID target"], t["FID target lo"],
                                                                       t["FID target hi"])],
        "edited": t["edited share"], "UNet passes / image": t["passes / image"],
        "s / 1,000 images": t["s / 1000 images (median rate)"], "note": t["note"].fillna("")})
    out.index = pd.MultiIndex.from_frame(t[["attribute", "row"]])
    return tables.frame(out, percent=["edited"], legend=f"Test seed {B.SEEDS['test']}, matched keep {kp}. "
                        "edited: share of samples edited; — : no setting reached this keep-rate on validation.")


display(show_table(tab, B.KEEP_POINTS[0]))
show_table(tab, B.KEEP_POINTS[1])"""),
(MD, r"""Beside the paper's P2 numbers (their judge reads real faces, ours the world's renders; only the direction of
the change is comparable):"""),
(CODE, r"""paper = pd.DataFrame(B.PAPER_P2_FD).T
ours = {"Original": {}, "best DiffLens (ours, keep 0.95)": {}}
t95 = tab[tab["keep point"] == B.KEEP_POINTS[0]]
for a in world.SOCIAL:
    best = fz["choices"][a]["best DiffLens"]
    r = t95[(t95["attribute"] == a) & (t95["row"] == (best or {}).get("label"))]
    ours["best DiffLens (ours, keep 0.95)"][a] = r["FD"].iloc[0] if len(r) else np.nan
    o = B.cells(B.OUT, "test", a)
    ours["Original"][a] = o[0]["meta"]["metrics"]["FD original"] if o else np.nan
both = pd.concat({"paper (P2, CelebA-HQ)": paper, "this book (embedded model)": pd.DataFrame(ours).T})
tables.frame(both, legend="FD against the uniform distribution.")"""),
(CODE, r"""from helpers.chapters import sites as SI

head = B.headline(split="test")
for a in world.SOCIAL:
    glue(f"reduction_{a}", tables.num(1 - head.loc[a, "DiffLens FD"] / head.loc[a, "FD original"], percent=True),
         display=False)
    t90 = tab[(tab["keep point"] == B.KEEP_POINTS[1]) & (tab["attribute"] == a) &
              (tab["row"] == fz["choices"][a]["best DiffLens"]["label"])]
    glue(f"fd90_{a}", tables.ci(*t90[["FD", "FD lo", "FD hi"]].values[0]) if len(t90) else "—", display=False)
    glue(f"paper_reduction_{a}", tables.num(1 - B.PAPER_P2_FD["DiffLens"][a] / B.PAPER_P2_FD["Original"][a],
                                            sig=2, percent=True), display=False)
lv = SI.lens_vs_h("test", "race")
glue("lens_race_h", tables.ci(lv["h"]["FD"], lv["h"]["FD lo"], lv["h"]["FD hi"]), display=False)
glue("lens_race_l", tables.ci(lv["lens"]["FD"], lv["lens"]["FD lo"], lv["lens"]["FD hi"]), display=False)
glue("lens_race_diff", tables.ci(lv["FD diff"]["diff"], lv["FD diff"]["lo"], lv["FD diff"]["hi"]), display=False)
glue("lens_race_halved", "halves it" if lv["verdict"]["halved"] else "does not halve it", display=False)
glue("lens_race_dir", "lower: the interval excludes zero" if lv["verdict"]["lower"] else
     "higher: the interval excludes zero" if lv["verdict"]["higher"] else "no measurable change", display=False)
bz = fz["choices"]["race"]["best DiffLens"]
bc = B.find(B.cells(B.OUT, "test", "race"), "race", B.Row(*bz["row"]), bz["setting"])["t"]
shares = lambda c: " / ".join(tables.num(float(x)) for x in B.class_shares(c, "race"))  # noqa: E731
glue("race_shares_orig", shares(B.io.load_tensors(B.OUT / "original_test.safetensors")[0]["cls.race"]), display=False)
glue("race_shares_best", shares(bc["cls.race"]), display=False)
ed = bc["asked"] >= 0
glue("race_reached", tables.num(float((bc["cls.race"][ed].long() == bc["asked"][ed].long()).float().mean()), percent=True),
     display=False)""",
 ["remove-cell"]),
(MD, r"""At its keep-{glue:text}`kp_hi` setting the best DiffLens row removes {glue:text}`reduction_gender` of the Original's FD on gender,
{glue:text}`reduction_age` on age and {glue:text}`reduction_race` on skin tone (in the paper, on P2: {glue:text}`paper_reduction_gender`,
{glue:text}`paper_reduction_age` and {glue:text}`paper_reduction_race`); at its keep-{glue:text}`kp_lo` setting it reaches FD
{glue:text}`fd90_gender`, {glue:text}`fd90_age` and {glue:text}`fd90_race`. {doc}`Chapter 6 <06_where_attributes_live>`
finds why skin tone is hard to move from h: over the edit window, transplanting h moves tone in under half of the
pairs the best activation patch moves, the first up block's output in most of them (its site and window maps give
the numbers). On skin tone the reduction is one move: the best row takes the shares of the four tones from
{glue:text}`race_shares_orig` to {glue:text}`race_shares_best` — tone 1 to tone 2, tones 3 and 4 as they were — and
{glue:text}`race_reached` of the samples it edited end in the class they were asked for. Run through this chapter's
protocol with an SAE at the first up block (the same rows, seeds, policies and samples edited), the best DiffLens
row's skin-tone FD at its keep-{glue:text}`kp_hi` setting moves from {glue:text}`lens_race_h` to {glue:text}`lens_race_l`, a paired
difference of {glue:text}`lens_race_diff` ({glue:text}`lens_race_dir`), which {glue:text}`lens_race_halved`."""),
(MD, r"""## The goals, checked

The issue that specified this benchmark set goals before any test cell existed; `benchmark.goals` checks each on
the stored cells (a miss is reported with its reason):"""),
(CODE, r"""gl = B.goals(split="test")
for a in world.SOCIAL:
    g = gl[(gl["attribute"] == a) & (gl["goal"] == "best DiffLens FD")]
    glue(f"goal_fd_{a}", tables.num(g["value"].iloc[0]) if len(g) and "value" in g and pd.notna(g["value"].iloc[0])
         else "not measured", display=False)
    glue(f"goal_fd_met_{a}", {True: "met", False: "not met"}.get(g["met"].iloc[0], "no bar") if len(g) else "—",
         display=False)
    mine = gl[(gl["attribute"] == a) & (gl["row"] == fz["choices"][a]["best DiffLens"]["label"]) &
              (gl["goal"] != "best DiffLens FD") & ~gl["goal"].str.startswith("minimal cell cost")]
    mine = mine[mine["goal"] != "FD bar at both keep bars"]
    missed = [f"{g} ({tables.num(v, sig=4)} against {tables.num(b, sig=4)})" for g, v, b, m in
              zip(mine["goal"], mine["value"], mine["bar"], mine["met"]) if m is False or m == 0]
    joint = gl[(gl["attribute"] == a) & (gl["goal"] == "FD bar at both keep bars")]
    glue(f"goal_joint_{a}", ("met" if bool(joint["met"].iloc[0]) else "not met") if len(joint) else "—",
         display=False)
    glue(f"goal_missed_{a}", ", ".join(missed) if missed else "none", display=False)
cost = gl[gl["goal"].str.startswith("minimal cell cost")]
over = cost[~cost["met"].astype(bool)]
glue("goal_cost_met", tables.num(int(cost["met"].astype(bool).sum())), display=False)
glue("goal_cost_n", tables.num(len(cost)), display=False)
glue("goal_cost_missed", "; ".join(f"{r} on {', '.join(sorted(set(g['attribute'])))}" for r, g in over.groupby("row"))
     or "none", display=False)
tables.frame(gl.set_index(["attribute", "goal"]))"""),
(MD, r"""## Against the best DiffLens row, pair by pair

Finding 1 is a claim about methods, so each baseline is compared with DiffLens *under the same policy*: with the
best DiffLens row of that policy — chosen by the freeze rule (lowest validation FD at keep {glue:text}`kp_hi`) from validation
numbers only — and with the distribution-level rows, which need no reading of who to edit, in both comparisons.
Under `minimal` every per-sample row reads who to edit with the same h-probe, but at its own first edited step, and
the probe reads better later in sampling: on the test seed it agrees with the judge's reading of the finished image
on {glue:text}`probe_gender_0` of samples at step 0 and {glue:text}`probe_gender_8` at step 8 for gender
({glue:text}`probe_age_0` / {glue:text}`probe_age_8` for age, {glue:text}`probe_race_0` / {glue:text}`probe_race_8`
for skin tone). Rows that edit from step 0 (Latent Editing always; others where validation chose that window) pay
for their window with a worse reading.

Each comparison is row minus best DiffLens row, on the same noise and class draws, with paired bootstrap
intervals: FD and overall keep-rate as run, McNemar's p on the per-sample keep outcomes, and **FD at the same
keep-rate**. Settings matched on validation do not keep exactly the same share on the test seed, so the row that
keeps less is *diluted* to the other's keep-rate — its edit applied to a random share of the samples, the rest left
as the Original drew them, which any method can do — before FDs are compared (`benchmark.matched_keep_fd`; the
class mixture makes this exact in expectation). A side is better only where an interval excludes zero
(`benchmark.outcome`): the side that keeps less wins outright if it still has the lower FD after dilution; the side
that keeps more wins at its own keep-rate, and if the other reaches a lower FD as run that is a *trade-off*; where
neither wins at the matched keep-rate, the side that keeps less wins if it reaches a lower FD as run, else there is
*no difference*. A baseline whose smallest setting already kept less than the keep point on validation cannot run there and is left
out of the comparison (listed). These rules were written after the gender test cells existed, before any age cell and any skin-tone
baseline cell (the best skin-tone row and its null edit had been run for chapter 6); the tables give every interval they read, so a reader can apply another rule."""),
(CODE, r"""orig_t = B.io.load_tensors(B.OUT / "original_test.safetensors")[0]
for a in world.SOCIAL:
    for step in (0, 8):
        agree = (orig_t[f"probe.{a}.{step}"].long() == orig_t[f"cls.{a}"].long()).float().mean()
        glue(f"probe_{a}_{step}", tables.num(float(agree), percent=True), display=False)
verdicts = {}
for a in world.SOCIAL:
    for pol in ("minimal", "iid"):
        d = B.against_best(split="test", attribute=a, policy=pol)
        f = B.finding1(d)
        verdicts[(a, pol)] = {**f, "best": d.attrs["best"], "siblings": sorted(
            d.loc[(d["kind"] == "DiffLens") & (d["outcome"] == "row better"), "row"]) if len(d) else []}
        glue(f"f1_{a}_{pol}", f["verdict"], display=False)
        if not len(d):
            continue
        cols = ["kind", "FD diff", "FD lo", "FD hi", "keep diff", "keep lo", "keep hi", "FD diff at matched keep",
                "matched lo", "matched hi", "McNemar p (keep)", "outcome"]
        d = d.set_index("row").reindex(columns=cols)
        out = pd.DataFrame({"kind": d["kind"],
                            "FD as run [95% CI]": [tables.ci(*r) for r in d[["FD diff", "FD lo", "FD hi"]].values],
                            "keep as run [95% CI]": [tables.ci(*r) for r in d[["keep diff", "keep lo", "keep hi"]].values],
                            "FD at matched keep [95% CI]": [tables.ci(*r) for r in
                                                            d[["FD diff at matched keep", "matched lo", "matched hi"]].values],
                            "McNemar p (keep)": d["McNemar p (keep)"], "outcome": d["outcome"]}, index=d.index)
        display(tables.frame(out, legend=f"{a}, policy {pol}: each row minus {verdicts[(a, pol)]['best']} at keep "
                                         f"{B.KEEP_POINTS[0]}, test seed."))"""),
(CODE, r"""def listing(rows_):
    return ", ".join(rows_) if rows_ else "none"


summary = pd.DataFrame([{"attribute": a, "policy": pol, "best DiffLens row": v["best"], "Finding 1": v["verdict"],
                         "baseline rows compared": f"{v['compared']} of {v['baselines']}",
                         "DiffLens better than": listing(v["DiffLens better"]),
                         "trade-off with": listing(v["trade-off"]), "no difference from": listing(v["no difference"]),
                         "better than DiffLens": listing(v["row better"]),
                         "cannot run at this keep": listing(v[B.UNREACHED]),
                         "undecided": listing(v[B.UNFINISHED] + v["test cell not run yet"])}
                        for (a, pol), v in verdicts.items()]).set_index(["attribute", "policy"])
def clauses(v):  # the verdict's evidence in words, empty outcomes left out
    parts = [f"better than {len(v['DiffLens better'])} of the {v['compared']} baseline rows compared"]
    for key, words in (("no difference", "no difference from"), ("trade-off", "a trade-off with"),
                       ("row better", "worse than"), (B.UNREACHED, "not compared with (cannot reach this keep-rate)"),
                       (B.UNFINISHED, "undecided against"), ("test cell not run yet", "no test cell yet for")):
        if v[key]:
            parts.append(f"{words} {listing(v[key])}")
    return "; ".join(parts)


for (a, pol), v in verdicts.items():
    glue(f"f1_{a}_{pol}_detail", clauses(v), display=False)
def named(a):  # the book's word for an attribute in prose
    return {"race": "skin tone"}.get(a, a)


beaten = [f"{named(a)} under `{pol}`, where {v['best']} is worse than {listing(v['siblings'])}"
          for (a, pol), v in verdicts.items() if v["siblings"]]
glue("declared_beaten", "On the test seed the declared row was itself beaten by another DiffLens row of its policy "
     "for " + "; ".join(beaten) + ". The freeze rule picks on validation numbers alone; the table of frozen choices above gives "
     "both rows' validation FDs"
     if beaten else "On the test seed no other DiffLens row of a policy beat the declared one", display=False)
tables.frame(summary, legend="Finding 1 per attribute and policy (benchmark.finding1) over the baseline rows — six "
             "rows from five methods (H-Distribution in two forms): holds = the best DiffLens row is better than every "
             "compared baseline; fails = a baseline is better; partly = ties or trade-offs, none better; undecided = "
             "a compared baseline has no test cell or an unfinished grid.")"""),
(MD, r"""## Leakage above the floor

An edit of any direction changes images; how much of the best DiffLens row's leakage is its features, and how much
the size of the edit? The null edit moves the same samples at the same steps by the same ‖Δh‖ in a random
direction:"""),
(CODE, r"""for a in world.SOCIAL:
    best = fz["choices"][a]["best DiffLens"]
    if best is None:
        continue
    lk = B.leakage(B.OUT, "test", a, B.Row(*best["row"]), best["setting"]).set_index("attribute")
    glue(f"leak_max_{a}", f"{tables.num(lk['above the floor'].max())} ({lk['above the floor'].idxmax()})", display=False)
    display(tables.frame(lk, legend=f"{a}: among the samples {best['label']} edited; flips = share whose judged "
                                    "class of that attribute changed."))"""),
(MD, r"""## A second test seed

The settings matched to keep {glue:text}`kp_hi` on validation, once more on a second fresh seed (n = {glue:text}`n_test`).
Per row, the table asks whether the two seeds' FD intervals overlap. That is a lenient test: it asks only that the
seeds do not clearly disagree, and a second-seed FD may fall outside the first seed's interval and still pass. The
Original moves between seeds too: {glue:text}`seed2_original`. The table below also says how many of the second seed's
cells have run."""),
(CODE, r"""rep = B.replication(tab, B.table(split="test2"))
both = rep["intervals overlap"].notna()
prog = B.split_progress(B.OUT, "test2")
done, planned, agree = int(prog["done"].sum()), int(prog["planned"].sum()), int((rep["intervals overlap"] == True).sum())  # noqa: E712
head2 = B.headline(split="test2")
glue("seed2_original", "; ".join(f"its FD is {tables.num(head.loc[a, 'FD original'])} on the first seed and "
                                 f"{tables.num(head2.loc[a, 'FD original'])} on the second ({named(a)})"
                                 for a in world.SOCIAL), display=False)
glue("seed2_sentence", f"{agree} of {int(both.sum())} rows' FD intervals at the keep-0.95 settings overlap the first seed's"
     + ("" if prog["complete"].all() else f"; {done} of the {planned} planned cells of the second seed have run "
        "so far, and a row without its cell is left out") if both.any() else
     f"no cell has run yet ({done} of {planned} planned), so there is nothing to compare", display=False)
display(tables.frame(prog, legend="Cells of the second test seed: the keep-0.95 settings of every tested row and "
                                  "the best DiffLens row's diagnostics (benchmark.planned_cells)."))
tables.frame(rep)"""),
(MD, r"""Finding 1 once more, from the second seed's cells alone: the same paired comparisons at keep {glue:text}`kp_hi`, the
same outcome rules, the same declared rows."""),
(CODE, r"""verdicts2 = {(a, pol): B.finding1(B.against_best(split="test2", attribute=a, policy=pol))
             for a in world.SOCIAL for pol in ("minimal", "iid")}
vrep = B.verdict_replication(verdicts, verdicts2)
decided = vrep["same verdict"].notna()
same = int((vrep["same verdict"] == True).sum())  # noqa: E712
differ = [f"{named(a)} · `{pol}` ({r['seed 1']} → {r['seed 2']}: {r['outcomes that changed']})"
          for (a, pol), r in vrep[decided & (vrep["same verdict"] == False)].iterrows()]  # noqa: E712
moved = [f"{named(a)} · `{pol}`: {r['outcomes that changed']}"
         for (a, pol), r in vrep[decided & (vrep["same verdict"] == True)].iterrows()  # noqa: E712
         if r["outcomes that changed"] != "none"]
glue("seed2_verdicts", f"Finding 1's verdict is the same on both seeds for {same} of the {int(decided.sum())} attribute × "
     "policy pairs decided on both" + (f"; it differs for {'; '.join(differ)}" if differ else "")
     + (f"; {int((~decided).sum())} pairs are still undecided on the second seed (cells missing)"
        if (~decided).any() else "")
     + (". Under an unchanged verdict, single baseline outcomes did change (" + "; ".join(moved) + "). The table "
        "above gives their intervals; an outcome decided by an interval end near 0 can flip between seeds" if moved
        else ". No baseline's outcome changed"), display=False)
g2 = B.goals(split="test2")
fd2 = g2[g2["goal"] == "best DiffLens FD"].set_index("attribute")
glue("seed2_goals", "; ".join(
    f"{named(a)} {tables.num(r['value'])} (removing {tables.num(1 - r['value'] / head2.loc[a, 'FD original'], percent=True)} "
    f"of the Original's FD" + ("" if pd.isna(r["bar"]) else f"; FD bar of {tables.num(r['bar'])} {'met' if r['met'] else 'not met'}")
    + ")" for a, r in fd2.iterrows() if pd.notna(r.get("value"))), display=False)
tables.frame(vrep, legend="Finding 1 (benchmark.finding1) on each test seed at keep 0.95, with the baseline rows "
             "whose outcome differs (benchmark.verdict_replication); same verdict is empty where a seed is undecided.")"""),
(MD, r"""## What the table says

**The goals set before the test.** The best DiffLens row declared on validation reaches, at its keep-{glue:text}`kp_hi` setting,
FD {glue:text}`goal_fd_gender` on gender ({glue:text}`goal_fd_met_gender` against the bar of {glue:text}`bar_fd` on its own; the
bar together with both keep bars: {glue:text}`goal_joint_gender`) and {glue:text}`goal_fd_age` on age
({glue:text}`goal_fd_met_age`; with the keep bars: {glue:text}`goal_joint_age`); race, which has no bar, reaches
{glue:text}`goal_fd_race`. Its other goals missed — keep overall, keep among the edited samples, FID-target — are:
gender: {glue:text}`goal_missed_gender`; age: {glue:text}`goal_missed_age`; skin tone: {glue:text}`goal_missed_race`.
{glue:text}`goal_cost_met` of {glue:text}`goal_cost_n` `minimal` test cells cost at most {glue:text}`bar_cost` of a full cell's UNet
passes (over: {glue:text}`goal_cost_missed`).

**Finding 1, policy by policy.** Under `minimal` assignment (per-sample rows move only each batch's surplus, read
by the same h-probe at their own first edited step) the verdict for the DiffLens row declared best on validation is
*{glue:text}`f1_gender_minimal`* on gender (it is {glue:text}`f1_gender_minimal_detail`),
*{glue:text}`f1_age_minimal`* on age ({glue:text}`f1_age_minimal_detail`) and *{glue:text}`f1_race_minimal`* on skin
tone ({glue:text}`f1_race_minimal_detail`). Under `iid` assignment — the paper's probability mode, where every sample
draws a class and majority samples are pushed too — it is *{glue:text}`f1_gender_iid`* on gender
({glue:text}`f1_gender_iid_detail`), *{glue:text}`f1_age_iid`* on age ({glue:text}`f1_age_iid_detail`) and
*{glue:text}`f1_race_iid`* on skin tone ({glue:text}`f1_race_iid_detail`). {glue:text}`declared_beaten`.

**Who is edited.** The best DiffLens row of each policy at its keep-{glue:text}`kp_hi` setting on the test seed, and the `minimal` row once
more with an oracle reading of each sample's own class:"""),
(CODE, r"""from dataclasses import replace

pol_rows = []
for a in world.SOCIAL:
    found_a = B.cells(B.OUT, "test", a)
    for pol in ("iid", "minimal", "oracle"):
        best = B.best_difflens(fz["choices"][a], "minimal" if pol == "oracle" else pol)
        m = {}
        if best is not None:
            row = B.Row(*best["row"])
            try:  # the oracle diagnostic runs the declared best row with an unedited pass read by a second judge
                m = B.find(found_a, a, replace(row, policy="oracle") if pol == "oracle" else row,
                           best["setting"])["meta"]["metrics"]
            except KeyError:
                pass
        pol_rows.append({"attribute": a, "who is edited": pol if pol != "oracle" else "oracle (diagnostic)",
                         "DiffLens row": (best or {}).get("label"),
                         "FD [95% CI]": tables.ci(m.get("FD"), m.get("FD lo"), m.get("FD hi")),
                         "keep all": m.get("keep all"), "edited": m["edited"] / B.N["test"] if m else None})
pol_tab = pd.DataFrame(pol_rows).set_index(["attribute", "who is edited"])
tables.frame(pol_tab, percent=["edited"], legend="The best DiffLens row of each policy (chosen on validation) at its "
             "keep-0.95 setting; oracle: the same row and setting as minimal, each sample's own class read from an "
             "unedited pass by a second judge instead of the h-probe (one extra pass per image).")"""),
(MD, r"""**Leakage above the floor.** Among the samples the best DiffLens row edited, the largest flip
rate of another attribute above its size-matched null edit is {glue:text}`leak_max_gender` for gender,
{glue:text}`leak_max_age` for age and {glue:text}`leak_max_race` for skin tone (the leakage tables above).

**A second seed.** On the second test seed, {glue:text}`seed2_sentence`. {glue:text}`seed2_verdicts`. The declared best
DiffLens rows at the same settings reach, on the second seed: {glue:text}`seed2_goals`. The goals above are checked on
the first test seed, as planned; where the second seed disagrees with one, this sentence says so."""),
(CODE, r"""found = {a: B.cells(B.OUT, "test", a) for a in world.SOCIAL}
orig = B.io.load_tensors(B.OUT / "original_test.safetensors")[0]
rows_img, labels = [], []
for a in world.SOCIAL:
    best = fz["choices"][a]["best DiffLens"]
    if best is None:
        continue
    c = B.find(found[a], a, B.Row(*best["row"]), best["setting"])
    shown = c["t"]["shown"].long()[:8]
    rows_img += [orig["images"][shown].float() / 255, c["t"]["images"][:8].float() / 255]
    labels += [f"{a}: original", f"{a}: DiffLens"]
show_images(torch.cat(rows_img), nrow=8, row_labels=labels);""", ["hide-input"],
 {"name": "fig-same-noise", "caption": "The same noises, original and under the best DiffLens row at keep 0.95, per "
  "social attribute (edited samples first)."}),
]
OUT = Path(__file__).resolve().parent.parent / "07_benchmark.ipynb"


def main():
    # the chapter's code cells are tables, glue and plots: folded (hide-input) unless a cell says otherwise
    cells = [c if c[0] != CODE or len(c) > 2 else (*c, ["hide-input"]) for c in CELLS]
    write(cells, OUT)


if __name__ == "__main__":
    main()
