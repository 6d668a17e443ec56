"""Chapter 5's verdicts (helpers.chapters.sweeps.finding3/4/5) say yes and no where they must."""
import torch

from helpers.chapters import sweeps


def test_finding3_needs_a_monotone_share_that_moves():
    n = 128
    assert sweeps.finding3({0: 0.1, 1: 0.3, 2: 0.6, 4: 0.9}, n)["holds"]
    flat = sweeps.finding3({0: 0.2, 1: 0.2, 2: 0.21, 4: 0.2}, n)
    assert flat["monotone"] and not flat["moves"] and not flat["holds"]  # a flat line is monotone, not a finding
    dip = sweeps.finding3({0: 0.1, 1: 0.6, 2: 0.2, 4: 0.9}, n)
    assert dip["moves"] and not dip["monotone"] and not dip["holds"]
    # a dip within one standard error is noise, not a break
    assert sweeps.finding3({0: 0.1, 1: 0.50, 2: 0.48, 4: 0.9}, n)["monotone"]


def test_finding4_needs_both_signs_and_log_ratio_is_clipped():
    assert sweeps.finding4([1.2, 0.4, -0.3])["crosses 0"]
    assert not sweeps.finding4([1.2, 0.8, 0.1])["crosses 0"]
    pred = torch.tensor([0] * 10)  # no sample in the target class: clipped at 1/(2n), finite
    assert abs(sweeps.log_ratio(pred, 0, 1) - torch.log(torch.tensor(20.0)).item()) < 1e-6


def test_finding5_reduction_and_interference():
    ok = sweeps.finding5(0.4, 0.05, 0.06, floor=0.03)
    assert ok["reduced vs original"] and ok["no interference"]
    bad = sweeps.finding5(0.4, 0.05, 0.2, floor=0.03)
    assert bad["reduced vs original"] and not bad["no interference"]
    assert not sweeps.finding5(0.4, 0.38, 0.39, floor=0.03)["reduced vs original"]
