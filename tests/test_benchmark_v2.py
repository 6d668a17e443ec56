"""Chapter 7's protocol: rows, grid extension, who gets edited under each policy, and that a cell which reuses
unedited samples and resumes edited ones gives what a full in-pass run gives."""
from dataclasses import replace

import pytest
import torch

from helpers import intervention as I
from helpers import world
from helpers.chapters import benchmark as BM


def test_rows_have_unique_names_and_every_per_sample_method_runs_under_both_policies():
    rows = BM.rows()
    assert len({r.slug for r in rows}) == len(rows) == len({r.label for r in rows})
    for m in BM.METHODS.values():
        mine = [r for r in rows if r.method == m.name]
        if m.kind == "distribution":
            assert {r.policy for r in mine} == {"—"}
        elif m.name != "DiffLens (released)":
            assert {r.policy for r in mine} == {"iid", "minimal"}
            assert {r.window for r in mine} == set(m.windows)


def test_next_setting_extends_until_the_frontier_brackets_both_keep_points_and_the_floor():
    m = BM.METHODS["DiffLens swap"]
    ext = {}
    # every setting keeps < 0.95: halve the distance to the identity below the grid
    assert BM.next_setting([(1, 0.93, 0.1), (2, 0.85, 0.05)], m, 0.02, ext) == 0.5
    # keeps ≥ 0.90 everywhere: extend above, doubling the last step
    ext = {}
    assert BM.next_setting([(1, 0.99, 0.3), (2, 0.97, 0.2)], m, 0.02, ext) == 4
    # crossed 0.90 but FD still above the floor: extend above
    assert BM.next_setting([(1, 0.99, 0.3), (2, 0.8, 0.2)], m, 0.02, {}) == 4
    # done: ≥ 0.95, < 0.90 and FD at the floor
    assert BM.next_setting([(1, 0.99, 0.3), (2, 0.8, 0.01)], m, 0.02, {}) is None
    # a setting that keeps half the samples or fewer stops the upward extension
    assert BM.next_setting([(1, 0.99, 0.3), (2, 0.5, 0.2)], m, 0.02, {}) is None
    # the extension limit stops it
    assert BM.next_setting([(1, 0.99, 0.3), (2, 0.97, 0.2)], m, 0.02, {"high": BM.MAX_EXTEND}) is None
    # extensions are counted from the stored frontier, so a restarted validation does not extend again
    front = [{"setting": x} for x in (1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 18.0, 0.5)]
    assert BM.extensions(front, m) == {"low": 1, "high": 3}
    assert BM.next_setting([(s, 0.97, 0.2) for s in (1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 18.0)], m, 0.02,
                           BM.extensions(front, m)) is None
    act = BM.METHODS["Activation"]  # a factor knob: the identity is 1
    assert BM.next_setting([(1.5, 0.9, 0.1), (2, 0.8, 0.05)], act, 0.02, {}) == 1.25


def test_the_tested_window_is_the_one_with_the_lower_validation_fd_at_keep_095():
    def rec(fd95, fd90):
        return {"0.95": {"setting": None if fd95 is None else 1.0, "val FD": fd95},
                "0.9": {"setting": None if fd90 is None else 2.0, "val FD": fd90}}
    assert BM.choose_window([(0, rec(0.2, 0.1)), (8, rec(0.1, 0.3))]) == 8
    assert BM.choose_window([(0, rec(None, 0.1)), (8, rec(None, 0.3))]) == 0
    assert BM.choose_window([(0, rec(None, None)), (8, rec(0.3, None))]) == 8
    assert BM.choose_window([(0, rec(None, None)), (8, rec(None, None))]) == 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("bench")
    return BM.Bench(out=d, states_dir=d / "states", n={"val": 8, "test": 8, "test2": 8}, batch_size=4,
                    progress=False)


