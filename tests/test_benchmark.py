"""The benchmark runner on the shipped model with tiny settings, and the table's refusals."""
import pytest
import torch

from helpers.chapters import benchmark_v1 as BM
from helpers import world

TINY_FIT = {
    "Latent Direction": dict(iters=2, batch_size=4, lr=0.05),
    "Latent Editing": dict(edit_steps=2, iters=1, batch_size=4, lr=0.05, l1=3.0),
    "Finetuning": dict(iters=1, batch_size=4, train_steps=2, rank=2, lr=1e-3, preserve=10.0),
}


def _row(**kw):
    r = {"attribute": "gender", "method": "DiffLens", "seed": 1, "n": 10, "FD": 0.1, "keep all": 0.95, "setting": 1.0}
    r.update(kw)
    return r


def test_table_refuses_mixed_seeds_counts_and_duplicates():
    BM.table([_row(), _row(method="Original")])
    with pytest.raises(ValueError, match="different \\(seed, n\\)"):
        BM.table([_row(), _row(method="Original", seed=2)])
    with pytest.raises(ValueError, match="different \\(seed, n\\)"):
        BM.table([_row(), _row(method="Original", n=11)])
    with pytest.raises(ValueError, match="more than one result"):
        BM.table([_row(), _row()])


def test_choose_rule():
    rows = [_row(setting=1.0, FD=0.05, **{"keep all": 0.97}), _row(setting=2.0, FD=0.01, **{"keep all": 0.91}),
            _row(setting=3.0, FD=0.00, **{"keep all": 0.50})]
    assert BM.choose(rows)["setting"] == 2.0  # lowest FD with keep >= 0.90
    assert BM.choose([_row(setting=3.0, **{"keep all": 0.5}), _row(setting=4.0, **{"keep all": 0.6})])["setting"] == 4.0


def test_every_method_runs_on_the_shipped_model_with_shared_noise(tmp_path):
    r = BM.Runner(tmp_path, steps=25, batch_size=4, keep_images=2, progress=False, fit=TINY_FIT)
    orig = r.cell("val", "gender", "Original", None, 4)
    ref = r.reference(8)
    for m in BM.METHODS[1:]:
        c = r.cell("val", "gender", m, BM.KNOBS[m][1][0], 4)
        assert (c.seed, c.n) == (BM.VAL_SEED, 4) and set(c.probs) == set(world.ATTRIBUTES)
        row = BM.cell_metrics(c, orig, ref["reference"])
        assert 0 <= row["keep all"] <= 1 and row["FID"] > 0
        if m == "DiffLens surplus":  # only the majority's surplus is asked to change; the rest are -1
            assert ((c.classes >= -1) & (c.classes < 2)).all()
        elif c.classes is not None:
            assert torch.equal(c.classes, BM.classes_for("gender", 4))
    # resumable: a saved cell is loaded, not recomputed — no sampling happens and its file is not rewritten
    from helpers import models

    path = next((tmp_path / "cells").glob("val_gender_Activation_*"))
    stamp = path.stat().st_mtime_ns
    real, calls = models.sample, []
    models.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = r.cell("val", "gender", "Activation", BM.KNOBS["Activation"][1][0], 4)
        assert not calls and path.stat().st_mtime_ns == stamp
        assert torch.equal(again.probs["gender"], BM.Cell.load(path).probs["gender"])
        path.unlink()  # and the check above can fail: a missing cell is sampled again
        r.cell("val", "gender", "Activation", BM.KNOBS["Activation"][1][0], 4)
        assert calls
    finally:
        models.sample = real
    # fitted baselines were cached with their training cost logged
    assert {"Latent Direction/gender", "Latent Editing/gender", "Finetuning/gender"} <= set(r.log["fit_seconds"])
    r2 = BM.Runner(tmp_path, steps=25, batch_size=4, progress=False, fit=TINY_FIT)
    ft = r2.fitted_method("Finetuning", "gender")
    saved = {n: p for n, p in r.fitted_method("Finetuning", "gender").unet.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, saved[n]) for n, p in ft.unet.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="not paired"):
        BM.cell_metrics(r.cell("val", "gender", "Original", None, 3), orig, ref["reference"])


def test_learned_baselines_train_on_the_second_judge_and_stale_fits_are_refused(tmp_path):
    from helpers import io

    r = BM.Runner(tmp_path, steps=25, batch_size=4, progress=False, fit=TINY_FIT)
    assert r.trainer_judge is not r.judge
    assert not torch.equal(r.trainer_judge.heads["gender"].weight[:, :8], r.judge.heads["gender"].weight[:, :8])
    r.fitted_method("Latent Editing", "gender")
    path = tmp_path / "fitted" / "Latent-Editing_gender.safetensors"
    t, meta = io.load_tensors(path)
    assert meta["judge"] == BM.TRAINER_JUDGE.name
    meta.pop("judge")
    io.save_tensors(path, t, meta=meta)  # as if trained against the scoring judge
    with pytest.raises(ValueError, match="delete it"):
        BM.Runner(tmp_path, steps=25, batch_size=4, progress=False, fit=TINY_FIT).fitted_method("Latent Editing", "gender")


def _cell(method, gender, classes=None, smile=None):
    def onehot(ix, k):
        return torch.nn.functional.one_hot(torch.tensor(ix), k).float()
    n = len(gender)
    probs = {a: onehot([0] * n, len(c)) for a, c in world.ATTRIBUTES.items()}
    probs["gender"] = onehot(gender, 2)
    if smile is not None:
        probs["smile"] = onehot(smile, 2)
    return BM.Cell("val", "gender", method, None if method == "Original" else 1.0, 1, n, probs,
                   torch.zeros(n, 4), torch.zeros(0), None if classes is None else torch.tensor(classes))


def test_hit_rates_and_changes_count_by_original_and_asked_for_class(tmp_path):
    orig = _cell("Original", [0, 0, 0, 0, 1, 1])
    # asked: 0→1 (x2), 0→0, 0→1, 1→0, 1→1; the edit turns two of the three 0→1 samples and no 1→0 sample
    edit = _cell("DiffLens", [1, 1, 0, 0, 1, 1], classes=[1, 1, 0, 1, 0, 1], smile=[0, 1, 0, 0, 0, 0])
    hr = BM.hit_rates(edit, orig)
    assert hr.loc["male", "female"] == pytest.approx(2 / 3) and hr.loc["female", "male"] == 0.0
    assert hr.loc["male", "male"] == 1.0 and hr.loc["female", "female"] == 1.0
    with pytest.raises(ValueError, match="no per-sample class draws"):
        BM.hit_rates(_cell("Finetuning", [0] * 6), orig)
    for c in (orig, edit):
        c.save(tmp_path / "cells")
    (row,) = BM.changes(tmp_path, split="val")
    assert row["gender"] == pytest.approx(2 / 6) and row["smile"] == pytest.approx(1 / 6) and row["age"] == 0.0


def test_target_spec_makes_only_the_target_uniform():
    spec = BM.target_spec("race")
    d = world.default_spec()
    assert spec.probs["race"] == BM.uniform("race") and spec.probs["gender"] == d.probs["gender"]
    assert spec.conditionals == d.conditionals
    b = world.sample(4000, spec=spec, seed=0)
    share = torch.bincount(b.labels["race"], minlength=4).float() / 4000
    assert (share - 0.25).abs().max() < 0.03
