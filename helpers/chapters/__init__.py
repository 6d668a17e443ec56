"""Each chapter's own experiments on the embedded portrait model: its settings (seeds, step counts, grids)
plus what only that chapter runs. Generic stages live in :mod:`helpers.pipeline`; nothing in ``helpers``
outside this package imports it (the book, scripts, bench and tests do).

* ``dissect``   — chapters 2–3: harvest → both SAEs → channel edits, reconstruction check
* ``identify``  — chapter 4: probe, IG rankings, footprints, top-k vs random-k vs channels check
* ``sweeps``    — chapter 5: β sweeps and multi-attribute control
* ``sites``     — chapter 6: activation patching per site × step window, the ceiling of an edit of h
* ``benchmark`` — chapter 7: every method on the same noise, validated then tested
"""
