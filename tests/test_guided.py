"""P2 / guided-diffusion checkpoints: the conversion is checked against guided-diffusion's own UNetModel and
its own DDIM loop (the PyPI package guided-diffusion-sdk), at a tiny size with the P2 flags."""
import warnings

import pytest
import torch

from helpers import guided as G
from helpers import models

import guided_diffusion.script_util as gd  # noqa: E402  (the test extra: guided-diffusion-sdk)

TINY = G.GuidedSettings(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8",
                        channel_mult="1,2,2", num_head_channels=16)


def _original(s: G.GuidedSettings = TINY, seed: int = 0):
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(seed)
    m = gd.create_model(s.image_size, s.num_channels, s.num_res_blocks, channel_mult=s.channel_mult,
                        learn_sigma=s.learn_sigma, class_cond=False, use_checkpoint=False,
                        attention_resolutions=s.attention_resolutions, num_heads=s.num_heads,
                        num_head_channels=s.num_head_channels, num_heads_upsample=-1,
                        use_scale_shift_norm=s.use_scale_shift_norm, dropout=0.0, resblock_updown=s.resblock_updown,
                        use_fp16=False, use_new_attention_order=s.use_new_attention_order).eval()
    with torch.no_grad():  # guided-diffusion zero-initialises its output convs; randomise everything, with
        for name, p in m.named_parameters():  # norms near 1 and large q/k so that attention is far from uniform
            if ".norm." in name or "layers.0." in name or name.startswith("out.0"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if ".qkv." in name else 0.05)
    return m


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("new_order", [False, True])
def test_converted_unet_equals_guided_diffusion_on_eps_and_variance(new_order):
    s = G.settings_from({**TINY.__dict__, "use_new_attention_order": new_order})
    m = _original(s)
    unet, sched = G.convert(m.state_dict(), s, keep_variance=True)
    eps_only, _ = G.convert(m.state_dict(), s)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for t in (0, 1, 250, 500, 999):
        tt = torch.full((3,), t)
        with torch.no_grad():
            a, b, e = m(x, tt), unet(x, tt).sample, eps_only(x, tt).sample
        assert a.shape == b.shape == (3, 6, 32, 32)
        assert _rel(b, a) < 1e-5, (t, _rel(b, a))
        assert torch.equal(e, b[:, :3])  # dropping the variance half keeps ε exactly
    assert sched.config.variance_type == "learned_range"
    # the comparison sees attention scores: swapping q and k in one block is caught
    att = unet.mid_block.attentions[0]
    with torch.no_grad():
        att.to_q.weight, att.to_k.weight = att.to_k.weight, att.to_q.weight
        att.to_q.bias, att.to_k.bias = att.to_k.bias, att.to_q.bias
        assert _rel(unet(x, torch.full((3,), 500)).sample, m(x, torch.full((3,), 500))) > 1e-3


