"""Activation patching (helpers.patching) on a tiny seeded UNet: identities that must hold exactly."""
import pytest
import torch
from diffusers import DDPMScheduler

from helpers import hooks, models, patching
from conftest import tiny_unet

STEPS = 5
SITES = ["mid_block", "down_blocks.0", "up_blocks.0.skips.0"]


@pytest.fixture(scope="module")
def model():
    return models.Diffusion(unet=tiny_unet().eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


def _no_hooks(unet):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_a_sample_patched_with_its_own_activations_is_bit_identical(model):
    noise = models.make_noise(6, model.sample_size, seed=1)
    clean = models.sample(model, noise=noise, steps=STEPS)
    acts = patching.record(model, noise, SITES, STEPS)
    assert set(acts) == set(SITES) and all(len(acts[s]) == STEPS for s in SITES)
    assert torch.equal(patching.run_patched(model, noise, acts, STEPS), clean)
    assert _no_hooks(model.unet)


def test_mix_sees_the_recipient_and_the_donor(model):
    rec, don = models.make_noise(3, model.sample_size, seed=6), models.make_noise(3, model.sample_size, seed=7)
    acts = patching.record(model, don, ["mid_block"], STEPS)
    clean = models.sample(model, noise=rec, steps=STEPS)
    keep_own = patching.run_patched(model, rec, acts, STEPS, mix=lambda h, d, site: h)
    assert torch.equal(keep_own, clean)
    take = patching.run_patched(model, rec, acts, STEPS, mix=lambda h, d, site: d)
    assert torch.equal(take, patching.run_patched(model, rec, acts, STEPS))
    half = patching.run_patched(model, rec, acts, STEPS, mix=lambda h, d, site: (h + d) / 2)
    assert (half - clean).abs().amax() > 1e-4 and (half - take).abs().amax() > 1e-4


def test_a_donor_patch_changes_the_recipient_and_a_resumed_window_equals_the_full_run(model):
    rec, don = models.make_noise(4, model.sample_size, seed=2), models.make_noise(4, model.sample_size, seed=3)
    clean = models.sample(model, noise=rec, steps=STEPS)
    acts = patching.record(model, don, ["mid_block"], STEPS)
    full = patching.run_patched(model, rec, acts, STEPS)
    assert (full - clean).abs().amax() > 1e-3  # the patch acts
    states = {2: None}
    models.sample(model, noise=rec, steps=STEPS, states=states)
    late_full = patching.run_patched(model, rec, acts, STEPS, window=range(2, STEPS))
    late_resumed = patching.run_patched(model, states[2], acts, STEPS, window=range(2, STEPS), start_step=2)
    torch.testing.assert_close(late_resumed, late_full, atol=1e-6, rtol=0)
    assert (late_full - full).abs().amax() > 1e-4  # the window matters
    # a donor recorded from a resumed run holds the same activations
    don_states = {2: None}
    models.sample(model, noise=don, steps=STEPS, states=don_states)
    late = patching.record(model, don_states[2], ["mid_block"], STEPS, start_step=2)
    assert sorted(late["mid_block"]) == [2, 3, 4]
    torch.testing.assert_close(late["mid_block"][3], acts["mid_block"][3], atol=1e-6, rtol=0)


def test_a_patch_at_a_module_the_forward_pass_never_calls_changes_nothing(model):
    noise = models.make_noise(3, model.sample_size, seed=4)
    clean = models.sample(model, noise=noise, steps=STEPS)
    model.unet.add_module("unused", torch.nn.Conv2d(3, 3, 1))
    try:
        donor = {"unused": {s: torch.randn(3, 3, 8, 8) for s in range(STEPS)}}
        assert torch.equal(patching.run_patched(model, noise, donor, STEPS), clean)
    finally:
        del model.unet.unused
    # and a window outside the run's steps is refused, not ignored
    with pytest.raises(ValueError, match="outside the sampled steps"):
        patching.run_patched(model, noise, donor, STEPS, window=[STEPS])


def test_hooks_are_removed_after_an_error_and_bad_inputs_name_the_fix(model):
    noise = models.make_noise(2, model.sample_size, seed=5)
    acts = patching.record(model, noise, ["mid_block"], STEPS, window=[0, 1])
    with pytest.raises(ValueError, match="record them first"):
        patching.run_patched(model, noise, acts, STEPS)  # steps 2.. were not recorded
    bad = {"mid_block": {s: torch.randn(2, 7, 1, 1) for s in range(STEPS)}}  # wrong shape: fails inside sampling
    with pytest.raises(ValueError, match="changed h's shape"):
        patching.run_patched(model, noise, bad, STEPS)
    assert _no_hooks(model.unet)
    with pytest.raises(ValueError, match="pair every recipient"):
        patching.run_patched(model, models.make_noise(3, model.sample_size, seed=5), acts, STEPS, window=[0, 1])
    with pytest.raises(ValueError, match="before the resumed sampler"):
        patching.run_patched(model, noise, acts, STEPS, window=[0, 1], start_step=1)
    with pytest.raises(ValueError, match="no module"):
        patching.record(model, noise, ["mid_blok"], STEPS)


def test_transfer_reads_took_among_differing_pairs():
    out = patching.transfer([0, 0, 1, 2], [1, 0, 1, 0], [1, 1, 0, 2])
    assert out["differ"].tolist() == [True, False, False, True]
    assert out["took"].tolist() == [True, False, False, False]
    assert out["changed"].tolist() == [True, True, True, False]
