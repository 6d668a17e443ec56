"""Each chapter's pipeline (helpers.chapters) in its quick mode, end to end, writing only where it is told."""
import json

import pytest
import torch

from helpers import cache, io, models, world
from helpers import harvest as H
from helpers import sae as S


@pytest.fixture
def shipped_stamps():
    return {p: p.stat().st_mtime_ns for p in models.DATA_DIR.rglob("*") if p.is_file() and "cache" not in p.parts}


def test_dissect_identify_sweeps_quick_modes(tmp_path, monkeypatch, shipped_stamps):
    from helpers.chapters import dissect, identify, sweeps

    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    log = dissect.run(tmp_path / "dissect", quick=True, progress=False)
    sae, meta = S.load_sae(tmp_path / "dissect" / "sae.safetensors")
    assert sae.cfg.site == "mid_block" and 0 < meta["held_out"]["fvu"] < 1
    assert meta["held_out_samples"] == [36, 40]  # the pipeline's split: 90% train
    summary = H.load_summary(tmp_path / "dissect" / "summary.safetensors")
    assert summary.pooled.shape == (40, 5, 128) and log["quick"]

    identify.run(tmp_path / "identify", quick=True, progress=False)
    chk = json.loads((tmp_path / "identify" / "check.json").read_text())
    assert {r["attribute"] for r in chk["rows"]} == set(world.SOCIAL)
    assert all(0 <= r["keep_nuisance"] <= 1 and 0 <= r["share_after"] <= 1 for r in chk["rows"])
    t, fmeta = io.load_tensors(tmp_path / "identify" / "footprints_age.safetensors")
    assert fmeta["classes"] == list(world.ATTRIBUTES["age"]) and fmeta["site"] == "mid_block"

    sweeps.run(tmp_path / "sweeps", quick=True, progress=False)
    sw, smeta = io.load_tensors(tmp_path / "sweeps" / "sweep_gender.safetensors")
    assert sw["add.0.images"].shape[0] == 4 and smeta["betas"]["add"] == [0.0, 4.0]
    base, _ = io.load_tensors(tmp_path / "sweeps" / "base.safetensors")
    assert torch.equal(sw["add.0.images"], base["images"][:4])  # β = 0: bit-identical to the unedited samples
    # the shipped artifacts were read, never written
    after = {p: p.stat().st_mtime_ns for p in models.DATA_DIR.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after == shipped_stamps
