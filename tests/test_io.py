import pytest
import torch

from helpers import io


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "w.safetensors"
    io.save_tensors(target, {"a": torch.ones(3)}, meta={"v": 1})

    def broken(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, broken)
    tensors, meta = io.load_tensors(target)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(4)
    opt.step()
    tensors, meta = io.flatten_optimizer(opt)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=5.0)
    io.unflatten_optimizer(opt2, tensors, meta)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[p][k], opt2.state[opt2.param_groups[0]["params"][0]][k])
    assert opt2.param_groups[0]["lr"] == 1e-3
