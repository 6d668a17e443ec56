"""Train the embedded portrait diffusion model (runs in the background; resumable).

    nohup python scripts/train_embedded.py --steps 4000 > runs/embedded.log 2>&1 &

Checkpoints go to ``runs/embedded/checkpoint.safetensors`` (rerun the same command to resume);
EMA weights are exported to ``data/embedded`` at every checkpoint.
"""
import argparse
import json

import torch

from helpers import models

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="total optimizer steps")
    ap.add_argument("--out", default="runs/embedded", help="checkpoint folder")
    ap.add_argument("--export", default=str(models.EMBEDDED_DIR), help="diffusers folder for EMA weights")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (after a checkpoint) when exceeded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                    help="override the config's prediction type")
    ap.add_argument("--init-from", default=None,
                    help="diffusers folder exported by an earlier run to warm-start a new run from")
    ap.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    ap.add_argument("--lr-decay", default=None, choices=["constant", "cosine"],
                    help="override the schedule after warm-up (cosine decays to 10%% of lr at --steps)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = models.EmbeddedConfig()
    if a.prediction_type:
        cfg.prediction_type = a.prediction_type
    if a.lr is not None:
        cfg.lr = a.lr
    if a.lr_decay:
        cfg.lr_decay = a.lr_decay
    summary = models.train(cfg, a.out, a.steps, checkpoint_every=a.checkpoint_every,
                           export_dir=a.export, max_minutes=a.max_minutes, init_from=a.init_from)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
