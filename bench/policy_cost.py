"""What a benchmark cell costs under each assignment policy when unedited samples are reused and edited
ones are resumed from the Original's state at the first edited step (issue 15, item 6), in one run.

    python bench/policy_cost.py [--threads 2] [--n 256] [--batch 128] [--from-step 8]

For the embedded model, the shipped SAE, probe and chapter-4 features, on one noise seed:

1. the Original pass, keeping each sample's state entering ``--from-step`` and the probe's reading of its
   own class from h at that step (what a stored Original cell would hold);
2. per attribute and policy (``quota``: exact counts over the cell; ``iid``: independent draws; ``minimal``:
   the surplus per batch, own class read by the probe), the samples asked to change; the UNet passes of a
   cell that reuses the others and resumes the edited ones, as a share of a full cell (n × steps);
3. for ``minimal`` on gender, the cell actually run both ways (``pipeline.edited_pass``), timed and compared.

Goal (issue 15): a ``minimal`` cell ≤ 35% of a full cell's UNet passes.
"""
import argparse
import time
from dataclasses import replace

import torch

from helpers import intervention, models, pipeline, world
from helpers import judge as J
from helpers import probe as P
from helpers import sae as S
from helpers.chapters import dissect, identify

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--from-step", type=int, default=8)
    ap.add_argument("--seed", type=int, default=9_191)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    sae, _ = S.load_sae(dissect.OUT / "sae.safetensors")
    probe, _ = P.load_probe(identify.OUT / "probe.safetensors")
    judge = J.load_judge()
    noise = models.make_noise(a.n, model.sample_size, a.seed)
    s0 = a.from_step

    t0 = time.time()
    ref = pipeline.original_pass(model, noise, a.steps, judge, state_steps=(s0,), pooled_steps=(s0,), batch_size=a.batch)
    t_orig = time.time() - t0
    print(f"Original pass: {a.n} samples × {a.steps} steps in {t_orig:.1f} s ({a.n / t_orig:.2f} images/s)")

    full = a.n * a.steps
    print(f"\nUNet passes of a cell that reuses unedited samples and resumes edited ones at step {s0}, "
          f"as a share of a full cell ({full} passes); batch {a.batch} for the per-batch quotas")
    print(f"{'attribute':10} {'policy':8} {'asked to change':>16} {'passes':>8} {'share':>7}")
    for attr in world.SOCIAL:
        k = len(world.ATTRIBUTES[attr])
        target = pipeline.uniform(k)
        own = probe.logits_pooled(ref.pooled[s0], s0)[attr].argmax(-1)
        asked = {"quota": intervention.assign_classes(a.n, target, seed=1),
                 "iid": intervention.assign_iid(a.n, target, seed=1),
                 "minimal": intervention.assign_minimal(own, target, a.batch, seed=1)}
        for pol, cl in asked.items():
            # quota and iid ask every sample for a class, its own included: the edit still runs on it (footprint
            # add of the asked class's features), so every sample is resumed; minimal asks only the surplus
            edited = int((cl >= 0).sum())
            passes = edited * (a.steps - s0)
            print(f"{attr:10} {pol:8} {edited:>10} / {a.n:<4} {passes:>8} {passes / full:>7.1%}")

    # the real thing for one attribute: full cell vs reuse + resume, same images
    e = identify.edit_for("gender", 4.0, target=[0.5, 0.5], swap=True, steps=range(s0, a.steps))
    e = replace(e, policy="minimal", probe=probe)
    t0 = time.time()
    full_imgs, iv = intervention.sample_edited(model, sae, [e], noise=noise, steps=a.steps, batch_size=a.batch,
                                               class_seed=1)
    t_full = time.time() - t0
    cl = iv.classes("gender")
    pre = replace(e, policy="quota", probe=None)

    def run(idx, x, start):
        sub = replace(pre, assigned=cl[idx])
        return intervention.sample_edited(model, sae, [sub], noise=x, steps=a.steps, batch_size=a.batch,
                                          start_step=start)[0]

    t0 = time.time()
    cell = pipeline.edited_pass(ref, cl, run, judge, start_step=s0)
    t_res = time.time() - t0
    edited = cell["edited"]
    same_unedited = torch.equal(full_imgs[~edited], ref.images[~edited])
    want = judge.predict(full_imgs)["gender"]
    err = (cell["probs"]["gender"] - want).abs().max().item()
    print(f"\ngender, minimal, swap β 4 from step {s0}: full cell {t_full:.1f} s; reuse + resume {t_res:.1f} s "
          f"({t_res / t_full:.1%} of the time) for {int(edited.sum())} edited of {a.n}; unedited samples "
          f"bit-identical to the Original: {same_unedited}; judged probabilities vs the full cell max |Δ| {err:.2e}")