def test_policies_ask_what_they_say(bench):
    t = bench.original("val")["t"]
    tgt = bench.target("gender")
    iid, own = bench.asked("val", "gender", BM.Row("DiffLens", "iid", 8))
    assert own is None and (iid >= 0).all()
    rel, _ = bench.asked("val", "gender", BM.Row("DiffLens (released)", "released", 0))
    major = torch.tensor(bench.majority("gender"))
    assert torch.equal(rel, torch.where(major[iid], -1, iid))  # same draws; a majority draw is a no-op
    assert (rel == -1).any() and (rel >= 0).any()
    mini, own = bench.asked("val", "gender", BM.Row("DiffLens swap", "minimal", 8))
    assert torch.equal(own, t["probe.gender.8"].long())
    assert torch.equal(mini, I.assign_minimal(own, tgt, 4, seed=BM.CLASS_SEED * 7919))
    for s in range(0, 8, 4):  # per batch of 4: moved samples come only from over-represented classes
        o, a = own[s:s + 4], mini[s:s + 4]
        moved = a >= 0
        assert not moved.any() or (a[moved] != o[moved]).all()
    ora, own_o = bench.asked("val", "gender", BM.Row("DiffLens swap", "oracle", 8))
    assert torch.equal(own_o, t["oracle.gender"].long())


def test_a_minimal_cell_equals_the_in_pass_run(bench):
    """Reuse (unedited samples are the Original's) + resume (edited ones start at step 8 from the Original's
    state) give the same judged classes as one full pass that reads each sample's class with the probe
    inside the pass."""
    row = BM.Row("DiffLens swap", "minimal", 8)
    m = bench.cell("val", "gender", row, 4.0)
    t, meta = BM.load_cell(BM.cell_path(bench.out, "val", "gender", row, 4.0))
    assert meta["passes"] == int((t["asked"] >= 0).sum()) * (BM.STEPS - 8)
    e = bench.edit_runner  # the same edit, decided in the pass
    from helpers import pipeline
    edit = pipeline.edit_for(bench.features_dir, "gender", 4.0, bench.k["gender"], target=bench.target("gender"),
                             swap=True, steps=range(8, BM.STEPS))
    edit = replace(edit, policy="minimal", probe=bench.probe)
    noise = BM.models.make_noise(8, bench.model.sample_size, BM.SEEDS["val"])
    imgs, iv = I.sample_edited(bench.model, bench.sae, [edit], noise=noise, steps=BM.STEPS, batch_size=4,
                               class_seed=BM.CLASS_SEED)
    assert torch.equal(iv.classes("gender"), t["asked"].long())
    assert torch.equal(iv.own_classes("gender"), t["own"].long())
    probs = bench.judge.predict(imgs)
    for a in world.ATTRIBUTES:
        assert torch.equal(probs[a].argmax(-1).to(torch.uint8), t[f"cls.{a}"]), a
    sim = torch.nn.functional.cosine_similarity(bench.judge.features(imgs), bench.original("val")["t"]["features"].float())
    assert torch.allclose(sim.half().float(), t["similarity"].float(), atol=2e-3)
    # unedited samples are the Original's own, bit for bit
    left = t["asked"] < 0
    assert (t["similarity"][left].float() > 0.999).all()
    assert m["edited"] == int((~left).sum())
    del e


