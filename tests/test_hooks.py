import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from helpers import hooks, models
from conftest import tiny_unet


@pytest.fixture
def tiny_model():
    return models.Diffusion(unet=tiny_unet().eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


def _no_hooks_left(unet):
    return not unet._forward_pre_hooks and not unet.mid_block._forward_hooks


def test_capture_shapes_steps_and_timesteps(tiny_model):
    with hooks.capture(tiny_model.unet) as cache:
        models.sample(tiny_model, 3, steps=4, seed=0)
    h = cache.stack()
    assert h.shape == (4, 3, 32, 8, 8)
    assert cache.steps == [0, 1, 2, 3]
    from diffusers import DDIMScheduler
    ddim = DDIMScheduler.from_config(tiny_model.scheduler.config)
    ddim.set_timesteps(4)
    assert [int(t) for t in cache.timesteps] == ddim.timesteps.tolist()
    with hooks.capture(tiny_model.unet, steps=[1, 3]) as sub:
        models.sample(tiny_model, 3, steps=4, seed=0)
    assert sub.steps == [1, 3]
    assert torch.equal(sub.stack(), h[[1, 3]])
    assert _no_hooks_left(tiny_model.unet)


def test_noop_edit_and_capture_are_bit_identical(tiny_model):
    plain = models.sample(tiny_model, 3, steps=3, seed=4)
    with hooks.edit(tiny_model.unet, lambda h, info: h.clone()):
        edited = models.sample(tiny_model, 3, steps=3, seed=4)
    with hooks.capture(tiny_model.unet):
        captured = models.sample(tiny_model, 3, steps=3, seed=4)
    assert torch.equal(plain, edited) and torch.equal(plain, captured)


def test_edit_changes_output_only_on_chosen_steps(tiny_model):
    plain = models.sample(tiny_model, 2, steps=3, seed=4)
    with hooks.edit(tiny_model.unet, lambda h, info: h * 3.0, steps=[1]):
        edited = models.sample(tiny_model, 2, steps=3, seed=4)
    assert not torch.allclose(plain, edited)
    with hooks.edit(tiny_model.unet, lambda h, info: h * 3.0, steps=[99]):
        untouched = models.sample(tiny_model, 2, steps=3, seed=4)
    assert torch.equal(plain, untouched)


def test_hooks_removed_after_exception(tiny_model):
    def boom(h, info):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        with hooks.edit(tiny_model.unet, boom):
            models.sample(tiny_model, 1, steps=2)
    assert _no_hooks_left(tiny_model.unet)
    with pytest.raises(KeyError):
        with hooks.capture(tiny_model.unet):
            raise KeyError("user code failed")
    assert _no_hooks_left(tiny_model.unet)


def test_edit_that_changes_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="shape"):
        with hooks.edit(tiny_model.unet, lambda h, info: h[:, :4]):
            models.sample(tiny_model, 1, steps=2)
    assert _no_hooks_left(tiny_model.unet)


def test_conditional_unet_capture():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=ctx).sample
        with hooks.capture(unet) as cache:
            again = unet(x, 10, encoder_hidden_states=ctx).sample
            unet(x, timestep=20, encoder_hidden_states=ctx)
    assert torch.equal(plain, again)
    assert cache.stack().shape == (2, 2, 64, 8, 8)
    assert [int(t) for t in cache.timesteps] == [10, 20]
    assert not unet._forward_pre_hooks and not unet.mid_block._forward_hooks


def test_model_without_mid_block_is_refused():
    with pytest.raises(ValueError, match="no `mid_block`"):
        with hooks.capture(torch.nn.Linear(2, 2)):
            pass


def test_capture_streams_to_shards_and_refuses_unfinished(tiny_model, tmp_path):
    with hooks.capture(tiny_model.unet) as cache:
        models.sample(tiny_model, 3, steps=4, seed=0)
    writer = hooks.ShardWriter(tmp_path / "h", rows=5)
    with hooks.capture(tiny_model.unet, sink=writer):
        models.sample(tiny_model, 3, steps=4, seed=0)
    # 12 rows in shards of >= 5 rows: nothing is complete until close() writes the manifest
    with pytest.raises(FileNotFoundError, match="never finished"):
        hooks.load_shards(tmp_path / "h")
    writer.close()
    got = hooks.load_shards(tmp_path / "h")
    assert got["h"].shape == (12, 32, 8, 8)
    assert torch.equal(got["h"], cache.stack().flatten(0, 1))
    assert got["step"].tolist() == [s for s in range(4) for _ in range(3)]
    assert [int(t) for t in got["timestep"][::3]] == [int(t) for t in cache.timesteps]
    assert [sh["rows"] for sh in writer.shards] == [6, 6]  # batches of 3, flushed once >= 5 rows
    assert not list((tmp_path / "h").glob(".*.tmp"))
    with pytest.raises(FileExistsError, match="already holds shards"):
        hooks.ShardWriter(tmp_path / "h")
