"""The world's Stable Diffusion (helpers.minisd): its training pieces, and the shipped folders."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import io, minisd, tiny, world


def test_every_caption_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(minisd.tiny.write_tokenizer(tmp_path, words=minisd.caption_words()))
    _, caps, _ = minisd.batch(64, seed=3, rates=(1.0,))
    for c in caps:
        ids = tok(c).input_ids[1:-1]
        words = c.lower().replace(",", " ,").replace("-", " - ").split()
        assert len(ids) == len(words), (c, tok.convert_ids_to_tokens(ids))
    assert max(len(tok(c).input_ids) for c in caps) <= minisd.ClipSettings().max_length


def test_batch_mixes_contexts_and_mention_rates_and_keeps_labels_with_images():
    images, caps, labels = minisd.batch(200, seed=1)
    assert images.shape == (200, 3, 32, 32) and len(caps) == 200
    assert set(labels["context"].tolist()) == set(range(len(world.CONTEXTS)))
    bare = {c for c in caps if c in world.CONTEXTS.values()}
    assert bare and len(bare) < len(set(caps))  # bare prompts and captions with words both occur
    for i, c in enumerate(caps):  # a named gender is the render's gender
        if ", a man" in c or "of a man" in c:
            assert labels["gender"][i] == 0
        if ", a woman" in c or "of a woman" in c:
            assert labels["gender"][i] == 1
    again, caps2, _ = minisd.batch(200, seed=1)
    assert torch.equal(images, again) and caps == caps2


def test_clip_loss_counts_identical_captions_as_positives():
    caps = ["a", "a", "b", "c"]
    good = torch.full((4, 4), -30.0)
    for i in range(4):
        for j in range(4):
            if caps[i] == caps[j]:
                good[i, j] = 30.0
    # the minimum: each image spreads over its caption's copies, so the loss is the mean log(#copies)
    expected = (2 * math.log(2)) / 4
    assert minisd.clip_loss(good, caps).item() == pytest.approx(expected, abs=1e-4)
    bad = good.clone()
    bad[0, 1] = bad[1, 0] = -30.0  # treating the copy as a negative costs more
    assert minisd.clip_loss(bad, caps) > minisd.clip_loss(good, caps) + 0.1


def test_a_stage_resumed_from_its_checkpoint_matches_one_run(tmp_path):
    s = minisd.VaeSettings(block_out_channels=(8, 16), batch=4, steps=4, warmup=1)
    exports = []
    minisd.train_vae(tmp_path / "one", tmp_path / "a", s, checkpoint_every=100, progress=False)
    minisd.train_vae(tmp_path / "two", tmp_path / "b", s, checkpoint_every=100, progress=False, max_minutes=0.0)
    assert minisd.io.load_tensors(tmp_path / "b" / "vae.safetensors")[1]["step"] == 1  # stopped after one step
    minisd.train_vae(tmp_path / "two", tmp_path / "b", s, checkpoint_every=100, progress=False)
    from diffusers import AutoencoderKL

    a = AutoencoderKL.from_pretrained(tmp_path / "one").state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path / "two").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), exports
    with pytest.raises(ValueError, match="other settings"):
        minisd.train_vae(tmp_path / "two", tmp_path / "b", minisd.VaeSettings(block_out_channels=(8, 16), batch=8,
                                                                               steps=4, warmup=1), progress=False)


def test_judge_prompts_are_captions_of_one_named_class():
    p = minisd.judge_prompts()
    assert p["gender"] == ("a portrait of a man", "a portrait of a woman")
    assert p["race"][3] == "a portrait of a person with dark skin"
    assert {a: len(v) for a, v in p.items()} == {a: len(c) for a, c in world.ATTRIBUTES.items()}


def test_bar_verdicts_pass_fail_and_missing_parts():
    def part(gap, conf):
        return {"max_abs_gap": gap, "confident": {a: conf for a in world.SOCIAL}, "fid": 1.0, "fid_floor": 0.5}

    q = {"shares/person/n=10/steps=5/guidance=3/seed=1": part(0.03, 0.99),
         "shares/doctor/n=10/steps=5/guidance=3/seed=1": part(0.07, 0.99),
         "shares/nurse/n=10/steps=5/guidance=3/seed=1": part(0.01, 0.90),
         "shares/teacher/n=10/steps=5/guidance=3/seed=2": part(0.01, 0.99)}  # another seed: not this bar's
    v = minisd.bar_verdicts(q, n=10, steps=5, guidance=3.0, seed=1)
    assert list(v.index) == list(world.CONTEXTS.values())
    assert v.loc["a portrait of a person", "within"] and v.loc["a portrait of a person", "confident ok"]
    assert not v.loc["a portrait of a doctor", "within"]
    assert v.loc["a portrait of a nurse", "within"] and not v.loc["a portrait of a nurse", "confident ok"]
    assert not v.loc["a portrait of a teacher", "within"] and not v.loc["a portrait of a CEO", "within"]


def test_choose_guidance_keeps_the_largest_scale_within_tolerance():
    def parts(gaps):
        return {f"shares/{c}/n=5/steps=2/guidance={g:g}/seed=9": {"max_abs_gap": v}
                for g, v in gaps.items() for c in world.CONTEXTS}

    kw = dict(candidates=(1.0, 2.0, 3.0), n=5, steps=2, seed=9)
    assert minisd.choose_guidance(parts({1.0: 0.02, 2.0: 0.04, 3.0: 0.09}), **kw) == 2.0
    assert minisd.choose_guidance(parts({1.0: 0.07, 2.0: 0.06, 3.0: 0.09}), **kw) == 2.0  # none within: smallest gap
    with pytest.raises(ValueError, match="lacks validation parts"):
        minisd.choose_guidance(parts({1.0: 0.02, 2.0: 0.04}), **kw)


def test_shipped_world_clip_loads_in_clip_judge_and_reads_renders():
    from helpers import judges

    j = judges.ClipJudge(minisd.io.DATA_DIR / "minisd" / "clip", prompts=minisd.judge_prompts(),
                         classes=minisd.judge_classes())
    assert j.attributes["race"] == world.ATTRIBUTES["race"]
    b = world.sample(64, world.uniform_spec(), seed=8)
    p = j.predict(b.images)
    for a in world.SOCIAL:
        assert (p[a].argmax(1) == b.labels[a]).float().mean() >= 0.9, a
    caps = [world.caption({k: int(v[i]) for k, v in b.labels.items()}, "person", ("gender",)) for i in range(4)]
    sims = torch.stack([j.clip_t(b.images[:4], c) for c in caps])  # (caption, image)
    assert all(sims[i, i] >= sims[:, i].max() - 1e-6 for i in range(4))  # each image matches its own caption


def test_decoder_fine_tune_keeps_the_encoder_and_changes_the_decoder(tmp_path):
    from diffusers import AutoencoderKL

    from helpers import judge as J

    minisd.train_vae(tmp_path / "vae", tmp_path, minisd.VaeSettings(block_out_channels=(8, 16), batch=4, steps=2,
                                                                     warmup=1), progress=False)
    net = J.Judge(J.JudgeConfig(width=8))
    J.save(net, tmp_path / "j.safetensors")
    minisd.train_decoder(tmp_path / "ft", tmp_path, tmp_path / "vae", minisd.DecoderSettings(batch=4, steps=2, warmup=1),
                         trainer_judge=tmp_path / "j.safetensors", progress=False)
    a = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path / "ft").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_quality_bar_readers_run_on_a_text_to_image_folder(tmp_path):
    """The readers' plumbing on a tiny random SD (its numbers mean nothing): one part per prompt with shares,
    gaps and FID; the words test counts every named class."""
    from helpers import judge as J, judges, tiny

    sd = tiny.build_sd(tmp_path / "sd", sample_size=8)
    r = minisd.prompt_shares(sd, J.load_judge(), n=6, steps=2, guidance=2.0, contexts=("doctor",), progress=False)
    part = r["prompts"]["doctor"]
    assert part["prompt"] == world.CONTEXTS["doctor"] and part["n"] == 6
    assert part["max_abs_gap"] == max(v["max_abs_gap"] for v in part["attributes"].values())
    assert part["attributes"]["gender"]["spec"] == pytest.approx(world.context_spec("doctor").marginal("gender").tolist())
    clip = judges.ClipJudge(tiny.build_clip(tmp_path / "clip"), prompts=minisd.judge_prompts(),
                            classes=minisd.judge_classes())
    w = minisd.prompt_words(sd, J.load_judge(), clip, per_class=2, steps=2, guidance=2.0, progress=False)
    assert {a: v["n"] for a, v in w["attributes"].items()} == {"gender": 4, "age": 6, "race": 8}
    assert all(0 <= v["clip_t_match_above_mismatch"] <= 1 for v in w["attributes"].values())


def test_book_guidance_is_the_validation_choice():
    """minisd.GUIDANCE is what the frozen rule picks from the shipped validation parts (not typed by hand)."""
    import json

    q = minisd.load_quality()  # the parts of the shipped model only
    assert minisd.GUIDANCE == minisd.choose_guidance(q)


def _noise_seeds(seed: int) -> set[int]:
    """Every seed a quality part at ``seed`` draws from: each prompt's samples, true renders and floor renders
    (prompt_shares), and the words test's samples (prompt_words)."""
    ctx = range(len(world.CONTEXTS))
    shares = {seed + off + c for off in (0, 100, 200) for c in ctx}
    words = {seed + 1000 * a + 100 * k + c for a in range(len(world.SOCIAL)) for k in range(4) for c in ctx}
    return shares | words


