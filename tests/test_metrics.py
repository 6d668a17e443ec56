import math

import numpy as np
import pytest
import torch

from helpers import metrics


def test_fd_exact_values():
    assert metrics.fairness_discrepancy(torch.zeros(10, dtype=torch.long), 2) == pytest.approx(math.sqrt(0.5))
    assert metrics.fairness_discrepancy(torch.tensor([0, 1, 0, 1]), 2) == 0.0
    # 4 classes with shares (0.5, 0.25, 0.25, 0): deviations (.25, 0, 0, -.25)
    preds = torch.tensor([0, 0, 1, 2])
    assert metrics.fairness_discrepancy(preds, 4) == pytest.approx(math.sqrt(2 * 0.25**2))
    # a custom target, reached exactly
    assert metrics.fairness_discrepancy(preds, 4, p_ref=[0.5, 0.25, 0.25, 0.0]) == pytest.approx(0.0)
    # probabilities are read by their argmax
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert metrics.fairness_discrepancy(probs, 2) == pytest.approx(math.sqrt(2) * (2 / 3 - 0.5))


def test_fd_bad_input():
    with pytest.raises(ValueError, match="sum"):
        metrics.fairness_discrepancy(torch.tensor([0, 1]), 2, p_ref=[0.3, 0.3])
    with pytest.raises(ValueError, match="0..1"):
        metrics.fairness_discrepancy(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="columns"):
        metrics.fairness_discrepancy(torch.rand(4, 3), 2)


def test_bootstrap_interval_brackets_fd_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = torch.as_tensor(rng.choice(3, size=200, p=[0.6, 0.3, 0.1]))
    big = torch.as_tensor(rng.choice(3, size=5000, p=[0.6, 0.3, 0.1]))
    s, b = metrics.fd_bootstrap(small, 3), metrics.fd_bootstrap(big, 3)
    assert s["lo"] <= s["fd"] <= s["hi"] and b["lo"] <= b["fd"] <= b["hi"]
    assert (b["hi"] - b["lo"]) < 0.5 * (s["hi"] - s["lo"])
    true_fd = np.linalg.norm(np.array([0.6, 0.3, 0.1]) - 1 / 3)
    assert b["lo"] <= true_fd <= b["hi"]


def test_fd_floor_matches_simulation_scale():
    f = metrics.fd_floor(2000, 2)
    # for K=2 the FD is sqrt(2)*|p̂-0.5|; E|N(0, 1/(4n))| = sqrt(2/pi)/(2 sqrt n)
    expected_mean = math.sqrt(2) * math.sqrt(2 / math.pi) / (2 * math.sqrt(2000))
    assert f["mean"] == pytest.approx(expected_mean, rel=0.03)
    assert f["rms"] == pytest.approx(math.sqrt(0.5 / 2000))


class _FakeJudge(torch.nn.Module):
    """Features = per-channel image means and stds: enough to separate distributions."""

    num_features = 6

    def encode(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    def features(self, x):
        return self.encode(x)


def test_fid_uses_floor_sensibly():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, 3, 8, 8, generator=g)
    b = torch.rand(400, 3, 8, 8, generator=g)
    shifted = (torch.rand(400, 3, 8, 8, generator=g) * 0.7)
    judge = _FakeJudge()
    same = metrics.fid(a, b, judge)
    diff = metrics.fid(a, shifted, judge)
    assert same < 0.01 and diff > 10 * same
    # from stored features: the same number as from the images
    fa, fs = judge.features(a), judge.features(shifted)
    assert metrics.fid_from_features(fa, fs) == pytest.approx(diff, rel=1e-6)
    with pytest.raises(ValueError, match="equal d"):
        metrics.fid_from_features(fa, fs[:, :3])


def test_keep_rate_and_similarity():
    pa = {"x": torch.eye(2)[[0, 1, 1, 0]], "y": torch.eye(3)[[0, 1, 2, 2]]}
    pb = {"x": torch.eye(2)[[0, 1, 0, 0]], "y": torch.eye(3)[[0, 1, 2, 1]]}
    assert metrics.keep_rate(pa, pb, ["x"]) == 0.75
    assert metrics.keep_rate(pa, pb, ["x", "y"]) == 0.5
    imgs = torch.rand(5, 3, 8, 8)
    assert torch.allclose(metrics.similarity(imgs, imgs, _FakeJudge()), torch.ones(5), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        metrics.similarity(imgs, imgs[:3], _FakeJudge())


def test_keep_among_edited_excludes_untouched_samples():
    a = {"smile": torch.tensor([[1.0, 0.0]] * 4)}
    b = {"smile": torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])}
    edited = torch.tensor([False, False, True, True])
    assert metrics.keep_rate(a, b, ["smile"]) == 0.75
    assert metrics.keep_among(a, b, ["smile"], edited) == 0.5
    assert metrics.keep_among(a, b, ["smile"], torch.zeros(4, dtype=torch.bool)) is None


def test_paired_difference_and_mcnemar():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(400, generator=g) < 0.9).float()
    same = metrics.paired_difference(x, x.clone(), lambda v: float(v.mean()), n_boot=300)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0  # paired: identical data never differ
    y = x.clone()
    y[:60] = 0  # y loses 60 samples' worth (minus those already 0)
    d = metrics.paired_difference(x, y, lambda v: float(v.mean()), n_boot=300)
    assert d["diff"] > 0 and d["lo"] > 0  # the paired CI excludes 0
    fd = lambda v: metrics.fairness_discrepancy(v.long(), 2)  # noqa: E731
    p = metrics.paired_difference(torch.zeros(50), torch.cat([torch.zeros(25), torch.ones(25)]), fd, n_boot=200)
    assert abs(p["diff"] - (0.7071 - 0.0)) < 1e-3
    m = metrics.mcnemar(x.bool(), y.bool())
    assert m["only_b"] == 0 and m["only_a"] == int(x[:60].sum()) and m["p"] < 1e-6
    assert metrics.mcnemar(x.bool(), x.bool())["p"] == 1.0


def test_matched_setting_interpolates_the_frontier():
    rows = [{"setting": 1.0, "keep all": 0.99}, {"setting": 2.0, "keep all": 0.95},
            {"setting": 4.0, "keep all": 0.85}, {"setting": 3.0, "keep all": 0.91}]
    assert metrics.matched_setting(rows, 0.95)["setting"] == 2.0
    assert abs(metrics.matched_setting(rows, 0.90)["setting"] - (3 + 1 / 6)) < 1e-9
    r = metrics.matched_setting(rows, 0.999)
    assert r["setting"] is None and "every setting keeps less" in r["why"]
    r = metrics.matched_setting(rows, 0.80)
    assert r["setting"] is None and "extend the grid past 4" in r["why"]


def test_shares_of_counts_every_class_and_agrees_with_fd():
    preds = torch.tensor([0, 0, 1, 2])
    assert metrics.shares_of(preds, 4).tolist() == [0.5, 0.25, 0.25, 0.0]  # an empty class has share 0
    assert metrics.shares_of(preds, 4, dtype=torch.float64).dtype == torch.float64
    assert metrics.fd_of_shares(metrics.shares_of(preds, 4)) == pytest.approx(metrics.fairness_discrepancy(preds, 4))
    with pytest.raises(ValueError, match="no samples"):
        metrics.shares_of(torch.tensor([], dtype=torch.long), 2)
