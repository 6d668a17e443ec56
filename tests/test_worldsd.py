"""Chapter 8's SD table (helpers.chapters.worldsd) end to end on a tiny random SD: the runner's stages, every
method's cell, freeze, the test seed and the both-halves ablation. The numbers mean nothing; the plumbing is what
is checked (cells written once and reused, freeze before test, the ablation differs from the conditional-half edit)."""
import pytest
import torch

from helpers import tiny
from helpers.chapters import worldsd


@pytest.fixture()
def small(tmp_path, monkeypatch):
    sd = tiny.build_sd(tmp_path / "sd", sample_size=8)
    base = worldsd.config

    def config(**kw):
        c = base(sd_folder=sd, guidance=1.0, **kw)
        c.update(harvest={"n": 48, "steps": 4, "batch_size": 24}, sae={"train_steps": 30},
                 attribution={"steps": [0, 2]},
                 intervention={"k": 8, "from_step": 0, "baselines": ["Latent Direction"],
                               "baseline_fit": {"Latent Direction": {"iters": 4, "batch_size": 4}}})
        return c

    monkeypatch.setattr(worldsd, "config", config)
    monkeypatch.setattr(worldsd, "RUN", tmp_path / "run")
    monkeypatch.setattr(worldsd, "OUT", tmp_path / "table")
    monkeypatch.setattr(worldsd, "STEPS", 4)
    monkeypatch.setattr(worldsd, "N", {"val": 6, "test": 6})
    monkeypatch.setattr(worldsd, "ATTRIBUTES", ("gender",))
    monkeypatch.setattr(worldsd, "GRIDS", {"DiffLens": (1.0, 4.0), "Activation": (2.0,), "Latent Direction": (1.0,),
                                           "H-Distribution": (1e3,)})
    return tmp_path


def test_table_end_to_end(small):
    """At the book's scale 1: every grid cell on the validation seed (stored once), freeze, the test seed, and the
    hook-placement ablation at ABLATION_GUIDANCE (both placements, same noise)."""
    t = worldsd.Table(progress=False)
    with pytest.raises(RuntimeError, match="freeze"):
        t.cell("test", "gender", "DiffLens", 1.0)
    rows = worldsd.validate(t)
    assert {(r["method"], r["setting"]) for r in rows} == {("DiffLens", 1.0), ("DiffLens", 4.0), ("Activation", 2.0),
                                                         ("Latent Direction", 1.0), ("H-Distribution", 1e3)}
    for r in rows:
        assert 0 <= r["keep other attributes"] <= 1 and r["n"] == 6 and r["guidance"] == 1.0
        assert -1 <= r["CLIP-I"] <= 1
    path = worldsd.cell_path("val", "gender", "DiffLens", 4.0)
    stamp = path.stat().st_mtime_ns
    assert worldsd.validate(t) == rows and path.stat().st_mtime_ns == stamp  # reused, not recomputed
    chosen = worldsd.freeze()
    assert set(chosen["gender"]) == set(worldsd.GRIDS)
    rows = worldsd.test(t)
    beta = chosen["gender"]["DiffLens"]
    assert [(r["method"], r["setting"], r["guidance"]) for r in rows[-2:]] == [("DiffLens", beta, 2.0),
                                                                             ("DiffLens", "both", 2.0)]
    assert all(r["guidance"] == 1.0 for r in rows[:-2]) and len(rows) == len(worldsd.GRIDS) + 2
    cond, both = rows[-2:]
    assert both["FD"] != cond["FD"] or both["CLIP-I"] != cond["CLIP-I"]  # the placement changes the samples
    assert worldsd.cell_path("test", "gender", "DiffLens", beta, 2.0).is_file()
    assert len(worldsd.frame("test", sd_folder=small / "sd")) == len(rows)


def test_cells_of_another_model_are_refused(small):
    """A retrained SD must not be reported with the old one's table: a stored cell names the model that drew it,
    and both the table and :func:`worldsd.frame` refuse cells of another model."""
    t = worldsd.Table(progress=False)
    t.stages()
    row = t.cell("val", "gender", "DiffLens", 1.0)
    assert row["model"] == t.fingerprint
    other = tiny.build_sd(small / "other", sample_size=8, seed=1)
    assert worldsd.frame("val", sd_folder=small / "sd")["model"].tolist() == [t.fingerprint]
    with pytest.raises(RuntimeError, match="another model"):
        worldsd.frame("val", sd_folder=other)
    path = worldsd.cell_path("val", "gender", "DiffLens", 1.0)
    path.write_text(path.read_text().replace(t.fingerprint, "0123456789ab"))
    with pytest.raises(RuntimeError, match="another model.*rerun scripts/worldsd_table.py"):
        t.cell("val", "gender", "DiffLens", 1.0)


def test_ablation_guidance():
    class Stub:
        def __init__(self, g):
            self.run = type("R", (), {"cfg": type("C", (), {"model": type("M", (), {"guidance_scale": g})})})

    assert worldsd.ablation_guidance(Stub(1.0)) == worldsd.ABLATION_GUIDANCE
    assert worldsd.ablation_guidance(Stub(3.0)) is None


def test_config_refuses_unset_guidance(monkeypatch):
    monkeypatch.setattr(worldsd.minisd, "GUIDANCE", None)
    with pytest.raises(ValueError, match="GUIDANCE"):
        worldsd.config()


def test_placement_verdict():
    row = lambda fd, lo, hi: {"FD original": 0.5, "FD": fd, "FD lo": lo, "FD hi": hi,  # noqa: E731
                              "keep other attributes": 0.9, "CLIP-I": 0.8}
    r = worldsd.placement(row(0.1, 0.05, 0.15), row(0.4, 0.35, 0.45))
    assert r["verdict"] == "editing the conditional half moves FD further" and r["FD moved"]["both halves"] == pytest.approx(0.1)
    assert worldsd.placement(row(0.4, 0.35, 0.45), row(0.1, 0.05, 0.15))["verdict"] == "editing both halves moves FD further"
    assert worldsd.placement(row(0.1, 0.05, 0.3), row(0.2, 0.1, 0.3))["verdict"].startswith("no clear difference")


def test_placement_reading_reads_orderings_only_beyond_the_intervals():
    cell = lambda fd, lo, hi: {"FD original": 0.5, "FD": fd, "FD lo": lo, "FD hi": hi,  # noqa: E731
                               "keep other attributes": 0.9, "CLIP-I": 0.9}
    r = worldsd.placement_reading({"gender": (cell(0.2, 0.15, 0.25), cell(0.4, 0.35, 0.45)),  # apart: cond further
                                   "age": (cell(0.52, 0.5, 0.55), cell(0.51, 0.48, 0.54)),    # both raise FD
                                   "race": (cell(0.3, 0.2, 0.4), cell(0.35, 0.25, 0.45))})    # overlapping intervals
    assert r.startswith("On age neither placement lowers FD")
    assert "On race the two placements' FD intervals overlap" in r
    assert r.endswith("on gender editing the conditional half moves FD further.")
    assert "race" not in r.split("overlap")[1] and "gender" not in r.split("Apart")[0]
