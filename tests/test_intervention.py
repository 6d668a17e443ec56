"""Probe, integrated gradients and interventions on a tiny UNet and a tiny SAE."""
import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler

from helpers import attribution, hooks, intervention, models
from helpers import probe as P
from helpers import sae as S
from conftest import tiny_unet

STEPS = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = models.Diffusion(unet=tiny_unet().eval(), scheduler=DDPMScheduler(num_train_timesteps=100))
    with hooks.capture(model.unet) as cache:
        models.sample(model, 48, steps=STEPS, seed=0)
    h = cache.stack()  # (steps, 48, 32, 8, 8)
    sae, _ = S.train_sae(S.to_rows(h.flatten(0, 1)), S.SAEConfig(d_in=32, expansion=4, k=4),
                         S.SAETrainConfig(steps=150, batch_size=1024, log_every=50), progress=False)
    pooled = h.mean((3, 4)).transpose(0, 1)  # (48, steps, 32)
    # a synthetic "gender": whether channel 0 at step 2 is above its median
    y = (pooled[:, 2, 0] > pooled[:, 2, 0].median()).long()
    probe = P.train_probe(pooled, {"gender": y}, attributes={"gender": ("low", "high")}, epochs=200)
    return model, sae, probe, h, y


def test_probe_learns_and_reports_per_step(setup):
    model, sae, probe, h, y = setup
    acc = P.accuracy(probe, h.mean((3, 4)).transpose(0, 1), {"gender": y})
    assert list(acc.index) == list(range(STEPS)) and acc.loc[2, "gender"] > 0.9
    with pytest.raises(ValueError, match="out of range"):
        probe(h[0], STEPS)


def test_ig_on_linear_output_matches_analytic(setup):
    model, sae, probe, h, y = setup
    hb, step, cls = h[2, :6], 2, 1
    attr, delta = attribution.latent_ig(sae, probe, hb, step, "gender", cls, n_steps=16, output="logit")
    z, _ = attribution._latent_maps(sae, hb)
    w = probe.weight[step, :, cls] / probe.std[step]  # d logit / d pooled h
    grad = sae.input_scale * (sae.W_dec @ w) / z.shape[1]  # d logit / d z[p, j]: same for every position
    torch.testing.assert_close(attr, z * grad, rtol=1e-4, atol=1e-6)
    assert delta.abs().max() < 1e-4
    # probability output: completeness holds up to captum's reported delta
    attr_p, delta_p = attribution.latent_ig(sae, probe, hb, step, "gender", cls, n_steps=64)
    full = probe.class_prob(hb, step, "gender", cls)
    base = probe.class_prob(hb - S.from_rows(sae.decode(z.view(-1, z.shape[-1])), hb.shape)
                            + S.from_rows(sae.decode(torch.zeros_like(z).view(-1, z.shape[-1])), hb.shape),
                            step, "gender", cls)
    torch.testing.assert_close(attr_p.sum((1, 2)), (full - base).detach() - delta_p, rtol=1e-4, atol=1e-5)
    assert delta_p.abs().max() < 1e-2


def test_assign_classes_hits_target_counts():
    c = intervention.assign_classes(1000, [0.5, 0.3, 0.2], seed=3)
    assert torch.bincount(c).tolist() == [500, 300, 200]
    c7 = intervention.assign_classes(7, [0.5, 0.5], seed=0)
    assert sorted(torch.bincount(c7).tolist()) == [3, 4]
    assert not torch.equal(c, intervention.assign_classes(1000, [0.5, 0.3, 0.2], seed=4))  # order is seeded


def test_noop_edits_are_bit_identical(setup):
    model, sae, *_ = setup
    # same batch split as the edited runs: a conv over a batch of 6 and over 4 + 2 may round differently
    plain = models.sample(model, 6, steps=STEPS, seed=5, batch_size=4)
    for e in (intervention.Edit("gender", {0: [1, 2]}, beta=1.0, mode="scale", cls=0),
              intervention.Edit("gender", {0: [1, 2]}, beta=0.0, mode="add", target=[0.5, 0.5]),
              intervention.Edit("gender", {0: []}, beta=5.0, mode="scale", cls=0)):
        got, _ = intervention.sample_edited(model, sae, [e], 6, steps=STEPS, seed=5, batch_size=4)
        assert torch.equal(got, plain)