def test_a_lens_bench_edits_with_its_own_sae_at_its_site_and_reuses_the_original(bench, tmp_path):
    """Chapter 6's lens: the same rows, policies and Original pass, but DiffLens edits with another SAE at its own
    hook site — the cell equals a full pass edited there, and no Original is rerun."""
    from helpers import io, pipeline
    from helpers import sae as S

    torch.manual_seed(0)
    sae = S.TopKSAE(S.SAEConfig(d_in=128, expansion=2, k=4, site="up_blocks.0"))
    S.save_sae(sae, tmp_path / "sae.safetensors")
    k = bench.k["gender"]
    classes = world.ATTRIBUTES["gender"]
    t = {}
    for c in range(len(classes)):
        t[f"{c}.features"] = torch.arange(c * k, (c + 1) * k)
        t[f"{c}.map"] = torch.rand(k, 16 * 16)
        t[f"{c}.active"] = torch.rand(k)
    io.save_tensors(tmp_path / "footprints_gender.safetensors", t,
                    meta={"attribute": "gender", "k_max": 64, "classes": list(classes), "site": "up_blocks.0"})
    lb = BM.Bench(out=tmp_path / "lens-bench", states_dir=bench.states_dir, n=bench.n, batch_size=4, progress=False,
                  shared=bench.out, lens=(tmp_path / "sae.safetensors", tmp_path, bench.k))
    assert lb.sae.cfg.site == "up_blocks.0" and lb.probe.cfg.site == "mid_block"  # who is read: the bottleneck
    row = BM.Row("DiffLens swap", "minimal", 8)
    lb.cell("val", "gender", row, 4.0)
    assert not list((tmp_path / "lens-bench").glob("original_*"))  # the Original is the shared one
    got, _ = BM.load_cell(BM.cell_path(lb.out, "val", "gender", row, 4.0))
    bench.cell("val", "gender", row, 4.0)
    ref, _ = BM.load_cell(BM.cell_path(bench.out, "val", "gender", row, 4.0))
    assert torch.equal(got["asked"], ref["asked"])  # who gets edited does not change
    edit = pipeline.edit_for(tmp_path, "gender", 4.0, k, target=bench.target("gender"), swap=True,
                             steps=range(8, BM.STEPS))
    edit = replace(edit, assigned=got["asked"].long())
    noise = BM.models.make_noise(8, bench.model.sample_size, BM.SEEDS["val"])
    imgs, _ = I.sample_edited(bench.model, lb.sae, [edit], noise=noise, steps=BM.STEPS, batch_size=4)
    probs = bench.judge.predict(imgs)
    for a in world.ATTRIBUTES:
        assert torch.equal(probs[a].argmax(-1).to(torch.uint8), got[f"cls.{a}"]), a
    edited = got["asked"] >= 0
    orig = bench.original("val")["t"]["images"]
    mine = (imgs * 255).round().to(torch.uint8)
    assert edited.any() and not torch.equal(mine[edited], orig[edited])  # the edit at up_blocks.0 acted
    assert torch.equal(mine[~edited], orig[~edited])  # and the rest are the Original's
    # paired statistics across the two benches (same noise, the shared Original)
    d = BM.paired(lb.out, "val", "gender", (row, 4.0), (row, 4.0), n_boot=50, out_b=bench.out, shared=bench.out)
    others = [x for x in world.ATTRIBUTES if x != "gender"]
    orig_t = bench.original("val")["t"]
    ka, kb = BM._kept(orig_t, got, others), BM._kept(orig_t, ref, others)
    assert d["keep all"]["diff"] == pytest.approx(float(ka.float().mean() - kb.float().mean()))


def test_test_cells_refuse_to_run_before_the_grids_are_frozen(bench):
    with pytest.raises(RuntimeError, match="frozen"):
        bench.cell("test", "gender", BM.Row("DiffLens", "iid", 8), 4.0)


