"""Sample the embedded model on the evaluation seeds, store the samples and print the quality report.

    python scripts/evaluate_embedded.py --n 2000 --steps 25

Writes ``data/embedded_samples.safetensors`` (uint8 images + settings), which chapter 1
loads, and ``data/embedded_quality.json`` (the report below, for notes and later chapters).
"""
import argparse
import json
import time

import torch

from helpers import io, judge as J, metrics, models, world

EVAL_SEED = 2025  # sampling-noise seed of the evaluation set
REF_SEEDS = (9_001, 9_002)  # fresh-render seeds of the two reference sets

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(models.DATA_DIR / "embedded_samples.safetensors"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.load_model("embedded")
    t0 = time.time()
    imgs = models.sample(model, a.n, steps=a.steps, seed=EVAL_SEED, progress=True)
    secs = time.time() - t0
    trained = json.loads((models.EMBEDDED_DIR / "training.json").read_text())["steps"]
    meta = {"n": a.n, "steps": a.steps, "seed": EVAL_SEED, "model_train_steps": trained,
            "sampling_seconds": secs, "threads": a.threads}
    io.save_tensors(a.out, {"images": (imgs * 255).round().to(torch.uint8)}, meta=meta)
    judge = J.load_judge()
    spec = world.default_spec()
    ref = world.sample(a.n, spec, seed=REF_SEEDS[0]).images
    ref2 = world.sample(a.n, spec, seed=REF_SEEDS[1]).images
    report = metrics.quality_report((imgs * 255).round() / 255, judge, spec, ref, ref2)
    report["settings"] = meta
    io.write_json(models.DATA_DIR / "embedded_quality.json", report)
    print(json.dumps(report, indent=1))