def test_validation_and_test_draws_share_no_noise():
    """Guidance is chosen on GUIDANCE_VAL's noise and judged on QUALITY_TEST's; the first test draw (FIRST_TEST),
    seen before the grid was refined, is not reused for the bar. No two of them draw from a common seed."""
    draws = {"val": minisd.GUIDANCE_VAL["seed"], "test": minisd.QUALITY_TEST["seed"], "first test": minisd.FIRST_TEST["seed"]}
    seeds = {k: _noise_seeds(v) for k, v in draws.items()}
    for a in seeds:
        for b in seeds:
            assert a == b or not seeds[a] & seeds[b], (a, b)
    assert minisd.ABLATION["seed"] == minisd.QUALITY_TEST["seed"]  # the same first samples, unguided
    assert set(minisd.FIRST_GRID) <= set(minisd.GUIDANCE_CANDIDATES)


def test_quality_parts_of_another_model_are_refused(tmp_path):
    sd = tiny.build_sd(tmp_path / "sd", sample_size=8)
    fp = minisd.cache.fingerprint(sd)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"shares/doctor/n=1/steps=1/guidance=1/seed=1": {"model": fp}}))
    assert list(minisd.load_quality(sd, path)) == ["shares/doctor/n=1/steps=1/guidance=1/seed=1"]
    path.write_text(json.dumps({"shares/doctor/n=1/steps=1/guidance=1/seed=1": {"model": fp},
                                "words/per_class=1/steps=1/guidance=1/seed=1": {"model": "0123456789ab"}}))
    with pytest.raises(ValueError, match="1 parts not drawn by .*words/per_class=1"):
        minisd.load_quality(sd, path)


