"""Writes book/intro.ipynb: the landing page, with the headline results glued from chapter 7's test cells
(issue 20, item 5). Run: python book/drafts/make_intro.py
"""
from pathlib import Path

from nbwrite import CODE, MD, write

WORLD = r"""## The world this book works in — and what it is not

The paper studies models trained on photographs of people, with bias judged by a face-attribute
classifier (FairFace; {cite:p}`karkkainen2021fairface`). This book runs on a laptop CPU, offline, and must be able to *check*
its claims. So its default model is a small diffusion model that this project trains on a
**procedurally rendered portrait world**: cartoon faces drawn from a handful of discrete
factors whose joint distribution we choose, and therefore know exactly.

That world is a **controlled stand-in with known factors, not people**. Its "gender" is hair
length and a beard, its "age" is hair colour and forehead lines, and its "race" is nothing but
one of four skin tones — a caricature no one should mistake for what those words mean for real
people. What the stand-in buys us is ground truth: we know which factors a debiasing edit
*should* move and which it *must not* (background, glasses, smile, head position), so we can
measure side effects the paper could only eyeball. The same helpers run unchanged on real
diffusers models (Stable Diffusion v1.5, a CelebA-HQ DDPM) on a GPU; there, the judge becomes
a real face-attribute classifier, with all the caveats such classifiers carry.

## Using the book

* Read it rendered, or execute each chapter cell by cell (`make book` builds it; chapters
  import the `helpers` package installed by `make`).
* Every chapter loads shipped artifacts from `data/` and has one `RECOMPUTE` flag at the top
  that regenerates them from scratch (slow on a CPU; minutes to hours, as stated).
"""
CELLS = [
(MD, r"""# DiffLens, runnable

This book is a runnable companion to **DiffLens** — *Dissecting and Mitigating Diffusion Bias
via Mechanistic Interpretability* {cite:p}`shi2025difflens`. DiffLens asks *where* a diffusion
model keeps the social biases it shows in its samples, and answers it in three steps:

1. **Dissect.** The U-Net's bottleneck (the output of its mid block, often called *h-space*)
   is polysemantic: single channels respond to many attributes at once. A sparse autoencoder
   (SAE; {cite:p}`gao2024scaling`) trained on bottleneck activations splits it into many sparse features that each
   respond to fewer things.
2. **Identify.** A light classifier on h-space reads the attribute at each sampling step;
   integrated gradients {cite:p}`sundararajan2017axiomatic` through the SAE decoder rank the features that drive each class.
3. **Intervene.** Scaling or adding to those few features while sampling moves the
   attribute distribution — towards fairness, or to any target mix — without retraining."""),
(CODE, r"""import json

import pandas as pd
import torch
from myst_nb import glue

from helpers import tables, world
from helpers.chapters import benchmark as B
from helpers.plots import show_images

head = B.headline(split="test")
log = json.loads((B.OUT / "log.json").read_text())
f1 = {(a, pol): B.finding1(B.against_best(split="test", attribute=a, policy=pol))
      for a in world.SOCIAL for pol in ("minimal", "iid")}
for a in world.SOCIAL:
    h = head.loc[a]
    glue(f"h_orig_{a}", tables.num(h["FD original"]), display=False)
    glue(f"h_dl_{a}", tables.ci(h["DiffLens FD"], h["DiffLens FD lo"], h["DiffLens FD hi"]), display=False)
    for pol in ("minimal", "iid"):
        glue(f"h_f1_{a}_{pol}", f1[(a, pol)]["verdict"], display=False)
    glue(f"h_keep_{a}", tables.num(h["DiffLens keep all"], percent=True), display=False)
best = log["frozen"]["choices"]["race"]["best DiffLens"]
bc = B.find(B.cells(B.OUT, "test", "race"), "race", B.Row(*best["row"]), best["setting"])["t"]
shares = lambda c: " / ".join(tables.num(float(x)) for x in B.class_shares(c, "race"))  # noqa: E731
glue("h_race_orig", shares(B.io.load_tensors(B.OUT / "original_test.safetensors")[0]["cls.race"]), display=False)
glue("h_race_best", shares(bc["cls.race"]), display=False)
glue("h_n", tables.num(B.N["test"]), display=False)
glue("h_keep", tables.num(B.KEEP_POINTS[0], percent=True), display=False)""", ["remove-cell"]),
(MD, r"""## Results at a glance

On this book's model, the best DiffLens row — chosen on a validation seed before any test sample existed — brings
the Fairness Discrepancy (0 = the uniform target) of gender from {glue:text}`h_orig_gender` to
{glue:text}`h_dl_gender`, of age from {glue:text}`h_orig_age` to {glue:text}`h_dl_age` and of skin tone ("race") from
{glue:text}`h_orig_race` to {glue:text}`h_dl_race` ({glue:text}`h_n` test samples, 95% intervals). Its setting was
matched on validation to leave every other attribute of {glue:text}`h_keep` of the samples as the judge read it
without the edit; on the test seed it leaves {glue:text}`h_keep_gender` (gender), {glue:text}`h_keep_age` (age) and
{glue:text}`h_keep_race` (skin tone). On skin tone, the shares of tones 1–4 go from {glue:text}`h_race_orig` to
{glue:text}`h_race_best`.

Against five published baselines, each compared with DiffLens under the same rule for who gets edited, the verdict
on the paper's Finding 1 — DiffLens beats them — is, for gender, age and skin tone: *{glue:text}`h_f1_gender_minimal`*,
*{glue:text}`h_f1_age_minimal`* and *{glue:text}`h_f1_race_minimal`* when only each batch's surplus is edited (policy
`minimal`); *{glue:text}`h_f1_gender_iid`*, *{glue:text}`h_f1_age_iid`* and *{glue:text}`h_f1_race_iid`* when every
sample draws its class (`iid`, the paper's mode). {doc}`Chapter 7 <07_benchmark>` has every row, its interval and what each
verdict means."""),
(CODE, r"""t = pd.DataFrame({
    "FD, Original": head["FD original"],
    "best DiffLens row": head["DiffLens row"],
    "its FD [95% CI]": [tables.ci(*r) for r in head[["DiffLens FD", "DiffLens FD lo", "DiffLens FD hi"]].values],
    "its keep": head["DiffLens keep all"],
    "best baseline": head["baseline row"],
    "its FD [95% CI] ": [tables.ci(*r) for r in head[["baseline FD", "baseline FD lo", "baseline FD hi"]].values],
    "its keep ": head["baseline keep all"],
    "Finding 1 (minimal)": [f1[(a, "minimal")]["verdict"] for a in head.index],
    "Finding 1 (iid)": [f1[(a, "iid")]["verdict"] for a in head.index]})
tables.frame(t, legend=f"Test seed {B.SEEDS['test']}, n = {B.N['test']:,} per row, both rows at the setting matched to "
                       f"keep {B.KEEP_POINTS[0]} on validation; keep: share of samples whose other attributes the "
                       "judge reads unchanged; best baseline: lowest validation FD at that keep-rate.")""",
 ["hide-input"]),
(CODE, r"""orig = B.io.load_tensors(B.OUT / "original_test.safetensors")[0]
found = B.cells(B.OUT, "test")
imgs, labels = [], []
for a in world.SOCIAL:
    best = log["frozen"]["choices"][a]["best DiffLens"]
    c = B.find(found, a, B.Row(*best["row"]), best["setting"])
    shown = c["t"]["shown"].long()[:8]
    imgs += [orig["images"][shown].float() / 255, c["t"]["images"][:8].float() / 255]
    labels += [f"{a}: original", f"{a}: DiffLens"]
show_images(torch.cat(imgs), nrow=8, row_labels=labels);""", ["hide-input"],
 {"name": "fig-glance", "caption": "The same noises sampled by the model as trained and under the best DiffLens row "
  "for each attribute (test seed; edited samples first): the attribute moves; how much of the rest stays is "
  "measured in chapter 7 (keep among the edited samples)."}),
(MD, r"""## Roadmap

| Chapter | Question |
|---|---|
| {doc}`01_biased_model` | How biased is our model, and how do we measure bias and image quality? |
| {doc}`02_polysemanticity` | Do single bottleneck channels mean one thing? |
| {doc}`03_sae` | Can a TopK sparse autoencoder disentangle them? |
| {doc}`04_finding_features` | Which SAE features cause each attribute class? |
| {doc}`05_intervention_sweeps` | Does editing them move the distribution, smoothly and selectively? |
| {doc}`06_where_attributes_live` | Where in the U-Net, and when in sampling, is each attribute carried — how much of it can an edit of h reach, and does an SAE where skin tone lives do better? |
| {doc}`07_benchmark` | How does DiffLens compare with five published debiasing methods, on equal terms? |
| {doc}`08_your_own_model` | How to run the same pipeline on Stable Diffusion v1.5 or a CelebA-HQ DDPM |

The works the book cites are listed under {doc}`references`."""),
(MD, WORLD),
]
OUT = Path(__file__).resolve().parent.parent / "intro.ipynb"


def main():
    write(CELLS, OUT, typed_numbers={"95%": "the level of every confidence interval"})


if __name__ == "__main__":
    main()