def test_paired_statistics_and_leakage_above_the_null_edit(bench):
    row = BM.Row("DiffLens swap", "minimal", 8)
    bench.cell("val", "gender", row, 4.0)
    bench.cell("val", "gender", row, 4.0, null=True)
    bench.cell("val", "gender", BM.Row("DiffLens", "iid", 8), 4.0)
    same = BM.paired(bench.out, "val", "gender", (row, 4.0), (row, 4.0), n_boot=50)
    assert same["FD"]["diff"] == 0 and same["keep all"]["diff"] == 0 and same["mcnemar keep"]["p"] == 1.0
    d = BM.paired(bench.out, "val", "gender", (row, 4.0), (BM.Row("DiffLens", "iid", 8), 4.0), n_boot=50)
    assert d["FD"]["lo"] <= d["FD"]["diff"] <= d["FD"]["hi"]
    lk = BM.leakage(bench.out, "val", "gender", row, 4.0)
    assert set(lk["attribute"]) == set(world.ATTRIBUTES) - {"gender"}
    assert (lk["above the floor"] == lk["flips (edit)"] - lk["flips (null edit)"]).all()
    t, _ = BM.load_cell(BM.cell_path(bench.out, "val", "gender", row, 4.0, null=True))
    real, _ = BM.load_cell(BM.cell_path(bench.out, "val", "gender", row, 4.0))
    assert torch.equal(t["asked"], real["asked"])  # the null edit acts on the same samples
    f = BM.frontier_frame(bench.out, ["gender"])
    assert {"FD", "keep all", "row", "setting"} <= set(f.columns)
    with pytest.raises(RuntimeError, match="not frozen"):
        BM.table(bench.out, "test")


def test_freeze_matches_each_row_picks_windows_and_declares_the_best_difflens_row(tmp_path):
    """On stored validation frontiers (metadata only), freeze interpolates each row's settings at keep 0.95 and
    0.90, tests one window per method × policy, and names the DiffLens row with the lowest FD at keep 0.95."""
    from types import SimpleNamespace

    from helpers import io

    for row in BM.rows():
        good = row.method == "DiffLens swap" and row.policy == "minimal" and row.window == 8
        for s, keep, fd in [(1.0, 0.99, 0.20), (2.0, 0.93, 0.10), (3.0, 0.85, 0.05)]:
            m = {"FD": fd / 2 if good else fd, "keep all": keep}
            io.save_tensors(BM.cell_path(tmp_path, "val", "gender", row, s), {"x": torch.zeros(1)},
                            meta={"metrics": m, "setting": s, "seconds": 1.0, "passes": 1})
    bench = SimpleNamespace(out=tmp_path, log={}, save_log=lambda: None)
    ch = BM.freeze(bench, ["gender"])["gender"]
    swap = ch["rows"]["DiffLens swap [minimal, steps 8–24]"]
    assert swap["0.95"]["setting"] == pytest.approx(1 + (0.99 - 0.95) / (0.99 - 0.93), abs=1e-3)  # 4 digits
    assert swap["0.9"]["setting"] == pytest.approx(2 + (0.93 - 0.90) / (0.93 - 0.85), abs=1e-3)
    assert swap["tested"] and not ch["rows"]["DiffLens swap [minimal]"]["tested"]
    assert ch["best DiffLens"]["label"] == "DiffLens swap [minimal, steps 8–24]"
    assert sum(r["tested"] for r in ch["rows"].values()) == len({(r.method, r.policy) for r in BM.rows()})
    assert "frozen" in bench.log and bench.log["frozen"]["choices"]["gender"] is ch


