"""The real-model paths (Stable Diffusion, pixel DDPMs, CLIP and FairFace judges, the headless runner)
on tiny randomly initialised pipelines built and saved here, then loaded back like downloaded folders."""
import json
import re

import pytest
import torch

from helpers import hooks, io, judges, models, runner, tiny


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny.build_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return tiny.build_ddpm(tmp_path_factory.mktemp("ddpm") / "pipe")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny.build_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_sd_pipeline_loads_samples_and_needs_a_prompt(sd_dir):
    m = models.load_model(sd_dir)
    assert m.text_conditioned and m.channels == 4 and type(m.unet).__name__ == "UNet2DConditionModel"
    with pytest.raises(ValueError, match="give it a prompt"):
        models.sample(m, n=1, steps=2)
    m = models.load_model(sd_dir, prompt="a photo of a doctor", guidance_scale=5.0)
    a = models.sample(m, n=3, steps=3, seed=1)
    b = models.sample(m, n=3, steps=3, seed=1, batch_size=2)
    assert a.shape == (3, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # per-sample noise: batch size does not matter
    with pytest.raises(ValueError, match="unconditional"):
        models.load_model(tiny.build_ddpm(sd_dir.parent / "uncond"), prompt="x")


def test_sd_hooks_capture_and_edit_the_conditional_half_only(sd_dir):
    m = models.load_model(sd_dir, prompt="a photo of a doctor", guidance_scale=5.0)
    with hooks.capture(m.unet) as cap:
        base = models.sample(m, n=2, steps=3, seed=4)
    assert len(cap.activations) == 3 and cap.activations[0].shape[0] == 2  # the conditional half
    with hooks.edit(m.unet, lambda h, info: h):
        same = models.sample(m, n=2, steps=3, seed=4)
    assert torch.equal(base, same)  # a no-op edit is bit-identical
    with hooks.edit(m.unet, lambda h, info: 3 * h):
        edited = models.sample(m, n=2, steps=3, seed=4)
    assert not torch.allclose(base, edited, atol=1e-3)
    # one guided UNet call: the unconditional half passes through untouched, the conditional one changes
    x = torch.randn(4, 4, 16, 16)
    emb = torch.randn(4, 5, 32)
    plain = m.unet(x, 10, encoder_hidden_states=emb).sample
    with hooks.guided(m.unet), hooks.edit(m.unet, lambda h, info: h * 0):
        out = m.unet(x, 10, encoder_hidden_states=emb).sample
    assert torch.equal(out[:2], plain[:2]) and not torch.allclose(out[2:], plain[2:])
    with hooks.guided(m.unet), pytest.raises(ValueError, match="odd batch"), hooks.capture(m.unet):
        m.unet(x[:3], 10, encoder_hidden_states=emb[:3])
    # the ablation: both halves get the same edit, capture still records the conditional half only
    seen = []
    with hooks.guided(m.unet), hooks.both_halves(m.unet), hooks.capture(m.unet) as cap:
        with hooks.edit(m.unet, lambda h, info: seen.append(h.shape[0]) or h * 0):
            both = m.unet(x, 10, encoder_hidden_states=emb).sample
    assert seen == [2, 2] and cap.activations[0].shape[0] == 2
    assert torch.equal(both[2:], out[2:]) and not torch.allclose(both[:2], plain[:2])
    with hooks.guided(m.unet), hooks.both_halves(m.unet), hooks.edit(m.unet, lambda h, info: None):
        assert torch.equal(m.unet(x, 10, encoder_hidden_states=emb).sample, plain)  # a no-op stays exact


def test_pixel_ddpm_pipeline_round_trip(ddpm_dir):
    m = models.load_model(ddpm_dir)
    assert not m.text_conditioned and m.channels == 3 and m.pipeline is not None
    with hooks.capture(m.unet) as cap:
        x = models.sample(m, n=2, steps=2)
    assert x.shape == (2, 3, 32, 32) and cap.activations[0].shape == (2, 32, 8, 8)


def test_clip_judge_interface_and_clip_scores(clip_dir):
    j = judges.load(f"clip:{clip_dir}")
    x = torch.rand(5, 3, 48, 48)
    p = j.predict(x)
    assert {a: v.shape for a, v in p.items()} == {"gender": (5, 2), "age": (5, 3), "race": (5, 4)}
    torch.testing.assert_close(p["race"].sum(-1), torch.ones(5))
    f = j.features(x)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(5))  # CLIP-I: unit-norm image embeddings
    assert j.clip_t(x, "a photo of a doctor").shape == (5,)
    logits = j(x.requires_grad_(True))["gender"]
    logits.sum().backward()  # differentiable, for the learned baselines
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one prompt per class"):
        judges.ClipJudge(clip_dir, prompts={"gender": ("a man",)})
    with pytest.raises(ValueError, match="needs 3 prompts"):
        judges.ClipJudge(clip_dir, prompts={"eyewear": ("a", "b")}, classes={"eyewear": ("x", "y", "z")})
    # any attribute, from prompts: its class names are given, or the prompts themselves
    j = judges.load(f"clip:{clip_dir}", prompts={"eyewear": ("a person", "a person wearing glasses")},
                    classes={"eyewear": ("no glasses", "glasses")})
    assert j.attributes["eyewear"] == ("no glasses", "glasses") and j.predict(x)["eyewear"].shape == (5, 2)
    assert set(j.attributes) == {"gender", "age", "race", "eyewear"}  # the defaults stay
    assert judges.schema(f"clip:{clip_dir}", prompts={"tie": ("a", "b")})["tie"] == ("a", "b")


