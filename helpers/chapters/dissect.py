"""Chapters 2–3 experiments on the embedded model's bottleneck: harvest → SAE → checks.

:func:`run` does everything ``scripts/dissect.py`` (and the chapters' ``RECOMPUTE`` flag) does,
writing ``data/dissect/`` (what chapters 2 and 3 load):

* ``summary.safetensors``  — harvest summary: images, judge probabilities, spatial-mean h per step
* ``sae.safetensors`` / ``sae_noaux.safetensors`` — the SAEs, their config, history and held-out metrics
* ``latents.safetensors``  — spatial-mean SAE latents per sample at a few steps
* ``channel_edits.json``   — leakage of single-channel edits onto every attribute
* ``reconstruction.safetensors`` — samples with h replaced by its SAE reconstruction vs the originals
* ``log.json``             — timings and headline numbers

The full activation shards stay in the cache (``data/cache/harvest-<key>/``, not committed).
"""
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import harvest as H
from .. import hooks, io, metrics, models, pipeline, world
from .. import judge as J
from .. import sae as S

OUT = models.DATA_DIR / "dissect"
EVAL_SEED = 2025  # chapter 1's evaluation noise: the reconstruction check runs on unseen noise
ANALYSIS_STEPS = (0, 6, 12, 18, 24)  # steps whose pooled latents are shipped (scaled for --quick)


def pooled_latents(sae, folder, steps, n, batch=200_000):
    """Spatial-mean latent activation ``(n, len(steps), latents)`` from the harvest shards."""
    rows = H.load_rows(folder, steps=steps)
    pos = int((rows["position"].max() + 1).item())
    out = torch.zeros(n * len(steps), sae.cfg.d_sae)
    lut = torch.full((max(steps) + 1,), -1, dtype=torch.long)
    lut[list(steps)] = torch.arange(len(steps))
    cap = rows["sample"] * len(steps) + lut[rows["step"]]  # which (sample, step) each row belongs to
    with torch.no_grad():
        for i in range(0, len(rows["x"]), batch):
            vals, idx = sae.encode_topk(rows["x"][i:i + batch].float())
            c = cap[i:i + batch]
            out.view(-1).index_add_(0, (c[:, None] * sae.cfg.d_sae + idx).flatten(), vals.flatten())
    return (out / pos).view(n, len(steps), -1)


def channel_edits(model, summary, judge, n, steps, alphas=(10.0, 30.0)):
    """For each social attribute, add ``alpha`` std to its most informative channel; judged changes.

    The std is that of the channel's spatial mean over the harvest (all samples and steps); the
    shift is added at every position and step, for each ``alpha``.
    """
    labels = summary.labels()
    mid = summary.pooled.shape[1] // 2
    acts = summary.pooled[:, mid].float()
    nmi = metrics.unit_attribute_nmi(acts, labels)
    std = summary.pooled.float().std((0, 1))
    noise = models.make_noise(n, model.sample_size, EVAL_SEED)
    base = models.sample(model, noise=noise, steps=steps, batch_size=n)
    pb = judge.predict(base)
    out = {"n": n, "steps": steps, "alphas": list(alphas), "nmi_step": mid, "edits": []}
    for a in world.SOCIAL:
        c = int(nmi[a].idxmax())
        for alpha in alphas:
            shift = torch.zeros(1, std.numel(), 1, 1)
            shift[0, c] = alpha * std[c]
            with hooks.edit(model.unet, lambda h, info, shift=shift: h + shift):
                imgs = models.sample(model, noise=noise, steps=steps, batch_size=n)
            pe = judge.predict(imgs)
            changed = {b: float((pe[b].argmax(-1) != pb[b].argmax(-1)).float().mean()) for b in world.ATTRIBUTES}
            out["edits"].append({"target": a, "channel": c, "alpha": alpha, "nmi": nmi.loc[c].to_dict(),
                                 "changed": changed})
    return out


def reconstruction_check(model, sae, judge, n, steps):
    noise = models.make_noise(n, model.sample_size, EVAL_SEED)
    orig = models.sample(model, noise=noise, steps=steps, batch_size=min(n, 250))
    with hooks.edit(model.unet, lambda h, info: sae.reconstruct(h)):
        rec = models.sample(model, noise=noise, steps=steps, batch_size=min(n, 250))
    po, pr = judge.predict(orig), judge.predict(rec)
    sim = metrics.similarity(orig, rec, judge)
    tensors = {"orig": (orig * 255).round().to(torch.uint8), "rec": (rec * 255).round().to(torch.uint8),
               "similarity": sim}
    tensors.update({f"orig.{a}": p for a, p in po.items()})
    tensors.update({f"rec.{a}": p for a, p in pr.items()})
    return tensors


