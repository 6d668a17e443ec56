"""The quality bar of the world's Stable Diffusion (data/minisd/sd), resumably, one part at a time.

    python scripts/evaluate_minisd.py --n 300 --seed 31000 --guidance 1 1.25 1.5 1.75 2 3 5   # validation: choose guidance
    python scripts/evaluate_minisd.py --n 2000 --guidance 1.25       # every bare prompt at the book's settings (test seed)
    python scripts/evaluate_minisd.py --n 500 --guidance 1           # the guidance ablation: the same first 500, unguided
    python scripts/evaluate_minisd.py --words 50 --guidance 1.25     # text alignment with explicit words

Each finished part (one prompt at one guidance scale and n, or the words test) is added to
data/minisd/quality.json atomically; a part already there is skipped, so a killed run resumes.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from helpers import io, judge as J, judges, minisd, world

OUT = io.DATA_DIR / "minisd" / "quality.json"
SD = io.DATA_DIR / "minisd" / "sd"
CLIP = io.DATA_DIR / "minisd" / "clip"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[minisd.GUIDANCE])
    ap.add_argument("--contexts", nargs="+", default=list(world.CONTEXTS))
    ap.add_argument("--words", type=int, default=0, help="samples per named class for the text-alignment test")
    ap.add_argument("--seed", type=int, default=minisd.QUALITY_TEST["seed"],
                    help="sampling seed (default: the test seed; choose settings on another one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sd", default=str(SD), help="the pipeline folder to judge (a candidate, before it is shipped)")
    ap.add_argument("--out", default=str(OUT), help="where the parts are stored (keep a candidate's apart)")
    ap.add_argument("--device", default="cpu", help="where the SD samples (the judges read on the CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    SD, OUT = Path(a.sd), Path(a.out)
    judge = J.load_judge()
    done = json.loads(OUT.read_text()) if OUT.is_file() else {}
    fingerprint = minisd.cache.fingerprint(SD)
    for g in a.guidance:
        if a.words:
            key = f"words/per_class={a.words}/steps={a.steps}/guidance={g:g}/seed={a.seed}"
            if done.get(key, {}).get("model") != fingerprint:
                t0 = time.time()
                r = minisd.prompt_words(SD, judge, judges.ClipJudge(CLIP, prompts=minisd.judge_prompts(),
                                                                    classes=minisd.judge_classes()),
                                        per_class=a.words, steps=a.steps, guidance=g, seed=a.seed, device=a.device)
                done[key] = {**r, "seconds": time.time() - t0, "model": fingerprint, "device": a.device}
                io.write_json(OUT, done)
                print(key, json.dumps(r["attributes"]), flush=True)
            continue
        for ctx in a.contexts:
            key = f"shares/{ctx}/n={a.n}/steps={a.steps}/guidance={g:g}/seed={a.seed}"
            if key in done and done[key].get("model") == fingerprint:
                continue
            r = minisd.prompt_shares(SD, judge, n=a.n, steps=a.steps, guidance=g, seed=a.seed, contexts=(ctx,),
                                     device=a.device)
            done[key] = {**r["prompts"][ctx], "settings": r["settings"], "model": fingerprint, "device": a.device}
            io.write_json(OUT, done)
            print(key, f"max gap {done[key]['max_abs_gap']:.3f}", json.dumps(
                {k: v["model"] for k, v in done[key]["attributes"].items()}), flush=True)