def test_scaling_top_features_moves_probe_score(setup):
    model, sae, probe, h, y = setup
    step = 2
    rank = attribution.rank(sae, probe, {step: h[step]}, y, "gender", per_class=16, n_steps=16, progress=False)
    top = rank.top(1, 4)

    def probe_score(beta):
        e = intervention.Edit("gender", {1: top}, beta=beta, mode="scale", cls=1, steps=[step])
        iv = intervention.Intervention(sae, [e], 16)
        with hooks.edit(model.unet, iv.fn(torch.arange(16)), record=True) as cache:
            models.sample(model, 16, steps=STEPS, seed=9, batch_size=16)
        h_after = cache.activations[cache.steps.index(step)]
        return probe.class_prob(h_after, step, "gender", 1).mean().item()

    lo, mid, hi = probe_score(0.0), probe_score(1.0), probe_score(3.0)
    assert lo < mid < hi


def test_edit_errors(setup):
    model, sae, *_ = setup
    m = sae.cfg.d_sae
    g2 = ("male", "female")
    bad = [
        (dict(attribute="gender", features={5: [1]}, beta=2.0, cls=0, classes=g2), r"classes 0..1 \['male', 'female'\]"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, cls=7, classes=g2), "cls must be one of"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, cls=True), "cls must be one of"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, cls=0, classes=("male",)), "two or more"),
        (dict(attribute="gender", features={0: [1]}, beta=math.nan, cls=0), "finite"),
        (dict(attribute="gender", features={0: [1]}, beta=math.inf, cls=0), "finite"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, target=[0.7, 0.7]), "sum to 1"),
        (dict(attribute="age", features={0: [1]}, beta=2.0, target=[0.5, 0.5], classes=("y", "a", "o")),
         "3 probabilities"),
        (dict(attribute="gender", features={0: [m]}, beta=2.0, cls=0), "out of range"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, cls=0, steps=[]), "steps is empty"),
        (dict(attribute="gender", features={0: [1]}, beta=2.0, cls=0, mode="mul"), "mode must be"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            intervention.Intervention(sae, [intervention.Edit(**kw)], 4)
    with pytest.raises(ValueError, match="no head for 'height'"):
        attribution.latent_ig(sae, setup[2], setup[3][0, :2], 0, "height", 0)
    with pytest.raises(ValueError, match="classes 0..1"):
        attribution.latent_ig(sae, setup[2], setup[3][0, :2], 0, "gender", 2)


def test_footprint_add_is_confined_to_its_positions(setup):
    model, sae, probe, h, y = setup
    feats = [1, 2, 3]
    fp = intervention.footprint(sae, {0: h[0], 2: h[2]}, y, 1, feats)
    assert fp.shape == (3, 64) and (fp >= 0).all()
    # the footprint is the class's mean activation map, averaged over the given steps
    z = torch.stack([sae.encode(S.to_rows(h[s][y == 1])).view(-1, 64, sae.cfg.d_sae)[:, :, feats].mean(0)
                     for s in (0, 2)]).mean(0).T
    torch.testing.assert_close(fp, z)
    # an all-zero footprint is a no-op, bit for bit
    zero = intervention.Edit("gender", {1: feats}, beta=3.0, mode="add", cls=1, footprint={1: torch.zeros(3, 64)})
    got, _ = intervention.sample_edited(model, sae, [zero], 4, steps=STEPS, seed=5, batch_size=4)
    assert torch.equal(got, models.sample(model, 4, steps=STEPS, seed=5))
    # a footprint on one position changes h there only (first edited step: nothing upstream differs yet)
    one = torch.zeros(3, 64)
    one[:, 27] = 1.0
    e = intervention.Edit("gender", {1: feats}, beta=3.0, mode="add", cls=1, footprint={1: one}, steps=[1])
    iv = intervention.Intervention(sae, [e], 4)
    with hooks.capture(model.unet) as before:
        models.sample(model, 4, steps=STEPS, seed=5)
    with hooks.edit(model.unet, iv.fn(torch.arange(4)), record=True) as after:
        models.sample(model, 4, steps=STEPS, seed=5)
    d = (after.activations[after.steps.index(1)] - before.stack()[1]).abs().sum(1).flatten(1)  # (4, 64)
    assert (d[:, 27] > 0).all() and d[:, torch.arange(64) != 27].max() == 0


def test_footprint_errors(setup):
    model, sae, *_ = setup
    with pytest.raises(ValueError, match="only applies to mode='add'"):
        intervention.Edit("gender", {1: [1]}, 2.0, "scale", cls=1, footprint={1: torch.ones(1, 64)}).validate(64)
    with pytest.raises(ValueError, match=r"footprint\[1\] must be"):
        intervention.Edit("gender", {1: [1, 2]}, 2.0, "add", cls=1, footprint={1: torch.ones(1, 64)}).validate(64)
    e = intervention.Edit("gender", {1: [1]}, 2.0, "add", cls=1, footprint={1: torch.ones(1, 16)})
    with pytest.raises(ValueError, match="positions but h has 64"):
        intervention.sample_edited(model, sae, [e], 2, steps=STEPS, seed=0)
    with pytest.raises(ValueError, match="no sample is judged class 1"):
        intervention.footprint(sae, {0: setup[3][0]}, torch.zeros(48), 1, [1])


def test_suppress_others_zeroes_the_other_classes_features(setup):
    """Swap edits: a sample assigned class c loses the other classes' features (exactly, on the first edited
    step), whichever code path applies the edit (add, scale, or mixed)."""
    model, sae, probe, h, y = setup
    step = 1
    z_all = sae.encode(S.to_rows(h[step])).view(48, 64, -1)
    busy = (z_all[:4] > 0).float().sum((0, 1)).argsort(descending=True)  # latents active in the first samples
    feats = {0: busy[:3].tolist(), 1: busy[3:6].tolist()}
    assert (z_all[:4][..., busy[:6]] > 0).any()
    with hooks.capture(model.unet) as before:
        models.sample(model, 4, steps=STEPS, seed=5)
    h0 = before.stack()[step]
    z = sae.encode(S.to_rows(h0)).view(4, 64, -1)
    extra = busy[6].item()

    def run(edits):
        iv = intervention.Intervention(sae, edits, 4)
        with hooks.edit(model.unet, iv.fn(torch.arange(4)), record=True) as after:
            models.sample(model, 4, steps=STEPS, seed=5)
        return iv.classes("gender"), after.activations[after.steps.index(step)]

    swap = dict(attribute="gender", features=feats, target=[0.5, 0.5], steps=[step], suppress_others=True)
    for edits, scale_extra in (
        ([intervention.Edit(beta=0.0, mode="add", **swap)], 1.0),
        ([intervention.Edit(beta=1.0, mode="scale", **swap)], 1.0),
        ([intervention.Edit(beta=0.0, mode="add", **swap),
          intervention.Edit("age", {0: [extra]}, beta=1.5, mode="scale", cls=0, steps=[step])], 1.5),
    ):
        classes, got = run(edits)
        assert sorted(classes.tolist()) == [0, 0, 1, 1]
        z_new = z.clone()
        z_new[..., extra] *= scale_extra
        for i, c in enumerate(classes.tolist()):
            z_new[i][:, feats[1 - c]] = 0
        want = h0 + S.from_rows(((z_new - z).view(256, -1) @ sae.W_dec) * sae.input_scale, h0.shape)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert (got - h0).abs().max() > 0  # the suppressed features were active: something changed
    # without suppress_others, add β = 0 is the identity
    plain = intervention.Edit("gender", feats, beta=0.0, mode="add", target=[0.5, 0.5])
    assert plain.is_noop() and not dataclasses.replace(plain, suppress_others=True).is_noop()


def test_assign_surplus_moves_only_the_majority_surplus():
    src = torch.tensor([0] * 75 + [1] * 25)
    a = intervention.assign_surplus(src, [0.5, 0.5], seed=1)
    assert int((a == 1).sum()) == 25 and int((a == 0).sum()) == 0  # 25 of the 75 class-0 samples move
    assert (src[a == 1] == 0).all() and (a[src == 1] == -1).all()
    final = torch.where(a >= 0, a, src)
    assert torch.bincount(final).tolist() == [50, 50]
    # three classes, two short: the surplus is split by the missing counts
    src3 = torch.tensor([1] * 70 + [0] * 20 + [2] * 10)
    a3 = intervention.assign_surplus(src3, [1 / 3, 1 / 3, 1 / 3], seed=0)
    assert torch.bincount(torch.where(a3 >= 0, a3, src3), minlength=3).tolist() in ([33, 34, 33], [34, 33, 33], [33, 33, 34])
    assert (src3[a3 >= 0] == 1).all()
    assert (intervention.assign_surplus(torch.tensor([0, 1]), [0.5, 0.5]) == -1).all()  # already on target
    assert not torch.equal(a, intervention.assign_surplus(src, [0.5, 0.5], seed=2))


def test_surplus_edit_leaves_unmoved_samples_bit_identical(setup):
    model, sae, *_ = setup
    src = torch.tensor([0, 0, 0, 1, 0, 0])
    e = intervention.Edit("gender", {0: [1, 2], 1: [3, 4]}, beta=4.0, mode="add", target=[0.5, 0.5], source=src,
                          suppress_others=True)
    got, iv = intervention.sample_edited(model, sae, [e], 6, steps=STEPS, seed=5, batch_size=6)
    plain = models.sample(model, 6, steps=STEPS, seed=5, batch_size=6)
    cls = iv.classes("gender")
    assert sorted(cls.tolist()) == [-1, -1, -1, -1, 1, 1] and (src[cls == 1] == 0).all()
    assert torch.equal(got[cls == -1], plain[cls == -1])
    assert (got[cls == 1] - plain[cls == 1]).abs().amax() > 0
    for bad, msg in ((torch.tensor([0, 2, 0, 0, 0, 0]), "class ids 0..1"), (torch.tensor([0.0] * 6), "class ids"),
                     (torch.tensor([0, 1]), "2 classes for 6 samples")):
        with pytest.raises(ValueError, match=msg):
            intervention.Intervention(sae, [dataclasses.replace(e, source=bad)], 6)
    with pytest.raises(ValueError, match="only applies with a target"):
        intervention.Intervention(sae, [intervention.Edit("gender", {0: [1]}, beta=1.0, cls=0, source=src)], 6)


# ----------------------------------------------------------------------------- assignment policies


def test_iid_policy_draws_independently_and_reproducibly():
    a = intervention.assign_iid(1000, [0.5, 0.3, 0.2], seed=3)
    assert torch.equal(a, intervention.assign_iid(1000, [0.5, 0.3, 0.2], seed=3))
    counts = torch.bincount(a, minlength=3)
    assert counts.tolist() != [500, 300, 200] and (counts.float() / 1000 - torch.tensor([0.5, 0.3, 0.2])).abs().max() < 0.05


def test_minimal_policy_reads_own_class_with_the_probe_and_moves_only_the_surplus(setup):
    model, sae, probe, h, y = setup
    feats = {0: [1, 2], 1: [3, 4]}
    e = intervention.Edit("gender", feats, beta=2.0, mode="add", target=[0.5, 0.5], steps=[2, 3], policy="minimal",
                          probe=probe, classes=("low", "high"))
    plain = models.sample(model, 12, steps=STEPS, seed=11, batch_size=6)  # same batches as the edited run
    with hooks.capture(model.unet, steps=[2]) as cap:
        models.sample(model, 12, steps=STEPS, seed=11)
    got, iv = intervention.sample_edited(model, sae, [e], 12, steps=STEPS, seed=11, batch_size=6)
    own = iv.own_classes("gender")
    # the reading is the probe's on the sample's own h at the first edited step (same pass, nothing edited yet)
    assert torch.equal(own, probe(cap.activations[0], 2)["gender"].argmax(-1))
    asked = iv.classes("gender")
    for b in (slice(0, 6), slice(6, 12)):  # per batch: the earth-mover minimum, surplus only, to the short class
        have = torch.bincount(own[b], minlength=2)
        moved = (asked[b] >= 0).sum()
        assert moved == (have - 3).clamp(min=0).sum()
        assert ((asked[b] < 0) | (asked[b] != own[b])).all()
    untouched = asked < 0
    assert untouched.any() and torch.equal(got[untouched], plain[untouched])  # unedited samples are bit-identical
    with pytest.raises(ValueError, match="read_step 3 comes after"):
        intervention.Intervention(sae, [dataclasses.replace(e, read_step=3)], 4)
    with pytest.raises(ValueError, match="needs an h-probe"):
        intervention.Intervention(sae, [dataclasses.replace(e, probe=None)], 4)
    # a probe of the same width trained at another site would read the wrong activations without a word: refused
    elsewhere = P.HProbe(dataclasses.replace(probe.cfg, site="up_blocks.0"))
    elsewhere.load_state_dict(probe.state_dict())
    with pytest.raises(ValueError, match="trained on activations at 'up_blocks.0'"):
        intervention.sample_edited(model, sae, [dataclasses.replace(e, probe=elsewhere)], 6, steps=STEPS, seed=11)


def test_per_class_beta_makes_a_majority_draw_a_noop(setup):
    """The released configs' per-class ratios: the majority's ratio 1.0 leaves those samples bit-identical."""
    model, sae, *_ = setup
    e = intervention.Edit("gender", {0: [1, 2], 1: [3, 4]}, beta=[1.0, 3.0], mode="scale", target=[0.5, 0.5],
                          policy="iid", classes=("male", "female"))
    plain = models.sample(model, 8, steps=STEPS, seed=12)
    got, iv = intervention.sample_edited(model, sae, [e], 8, steps=STEPS, seed=12, batch_size=8)
    drawn = iv.classes("gender")
    assert (drawn == 0).any() and (drawn == 1).any()
    assert torch.equal(got[drawn == 0], plain[drawn == 0]) and not torch.equal(got[drawn == 1], plain[drawn == 1])
    with pytest.raises(ValueError, match="2 per-class strengths for 3 classes"):
        intervention.Edit("age", {0: [1]}, beta=[1.0, 2.0], mode="scale", target=[0.4, 0.3, 0.3]).validate(64)
    assert intervention.Edit("g", {0: [1]}, beta=[1.0, 1.0], mode="scale", target=[0.5, 0.5]).is_noop()


def test_steps_given_as_an_iterator_still_fire(setup):
    model, sae, *_ = setup
    plain = models.sample(model, 2, steps=STEPS, seed=4)
    e = intervention.Edit("gender", {0: [1, 2]}, beta=3.0, mode="scale", cls=0, steps=iter([0, 1]))
    got, _ = intervention.sample_edited(model, sae, [e], 2, steps=STEPS, seed=4)
    assert not torch.equal(got, plain)


def test_resuming_an_edit_from_the_unedited_state_gives_the_same_images(setup):
    """Cost grows with edited samples only: an edit that starts at step s, run from the unedited pass's state at s
    (steps s.. only), equals the full run; the samples the policy leaves alone are the unedited ones."""
    model, sae, probe, *_ = setup
    n, s0 = 10, 2
    noise = models.make_noise(n, 16, 21)
    states = {s0: None}
    plain = models.sample(model, noise=noise, steps=STEPS, batch_size=5, states=states)
    e = intervention.Edit("gender", {0: [1, 2], 1: [3, 4]}, beta=2.0, mode="add", target=[0.5, 0.5],
                          steps=range(s0, STEPS), policy="minimal", probe=probe, classes=("low", "high"))
    full, iv = intervention.sample_edited(model, sae, [e], noise=noise, steps=STEPS, batch_size=5, class_seed=3)
    # decided beforehand from the stored pass (the probe reads pooled h at the read step): the same classes
    hs = []
    for b in (slice(0, 5), slice(5, 10)):  # the hook counts UNet calls within its block: one block per batch
        with hooks.capture(model.unet, steps=[s0]) as cap:
            models.sample(model, noise=noise[b], steps=STEPS)
        hs.append(cap.activations[0])
    own = probe(torch.cat(hs), s0)["gender"].argmax(-1)
    asked = intervention.assign_minimal(own, [0.5, 0.5], batch_size=5, seed=3 * 7919 + 0)
    assert torch.equal(asked, iv.classes("gender"))
    edited = (asked >= 0).nonzero().flatten()
    assert 0 < len(edited) < n
    pre = dataclasses.replace(e, assigned=asked[edited], policy="quota", probe=None)
    resumed, _ = intervention.sample_edited(model, sae, [pre], noise=states[s0][edited], steps=STEPS,
                                            batch_size=len(edited), start_step=s0)
    torch.testing.assert_close(resumed, full[edited], atol=1e-6, rtol=0)
    assert torch.equal(full[asked < 0], plain[asked < 0])
    with pytest.raises(ValueError, match="before start_step 3"):
        intervention.sample_edited(model, sae, [pre], noise=states[s0][edited], steps=STEPS, start_step=3)


def test_null_edit_has_the_same_size_in_a_random_direction(setup):
    model, sae, *_ = setup
    e = intervention.Edit("gender", {0: [1, 2], 1: [3, 4]}, beta=3.0, mode="add", target=[0.5, 0.5], steps=[1],
                          classes=("m", "f"))
    iv = intervention.Intervention(sae, [e], 4)
    with hooks.capture(model.unet, steps=[1]) as before:
        models.sample(model, 4, steps=STEPS, seed=5)
    h = before.activations[0]
    info = hooks.StepInfo(step=1, timestep=torch.tensor(0))
    real = iv.fn(torch.arange(4))(h, info) - h
    null = iv.fn(torch.arange(4), null_seed=7)(h, info) - h
    torch.testing.assert_close(null.flatten(1).norm(dim=1), real.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(null.flatten(1), real.flatten(1), dim=1)
    assert cos.abs().max() < 0.3  # unrelated to the edit's direction
    again = iv.fn(torch.arange(4), null_seed=7)(h, info) - h
    assert torch.equal(null, again)  # fixed per sample and seed


def test_a_cell_that_costs_what_it_edits_equals_the_full_cell(setup):
    """pipeline.original_pass + edited_pass (reuse unedited samples, resume edited ones at the first edited
    step) gives the same judged cell as sampling every sample with the edit."""
    from helpers import judge as J
    from helpers import pipeline

    model, sae, probe, *_ = setup
    torch.manual_seed(0)
    judge = J.Judge(J.JudgeConfig(resolution=16)).eval()
    n, s0 = 10, 2
    noise = models.make_noise(n, 16, 31)
    ref = pipeline.original_pass(model, noise, STEPS, judge, state_steps=(s0,), pooled_steps=(s0,), batch_size=5)
    assert ref.states[s0].shape == (n, 3, 16, 16) and ref.pooled[s0].shape == (n, 32)
    e = intervention.Edit("gender", {0: [1, 2], 1: [3, 4]}, beta=2.0, mode="add", target=[0.5, 0.5],
                          steps=range(s0, STEPS), policy="minimal", probe=probe, classes=("low", "high"))
    full, iv = intervention.sample_edited(model, sae, [e], noise=noise, steps=STEPS, batch_size=5, class_seed=2)
    own = probe.logits_pooled(ref.pooled[s0], s0)["gender"].argmax(-1)  # the probe reads pooled h
    asked = intervention.assign_minimal(own, [0.5, 0.5], 5, seed=2 * 7919)
    assert torch.equal(asked, iv.classes("gender"))

    def run(idx, x, start):
        pre = dataclasses.replace(e, assigned=asked[idx], policy="quota", probe=None)
        return intervention.sample_edited(model, sae, [pre], noise=x, steps=STEPS, batch_size=5, start_step=start)[0]

    cell = pipeline.edited_pass(ref, asked, run, judge, start_step=s0)
    want = judge.predict(full)
    for a in want:
        torch.testing.assert_close(cell["probs"][a], want[a], atol=1e-5, rtol=0)
    assert cell["passes"] == int((asked >= 0).sum()) * (STEPS - s0) < n * STEPS
    with pytest.raises(ValueError, match="no state at step 1"):
        pipeline.edited_pass(ref, asked, run, judge, start_step=1)


def test_edit_norm_is_the_size_of_an_add_edit(setup):
    """Chapter 4's size-matched control rests on ‖Δh‖ of a footprint add being linear in β and computable from
    the footprint and the decoder rows alone."""
    from helpers.chapters import identify

    model, sae, probe, h, y = setup
    feats = [1, 5, 9]
    fp = intervention.footprint(sae, {0: h[0]}, y, 1, feats)
    e = intervention.Edit("gender", {1: feats}, beta=2.5, mode="add", cls=1, footprint={1: fp})
    iv = intervention.Intervention(sae, [e], 3)
    x = h[1][:3]
    d = iv.fn(torch.arange(3))(x, hooks.StepInfo(step=0, timestep=torch.tensor(0))) - x
    want = 2.5 * identify.edit_norm(sae, feats, fp)
    torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.full((3,), want), rtol=1e-4, atol=1e-5)


def test_edits_take_exactly_what_they_say(setup):
    model, sae, *_ = setup
    with pytest.raises(ValueError, match="feature ids must be integers"):
        intervention.Edit("gender", {0: [1, 2.7]}, beta=2.0, mode="add", cls=0).validate(sae.cfg.d_sae)
    intervention.Edit("gender", {0: torch.tensor([1, 2])}, beta=2.0, mode="add", cls=0).validate(sae.cfg.d_sae)
    for steps in ([99], [-1], [2, 50]):
        e = intervention.Edit("gender", {0: [1]}, beta=2.0, mode="add", cls=0, steps=steps)
        with pytest.raises(ValueError, match="outside this 4-step schedule"):
            intervention.sample_edited(model, sae, [e], 1, steps=STEPS)
    e = intervention.Edit("gender", {0: [1]}, beta=1e38, mode="scale", cls=0)
    with pytest.raises(ValueError, match=r"made h non-finite at sampling step \d \(β {.gender.: 1e\+38}\)"):
        intervention.sample_edited(model, sae, [dataclasses.replace(e, mode="add")], 2, steps=STEPS)
