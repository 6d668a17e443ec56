"""Check the β slider of the *built* book in headless Chromium, without a kernel or network.

    make book && python scripts/check_slider.py [--page book/05_intervention_sweeps.html]

Moves the page's first slider twice and fails unless the shown frame changed each time.
(The test suite checks the same mechanism on a one-page book it builds: tests/test_slider_browser.py.)
"""
import argparse
import sys
from pathlib import Path

from helpers import widgets

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", default=str(Path(__file__).resolve().parents[1] / "_build" / "html"))
    ap.add_argument("--page", default="book/05_intervention_sweeps.html")
    a = ap.parse_args()
    got = widgets.check_static_slider(a.html, a.page)
    f = got["frames"]
    ok = len(set(f)) == len(f)
    print(f"{a.page}: frames {[x[:8] for x in f]}, readout {got['readout']!r}: "
          f"{'slider switches frames' if ok else 'FRAME DID NOT CHANGE'}")
    sys.exit(0 if ok else 1)