def test_goals_and_paired_comparisons_read_the_frozen_best_row(bench):
    import json

    best = BM.Row("DiffLens swap", "minimal", 8)
    other = BM.Row("Latent Direction", "minimal", 8)
    m_best = bench.cell("val", "gender", best, 4.0)
    bench.cell("val", "gender", other, 1.0)
    rec = lambda row, s: {"row": [row.method, row.policy, row.window], "tested": True,  # noqa: E731
                          "0.95": {"setting": s, "why": "", "val FD": 0.1}, "0.9": {"setting": s, "why": "", "val FD": 0.1}}
    log = json.loads((bench.out / "log.json").read_text()) if (bench.out / "log.json").is_file() else {}
    saved = dict(log)
    log["frozen"] = {"choices": {"gender": {"rows": {best.label: rec(best, 4.0), other.label: rec(other, 1.0)},
                                            "best DiffLens": {"row": [best.method, best.policy, best.window],
                                                              "label": best.label, "setting": 4.0, "val FD": 0.0}}}}
    (bench.out / "log.json").write_text(json.dumps(log))
    try:
        g = BM.goals(bench.out, "val", ["gender"]).set_index("goal")
        assert g.loc["best DiffLens FD", "value"] == m_best["FD"]
        assert bool(g.loc["best DiffLens FD", "met"]) == (m_best["FD"] <= BM.GOAL_FD)
        assert g.loc["keep overall", "value"] == m_best["keep all"]
        assert g.loc["FID-target ≤ the Original's", "bar"] == pytest.approx(
            BM.original_fid_target(bench.out, "val", "gender"))
        cost = g.loc[["minimal cell cost ≤ 35% of a full cell"]]
        assert len(cost) >= 2 and (cost["value"] <= 1).all()
        d = BM.against_best(bench.out, "val", "gender", n_boot=50)
        assert list(d["row"]) == [other.label]
        r = d.iloc[0]
        assert r["FD lo"] <= r["FD diff"] <= r["FD hi"]
        assert r["FD winner"] in (best.label, other.label, "neither (CI spans 0)")
        assert r["outcome"] in ("row better", "DiffLens better", "trade-off", "no difference")
        pb = BM.paired(bench.out, "val", "gender", (other, 1.0), (best, 4.0), n_boot=50)
        assert bool(r["row lowers FD"]) == (pb["FD a − Original"]["hi"] < 0)
        assert d.attrs["best"] == best.label and r["kind"] == "baseline"
        h = BM.headline(bench.out, "val").loc["gender"]
        orig_t = bench.original("val")["t"]
        assert h["FD original"] == pytest.approx(BM._fd(orig_t["cls.gender"], 2))
        assert h["DiffLens row"] == best.label and h["DiffLens FD"] == m_best["FD"]
        assert h["baseline row"] == other.label
    finally:
        (bench.out / "log.json").write_text(json.dumps(saved))


def _choice(entries):
    """A frozen choice of one attribute from ``(row, tested, val FD at 0.95 or None)``."""
    return {"rows": {r.label: {"row": [r.method, r.policy, r.window], "tested": t,
                               "0.95": {"setting": None if fd is None else 1.0, "val FD": fd, "why": ""},
                               "0.9": {"setting": 2.0, "val FD": 0.0, "why": ""}} for r, t, fd in entries}}


def test_best_rows_follow_freezes_rule_within_a_policy_and_among_baselines():
    ch = _choice([(BM.Row("DiffLens swap", "minimal", 8), True, 0.10),
                  (BM.Row("DiffLens swap", "minimal", 0), False, 0.01),  # untested window: never chosen
                  (BM.Row("DiffLens", "iid", 8), True, 0.20),
                  (BM.Row("DiffLens swap", "iid", 8), True, None),  # never reached keep 0.95
                  (BM.Row("DiffLens (released)", "released", 0), True, 0.30),
                  (BM.Row("Latent Direction", "minimal", 8), True, 0.05),
                  (BM.Row("H-Distribution", "—", 0), True, 0.07)])
    assert BM.best_difflens(ch)["label"] == "DiffLens swap [minimal, steps 8–24]"
    assert BM.best_difflens(ch, "iid")["label"] == "DiffLens [iid, steps 8–24]"
    assert BM.best_difflens(ch, "released")["val FD"] == 0.30
    assert BM.best_difflens(ch, "oracle") is None
    assert BM.best_baseline(ch)["label"] == "Latent Direction [minimal, steps 8–24]"
    assert BM.best_baseline(ch, 0.9)["label"] == "Latent Direction [minimal, steps 8–24]"  # first of the ties


