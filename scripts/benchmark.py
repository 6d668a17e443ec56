"""Chapter 7 artifacts (data/benchmark/v2/): validation frontiers of every row, the frozen choices, the test
cells. Resumable: rerun the same command after an interruption and finished cells are loaded, not recomputed.

    python scripts/benchmark.py validate [--attributes gender]   # every row's grid on the validation seed
    python scripts/benchmark.py freeze                            # matched settings + best DiffLens row, logged
    python scripts/benchmark.py test [--split test|test2]         # the frozen settings on a test seed
    python scripts/benchmark.py report [--split test]              # the stored cells as markdown tables

Costs on 2 cores (measured, see data/benchmark/v2/log.json and each cell's seconds): the Original pass of
n samples ≈ 0.26 s per sample; a cell costs what it edits (unedited samples are the Original's own, edited
ones resume at their first edited step). See helpers/chapters/benchmark.py for the protocol.
"""
import argparse

import torch

from helpers import world
from helpers.chapters import benchmark

def report(split: str, attributes) -> None:
    """Print the table, the paired comparisons per policy with Finding 1's verdicts, the goals and the headline
    (markdown; what chapter 7 shows, for notes and reviews)."""
    from helpers import tables

    def md(df, **kw):
        print(tables.text(df, **kw).to_markdown() + "\n")

    t = benchmark.table(split=split, attributes=attributes)
    for kp in benchmark.KEEP_POINTS:
        d = t[t["keep point"] == kp].set_index(["attribute", "row"])
        cols = ["setting", "FD", "FD lo", "FD hi", "keep all", "keep all among edited", "similarity among edited",
                "FID target", "edited share", "passes / image", "s / 1000 images (median rate)", "note"]
        print(f"### {split}, matched keep {kp}\n")
        md(d.reindex(columns=cols))
    for a in attributes:
        for pol in ("minimal", "iid"):
            try:
                d = benchmark.against_best(split=split, attribute=a, policy=pol)
            except (RuntimeError, KeyError) as e:
                print(f"### {a} · {pol}: {e}\n")
                continue
            f = benchmark.finding1(d)
            print(f"### {a} · {pol}: row − {d.attrs['best']} — Finding 1: {f['verdict']}\n")
            md(d.set_index("row").drop(columns=["FD winner"], errors="ignore"))
    print("### goals\n")
    md(benchmark.goals(split=split, attributes=attributes).set_index(["attribute", "goal"]))
    print("### headline\n")
    md(benchmark.headline(split=split))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["validate", "freeze", "test", "report"])
    ap.add_argument("--attributes", nargs="+", default=list(world.SOCIAL), choices=list(world.SOCIAL))
    ap.add_argument("--split", default="test", choices=["test", "test2"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.stage == "report":
        report(a.split, a.attributes)
        raise SystemExit
    b = benchmark.Bench()
    if a.stage == "validate":
        benchmark.validate(b, a.attributes)
    elif a.stage == "freeze":
        benchmark.freeze(b, a.attributes)
    else:  # the second seed replicates the keep-0.95 point
        benchmark.test(b, a.split, a.attributes, keep_points=benchmark.KEEP_POINTS[:1] if a.split == "test2"
                       else benchmark.KEEP_POINTS)
