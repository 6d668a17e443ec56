"""Sample the embedded model on the evaluation noise, store the samples and the quality reports.

    python scripts/evaluate_embedded.py --n 2000 --steps 25 100     # evaluation sets + quality reports
    python scripts/evaluate_embedded.py --sweep 10 25 50 100         # class shares vs DDIM steps (n = 500)

Evaluation sets go to ``data/embedded_eval/samples_<steps>.safetensors`` (uint8 images + settings, read by
chapter 1) and their reports to ``data/embedded_eval/quality.json`` (one report per step count). The sweep
writes ``data/embedded_eval/steps.json``: judged class shares, confident shares and the largest gap to the
spec for the first ``--sweep-n`` samples of the same noise at each step count; a step count that already
has an evaluation set reuses its first samples (per-sample noise, deterministic DDIM: the same images).
Every file is written atomically, and a report is added to ``quality.json`` without touching the others.
"""
import argparse
import json
import time

import torch

from helpers import io, judge as J, metrics, models, world

EVAL_SEED = 2025  # sampling-noise seed of the evaluation set
REF_SEEDS = (9_001, 9_002)  # fresh-render seeds of the two reference sets
EVAL_DIR = models.DATA_DIR / "embedded_eval"


def samples_path(steps: int):
    return EVAL_DIR / f"samples_{steps}.safetensors"


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(model, judge, n: int, steps: int, threads: int) -> dict:
    t0 = time.time()
    imgs = models.sample(model, n, steps=steps, seed=EVAL_SEED, progress=True)
    secs = time.time() - t0
    trained = json.loads((models.EMBEDDED_DIR / "training.json").read_text())["steps"]
    meta = {"n": n, "steps": steps, "seed": EVAL_SEED, "model_train_steps": trained,
            "sampling_seconds": secs, "threads": threads}
    q = (imgs * 255).round()  # what is stored, and what is judged
    io.save_tensors(samples_path(steps), {"images": q.to(torch.uint8)}, meta=meta)
    spec = world.default_spec()
    ref = world.sample(n, spec, seed=REF_SEEDS[0]).images
    ref2 = world.sample(n, spec, seed=REF_SEEDS[1]).images
    report = metrics.quality_report(q / 255, judge, spec, ref, ref2)
    report["settings"] = meta
    return report


def sweep_point(model, judge, n: int, steps: int) -> dict:
    stored = samples_path(steps)
    t0 = time.time()
    tensors, meta = io.load_tensors(stored) if stored.is_file() else (None, {"n": 0})
    if meta["n"] >= n:
        imgs, source = tensors["images"][:n].float() / 255, stored.name
    else:
        imgs = (models.sample(model, n, steps=steps, seed=EVAL_SEED, progress=True) * 255).round() / 255
        source = "sampled"
    secs = time.time() - t0
    probs = judge.predict(imgs)
    shares = metrics.class_shares(probs, world.default_spec(), world.SOCIAL)
    conf = metrics.confident_share(probs, world.SOCIAL, 0.9)
    return {"n": n, "steps": steps, "seed": EVAL_SEED, "source": source, "seconds": secs,
            "attributes": {a: {**shares[a], "confident": conf[a]} for a in world.SOCIAL}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="samples per evaluation set")
    ap.add_argument("--steps", type=int, nargs="*", default=[], help="DDIM step counts to evaluate")
    ap.add_argument("--sweep", type=int, nargs="*", default=[], help="DDIM step counts for the share sweep")
    ap.add_argument("--sweep-n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not a.steps and not a.sweep:
        ap.error("nothing to do: give --steps (evaluation sets) and/or --sweep (share vs steps)")
    if any(s < 1 for s in a.steps + a.sweep) or a.n < 2 or a.sweep_n < 2:
        ap.error("step counts must be ≥ 1 and sample counts ≥ 2")
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    judge = J.load_judge()
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    for steps in a.steps:
        report = evaluate(model, judge, a.n, steps, a.threads)
        quality = _read_json(EVAL_DIR / "quality.json")
        quality[str(steps)] = report
        io.write_json(EVAL_DIR / "quality.json", quality)
        print(json.dumps({k: v for k, v in report.items() if k != "attributes"}, indent=1))
        for attr, r in report["attributes"].items():
            print(f"{steps} steps {attr}: model {[round(x, 3) for x in r['model']]} spec {r['spec']} "
                  f"gap {r['max_abs_gap']:.3f}")
    for steps in a.sweep:
        point = sweep_point(model, judge, a.sweep_n, steps)
        sweep = _read_json(EVAL_DIR / "steps.json")
        sweep[str(steps)] = point
        io.write_json(EVAL_DIR / "steps.json", sweep)
        print(steps, {k: [round(x, 3) for x in v["model"]] for k, v in point["attributes"].items()})
