"""Train the Stable Diffusion of the portrait world (helpers.minisd), stage by stage, resumably.

    nohup python scripts/train_minisd.py clip --threads 1 > runs/minisd-clip.log 2>&1 &
    nohup python scripts/train_minisd.py vae --threads 1 > runs/minisd-vae.log 2>&1 &
    nohup python scripts/train_minisd.py unet --threads 2 > runs/minisd-unet.log 2>&1 &   # needs clip and vae
    nohup python scripts/train_minisd.py decoder --threads 1 > runs/minisd-dec.log 2>&1 &  # needs vae (encoder kept)
    python scripts/train_minisd.py assemble      # data/minisd/sd: the StableDiffusionPipeline folder
    # continue the shipped UNet for more steps (fresh optimizer and schedule; the shipped encoder and decoder kept):
    nohup python scripts/train_minisd.py unet --init-from data/minisd/sd/unet --steps 10000 --run runs/minisd-more &
    python scripts/train_minisd.py assemble --run runs/minisd-more
    # the same, re-parametrised to zero terminal SNR + v-prediction (the fix for the drift toward the latents' mean):
    nohup python scripts/train_minisd.py unet --init-from data/minisd/sd/unet --zero-snr --steps 6000 --run runs/minisd-zsnr &
    python scripts/train_minisd.py report        # CLIP zero-shot + retrieval, VAE reconstructions → data/minisd/report.json

Checkpoints live in runs/minisd/<stage>.safetensors (rerun the same command to resume); the CLIP folder is
exported to data/minisd/clip, the VAE and UNet to runs/minisd/export/, each swapped in whole at every checkpoint.
"""
import argparse
import json
from pathlib import Path

import torch

from helpers import io, minisd

RUN = Path("runs/minisd")
CLIP = io.DATA_DIR / "minisd" / "clip"
SD = io.DATA_DIR / "minisd" / "sd"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["clip", "vae", "decoder", "unet", "assemble", "report"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override the stage's total steps")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (after a checkpoint) when exceeded")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--device", default="cpu", help="decoder and unet: train there (e.g. cuda)")
    ap.add_argument("--workers", type=int, default=0, help="decoder and unet: processes rendering batches ahead")
    ap.add_argument("--init-from", default="", help="unet: a UNet folder to continue from (e.g. data/minisd/sd/unet)")
    ap.add_argument("--run", default=str(RUN), help="the run folder holding checkpoints and exports")
    ap.add_argument("--sd", default=str(SD), help="assemble: the pipeline folder to write (default: the shipped one)")
    ap.add_argument("--zero-snr", action="store_true",
                    help="unet: zero-terminal-SNR schedule, v-prediction, trailing timesteps (UNetSettings.zero_snr)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loop = dict(max_minutes=a.max_minutes, checkpoint_every=a.checkpoint_every)
    over = {} if a.steps is None else {"steps": a.steps}
    RUN = Path(a.run)
    if a.stage == "clip":
        r = minisd.train_clip(CLIP, RUN, minisd.ClipSettings(**over), **loop)
    elif a.stage == "vae":
        r = minisd.train_vae(RUN / "export" / "vae", RUN, minisd.VaeSettings(**over), **loop)
    elif a.stage == "decoder":
        r = minisd.train_decoder(RUN / "export" / "vae-ft", RUN, RUN / "export" / "vae",
                                 minisd.DecoderSettings(**over), device=a.device, workers=a.workers, **loop)
    elif a.stage == "unet":
        if a.init_from:
            over["init_from"] = a.init_from
        if a.zero_snr:
            over["zero_snr"] = True
        # the encoder the UNet's latents come from: this run's VAE, else the shipped pipeline's (its decoder was
        # fine-tuned, its encoder kept, so the latents are the same)
        vae = RUN / "export" / "vae" if (RUN / "export" / "vae").is_dir() else SD / "vae"
        r = minisd.train_unet(RUN / "export" / "unet", RUN, CLIP, vae, minisd.UNetSettings(**over),
                              device=a.device, workers=a.workers, **loop)
    elif a.stage == "assemble":
        vae = RUN / "export" / "vae-ft" if (RUN / "export" / "vae-ft").is_dir() else SD / "vae"
        r = {"folder": str(minisd.assemble(Path(a.sd), CLIP, vae, RUN / "export" / "unet"))}
    else:
        from helpers import judge as J

        r = {"clip": minisd.clip_report(CLIP),
             "vae": minisd.vae_report(RUN / "export" / "vae-ft", J.load_judge()),
             "vae before the decoder fine-tune": minisd.vae_report(RUN / "export" / "vae", J.load_judge())}
        # training records live in the pipeline folder's training.json only (a copy here went stale when the UNet changed)
        io.write_json(io.DATA_DIR / "minisd" / "report.json", r)
    print(json.dumps({k: v for k, v in r.items() if k != "history"}))