def test_validation_worst_compares_models_scale_by_scale():
    part = lambda gap: {"max_abs_gap": gap}  # noqa: E731
    key = "shares/{}/n=300/steps=25/guidance={}/seed=31000"
    a = {key.format(c, g): part(0.1 * g + 0.01 * i) for i, c in enumerate(world.CONTEXTS) for g in (1, 2)}
    b = {k: part(v["max_abs_gap"] / 2) for k, v in a.items() if "guidance=1/" in k}
    b.pop(key.format("ceo", 1))  # a prompt missing at a scale: no value there, not the others' maximum
    f = minisd.validation_worst({"a": a, "b": b}, candidates=(1.0, 2.0))
    assert f.loc["a", "guidance 1"] == pytest.approx(0.14) and f.loc["a", "guidance 2"] == pytest.approx(0.24)
    assert np.isnan(f.loc["b", "guidance 1"]) and np.isnan(f.loc["b", "guidance 2"])
    assert f.loc["a", "best"] == pytest.approx(0.14)


def test_the_shipped_unet_beats_every_rejected_candidate_on_validation():
    """Each UNet judged on the validation noise and not shipped (data/minisd/candidates.json) carries its own
    fingerprint on every part, was judged over the whole grid on validation noise only, started from the shipped UNet,
    and its best largest gap is not below the shipped one's (the rule that kept the shipped UNet, recomputed from the
    stored parts, whose gaps are checked against their class shares)."""
    shipped = minisd.load_quality()
    cands = minisd.load_candidates()
    shipped_unet = json.loads((io.DATA_DIR / "minisd" / "sd" / "training.json").read_text())["unet"]
    assert cands and minisd.cache.fingerprint(io.DATA_DIR / "minisd" / "sd") not in cands
    for fp, c in cands.items():
        assert {p["model"] for p in c["quality"].values()} == {fp}
        # judged on the validation noise only, never on test noise
        assert {(p["settings"]["n"], p["settings"]["steps"], p["settings"]["seed"]) for p in c["quality"].values()} == \
            {(minisd.GUIDANCE_VAL["n"], minisd.GUIDANCE_VAL["steps"], minisd.GUIDANCE_VAL["seed"])}
        minisd.choose_guidance(c["quality"])  # raises if a scale of the grid lacks a prompt
        assert c["unet training"]["continued_from"] == shipped_unet  # it started from the shipped UNet
    for quality in [shipped, *(c["quality"] for c in cands.values())]:  # the stored gaps are the shares' own
        for key, p in quality.items():
            if key.startswith("shares/"):
                gap = max(abs(m - s) for a in p["attributes"].values() for m, s in zip(a["model"], a["spec"]))
                assert p["max_abs_gap"] == pytest.approx(gap, abs=1e-9), key
    f = minisd.validation_worst({"shipped": shipped, **{fp: c["quality"] for fp, c in cands.items()}})
    assert f.drop(index="shipped")["best"].min() >= f.loc["shipped", "best"]


