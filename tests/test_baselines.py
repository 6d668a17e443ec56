"""The five baselines end to end on a tiny UNet (seconds each), and the DDIM pieces they share."""
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from helpers import baselines as B
from helpers import hooks, models, world
from helpers import judge as J
from helpers import probe as P
from conftest import tiny_unet

STEPS = 4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = models.Diffusion(unet=tiny_unet().eval(), scheduler=DDPMScheduler(num_train_timesteps=100))
    judge = J.Judge(J.JudgeConfig(width=8, features=16)).eval()
    return model, judge


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(kind):
    model = models.Diffusion(unet=tiny_unet().eval(),
                             scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type=kind))
    noise = models.make_noise(3, 16, 1)
    ref = models.sample(model, noise=noise, steps=STEPS)
    sched = B.ddim(model, STEPS)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = model.unet(x, t).sample
            x, _ = B.ddim_step(sched, out, out, t, x)
    torch.testing.assert_close((x.clamp(-1, 1) + 1) / 2, ref, rtol=1e-5, atol=1e-5)


def test_activation_scales_the_drawn_class_channels(tiny):
    model, _ = tiny
    pooled = torch.randn(40, STEPS, 32)
    labels = torch.arange(40) % 2
    pooled[labels == 1, :, 5] += 3.0  # channel 5 is much higher in class 1
    act = B.Activation.fit(pooled, labels, "gender", k=3, beta=2.0, classes=("male", "female"))
    assert act.channels[1][0] == 5
    classes = torch.tensor([0, 1, 1, 0])
    h = torch.randn(4, 32, 4, 4)
    got = act.hook(classes)(torch.arange(4))(h, None)
    for i, c in enumerate(classes.tolist()):
        mult = torch.ones(32)
        mult[act.channels[c]] = torch.tensor([2.0 if s > 0 else 0.5 for s in act.signs[c]])
        torch.testing.assert_close(got[i], h[i] * mult[:, None, None])
    noise = models.make_noise(4, 16, 0)
    plain = B.sample(model, noise, STEPS)
    assert torch.equal(B.sample(model, noise, STEPS, B.Activation("gender", act.channels, 1.0).hook(classes)), plain)
    assert not torch.equal(B.sample(model, noise, STEPS, act.hook(classes)), plain)


def test_activation_moves_each_channel_towards_its_class():
    """The sign fix: a channel whose class mean is negative (but above the rest's) is scaled by 1/β, which raises
    it towards the class; the unsigned version scaled it by β and pushed it further away."""
    pooled = torch.randn(40, 2, 6) * 0.1
    labels = torch.arange(40) % 2
    pooled[labels == 1, :, 2] += -1.0  # class 1 mean ≈ −1
    pooled[labels == 0, :, 2] += -4.0  # the rest ≈ −4: channel 2 is class 1's top channel, with a negative mean
    pooled[labels == 1, :, 4] += 3.0  # and channel 4 its top positive one
    act = B.Activation.fit(pooled, labels, "gender", k=2, beta=2.0, classes=("male", "female"))
    assert set(act.channels[1]) == {2, 4}
    h = torch.zeros(1, 6, 1, 1)
    h[0, 2], h[0, 4] = -3.0, 1.0  # a sample between the classes on both channels
    out = act.hook(torch.tensor([1]))(torch.arange(1))(h, None)
    assert out[0, 2] > h[0, 2] and out[0, 4] > h[0, 4]  # both move towards class 1's side
    unsigned = replace(act, signs=None).hook(torch.tensor([1]))(torch.arange(1))(h, None)
    assert unsigned[0, 2] < h[0, 2]  # the old behaviour: away from the class


