"""Harvest on a tiny UNet: shapes, consistency of summary and shards, atomic folders, cache keys."""
import pytest
import torch
from diffusers import DDPMScheduler

from helpers import cache, harvest, hooks, judge as J, metrics, models
from helpers import sae as S
from conftest import tiny_unet


@pytest.fixture
def tiny_model():
    return models.Diffusion(unet=tiny_unet().eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


@pytest.fixture
def judge():
    torch.manual_seed(0)
    return J.Judge().eval()


def test_harvest_summary_matches_shards(tiny_model, judge, tmp_path):
    s = harvest.HarvestSettings(n=5, steps=3, batch_size=2, shard_dtype="float32")
    folder = harvest.run(tiny_model, s, tmp_path / "h", judge=judge, progress=False)
    summ = harvest.load_summary(folder)
    assert summ.images.shape == (5, 3, 16, 16) and summ.images.dtype == torch.uint8
    assert summ.pooled.shape == (5, 3, 32)
    assert set(summ.probs) == set(judge.heads) and summ.probs["age"].shape == (5, 3)
    # the images are exactly what plain sampling from the same noise gives
    plain = models.sample(tiny_model, 5, steps=3, seed=s.seed)
    assert torch.equal(summ.images, (plain * 255).round().to(torch.uint8))
    rows = harvest.load_rows(folder)
    assert rows["x"].shape == (5 * 3 * 8 * 8, 32)
    assert sorted(rows["sample"].unique().tolist()) == list(range(5))
    # pooled (sample 3, step 2) equals the mean over that sample's rows at that step
    sel = (rows["sample"] == 3) & (rows["step"] == 2)
    assert sel.sum() == 64
    torch.testing.assert_close(rows["x"][sel].mean(0), summ.pooled[3, 2].float(), rtol=2e-3, atol=2e-3)
    sub = harvest.load_rows(folder, steps=[0], max_rows=50, seed=1)
    assert len(sub["x"]) == 50 and (sub["step"] == 0).all()


def test_interrupted_harvest_resumes_batch_by_batch(tiny_model, judge, tmp_path, monkeypatch):
    s = harvest.HarvestSettings(n=6, steps=2, batch_size=2, shard_dtype="float32")
    whole = harvest.run(tiny_model, s, tmp_path / "whole", judge=judge, progress=False)
    calls = {"n": 0}
    real = models.sample

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(models, "sample", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        harvest.run(tiny_model, s, tmp_path / "h", judge=judge, progress=False)
    assert not (tmp_path / "h").exists()  # nothing a reader would trust
    with pytest.raises(FileNotFoundError, match="run the harvest"):
        harvest.load_summary(tmp_path / "h")
    calls["n"] = 10  # resume: only the third batch is sampled again
    harvest.run(tiny_model, s, tmp_path / "h", judge=judge, progress=False)
    assert calls["n"] == 11
    a, b = harvest.load_summary(whole), harvest.load_summary(tmp_path / "h")
    assert torch.equal(a.images, b.images) and torch.equal(a.pooled, b.pooled)
    assert torch.equal(harvest.load_rows(whole)["x"], harvest.load_rows(tmp_path / "h")["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "whole"]  # the work folder is gone
    # other settings never reuse a stale work folder
    monkeypatch.setattr(models, "sample", real)
    harvest.run(tiny_model, harvest.HarvestSettings(n=4, steps=2, batch_size=2, seed=9), tmp_path / "h", judge=judge,
                progress=False)
    assert harvest.load_summary(tmp_path / "h").images.shape[0] == 4


def test_harvest_never_overwrites_a_folder_it_did_not_make(tiny_model, judge, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write.*notes.txt"):
        harvest.run(tiny_model, harvest.HarvestSettings(n=2, steps=2, batch_size=2), mine, judge=judge, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no default judge"):
        harvest.run(tiny_model, harvest.HarvestSettings(n=2, steps=2), tmp_path / "x", judge=None, progress=False)


def test_harvest_at_another_site_and_rejudge(tiny_model, judge, tmp_path):
    s = harvest.HarvestSettings(n=3, steps=2, batch_size=3, site="up_blocks.0.skips.0", shard_dtype="float32")
    folder = harvest.run(tiny_model, s, tmp_path / "h", judge=judge, progress=False)
    summ = harvest.load_summary(folder)
    assert summ.pooled.shape == (3, 2, 32) and summ.settings["site"] == "up_blocks.0.skips.0"
    with hooks.capture(tiny_model.unet, site="up_blocks.0.skips.0") as cap:
        models.sample(tiny_model, 3, steps=2, seed=s.seed)
    torch.testing.assert_close(harvest.load_rows(folder)["x"][:64], S.to_rows(cap.activations[0][:1]))
    torch.manual_seed(1)
    other = J.Judge().eval()
    harvest.rejudge(folder, other)
    again = harvest.load_summary(folder)
    assert torch.equal(again.images, summ.images)
    torch.testing.assert_close(again.probs["age"], other.predict(summ.images.float() / 255)["age"])


def test_cache_keys_and_fingerprints(tmp_path):
    a = cache.key({"n": 1, "steps": 25})
    assert a == cache.key({"steps": 25, "n": 1}) and a != cache.key({"n": 2, "steps": 25})
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"one")
    fp = cache.fingerprint(f)
    f.write_bytes(b"two")
    assert cache.fingerprint(f) != fp
    with pytest.raises(FileNotFoundError):
        cache.fingerprint(tmp_path / "missing")


def test_nmi_separates_mixing_from_correlation():
    g = torch.Generator().manual_seed(0)
    n = 2000
    gender = torch.randint(0, 2, (n,), generator=g)
    backdrop = torch.where(torch.rand(n, generator=g) < 0.85, gender, 1 - gender)  # correlated with gender
    age = torch.randint(0, 3, (n,), generator=g)
    acts = torch.stack([gender + 0.1 * torch.randn(n, generator=g),  # pure gender unit
                        gender + 2.0 * age + 0.1 * torch.randn(n, generator=g),  # mixes gender and age
                        torch.randn(n, generator=g)], 1)  # knows nothing
    labels = {"gender": gender, "backdrop": backdrop, "age": age}
    nmi = metrics.unit_attribute_nmi(acts, labels)
    assert nmi.loc[0, "gender"] > 0.9 and nmi.loc[0, "backdrop"] > 0.2  # correlation shows in plain NMI
    assert nmi.loc[2].max() < 0.01  # bias-corrected: noise is not knowledge
    sel = metrics.selectivity(acts, labels)
    assert sel.loc[0, "best_attribute"] == "gender" and not sel.loc[0, "polysemantic"]
    assert sel.loc[0, "second"] < 0.02  # nothing about the backdrop once gender is known
    assert sel.loc[1, "polysemantic"] and {sel.loc[1, "best_attribute"], sel.loc[1, "second_attribute"]} == {"age", "gender"}
    assert not sel.loc[2, "informative"]