def test_ddim_samples_equal_guided_diffusions_own_respaced_ddim(tmp_path):
    from guided_diffusion.script_util import create_gaussian_diffusion

    m = _original()
    pt = tmp_path / "tiny_p2.pt"
    torch.save(m.state_dict(), pt)
    model = models.load_model(str(pt), arch="guided-diffusion", arch_settings=TINY.__dict__)
    assert (tmp_path / "tiny_p2-diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = models.sample(model, noise=noise, steps=4, batch_size=2)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                          timestep_respacing="ddim4")
    with torch.no_grad():
        theirs = diffusion.ddim_sample_loop(m, (2, 3, 32, 32), noise=noise.clone(), clip_denoised=True, eta=0.0)
    theirs = ((theirs + 1) / 2).clamp(0, 1)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()  # images in [0, 1]
    # a second load reads the converted folder, not the .pt
    pt.write_bytes(pt.read_bytes())
    again = models.load_model(str(pt), arch="guided-diffusion", arch_settings=TINY.__dict__)
    assert torch.equal(models.sample(again, noise=noise, steps=4, batch_size=2), ours)


def test_mismatched_checkpoints_and_unsafe_files_get_one_clear_error(tmp_path):
    sd = _original().state_dict()
    wrong = G.settings_from({**TINY.__dict__, "attention_resolutions": "16"})
    with pytest.raises(ValueError, match="keys do not match.*unexpected key.*attention in"):
        G.convert(sd, wrong)
    fewer = dict(sd)
    del fewer["middle_block.1.qkv.weight"]
    with pytest.raises(ValueError, match="missing key.*middle_block.1.qkv.weight"):
        G.convert(fewer, TINY)
    narrow = G.settings_from({**TINY.__dict__, "num_channels": 64})
    with pytest.raises(ValueError, match="num_channels = 32"):
        G.convert(sd, narrow)
    pt = tmp_path / "m.pt"
    torch.save(sd, pt)
    with pytest.raises(ValueError, match="arch='guided-diffusion'"):
        models.load_model(str(pt))

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        models.load_model(str(bad), arch="guided-diffusion")
    with pytest.raises(ValueError, match="unknown \\['image_sise'\\]"):
        models.load_model(str(pt), arch="guided-diffusion", arch_settings={"image_sise": 32})


def test_the_full_p2_architecture_converts_key_for_key_and_shape_for_shape():
    """guided-diffusion's real P2 UNetModel (93.6 M parameters) built on the meta device: every tensor lands on a
    UNet2DModel tensor of the same shape, and no UNet2DModel tensor is left without one."""
    from diffusers import UNet2DModel

    s = G.P2_CELEBAHQ
    with torch.device("meta"):
        m = gd.create_model(s.image_size, s.num_channels, s.num_res_blocks, channel_mult="", learn_sigma=True,
                            class_cond=False, use_checkpoint=False, attention_resolutions=s.attention_resolutions,
                            num_heads=s.num_heads, num_head_channels=s.num_head_channels, num_heads_upsample=-1,
                            use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
                            use_new_attention_order=False)
        ours = UNet2DModel(**G.unet_config(s))
    new = G.convert_state_dict(m.state_dict(), s)
    want = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in new.items()} == want
    assert sum(p.numel() for p in m.parameters()) > 93e6
    assert ours.mid_block.resnets[0].conv1.out_channels == 512 and ours.mid_block.attentions[0].heads == 8


def test_p2_settings_give_the_papers_architecture():
    cfg = G.unet_config(G.P2_CELEBAHQ)
    assert cfg["block_out_channels"] == [128, 128, 256, 256, 512, 512]
    assert cfg["down_block_types"][4] == "AttnDownBlock2D" and cfg["down_block_types"].count("AttnDownBlock2D") == 1
    assert cfg["attention_head_dim"] == 64 and cfg["out_channels"] == 3 and cfg["layers_per_block"] == 1
    sc = G.scheduler_config(G.P2_CELEBAHQ)
    assert (sc["beta_start"], sc["beta_end"], sc["num_train_timesteps"]) == (0.0001, 0.02, 1000)


def test_the_runner_completes_every_stage_on_a_tiny_p2_checkpoint(tmp_path, capsys):
    """The whole pipeline (harvest → SAE → probe → IG → intervention → metrics) on a converted guided-diffusion
    model with the P2 flags at 32×32, the world's judge reading its images."""
    import json

    from helpers import io, runner

    pt = tmp_path / "weights" / "tiny_p2.pt"
    pt.parent.mkdir()
    torch.save(_original().state_dict(), pt)
    d = {"out": str(tmp_path / "run"), "attributes": ["gender"],
         "model": {"path": str(pt), "arch": "guided-diffusion", "arch_settings": dict(TINY.__dict__)},
         "harvest": {"n": 24, "steps": 4, "batch_size": 12}, "sae": {"train_steps": 40, "batch_size": 256},
         "attribution": {"steps": [0, 2], "per_class": 4, "ig_steps": 8},
         "intervention": {"n": 8, "from_step": 1, "k": 4, "batch_size": 8, "baselines": ["Activation"]}}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0, capsys.readouterr().out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"gender/DiffLens", "gender/Activation"} <= set(m)
    sae_meta = io.load_tensors(tmp_path / "run" / "sae.safetensors")[1]
    assert sae_meta["sae_config"]["d_in"] == 64  # the tiny model's bottleneck (the real P2: 512)
    # the same checkpoint without arch is one clear error; a folder with arch is too
    d["model"] = {"path": str(pt)}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert 'arch = "guided-diffusion"' in capsys.readouterr().out
    d["model"] = {"path": str(tmp_path / "weights"), "arch": "guided-diffusion"}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert "takes the .pt checkpoint file" in capsys.readouterr().out