def test_h_distribution_moves_batch_prediction_towards_target(tiny):
    model, _ = tiny
    with hooks.capture(model.unet) as cap:
        models.sample(model, 48, steps=STEPS, seed=0)
    h = cap.stack()
    pooled = h.mean((3, 4)).transpose(0, 1)
    y = (pooled[:, 2, 0] > pooled[:, 2, 0].median()).long()
    probe = P.train_probe(pooled, {"gender": y}, attributes={"gender": ("male", "female")}, epochs=200)

    def mean_p(method):
        with hooks.edit(model.unet, method.hook()(torch.arange(16)) if method else (lambda h, i: None),
                        record=True) as c:
            models.sample(model, 16, steps=STEPS, seed=3, batch_size=16)
        return probe(c.activations[2], 2)["gender"].softmax(-1).mean(0)[1].item()

    before = mean_p(None)
    after = mean_p(B.HDistribution("gender", probe, [0.0, 1.0], scale=30.0))
    assert after > before + 0.05
    with pytest.raises(ValueError, match="non-negative probabilities"):
        B.HDistribution("gender", probe, [0.5, 0.6]).hook()


def test_flat_h_distribution_reads_one_position_and_moves_the_batch_towards_target(tiny):
    """The published form: a predictor on the flattened h (a label carried by one position of one channel is
    learnable), and guidance that moves the batch's predicted share towards the target."""
    g = torch.Generator().manual_seed(0)
    hs = {s: torch.randn(400, 4, 4, 4, generator=g) for s in range(3)}
    y = (hs[2][:, 0, 1, 2] > 0).long()
    m = B.HDistributionFlat.fit(hs, y, "gender", [0.5, 0.5], ("male", "female"), held_out=0.25, epochs=40,
                                batch_size=32, lr=3e-3)
    assert m.accuracy[2] > 0.75 and m.accuracy[0] < 0.65  # step 2 carries the label, step 0 does not
    with pytest.raises(ValueError, match="every sampling step"):
        B.HDistributionFlat.fit({0: hs[0], 2: hs[2]}, y, "gender", [0.5, 0.5], ("male", "female"))

    model, _ = tiny
    with hooks.capture(model.unet) as cap:
        models.sample(model, 48, steps=STEPS, seed=0)
    h = {s: a.float() for s, a in enumerate(cap.activations)}
    lab = (h[STEPS - 1][:, 0, 0, 0] > h[STEPS - 1][:, 0, 0, 0].median()).long()
    ctx = B.Context(model, "gender", ("male", "female"), [0.0, 1.0], steps=STEPS, labels=lab,
                    h_full=lambda steps: {s: h[s] for s in steps}, progress=False)
    m = B.HDistributionFlat.from_context(ctx, epochs=30, batch_size=16)
    t, meta = m.to_tensors()
    again = B.HDistributionFlat.from_tensors(ctx, t, meta)
    assert torch.allclose(again.predictor(h[1][:4], 1), m.predictor(h[1][:4], 1), atol=1e-2)

    def share(scale):
        with hooks.edit(model.unet, replace(m, scale=scale).hook()(torch.arange(16)), record=True) as c:
            models.sample(model, 16, steps=STEPS, seed=3, batch_size=16)
        return m.predictor(c.activations[STEPS - 1], STEPS - 1).softmax(-1).mean(0)[1].item()

    assert share(300.0) > share(0.0) + 0.05


def test_latent_direction_learns_and_adds_per_class(tiny):
    model, _ = tiny
    ld = B.LatentDirection.fit(model, "gender", iters=30, batch_size=8, lr=0.05, progress=False,
                               classes=world.ATTRIBUTES["gender"],
                               images_of=lambda cl, sd: world.render_classes("gender", cl, sd, resolution=16))
    assert ld.directions.shape == (2, 32, 8, 8) and ld.directions.abs().sum() > 0
    # on a fixed held-out batch, the learned directions lower the denoising loss
    g = torch.Generator().manual_seed(99)
    classes = torch.arange(64) % 2
    x0 = world.render_classes("gender", classes, seed=99, resolution=16)
    eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 100, (64,), generator=g)
    with torch.no_grad():
        plain = models.diffusion_loss(model.unet, model.scheduler, x0, eps, t)
        with hooks.edit(model.unet, lambda h, info: h + ld.directions[classes]):
            learned = models.diffusion_loss(model.unet, model.scheduler, x0, eps, t)
    assert learned < plain
    assert all(p.requires_grad for p in model.unet.parameters())  # UNet left as it was
    classes = torch.tensor([1, 0])
    h = torch.zeros(2, 32, 8, 8)
    got = ld.hook(classes)(torch.arange(2))(h, None)
    torch.testing.assert_close(got, ld.directions[[1, 0]])