def test_share_frame_reads_every_class_and_signs_the_gap():
    part = lambda g, gender: {"settings": {"n": 10, "steps": 5, "guidance": g, "seed": 1},  # noqa: E731
                              "attributes": {"gender": {"spec": [0.85, 0.15], "model": gender}}}
    q = {"shares/doctor/n=10/steps=5/guidance=1/seed=1": part(1.0, [0.80, 0.20]),
         "shares/doctor/n=10/steps=5/guidance=3/seed=1": part(3.0, [0.96, 0.04]),
         "shares/doctor/n=99/steps=5/guidance=1/seed=1": {**part(1.0, [0.5, 0.5]),
                                                          "settings": {"n": 99, "steps": 5, "guidance": 1.0, "seed": 1}},
         "words/per_class=5": {}}
    f = minisd.share_frame(q, n=10, steps=5, seed=1)
    assert len(f) == 4 and set(f["guidance"]) == {1.0, 3.0}
    male = f[(f["class"] == world.ATTRIBUTES["gender"][0])].set_index("guidance")["gap"]
    assert male[1.0] == pytest.approx(-0.05) and male[3.0] == pytest.approx(0.11)
    assert len(minisd.share_frame(q, n=10, steps=5, seed=1, guidance=3)) == 2
    assert (f["prompt"] == world.CONTEXTS["doctor"]).all()


# ----------------------------------------------------------------------------- the shipped world SD (data/minisd)
SD = io.DATA_DIR / "minisd" / "sd"
CLIP = io.DATA_DIR / "minisd" / "clip"


def test_shipped_world_sd_loads_through_diffusers_and_load_model_and_samples_the_world():
    from diffusers import StableDiffusionPipeline

    from helpers import judge as J, models

    pipe = StableDiffusionPipeline.from_pretrained(SD)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.safety_checker is None
    m = models.load_model(SD, prompt=world.CONTEXTS["nurse"], guidance_scale=minisd.GUIDANCE)
    assert m.text_conditioned and models.trained_on_world(SD)
    x = models.sample(m, n=16, steps=10, seed=3)
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()
    p = J.load_judge().predict(x)
    assert (p["gender"].argmax(1) == 1).float().mean() >= 0.6  # "a nurse" is 90% female by its spec