def test_planned_cells_are_the_tested_rows_at_each_keep_point_then_the_best_rows_diagnostics(tmp_path):
    import json

    best, base = BM.Row("DiffLens swap", "minimal", 8), BM.Row("Latent Direction", "minimal", 8)
    ch = _choice([(best, True, 0.10), (BM.Row("DiffLens swap", "minimal", 0), False, 0.01), (base, True, None)])
    ch["best DiffLens"] = BM.best_difflens(ch)
    plan = BM.planned_cells({"gender": ch}, ["gender"])["gender"]
    assert plan == [(best, 1.0, False), (best, 2.0, False), (base, 2.0, False),  # base never reached keep 0.95
                    (BM.Row("DiffLens swap", "oracle", 8), 1.0, False), (best, 1.0, True)]
    assert BM.planned_cells({"gender": ch}, ["gender"], keep_points=(0.95,))["gender"] == [
        (best, 1.0, False), (BM.Row("DiffLens swap", "oracle", 8), 1.0, False), (best, 1.0, True)]
    (tmp_path / "log.json").write_text(json.dumps({"frozen": {"choices": {"gender": ch}}}))
    (tmp_path / "cells").mkdir()
    BM.cell_path(tmp_path, "test2", "gender", best, 1.0, null=True).write_bytes(b"")
    BM.cell_path(tmp_path, "test", "gender", best, 1.0).write_bytes(b"")  # another split: not counted
    p = BM.split_progress(tmp_path, "test2").loc["gender"]
    assert (p["planned"], p["done"], bool(p["complete"])) == (3, 1, False)


def test_replication_pairs_rows_across_seeds_and_leaves_missing_cells_undecided():
    import pandas as pd

    t = lambda recs: pd.DataFrame([{"attribute": "gender", "keep point": kp, "row": r, "FD": f, "FD lo": lo,  # noqa: E731
                                     "FD hi": hi} for r, kp, f, lo, hi in recs])
    first = t([("a", 0.95, 0.10, 0.08, 0.12), ("b", 0.95, 0.30, 0.28, 0.32), ("c", 0.95, 0.2, 0.1, 0.3),
               ("a", 0.9, 0.0, 0.0, 0.0)])
    second = t([("a", 0.95, 0.13, 0.11, 0.15), ("b", 0.95, 0.20, 0.18, 0.22), ("c", 0.95, None, None, None)])
    rep = BM.replication(first, second)
    assert list(rep["intervals overlap"]) == [True, False, None]
    assert rep.loc[("gender", "a"), "FD (seed 2)"] == 0.13 and len(rep) == 3


def test_outcome_compares_at_the_same_keep_rate_by_diluting_the_side_that_keeps_less():
    # arguments: row − best at the matched keep-rate (lo, hi), row − best as run (lo, hi), does the row keep more
    assert BM.outcome(0.1, 0.2, 0.2, 0.3, True) == "DiffLens better"     # diluted best still beats the row
    assert BM.outcome(-0.2, -0.1, 0.05, 0.1, True) == "trade-off"        # row wins at its keep, best goes lower
    assert BM.outcome(-0.2, -0.1, -0.01, 0.01, True) == "row better"
    assert BM.outcome(-0.01, 0.01, 0.05, 0.1, True) == "DiffLens better"  # tie where both run, best goes lower
    assert BM.outcome(-0.01, 0.01, -0.01, 0.01, True) == "no difference"
    assert BM.outcome(0.0, 0.02, 0.0, 0.02, True) == "no difference"     # an interval touching 0 decides nothing
    assert BM.outcome(-0.2, -0.1, -0.3, -0.2, False) == "row better"     # the row keeps less and still wins
    assert BM.outcome(0.1, 0.2, -0.2, -0.1, False) == "trade-off"


