import pytest
import torch

from helpers import judge as J, world


@pytest.fixture(scope="module")
def judge():
    return J.load_judge()


def test_shipped_judge_is_accurate_on_fresh_renders(judge):
    # seeds never used in training (training draws 10_000 + step)
    acc = J.accuracy(judge, n=3000, seed=424_242)
    low = {a: v for a, v in acc.items() if v < 0.99}
    assert not low, f"judge below 99% on fresh renders: {low}"


def test_judge_accuracy_on_biased_spec(judge):
    acc = J.accuracy(judge, n=2000, seed=515_151, spec=world.default_spec())
    assert min(acc.values()) >= 0.99, acc


def test_judge_interface(judge):
    x = world.sample(5, seed=1).images
    p = judge.predict(x)
    assert set(p) == set(world.ATTRIBUTES)
    for a, v in p.items():
        assert v.shape == (5, len(world.ATTRIBUTES[a]))
        assert torch.allclose(v.sum(1), torch.ones(5), atol=1e-5)
    assert judge.features(x).shape == (5, judge.num_features)
    # other resolutions are resized to the judge's input size
    big = world.sample(5, seed=1, resolution=64).images
    assert (judge.predict(big)["gender"].argmax(1) == p["gender"].argmax(1)).all()
    with pytest.raises(ValueError, match="expected images"):
        judge.predict(torch.rand(2, 1, 32, 32))


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_judge.py"):
        J.load_judge(tmp_path / "none.safetensors")