def test_runner_end_to_end_on_the_world_sd(tmp_path, capsys):
    import json

    from helpers import runner

    d = {"out": str(tmp_path / "run"), "attributes": ["gender"],
         "model": {"path": str(SD), "prompt": world.CONTEXTS["doctor"], "guidance_scale": minisd.GUIDANCE},
         "harvest": {"n": 40, "steps": 5, "batch_size": 20},
         "sae": {"train_steps": 40, "batch_size": 256},
         "attribution": {"steps": [0, 2], "per_class": 4, "ig_steps": 8},
         "intervention": {"n": 8, "from_step": 1, "k": 4, "batch_size": 8}}
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert runner.main(["run", str(tmp_path / "c.json"), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().out  # the world judge is the right reader of the world SD
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"gender/DiffLens"}


def test_a_unet_run_can_start_from_a_shipped_unet_and_records_its_lineage(tmp_path):
    """init_from: a run that starts from another UNet's weights and trains one step at learning rate 0 exports
    those weights unchanged (EMA included), and its record names the run it continued; a UNet of other settings
    is refused with the setting named."""
    from diffusers import UNet2DConditionModel

    clip = io.DATA_DIR / "minisd" / "clip"
    vae = tmp_path / "vae"
    minisd.train_vae(vae, tmp_path / "v", minisd.VaeSettings(block_out_channels=(8, 16), batch=2, steps=1),
                     progress=False)
    s = minisd.UNetSettings(block_out_channels=(8, 16), batch=2, steps=1)
    minisd.train_unet(tmp_path / "a", tmp_path / "ra", clip, vae, s, progress=False)
    cont = replace(s, lr=0.0, init_from=str(tmp_path / "a"))
    minisd.train_unet(tmp_path / "b", tmp_path / "rb", clip, vae, cont, progress=False)
    a, b = UNet2DConditionModel.from_pretrained(tmp_path / "a"), UNet2DConditionModel.from_pretrained(tmp_path / "b")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    rec = json.loads((tmp_path / "b" / "training.json").read_text())
    assert rec["settings"]["init_from"] == str(tmp_path / "a") and rec["continued_from"]["steps"] == 1
    with pytest.raises(ValueError, match="block_out_channels"):
        minisd.train_unet(tmp_path / "c", tmp_path / "rc", clip, vae,
                          replace(s, block_out_channels=(8, 32), init_from=str(tmp_path / "a")), progress=False)


def test_unet_lineage_lists_every_run_oldest_first():
    """The shipped UNet's record and the runs it continued from, named by schedule, steps from each run's own record."""
    run = lambda steps, zsnr, prev=None: {"steps": steps, "settings": {"zero_snr": zsnr},  # noqa: E731
                                          **({"continued_from": prev} if prev else {})}
    lineage = minisd.unet_lineage(run(30, True, run(20, True, run(10, False))))
    assert list(lineage) == ["unet (ε-prediction, SD's schedule)", "unet fine-tune 1 (zero terminal SNR, v-prediction)",
                             "unet fine-tune 2 (zero terminal SNR, v-prediction)"]
    assert [r["steps"] for r in lineage.values()] == [10, 20, 30]
    assert all("continued_from" not in r for r in lineage.values())
    assert list(minisd.unet_lineage(run(5, False))) == ["unet (ε-prediction, SD's schedule)"]
    two = minisd.unet_lineage(run(7, False, run(5, False)))  # an ε run continued by another: both kept
    assert [r["steps"] for r in two.values()] == [5, 7] and len(set(two)) == 2
    shipped = json.loads((io.DATA_DIR / "minisd" / "sd" / "training.json").read_text())["unet"]
    assert list(minisd.unet_lineage(shipped).values())[-1]["steps"] == shipped["steps"]


def test_a_zero_snr_unet_ships_a_matching_ddim_and_samples(tmp_path):
    """zero_snr: the training schedule reaches ᾱ = 0 at its last step and predicts v; a UNet trained so is assembled
    with a DDIM of the same betas and prediction type that starts at that step (trailing), and the folder samples
    finite images through diffusers. The default keeps SD v1.5's schedule (ᾱ_999 > 0, ε, leading); the shipped folder's
    sampler matches its UNet's training record."""
    from diffusers import StableDiffusionPipeline

    plain, zero = minisd.train_scheduler(), minisd.train_scheduler(zero_snr=True)
    assert plain.alphas_cumprod[-1] > 1e-3 and plain.config.prediction_type == "epsilon"
    assert zero.alphas_cumprod[-1] < 1e-12 and zero.config.prediction_type == "v_prediction"
    clip, vae = io.DATA_DIR / "minisd" / "clip", tmp_path / "vae"
    minisd.train_vae(vae, tmp_path / "v", minisd.VaeSettings(block_out_channels=(8, 16), batch=2, steps=1),
                     progress=False)
    minisd.train_unet(tmp_path / "u", tmp_path / "ru", clip, vae,
                      minisd.UNetSettings(block_out_channels=(8, 16), batch=2, steps=1, zero_snr=True), progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(minisd.assemble(tmp_path / "sd", clip, vae, tmp_path / "u"))
    cfg = pipe.scheduler.config
    assert cfg.rescale_betas_zero_snr and cfg.prediction_type == "v_prediction" and cfg.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(5)
    assert int(pipe.scheduler.timesteps[0]) == 999
    out = pipe("a portrait of a doctor", num_inference_steps=3, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the shipped folder samples with the schedule its UNet was trained on (its training record says which)
    shipped = StableDiffusionPipeline.from_pretrained(io.DATA_DIR / "minisd" / "sd").scheduler.config
    trained_zero = json.loads((io.DATA_DIR / "minisd" / "sd" / "training.json").read_text())["unet"]["settings"].get(
        "zero_snr", False)
    want = minisd.sampling_scheduler(trained_zero).config
    keys = ("rescale_betas_zero_snr", "prediction_type", "timestep_spacing", "beta_schedule")
    assert {k: shipped.get(k) for k in keys} == {k: want.get(k) for k in keys}


def test_mean_start_frame_measures_each_start_against_the_spec():
    d = {"prompts": {"nurse": {"spec": {"age": [0.45, 0.5, 0.05], "gender": [0.1, 0.9]},
                               "plain": {"age": [0.56, 0.41, 0.03], "gender": [0.16, 0.84]},
                               "mean start": {"age": [0.29, 0.63, 0.08], "gender": [0.1, 0.9]}}}}
    f = minisd.mean_start_frame(d)
    assert f.loc[("nurse", "age"), "gap plain"] == pytest.approx(0.11)
    assert f.loc[("nurse", "age"), "gap mean start"] == pytest.approx(0.16)
    assert not f.loc[("nurse", "age"), "closer"] and f.loc[("nurse", "gender"), "closer"]


def test_diagnosis_verdicts_read_the_adult_flips_and_the_mean_start():
    def rec(adult_to_young, ages_start):
        spec = {"age": [0.16, 0.72, 0.12]}
        prompts = {c: {"spec": spec, "plain": {"age": [0.36, 0.52, 0.12]}, "mean start": {"age": a}}
                   for c, a in zip("abc", ages_start)}
        eye = [[1.0, 0.0, 0.0], [adult_to_young, 1 - adult_to_young, 0.0], [0.0, 0.0, 1.0]]
        return {"sdedit": {"strengths": {"0.4": eye, "1": [[0.0, 1.0, 0.0]] * 3}}, "mean start": {"prompts": prompts}}

    near, off = [0.18, 0.70, 0.12], [0.50, 0.40, 0.10]
    v = minisd.diagnosis_verdicts(rec(0.02, [near, near, off]))
    assert v["detail loss"] == "refuted" and v["mean drift"] == "holds" and v["prompts closer on age"] == 2
    v = minisd.diagnosis_verdicts(rec(0.30, [near, off, off]))   # strength 1 (a fresh sample) is not read
    assert v["detail loss"] == "holds" and v["mean drift"] == "refuted"
    assert v["adult read young, largest below strength 1"] == 0.30


def test_before_after_compares_the_same_part_of_two_models():
    def part(gap, young):
        return {"max_abs_gap": gap, "fid": 10 * gap,
                "attributes": {"age": {"spec": [0.1, 0.6, 0.3], "model": [young, 0.5, 0.2]}}}

    keys = {c: f"shares/{c}/n=10/steps=5/guidance=1/seed=1" for c in world.CONTEXTS}
    before = {k: part(0.2, 0.3) for k in keys.values()}
    after = {k: part(0.05 if c != "nurse" else 0.25, 0.12) for c, k in keys.items()}
    f = minisd.before_after(before, after, n=10, steps=5, guidance=1, seed=1)
    assert list(f.index) == list(world.CONTEXTS.values())
    assert f["closer"].tolist() == [c != "nurse" for c in world.CONTEXTS]
    assert f.loc[world.CONTEXTS["doctor"], ["young before", "young after", "young spec"]].tolist() == [0.3, 0.12, 0.1]
    assert f.loc[world.CONTEXTS["nurse"], ["FID before", "FID after"]].tolist() == [2.0, 2.5]
    del after[keys["ceo"]]
    with pytest.raises(KeyError, match="ceo.*second"):
        minisd.before_after(before, after, n=10, steps=5, guidance=1, seed=1)
