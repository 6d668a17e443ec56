"""Bad input gets one clear error naming the setting or file: the runner's output folder and lock, every
loader on truncated, foreign or non-finite files, and property-based checks that no config or edit argument
gets past validation as anything but a named error."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import intervention as I
from helpers import io, models, runner
from helpers import judge as J
from helpers import probe as P
from helpers import sae as S

DATA = io.DATA_DIR


def _cfg(out) -> dict:
    return {"out": str(out), "attributes": ["gender"], "model": {"path": "embedded"},
            "harvest": {"n": 4, "steps": 4, "batch_size": 4}, "attribution": {"steps": [0, 2]},
            "intervention": {"from_step": 1}}


# ----------------------------------------------------------------------------- output folder and lock


def test_out_is_relative_to_the_config_file_and_tilde_expands(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    monkeypatch.chdir(tmp_path / "cfgs")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    c = elsewhere / "c.json"
    c.write_text(json.dumps(_cfg("../runs/x")))
    assert Path(runner.load_config(c).out) == (tmp_path / "somewhere" / "runs" / "x").resolve()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    c.write_text(json.dumps(_cfg("~/runs")))
    assert Path(runner.load_config(c).out) == tmp_path / "home" / "runs"
    c.write_text(json.dumps(_cfg(str(tmp_path / "abs"))))
    assert Path(runner.load_config(c).out) == tmp_path / "abs"


def test_a_second_run_on_the_same_out_refuses_and_the_lock_dies_with_its_process(tmp_path):
    cfg = runner.config_from_dict(_cfg(tmp_path / "run"))
    first = runner.Run(cfg, progress=False)
    with pytest.raises(RuntimeError, match=f"out {tmp_path / 'run'} is in use by another run \\(pid {os.getpid()}"):
        runner.Run(cfg, progress=False)
    first.close()
    with runner.Run(cfg, progress=False):  # released: a new run starts
        pass
    # a run killed while holding the lock leaves the file but not the lock
    code = ("import os, sys; from helpers import runner; r = runner.Run(runner.config_from_dict("
            f"{_cfg(tmp_path / 'run')!r}), progress=False); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=io.REPO_ROOT)
    assert (tmp_path / "run" / runner.LOCK).is_file()
    with runner.Run(cfg, progress=False):
        pass


def test_main_prints_the_absolute_out_and_refuses_a_busy_folder(tmp_path, capsys):
    c = tmp_path / "c.json"
    c.write_text(json.dumps({**_cfg("run"), "stages": []}))
    held = runner.Run(runner.load_config(c), progress=False)
    assert runner.main(["run", str(c), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert f"run: writing to {tmp_path / 'run'}" in out and out.count("error:") == 1 and "in use" in out
    held.close()


# ----------------------------------------------------------------------------- loaders name the file


LOADERS = {
    "sae": (DATA / "dissect" / "sae.safetensors", S.load_sae),
    "probe": (DATA / "identify" / "probe.safetensors", P.load_probe),
    "judge": (DATA / "judge.safetensors", J.load_judge),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("damage", ["truncated", "foreign", "nan", "shape"])
def test_every_loader_names_a_damaged_file(tmp_path, kind, damage):
    src, load = LOADERS[kind]
    p = tmp_path / f"{kind}-{damage}.safetensors"
    if damage == "truncated":
        b = src.read_bytes()
        p.write_bytes(b[: len(b) // 2])
    elif damage == "foreign":
        p.write_bytes(b"this is a text file, not safetensors\n")
    else:
        t, meta = io.load_tensors(src)
        name = max((k for k, v in t.items() if v.is_floating_point()), key=lambda k: t[k].numel())
        t = dict(t)
        if damage == "nan":
            t[name] = t[name].clone()
            t[name].view(-1)[0] = math.nan
        else:
            t[name] = t[name].flatten()[:-1].clone()
        if kind == "sae" and damage == "shape":
            meta.pop("digest", None)  # the digest would name the edit first; the shape check must too
        io.save_tensors(p, t, meta=meta)
    with pytest.raises(ValueError) as e:
        load(p)
    assert str(p) in str(e.value), e.value


def test_model_folders_with_a_bad_config_or_truncated_weights_name_the_file(tmp_path):
    m = tmp_path / "model"
    shutil.copytree(DATA / "embedded", m)
    (m / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{m / 'unet' / 'config.json'} is not a JSON object"):
        models.load_model(str(m))
    shutil.rmtree(m)
    shutil.copytree(DATA / "embedded", m)
    w = next((m / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"the UNet in {m / 'unet'} cannot be loaded"):
        models.load_model(str(m))


def test_a_truncated_harvest_shard_is_named(tmp_path):
    from helpers import hooks

    hooks_dir = tmp_path / "shards"
    w = hooks.ShardWriter(hooks_dir, rows=4)
    w.add(torch.randn(4, 2, 2, 2), step=0, timestep=None, sample=torch.arange(4))
    w.close()
    shard = next(hooks_dir.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"{shard} is not a readable safetensors file"):
        hooks.load_shards(hooks_dir)


# ----------------------------------------------------------------------------- property-based


values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 30), max_size=4), st.dictionaries(st.text(max_size=4),
                                                                                                   st.integers(), max_size=2))
SETTINGS = {
    "harvest": ["n", "steps", "batch_size", "seed", "shard_steps"],
    "sae": ["train_steps", "batch_size", "lr", "expansion", "k"],
    "probe": ["train_share", "epochs"],
    "attribution": ["steps", "per_class", "ig_steps"],
    "intervention": ["n", "beta", "k", "from_step", "batch_size", "baselines"],
    "model": ["device", "site", "guidance_scale"],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(sorted(SETTINGS)), data=st.data())
def test_any_runner_setting_is_accepted_or_named(tmp_path, section, data):
    key = data.draw(st.sampled_from(SETTINGS[section]))
    value = data.draw(values)
    d = _cfg(tmp_path / "run")
    d.setdefault(section, {})[key] = value
    try:
        runner.config_from_dict(d, "c.toml")
    except runner.ConfigError as e:
        assert f"[{section}] {key}" in str(e) or f"[{section}]" in str(e) or key in str(e), str(e)
    assert not (tmp_path / "run").exists()  # validation never writes


@pytest.fixture(scope="module")
def sae():
    return S.TopKSAE(S.SAEConfig(d_in=8, expansion=2, k=2))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beta=values, cls=values, steps=values, feats=st.lists(st.one_of(st.integers(-2, 20), st.floats(0, 20),
                                                                         st.booleans()), max_size=3),
       target=st.one_of(st.none(), st.lists(st.floats(-1, 2), min_size=1, max_size=3)))
def test_any_edit_argument_is_accepted_or_a_value_error(sae, beta, cls, steps, feats, target):
    e = I.Edit("gender", {0: feats, 1: [1]}, beta=beta, mode="add", cls=cls, target=target, steps=steps,
               classes=("male", "female"))
    try:
        e.validate(sae.cfg.d_sae)
    except ValueError:
        return
    # accepted: it must be exactly what it says
    assert isinstance(e.betas() or e.beta, (int, float, list)) and not isinstance(e.beta, bool)
    assert all(isinstance(f, int) and not isinstance(f, bool) for f in feats)
    assert (target is None) != (cls is None)
    if cls is not None:
        assert isinstance(cls, int) and not isinstance(cls, bool) and cls in (0, 1)


# ----------------------------------------------------------------------------- nothing foreign is deleted


def test_cache_building_replaces_only_its_own_folders_and_cleans_dead_partials(tmp_path):
    from helpers import cache

    mine = tmp_path / "harvest-abc"
    with cache.building(mine) as tmp:
        (tmp / "a.txt").write_text("1")
    with cache.building(mine) as tmp:  # ours (marker): replaced
        (tmp / "a.txt").write_text("2")
    assert (mine / "a.txt").read_text() == "2"
    user = tmp_path / "harvest-user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{user} exists and was not built by this project"):
        with cache.building(user) as tmp:
            pass
    assert (user / "thesis.tex").read_text() == "precious"
    # a build killed mid-way leaves a partial folder with its pid; the next build removes it, but not a live
    # build's partial nor one without an owner
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".harvest-abc.partial.x1"
    stale.mkdir()
    (stale / ".pid").write_text(dead.stdout.strip())
    live = tmp_path / ".harvest-abc.partial.x2"
    live.mkdir()
    (live / ".pid").write_text(str(os.getpid()))
    unknown = tmp_path / ".harvest-abc.partial.x3"
    unknown.mkdir()
    with cache.building(mine) as tmp:
        pass
    assert not stale.exists() and live.exists() and unknown.exists()
