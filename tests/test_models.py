import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from helpers import models, world
from conftest import tiny_unet


def test_load_unet_folder_and_sample(tiny_unet_dir):
    m = models.load_model(tiny_unet_dir)
    assert m.sample_size == 16 and m.scheduler.config.num_train_timesteps == 100
    x = models.sample(m, 3, steps=2, seed=0)
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    # same noise -> same samples; per-sample noise does not depend on batch size
    y = models.sample(m, 3, steps=2, seed=0, batch_size=2)
    assert torch.allclose(x, y, atol=1e-5)


def test_load_pipeline_folder(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path / "pipe")
    m = models.load_model(tmp_path / "pipe")
    assert m.pipeline is not None and m.unet.config.sample_size == 16
    assert models.sample(m, 2, steps=2).shape == (2, 3, 16, 16)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.load_model("./not/here")


def test_non_diffusion_folder_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        models.load_model(tmp_path / "junk")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not a UNet2DModel"):
        models.load_model(tmp_path / "vae")
    with pytest.raises(ValueError, match="is a file"):
        models.load_model(tmp_path / "junk" / "notes.txt")


def test_embedded_model_loads_and_samples():
    m = models.load_model("embedded")
    assert m.sample_size == 32
    assert m.unet.mid_block is not None
    x = models.sample(m, 2, steps=3, seed=1)
    assert x.shape == (2, 3, 32, 32)


TINY = dict(batch_size=8, block_out_channels=(16, 32), norm_num_groups=8, warmup_steps=5, resolution=16,
            lr=2e-3)


def _heldout_loss(unet, cfg):
    sched = models.build_scheduler(cfg)
    x0 = world.sample(32, seed=999, resolution=cfg.resolution).images * 2 - 1
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, cfg.num_train_timesteps, (32,), generator=g)
    with torch.no_grad():
        return models.diffusion_loss(unet, sched, x0, eps, t, cfg.min_snr_gamma).item()


def test_tiny_training_lowers_heldout_loss(tmp_path):
    cfg = models.EmbeddedConfig(**TINY)
    torch.manual_seed(cfg.seed)
    before = _heldout_loss(models.build_unet(cfg), cfg)
    models.train(cfg, tmp_path / "run", 40, checkpoint_every=40, export_dir=tmp_path / "exp", progress=False)
    m = models.load_model(tmp_path / "exp")  # EMA weights, exported as a diffusers folder
    from diffusers import UNet2DModel
    raw = UNet2DModel.from_pretrained(tmp_path / "exp" / "unet")
    after = _heldout_loss(raw, cfg)
    assert after < 0.7 * before, (before, after)
    assert json.loads((tmp_path / "exp" / "training.json").read_text())["steps"] == 40
    assert m.sample_size == 16


def test_resume_continues_exactly(tmp_path):
    cfg = models.EmbeddedConfig(**TINY)
    models.train(cfg, tmp_path / "a", 6, checkpoint_every=3, progress=False)
    models.train(cfg, tmp_path / "b", 3, checkpoint_every=3, progress=False)
    models.train(cfg, tmp_path / "b", 6, checkpoint_every=3, progress=False)  # resumes at step 3
    from helpers import io
    a, ma = io.load_tensors(tmp_path / "a" / "checkpoint.safetensors")
    b, mb = io.load_tensors(tmp_path / "b" / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 6
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_config(tmp_path):
    models.train(models.EmbeddedConfig(**TINY), tmp_path / "a", 2, progress=False)
    with pytest.raises(ValueError, match="different config"):
        models.train(models.EmbeddedConfig(**(TINY | {"lr": 1e-4})), tmp_path / "a", 4, progress=False)


def test_unreachable_repo_id_is_one_clear_error():
    # offline (as here and in CI) a Hub id cannot be fetched: one OSError saying what to do
    import os
    import subprocess
    import sys

    code = ("from helpers import models\n"
            "try:\n    models.load_model('nobody-here/no-such-model')\n"
            "except OSError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR load_model: could not fetch 'nobody-here/no-such-model'" in out.stdout, out.stderr[-2000:]
    assert "pass the local folder" in out.stdout


def test_warm_start_from_export_switches_prediction_type(tmp_path):
    eps_cfg = models.EmbeddedConfig(**(TINY | {"prediction_type": "epsilon"}))
    models.train(eps_cfg, tmp_path / "eps", 4, checkpoint_every=4, export_dir=tmp_path / "eps_exp", progress=False)
    v_cfg = models.EmbeddedConfig(**TINY)
    assert v_cfg.prediction_type == "v_prediction"
    models.train(v_cfg, tmp_path / "v", 2, export_dir=tmp_path / "v_exp", progress=False,
                 init_from=tmp_path / "eps_exp")
    meta = json.loads((tmp_path / "v_exp" / "training.json").read_text())
    assert meta["init_from"]["config"]["prediction_type"] == "epsilon" and meta["init_from"]["steps"] == 4
    m = models.load_model(tmp_path / "v_exp")
    assert m.scheduler.config.prediction_type == "v_prediction"
    assert models.sample(m, 2, steps=2).shape == (2, 3, 16, 16)
