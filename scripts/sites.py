"""The chapter "Where each attribute lives": activation-patching cells of the embedded model (data/sites/).
Resumable: rerun after an interruption and finished cells are skipped.

    python scripts/sites.py patch      # the pool, its pairs, every (site group, window) patch
    python scripts/sites.py latents    # h patched with what the SAE / its ranked latents carry of the donor's h
    python scripts/sites.py edits      # DiffLens' edits on the same pairs (the ceiling-vs-edit comparison)
    python scripts/sites.py lens       # chapters 3–4's SAE, probe and IG ranking at up_blocks.0 (data/sites/lens/)
    python scripts/sites.py lens-validate | lens-freeze | lens-test [--all]   # chapter 7's protocol, its DiffLens rows
    python scripts/sites.py lens-latents | lens-edits   # the ceiling-vs-edit chain at up_blocks.0 (after validate)

Costs on 2 cores: see helpers/chapters/sites.py (each cell's header records its seconds and UNet passes).
"""
import argparse

import torch

from helpers.chapters import sites

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["patch", "latents", "edits", "lens", "lens-validate",
                                           "lens-freeze", "lens-test", "lens-latents", "lens-edits"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="lens-test: every tested lens row, not only the best")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.stage.startswith("lens"):
        from helpers.chapters import benchmark

        if a.stage == "lens":
            sites.lens()
        elif a.stage in ("lens-latents", "lens-edits"):
            s = sites.Sites()
            if a.stage == "lens-latents":
                s.latents(site=sites.LENS_SITE, attributes=sites.LENS_ATTRIBUTES)
            else:
                s.edits(site=sites.LENS_SITE, attributes=sites.LENS_ATTRIBUTES)
        else:
            b = sites.lens_bench()
            if a.stage == "lens-validate":
                benchmark.validate(b, sites.LENS_ATTRIBUTES, only=sites.lens_rows())
            elif a.stage == "lens-freeze":
                benchmark.freeze(b, sites.LENS_ATTRIBUTES, only=sites.lens_rows())
            elif a.all:  # every tested lens row at both keep points, with the diagnostics (≈ 1 h on 2 cores)
                benchmark.test(b, "test", sites.LENS_ATTRIBUTES)
            else:  # what the chapter compares: the best lens row at its keep-0.95 and keep-0.90 settings
                for attr in sites.LENS_ATTRIBUTES:
                    ch = b.log["frozen"]["choices"][attr]
                    best = ch["best DiffLens"]
                    rec = ch["rows"][best["label"]]
                    for kp in benchmark.KEEP_POINTS:
                        if rec[str(kp)]["setting"] is not None:
                            print(attr, kp, b.cell("test", attr, benchmark.Row(*best["row"]), rec[str(kp)]["setting"]))
        raise SystemExit(0)
    s = sites.Sites()
    if a.stage == "patch":
        s.run()
    elif a.stage == "latents":
        s.latents()
    else:
        s.edits()