def test_dilution_mixes_the_original_and_the_edit_to_the_asked_keep_rate():
    k = 2
    orig = torch.zeros(100, dtype=torch.long)                 # all class 0: FD of a 2-class all-one-class = 0.707
    edit = torch.cat([torch.ones(50), torch.zeros(50)]).long()
    kept = torch.cat([torch.zeros(50), torch.ones(50)]).bool()  # keeps 0.5
    assert BM.diluted_fd(orig, edit, kept, 0.5, k) == pytest.approx(0.0)              # its own keep: as run
    assert BM.diluted_fd(orig, edit, kept, 1.0, k) == pytest.approx(2 ** -0.5)        # keep 1: the Original
    assert BM.diluted_fd(orig, edit, kept, 0.75, k) == pytest.approx(0.5 * 2 ** -0.5)  # half-way: the mixture
    # a row that edits nothing against one that balances: no difference where both run, the edit goes lower
    same = torch.ones(100).bool()
    m = BM.matched_keep_fd(orig, orig, same, edit, kept, k, n_boot=50)
    assert m["a keeps more"] and m["diff"] == pytest.approx(0.0)
    assert BM.matched_keep_fd(orig, edit, kept, edit, kept, k, n_boot=50)["hi"] == pytest.approx(0.0)


def test_finding1_is_judged_on_baselines_only():
    import pandas as pd

    def frame(*rows):
        return pd.DataFrame([{"row": r, "kind": k, "outcome": o} for r, k, o in rows])

    beaten = ("A", "baseline", "DiffLens better")
    f = BM.finding1(frame(beaten, ("B", "baseline", BM.UNREACHED), ("D", "DiffLens", "row better")))
    assert f["verdict"] == "holds" and f["compared"] == 1 and f[BM.UNREACHED] == ["B"]
    f = BM.finding1(frame(beaten, ("B", "baseline", "row better")))
    assert f["verdict"] == "fails" and f["row better"] == ["B"]
    assert BM.finding1(frame(beaten, ("B", "baseline", "trade-off")))["verdict"] == "partly"
    assert BM.finding1(frame(beaten, ("B", "baseline", "no difference")))["verdict"] == "partly"
    assert BM.finding1(frame(beaten, ("B", "baseline", "test cell not run yet")))["verdict"] == "undecided"
    assert BM.finding1(frame(beaten, ("B", "baseline", BM.UNFINISHED)))["verdict"] == "undecided"
    assert BM.finding1(frame(("B", "baseline", BM.UNREACHED)))["verdict"] == "undecided"  # nothing compared
    empty = BM.finding1(pd.DataFrame(columns=["row", "kind", "outcome"]))
    assert empty["verdict"] == "undecided" and empty["row better"] == [] and empty[BM.UNREACHED] == []


def test_pass_seconds_is_the_median_rate_per_method():
    cell = lambda m, s, p: {"meta": {"method": m, "seconds": s, "passes": p}}  # noqa: E731
    r = BM.pass_seconds([cell("A", 10.0, 100), cell("A", 90.0, 100), cell("A", 20.0, 100), cell("B", 5.0, 10),
                         cell("C", 1.0, 0)])
    assert r == {"A": pytest.approx(0.2), "B": pytest.approx(0.5)}  # a cell that ran no pass has no rate


def test_verdict_replication_compares_verdicts_and_lists_changed_outcomes():
    def f(verdict, **by):
        return {"verdict": verdict, **{k: [] for k in BM.OUTCOME_KEYS}, **by}

    first = {("gender", "minimal"): f("holds", **{"DiffLens better": ["A", "B"]}),
             ("gender", "iid"): f("fails", **{"row better": ["A"], "DiffLens better": ["B"]}),
             ("age", "minimal"): f("partly", **{"no difference": ["A"]})}
    second = {("gender", "minimal"): f("holds", **{"DiffLens better": ["A", "B"]}),
              ("gender", "iid"): f("partly", **{"trade-off": ["A"], "DiffLens better": ["B"]}),
              ("age", "minimal"): f("undecided", **{"test cell not run yet": ["A"]})}
    r = BM.verdict_replication(first, second)
    assert list(r["same verdict"]) == [True, False, None]
    assert r.loc[("gender", "iid"), "outcomes that changed"] == "A: row better → trade-off"
    assert r.loc[("gender", "minimal"), "outcomes that changed"] == "none"
    assert r.loc[("age", "minimal"), "seed 2"] == "undecided"