def test_missing_judge_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        judges.load(f"clip:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="FairFace"):
        judges.load(f"fairface:{tmp_path / 'nope.pt'}")
    with pytest.raises(ValueError, match="expected 'world'"):
        judges.load("resnet")


def _torchvision_names(sd):
    """transformers ResNet keys → torchvision's (the inverse of the judge's converter), to fake the
    released FairFace checkpoint's layout."""
    out = {}
    for k, v in sd.items():
        n = k.replace("resnet.embedder.embedder.convolution.", "conv1.")
        n = n.replace("resnet.embedder.embedder.normalization.", "bn1.").replace("classifier.1.", "fc.")
        m = re.match(r"resnet\.encoder\.stages\.(\d)\.layers\.(\d+)\.(.*)", n)
        if m:
            r = re.sub(r"^layer\.(\d)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", m.group(3))
            r = re.sub(r"^layer\.(\d)\.normalization\.", lambda g: f"bn{int(g.group(1)) + 1}.", r)
            r = r.replace("shortcut.convolution.", "downsample.0.").replace("shortcut.normalization.", "downsample.1.")
            n = f"layer{int(m.group(1)) + 1}.{m.group(2)}.{r}"
        out[n] = v
    return out


def test_fairface_judge_loads_a_torchvision_layout_checkpoint_and_groups_classes(tmp_path):
    torch.manual_seed(0)
    net = judges.fairface_resnet().eval()
    sd = _torchvision_names(net.state_dict())
    assert "layer4.2.bn2.running_var" in sd and "fc.weight" in sd
    torch.save(sd, tmp_path / "ff.pt")
    j = judges.load(f"fairface:{tmp_path / 'ff.pt'}", image_size=64)
    x = torch.rand(3, 3, 64, 64)
    logits = net(judges.FairFaceJudge._prep(j, x, 64, judges.IMAGENET_MEAN, judges.IMAGENET_STD)).logits
    p = j.predict(x)
    # grouped probabilities are sums of FairFace's fine-class softmax
    race = logits[:, :7].softmax(-1)
    torch.testing.assert_close(p["race"][:, 0], race[:, [0, 2, 6]].sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(p["race"][:, 2], race[:, [3, 4]].sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(p["gender"], logits[:, 7:9].softmax(-1), atol=1e-5, rtol=0)
    assert p["age"].shape == (3, 3) and j.features(x).shape == (3, 512)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a FairFace ResNet-34"):
        judges.load(f"fairface:{tmp_path / 'bad.pt'}")


def _tiny_cfg(out, model_path, **kw):
    d = {"out": str(out), "attributes": ["gender", "age"],
         "model": {"path": str(model_path)},
         "harvest": {"n": 24, "steps": 4, "batch_size": 12},
         "sae": {"train_steps": 40, "batch_size": 256},
         "attribution": {"steps": [0, 2], "per_class": 4, "ig_steps": 8},
         "intervention": {"n": 8, "from_step": 1, "k": 4, "batch_size": 8}}
    for k, v in kw.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def test_runner_end_to_end_on_tiny_sd_then_resumes(sd_dir, tmp_path, capsys):
    d = _tiny_cfg(tmp_path / "run", sd_dir, model={"prompt": "a photo of a doctor", "guidance_scale": 5.0})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    out = tmp_path / "run"
    state = json.loads((out / "state.json").read_text())
    assert list(state) == list(runner.STAGES)
    for f in ("harvest/summary.safetensors", "sae.safetensors", "probe.safetensors",
              "attribution/footprints_gender.safetensors", "intervention/original.safetensors", "metrics.json"):
        assert (out / f).is_file(), f
    o, _ = io.load_tensors(out / "intervention/original.safetensors")
    for a in ("gender", "age"):
        e, _ = io.load_tensors(out / f"intervention/edited_{a}.safetensors")
        assert not torch.equal(e["images"], o["images"])  # the edit reached the images
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"gender/DiffLens", "age/DiffLens"}
    assert 0 <= metrics["gender/DiffLens"]["keep other attributes"] <= 1
    assert (out / "grid_gender.png").is_file() and "| gender | DiffLens |" in (out / "report.md").read_text()
    # resume: nothing reruns; a changed intervention setting reruns intervention and metrics only
    capsys.readouterr()
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("up to date") == len(runner.STAGES)
    d["intervention"]["beta"] = 5.0
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("up to date") == 4
    d["attributes"] = ["gender"]  # fewer attributes: harvest and SAE are reused
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("up to date") == 2


def test_runner_on_tiny_pixel_ddpm_and_harvest_parts_merge(ddpm_dir, tmp_path):
    from helpers import harvest as H

    cfg = runner.config_from_dict(_tiny_cfg(tmp_path / "run", ddpm_dir, attributes=["gender"],
                                            stages=["harvest", "sae", "probe"], harvest={"shard_steps": [0, 2]}))
    runner.Run(cfg, progress=False).all()
    assert json.loads((tmp_path / "run/state.json").read_text()).keys() == {"harvest", "sae", "probe"}
    rows = H.load_rows(tmp_path / "run/harvest")
    assert set(rows["step"].tolist()) == {0, 2}  # only the listed steps' full h were stored
    assert H.load_summary(tmp_path / "run/harvest").pooled.shape[1] == 4  # pooled h keeps every step
    # what each process of a multi-GPU launch does, then the main process's merge
    m, j = models.load_model(ddpm_dir), judges.load("world")
    s = H.HarvestSettings(n=6, steps=2, batch_size=4)
    H.run(m, s, tmp_path / "whole", judge=j, progress=False)
    H.run(m, s, tmp_path / "p0", judge=j, progress=False, sample_ids=torch.tensor([0, 2, 4]))
    H.run(m, s, tmp_path / "p1", judge=j, progress=False, sample_ids=torch.tensor([1, 3, 5]))
    H.merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")
    a, b = H.load_summary(tmp_path / "whole"), H.load_summary(tmp_path / "merged")
    # the same samples; only batch composition differs (float rounding of batched convs)
    assert (a.images.int() - b.images.int()).abs().max() <= 1
    torch.testing.assert_close(a.pooled.float(), b.pooled.float(), atol=1e-2, rtol=0)
    ra, rb = H.load_rows(tmp_path / "whole"), H.load_rows(tmp_path / "merged")
    ia, ib = torch.argsort(ra["sample"] * 1000 + ra["step"] * 100 + ra["position"]), \
        torch.argsort(rb["sample"] * 1000 + rb["step"] * 100 + rb["position"])
    torch.testing.assert_close(ra["x"][ia].float(), rb["x"][ib].float(), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="exactly once"):
        H.merge([tmp_path / "p0", tmp_path / "p0"], tmp_path / "bad")


@pytest.mark.parametrize("change, message", [
    ({"stages": ["harvest", "denoise"]}, "unknown stage"),
    ({"attributes": ["hair"]}, "unknown attribute"),
    ({"judge": {"spec": "clip:/no/such/clip"}}, "hf download"),
    ({"model": {"path": "/no/such/model"}}, "no such folder"),
    ({"harvest": {"n": 10, "stepz": 3}}, "unknown setting"),
    ({"colour": "red"}, "unknown key"),
    ({"attribution": {"steps": [0, 9]}}, "outside the harvest"),
    ({"harvest": {"n": 4, "shard_steps": [0]}}, "not in [harvest] shard_steps"),
    ({"model": {"site": "mid block"}}, "not a hook site name"),
    ({"model": {"site": "bottleneck"}}, "has no module 'bottleneck'"),
    ({"intervention": {"k": 65}}, "at most 64 ranked features"),
    ({"intervention": {"baselines": ["Latent Editing"]}}, "edit_steps = 12 of 4 sampling steps"),
    ({"harvest": {"n": "many"}}, "expected int"),
    ({"intervention": {"baselines": ["Magic"]}}, "unknown method 'Magic'"),
    ({"out": ""}, "out is empty"),
])
def test_bad_configs_get_one_clear_error(tmp_path, capsys, change, message):
    d = _tiny_cfg(tmp_path / "run", "embedded", harvest={"n": 4, "steps": 4, "batch_size": 4})
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    (tmp_path / "c.toml").write_text(_toml(d))
    assert runner.main(["run", str(tmp_path / "c.toml"), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert out.count("error:") == 1 and message in out, out
    assert not (tmp_path / "run" / "harvest").exists()  # nothing half-written


def test_every_config_problem_is_reported_at_once_before_loading_anything(tmp_path, capsys, monkeypatch):
    d = _tiny_cfg(tmp_path / "run", "/no/such/model", attributes=["gender", "hair"],
                  model={"device": "cuda", "site": "neck!"}, judge={"spec": "clip:/no/clip"},
                  attribution={"steps": [0, 9]})
    (tmp_path / "c.json").write_text(json.dumps(d))
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    out = capsys.readouterr().out
    for msg in ("no such folder", "device = 'cuda'", "not a hook site name", "hf download", "outside the harvest",
                "unknown attribute(s) ['hair']"):
        assert msg in out, (msg, out)
    assert "6 problems" in out and not loaded and not (tmp_path / "run").exists()


def test_runner_non_world_attribute_at_another_site_with_a_baseline_on_tiny_sd(sd_dir, clip_dir, tmp_path, capsys):
    """The tiny SD pipeline, an attribute the world does not have (its judge's own), edits at an up block's
    output, and the Activation baseline next to DiffLens on the same noise: grid PNG and report written."""
    d = _tiny_cfg(tmp_path / "run", sd_dir, attributes=["eyewear"],
                  model={"prompt": "a photo of a doctor", "guidance_scale": 5.0, "site": "up_blocks.0"},
                  judge={"spec": "python:judges_for_tests:brightness"},
                  intervention={"baselines": ["Activation"], "baseline_settings": {"Activation": 1.5}})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0, capsys.readouterr().out
    out = tmp_path / "run"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"eyewear/DiffLens", "eyewear/Activation"}
    assert m["eyewear/Activation"]["setting"] == 1.5 and m["eyewear/DiffLens"]["classes"] == ["no glasses", "glasses"]
    from helpers import sae as S

    assert S.load_sae(out / "sae.safetensors")[0].cfg.site == "up_blocks.0"
    from PIL import Image

    assert Image.open(out / "grid_eyewear.png").size[1] > 3 * 64  # three rows: original, DiffLens, Activation
    report = (out / "report.md").read_text()
    assert "| eyewear | Activation | 1.500 |" in report and "`up_blocks.0`" in report
    # a world-only attribute on this judge is refused up front
    d["attributes"] = ["gender"]
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert "unknown attribute(s) ['gender']: judge 'python:judges_for_tests:brightness' reads ['eyewear']" in \
        capsys.readouterr().out
    # a CLIP judge takes the attribute and its class prompts from the config; a random CLIP reads every
    # noise image as one class, which stops the run with the reason (not an empty metrics.json)
    d.update(attributes=["eyewear"], out=str(tmp_path / "clip-run"),
             judge={"spec": f"clip:{clip_dir}", "prompts": {"eyewear": ["a photo of a person",
                                                                       "a photo of a person wearing glasses"]},
                    "classes": {"eyewear": ["no glasses", "glasses"]}})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    text = capsys.readouterr().out
    assert "the judge reads 'eyewear' as" in text and "of 24 harvested images" in text, text


def test_runner_runs_every_baseline_on_tiny_sd(sd_dir, tmp_path, capsys):
    """All five baselines behind one interface, on the text-to-image pipeline (latents, prompt, guidance),
    next to DiffLens on the same noise, each with tiny fit settings."""
    from helpers import baselines as B

    d = _tiny_cfg(tmp_path / "run", sd_dir, attributes=["eyewear"],
                  model={"prompt": "a photo of a doctor", "guidance_scale": 5.0},
                  judge={"spec": "python:judges_for_tests:brightness"},
                  intervention={"baselines": list(B.METHODS), "baseline_fit": {
                      "Activation": {"k": 4},
                      "Latent Direction": {"iters": 2, "batch_size": 4},
                      "Latent Editing": {"edit_steps": 2, "iters": 1, "batch_size": 4},
                      "Finetuning": {"iters": 1, "batch_size": 4, "train_steps": 2, "rank": 2}}})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0, capsys.readouterr().out
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    assert set(m) == {f"eyewear/{x}" for x in ["DiffLens", *B.METHODS]}
    o, _ = io.load_tensors(tmp_path / "run/intervention/original.safetensors")
    for b in B.METHODS:
        e, meta = io.load_tensors(tmp_path / f"run/intervention/baseline_{b.replace(' ', '-')}_eyewear.safetensors")
        assert meta["method"] == b and e["images"].shape == o["images"].shape
        assert ("classes" in e) == B.METHODS[b].per_sample
    assert "learned from the same judge that scores them" in (tmp_path / "run/report.md").read_text()
    d["intervention"]["baseline_fit"] = {"Finetuning": {"epochs": 3}}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert "baseline_fit 'Finetuning': unknown setting(s) ['epochs']" in capsys.readouterr().out


def test_changing_only_the_judge_rejudges_without_sampling(sd_dir, tmp_path, monkeypatch, capsys):
    # a broken judge stops the run after sampling; fixing the judge then re-reads the images, no re-sampling
    d = _tiny_cfg(tmp_path / "run", sd_dir, attributes=["eyewear"], stages=["harvest"],
                  model={"prompt": "a photo of a doctor", "guidance_scale": 5.0},
                  judge={"spec": "python:judges_for_tests:always_glasses"})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert "reads 'eyewear' as 'glasses' for 24 of 24" in capsys.readouterr().out
    calls = []
    real = models.sample
    monkeypatch.setattr(models, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    d["judge"] = {"spec": "python:judges_for_tests:brightness"}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert "re-reading the stored images" in capsys.readouterr().out and not calls
    before = json.loads((tmp_path / "run/state.json").read_text())["harvest"]
    d.update(attributes=["gender"], judge={"spec": "world"})
    (tmp_path / "c.json").write_text(json.dumps(d))
    code = runner.main(["run", str(tmp_path / "c.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "re-reading the stored images" in out and not calls, out
    after = json.loads((tmp_path / "run/state.json").read_text())["harvest"]
    assert after["judge"] != before["judge"] and after["key"] == before["key"] and after["rejudged"]
    from helpers import harvest as H

    assert set(H.load_summary(tmp_path / "run/harvest").probs) == set(judges.load("world").attributes)


def test_stage_keys_split_and_stale_outputs(sd_dir, tmp_path, capsys):
    """The SAE reruns when the train share changes; metrics report only what this run's intervention made."""
    d = _tiny_cfg(tmp_path / "run", sd_dir, attributes=["eyewear"],
                  model={"prompt": "a photo of a doctor", "guidance_scale": 5.0},
                  judge={"spec": "python:judges_for_tests:brightness"}, intervention={"baselines": ["Activation"]})
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert set(json.loads((tmp_path / "run/metrics.json").read_text())) == {"eyewear/DiffLens", "eyewear/Activation"}
    capsys.readouterr()
    d["intervention"]["baselines"] = []
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert (tmp_path / "run/intervention/baseline_Activation_eyewear.safetensors").is_file()  # left, not deleted
    assert set(json.loads((tmp_path / "run/metrics.json").read_text())) == {"eyewear/DiffLens"}  # not reported
    assert capsys.readouterr().out.count("up to date") == 4
    d["probe"] = {"train_share": 0.75}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[harvest] up to date" in out and "[sae] up to date" not in out


def _toml(d) -> str:
    def val(v):
        return json.dumps(v)
    top = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items()) for k, v in d.items()
              if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def test_example_configs_parse(capsys):
    for kind in runner.EXAMPLES:
        assert runner.main(["example-config", kind]) == 0
        import tomllib

        cfg = runner.config_from_dict(tomllib.loads(capsys.readouterr().out), kind, check_files=False)
        assert cfg.stages == list(runner.STAGES)


def test_runner_under_torchrun_splits_the_harvest_over_two_processes(ddpm_dir, tmp_path):
    import subprocess
    import sys

    d = _tiny_cfg(tmp_path / "run", ddpm_dir, attributes=["gender"], stages=["harvest", "sae", "probe"],
                  harvest={"n": 10, "steps": 3, "batch_size": 4}, attribution={"steps": [0, 2]})
    (tmp_path / "c.json").write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "helpers", "run", str(tmp_path / "c.json"), "--no-progress"], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    state = json.loads((tmp_path / "run/state.json").read_text())
    assert state["harvest"]["processes"] == 2 and set(state) == {"harvest", "sae", "probe"}
    from helpers import harvest as H

    parts = [H.load_summary(tmp_path / f"run/harvest-part-{i}") for i in (0, 1)]
    assert sorted(len(p.pooled) for p in parts) == [5, 5]
    rows = H.load_rows(tmp_path / "run/harvest")
    assert sorted(set(rows["sample"].tolist())) == list(range(10))


def test_sd_in_float16_samples_and_captures(sd_dir):
    m = models.load_model(sd_dir, dtype=torch.float16, prompt="a photo of a doctor", guidance_scale=5.0)
    assert m.unet.dtype == m.pipeline.vae.dtype == m.pipeline.text_encoder.dtype == torch.float16
    with hooks.capture(m.unet) as cap:
        a = models.sample(m, n=2, steps=2, seed=3)
    with hooks.edit(m.unet, lambda h, info: h):
        b = models.sample(m, n=2, steps=2, seed=3)
    assert cap.activations[0].dtype == torch.float16 and torch.isfinite(a).all() and torch.equal(a, b)


def test_hooks_refuse_a_wholesale_compiled_unet(ddpm_dir):
    m = models.load_model(ddpm_dir)
    m.unet.compile()  # lazy: nothing is compiled until the first call
    with pytest.raises(ValueError, match="compile_blocks"):
        with hooks.capture(m.unet):
            pass


@pytest.mark.skipif(not __import__("os").environ.get("DIFFLENS_SLOW"),
                    reason="compiling takes ~2 min on 2 CPU cores; run with DIFFLENS_SLOW=1")
def test_compile_blocks_keeps_hooks_working(ddpm_dir):
    m = models.load_model(ddpm_dir)
    base = models.sample(m, n=2, steps=3)
    with hooks.edit(m.unet, lambda h, info: h * 0.5):
        eager_edit = models.sample(m, n=2, steps=3)
    models.compile_blocks(m)
    with hooks.capture(m.unet) as cap:
        compiled = models.sample(m, n=2, steps=3)
    with hooks.edit(m.unet, lambda h, info: h * 0.5):
        compiled_edit = models.sample(m, n=2, steps=3)
    assert cap.steps == [0, 1, 2]
    torch.testing.assert_close(compiled, base, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled_edit, eager_edit, atol=1e-4, rtol=0)