def test_latent_editing_moves_judged_class(tiny):
    model, judge = tiny
    le = B.LatentEditing.fit(model, judge, "gender", steps=STEPS, edit_steps=2, iters=15, batch_size=8,
                             lr=0.1, l1=0.0, progress=False)
    noise = models.make_noise(16, 16, 7)
    target = torch.ones(16, dtype=torch.long)
    plain = judge.predict(models.sample(model, noise=noise, steps=STEPS))["gender"][:, 1].mean()
    edited = judge.predict(le.sample_edited(model, noise, classes=target))["gender"][:, 1].mean()
    assert edited > plain + 0.02
    zero = B.LatentEditing("gender", torch.zeros_like(le.delta), STEPS)
    torch.testing.assert_close(zero.sample_edited(model, noise, classes=target), models.sample(model, noise=noise, steps=STEPS),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="trained for 4 sampling steps"):
        le.sample_edited(model, noise, steps=5, classes=target)


def test_finetuning_moves_judged_distribution_and_leaves_model(tiny):
    model, judge = tiny
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    ft = B.Finetuning.fit(model, judge, "gender", [0.0, 1.0], iters=12, batch_size=8, train_steps=STEPS,
                          lr=1e-2, preserve=0.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    noise = models.make_noise(16, 16, 7)
    plain = judge.predict(models.sample(model, noise=noise, steps=STEPS))["gender"][:, 1].mean()
    tuned = judge.predict(models.sample(ft.model(model), noise=noise, steps=STEPS))["gender"][:, 1].mean()
    assert tuned > plain + 0.02


def test_assign_targets_is_optimal_with_target_counts():
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    got = B.assign_targets(p, [0.5, 0.5])
    assert torch.bincount(got, minlength=2).tolist() == [2, 2]
    assert got.tolist() == [0, 0, 1, 1]  # the two most class-1-like samples get class 1


def test_render_classes_gives_the_asked_classes():
    from helpers import judge as Jmod
    classes = torch.tensor([2, 0, 2, 1, 2])
    imgs = world.render_classes("age", classes, seed=0)
    assert imgs.shape == (5, 3, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
    judge = Jmod.load_judge()
    assert torch.equal(judge.predict((imgs + 1) / 2)["age"].argmax(-1), classes)
    with pytest.raises(ValueError, match="give the attribute's class names"):
        B.Activation.fit(torch.zeros(4, 2, 8), torch.zeros(4), "height")
    with pytest.raises(ValueError, match="give images_of"):
        B.LatentDirection.fit(None, "gender", classes=("m", "f"))


def test_hook_baselines_with_a_step_window_resume_from_the_unedited_state(tiny):
    model, _ = tiny
    pooled = torch.randn(40, STEPS, 32)
    labels = torch.arange(40) % 2
    pooled[labels == 1, :, 5] += 3.0
    act = replace(B.Activation.fit(pooled, labels, "gender", k=3, classes=("m", "f")), from_step=2)
    noise = models.make_noise(4, 16, 3)
    classes = torch.tensor([0, 1, -1, 1])
    full = act.sample_edited(model, noise, STEPS, 3.0, classes, batch_size=4)
    states = {2: None}
    plain = models.sample(model, noise=noise, steps=STEPS, batch_size=4, states=states)
    resumed = act.sample_edited(model, states[2], STEPS, 3.0, classes, batch_size=4, start_step=2)
    torch.testing.assert_close(resumed, full, atol=1e-6, rtol=0)
    assert torch.equal(full[2], plain[2]) and not torch.equal(full[1], plain[1])  # class -1: untouched
    with pytest.raises(ValueError, match="would skip edited steps"):
        act.sample_edited(model, states[2], STEPS, 3.0, classes, start_step=3)
