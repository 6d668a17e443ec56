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


# ----------------------------------------------------------------------------- named sites


def _cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def _bump(h, info):
    """A fixed non-constant change (GroupNorm right after a site would cancel a constant or a scale)."""
    g = torch.Generator().manual_seed(h.shape[1] * 100 + h.shape[2])
    return h + torch.randn(h.shape[1:], generator=g).to(h.dtype)


def test_sites_list_blocks_layers_and_skips(tiny_model):
    names = hooks.sites(tiny_model.unet)
    for want in ("mid_block", "down_blocks.0", "down_blocks.1.resnets.0", "mid_block.attentions.0", "up_blocks.0",
                 "up_blocks.1.resnets.1", "up_blocks.0.skips.0", "up_blocks.0.skips.1"):
        assert want in names
    assert "up_blocks.0.skips.2" not in names  # one skip per resnet of the up block
    assert any(".attentions." in n and n.startswith("up_blocks") for n in hooks.sites(_cond_unet()))


@pytest.mark.parametrize("make", ["pixel", "conditional"])
def test_every_site_captures_edits_and_cleans_up(tiny_model, make):
    if make == "pixel":
        unet = tiny_model.unet
        args = (torch.randn(2, 3, 16, 16), 10)
        kw = {}
    else:
        unet = _cond_unet()
        args = (torch.randn(2, 4, 16, 16), 10)
        kw = {"encoder_hidden_states": torch.randn(2, 5, 32)}
    with torch.no_grad():
        plain = unet(*args, **kw).sample
        for site in hooks.sites(unet):
            with hooks.capture(unet, site=site) as cap:
                same = unet(*args, **kw).sample
            assert torch.equal(plain, same), site  # capturing changes nothing
            assert len(cap.activations) == 1 and cap.activations[0].shape[0] == 2, site
            with hooks.edit(unet, lambda h, info: h.clone(), site=site):
                assert torch.equal(plain, unet(*args, **kw).sample), site  # a no-op edit is bit-identical
            with hooks.edit(unet, _bump, site=site):
                assert not torch.allclose(plain, unet(*args, **kw).sample, atol=1e-4), site
            for m in unet.modules():
                assert not m._forward_hooks and not m._forward_pre_hooks, site


def test_skip_site_is_what_the_down_path_sent(tiny_model):
    """Up block 0 receives the last two down-path outputs: block 0's downsampler and block 1's resnet."""
    unet = tiny_model.unet
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), hooks.capture(unet, site="up_blocks.0.skips.1") as skip, \
            hooks.capture(unet, site="down_blocks.1.resnets.0") as down, \
            hooks.capture(unet, site="down_blocks.0.downsamplers.0") as ds, \
            hooks.capture(unet, site="up_blocks.0.skips.0") as skip0:
        unet(x, 10)
    assert torch.equal(skip.activations[0], down.activations[0])
    assert torch.equal(skip0.activations[0], ds.activations[0])
    # editing a skip changes only what the up block reads: the mid block sees the same h
    with torch.no_grad(), hooks.capture(unet) as mid_plain:
        unet(x, 10)
    with torch.no_grad(), hooks.edit(unet, _bump, site="up_blocks.0.skips.1"), hooks.capture(unet) as mid_edit:
        unet(x, 10)
    assert torch.equal(mid_plain.activations[0], mid_edit.activations[0])


def test_guided_edits_touch_the_conditional_half_at_any_site():
    unet = _cond_unet()
    x, emb = torch.randn(4, 4, 16, 16), torch.randn(4, 5, 32)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=emb).sample
        for site in ("down_blocks.0.attentions.0", "up_blocks.0.skips.1", "up_blocks.1"):
            with hooks.guided(unet), hooks.edit(unet, _bump, site=site, record=True) as rec:
                out = unet(x, 10, encoder_hidden_states=emb).sample
            assert rec.activations[0].shape[0] == 2, site  # fn saw the conditional half only
            assert torch.equal(out[:2], plain[:2]) and not torch.allclose(out[2:], plain[2:]), site


def test_bad_sites_and_compiled_blocks_are_refused(tiny_model):
    with pytest.raises(ValueError, match="has no module 'up_blocks.7'.*sites include"):
        with hooks.capture(tiny_model.unet, site="up_blocks.7"):
            pass
    with pytest.raises(ValueError, match="receives 2 skip tensors"):
        with hooks.capture(tiny_model.unet, site="up_blocks.0.skips.5"):
            pass
    with pytest.raises(ValueError, match="skips are what an up block receives"):
        with hooks.capture(tiny_model.unet, site="down_blocks.0.skips.0"):
            pass
    tiny_model.unet.down_blocks[1].compile()  # lazy: nothing is compiled until the first call
    with pytest.raises(ValueError, match="'down_blocks.1' was compiled.*keep='down_blocks.1.resnets.0'"):
        with hooks.capture(tiny_model.unet, site="down_blocks.1.resnets.0"):
            pass
    with hooks.capture(tiny_model.unet):  # the bottleneck is not inside the compiled block
        pass