def auxk_stress(x_train, x_held, cfg, tc, progress=True) -> dict:
    """With and without AuxK in a regime where latents *do* die: untied random encoder init,
    a 5× higher learning rate and a shorter dead window (100,000 rows). The main SAEs (tied init)
    lose no latents, so there AuxK never fires; this shows what it does when they die."""
    out = {}
    for name, aux in (("with AuxK", tc.aux_k), ("without AuxK", 0)):
        tci = S.SAETrainConfig(**(asdict(tc) | {"aux_k": aux, "tied_init": False, "lr": 5 * tc.lr,
                                                "steps": max(50, tc.steps // 3), "dead_rows": 100_000}))
        t1 = time.time()
        sae, hist = S.train_sae(x_train, cfg, tci, desc=f"stress {name}", progress=progress)
        out[name] = {"train": asdict(tci), "history": hist, "held_out": S.evaluate(sae, x_held),
                     "train_seconds": time.time() - t1}
    return out


def run(out=OUT, quick: bool = False, recompute_harvest: bool = False, progress: bool = True) -> dict:
    """Harvest (cached), train both SAEs, run the checks; write everything to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        hs = H.HarvestSettings(n=40, steps=5, batch_size=20)
        tc = S.SAETrainConfig(steps=60, batch_size=1024, log_every=10, dead_rows=20_000)
        steps_keep, n_rec, n_edit = (0, 2, 4), 16, 16
    else:
        hs = H.HarvestSettings()
        tc = S.SAETrainConfig()
        steps_keep, n_rec, n_edit = ANALYSIS_STEPS, 400, 128
    from .. import cache

    log = {"model_fingerprint": cache.fingerprint(models.EMBEDDED_DIR),
           "judge_fingerprint": cache.fingerprint(J.JUDGE_PATH), "quick": quick}
    t0 = time.time()
    folder = H.cached("embedded", hs, recompute=recompute_harvest, progress=progress)
    log["harvest_seconds"] = time.time() - t0
    import resource

    log["peak_rss_gib_after_harvest"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log["harvest_folder"] = folder.name
    print(f"harvest: {folder} ({log['harvest_seconds']:.0f} s)", flush=True)
    summary = H.load_summary(folder)
    io.atomic_write(out / "summary.safetensors",
                    lambda tmp: Path(tmp).write_bytes((folder / "summary.safetensors").read_bytes()))

    rows = H.load_rows(folder)
    n_train = pipeline.n_train(hs.n)  # samples [0, n_train) train the SAE; the rest are held out
    train_mask = rows["sample"] < n_train
    x_train, x_held = rows["x"][train_mask], rows["x"][~train_mask]
    width = x_train.shape[1]
    cfg = S.SAEConfig(d_in=width, expansion=8, k=S.scaled_k(width))
    results = {}
    for name, aux in (("sae", tc.aux_k), ("sae_noaux", 0)):
        tci = S.SAETrainConfig(**(asdict(tc) | {"aux_k": aux}))
        t1 = time.time()
        sae, hist = S.train_sae(x_train, cfg, tci, desc=name, progress=progress)
        secs = time.time() - t1
        ev = S.evaluate(sae, x_held)
        results[name] = ev | {"train_seconds": secs}
        print(name, json.dumps(results[name]), flush=True)
        S.save_sae(sae, out / f"{name}.safetensors",
                   meta={"train": asdict(tci), "history": hist, "held_out": ev, "train_seconds": secs,
                         "train_rows": int(len(x_train)), "harvest": folder.name,
                         "harvest_settings": asdict(hs), "held_out_samples": [n_train, hs.n]})
        if name == "sae":
            main_sae = sae
    stress = auxk_stress(x_train, x_held, cfg, tc, progress=progress)
    io.write_json(out / "auxk_stress.json", stress)
    results["stress"] = {k: v["held_out"] for k, v in stress.items()}
    del rows, x_train, x_held

    lat = pooled_latents(main_sae, folder, steps_keep, hs.n)
    io.save_tensors(out / "latents.safetensors", {"pooled": lat.to(torch.float16)},
                    meta={"steps": list(steps_keep), "sae": "sae.safetensors"})
    model = models.load_model("embedded")
    judge = J.load_judge()
    t1 = time.time()
    edits = channel_edits(model, summary, judge, n_edit, hs.steps)
    edits["seconds"] = time.time() - t1
    io.write_json(out / "channel_edits.json", edits)
    t1 = time.time()
    rec = reconstruction_check(model, main_sae, judge, n_rec, hs.steps)
    io.save_tensors(out / "reconstruction.safetensors", rec,
                    meta={"n": n_rec, "steps": hs.steps, "seed": EVAL_SEED, "seconds": time.time() - t1})
    log.update(results=results, total_seconds=time.time() - t0)
    io.write_json(out / "log.json", log)
    return log

