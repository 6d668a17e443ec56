"""A catalogue of bad or odd inputs, each tried and classified (issue 16): how the project answers them.

    python scripts/hostile_inputs.py            # about 2 min on 2 cores; prints every case and the counts

Every kind of input the reliability issue reported is here (user folders in the way, output paths, SAE
training and files, edit arguments, runner settings, damaged files), each in a few variants. A case is
classified as

* ``clear``   — refused with an error that names the setting or file (the token the case expects);
* ``unclear`` — refused with an error that does not name it;
* ``correct`` — accepted, and the result is what the input asks for (checked);
* ``silent``  — accepted, and the result is wrong;
* ``crash``   — a raw exception of another kind (TypeError, IndexError, a library's own error ...), or a
  runner exit that is not the one ``error:`` line with exit code 2;
* ``data loss`` — a file the project did not create was deleted or changed.

The goal: data loss, silent and crash at zero. Each case also has a test in ``tests/`` (mostly
``tests/test_bad_inputs.py``, ``tests/test_sae.py``, ``tests/test_intervention.py``, ``tests/test_harvest.py``,
``tests/test_real_models.py``).
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import harvest as H  # noqa: E402
from helpers import intervention as I  # noqa: E402
from helpers import io, models, runner  # noqa: E402
from helpers import judge as J  # noqa: E402
from helpers import probe as P  # noqa: E402
from helpers import sae as S  # noqa: E402

NAMED = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)
ROOT = Path(tempfile.mkdtemp(prefix="hostile-"))
CASES: list[tuple[str, str, object, str, object]] = []  # (group, case, action, token, check)


def case(group: str, name: str, token: str = "", check=None):
    def deco(fn):
        CASES.append((group, name, fn, token, check))
        return fn
    return deco


def classify(action, token, check) -> tuple[str, str]:
    try:
        out = action()
    except NAMED as e:
        msg = str(e)
        return ("clear" if token and token in msg else "unclear"), msg.splitlines()[0][:110]
    except Exception as e:  # noqa: BLE001 - that is what is being measured
        return "crash", f"{type(e).__name__}: {str(e)[:100]}"
    if isinstance(out, str) and out in ("data loss", "crash", "unclear", "clear", "silent"):
        return out, ""
    ok = check(out) if check else False
    return ("correct" if ok else "silent"), str(out)[:110]


def cfg(out, **kw) -> dict:
    d = {"out": str(out), "attributes": ["gender"], "model": {"path": "embedded"},
         "harvest": {"n": 4, "steps": 4, "batch_size": 4}, "attribution": {"steps": [0, 2]},
         "intervention": {"from_step": 1}}
    for k, v in kw.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def run_main(d: dict | str, suffix: str = ".json", token: str = "") -> str:
    """The runner's command line on a config: one ``error:`` line naming ``token`` and exit 2 is clear."""
    path = ROOT / f"cfg-{len(os.listdir(ROOT))}{suffix}"
    path.write_text(d if isinstance(d, str) else json.dumps(d))
    buf = _io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = runner.main(["run", str(path), "--no-progress", "--stages", "harvest"])
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001
        return "crash"
    out = buf.getvalue()
    if code == 2 and out.count("error:") == 1:
        return "clear" if token in out else "unclear"
    return "crash" if code not in (0, 2) else "silent"


# ----------------------------------------------------------------------------- data loss


def _user_folder(name: str) -> Path:
    f = ROOT / name
    f.mkdir()
    (f / "notes.txt").write_text("mine")
    return f


def _kept(f: Path) -> bool:
    return (f / "notes.txt").is_file() and (f / "notes.txt").read_text() == "mine"


@case("data loss", "harvest.run into a folder the user made")
def _():
    f = _user_folder("user-harvest")
    try:
        H.run(MODEL, H.HarvestSettings(n=2, steps=2, batch_size=2), f, JUDGE, progress=False)
    except FileExistsError:
        return "clear" if _kept(f) else "data loss"
    return "correct" if _kept(f) else "data loss"


@case("data loss", "runner out/harvest holding the user's files")
def _():
    out = ROOT / "run-user"
    (out / "harvest").mkdir(parents=True)
    (out / "harvest" / "notes.txt").write_text("mine")
    r = run_main(cfg(out), token="harvest")
    return r if _kept(out / "harvest") else "data loss"


@case("data loss", "cache.building over a folder the user made")
def _():
    from helpers import cache

    f = _user_folder("harvest-user2")
    try:
        with cache.building(f) as tmp:
            (tmp / "x").write_text("")
    except FileExistsError:
        return "clear" if _kept(f) else "data loss"
    return "data loss" if not _kept(f) else "silent"


# ----------------------------------------------------------------------------- output paths


def _out_of(raw_out: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    c = where / "c.json"
    c.write_text(json.dumps(cfg(raw_out)))
    return Path(runner.load_config(c).out)


case("output paths", 'out = "../x" (relative to the config file)',
     check=lambda p: p == (ROOT / "cfgdir" / "x").resolve())(lambda: _out_of("../x", ROOT / "cfgdir" / "sub"))
case("output paths", 'out = "~/runs" (expands)', check=lambda p: p == Path.home() / "runs")(
    lambda: _out_of("~/runs", ROOT / "cfgdir2"))
case("output paths", 'out = ""', token="out is empty")(lambda: runner.config_from_dict(cfg("")))
case("output paths", 'out = "   "', token="out is empty")(lambda: runner.config_from_dict(cfg("   ")))


@case("output paths", "two runs on one out", token="in use")
def _():
    c = runner.config_from_dict(cfg(ROOT / "busy"))
    first = runner.Run(c, progress=False)
    try:
        runner.Run(c, progress=False)
    finally:
        first.close()


# ----------------------------------------------------------------------------- SAE training and files


def _train(x, **tc):
    cfg_ = S.SAEConfig(d_in=x.shape[1], expansion=2, k=2)
    return S.train_sae(x, cfg_, S.SAETrainConfig(**{"steps": 5, "batch_size": 16, "log_every": 1, **tc}),
                       progress=False)


def _rows():
    return torch.randn(64, 8)


def _nan():
    x = _rows()
    x[3, 2] = math.nan
    return x


def _inf():
    x = _rows()
    x[5, 0] = math.inf
    return x


case("SAE", "training rows with a NaN", token="NaN")(lambda: _train(_nan()))
case("SAE", "training rows with an inf", token="inf")(lambda: _train(_inf()))
case("SAE", "all-zero training rows", token="variance")(lambda: _train(torch.zeros(64, 8)))
case("SAE", "constant training rows", token="variance")(lambda: _train(torch.ones(64, 8) * 3))
case("SAE", "batch_size = 0", token="batch_size")(lambda: _train(_rows(), batch_size=0))
case("SAE", "steps = 0", token="steps")(lambda: _train(_rows(), steps=0))
case("SAE", "steps = -1", token="steps")(lambda: _train(_rows(), steps=-1))


def _sae_file(edit):
    sae, _ = _train(_rows())
    p = ROOT / f"sae-{len(os.listdir(ROOT))}.safetensors"
    S.save_sae(sae, p)
    edit(p)
    return S.load_sae(p)


def _nan_weight(p):
    t, m = io.load_tensors(p)
    t["W_dec"] = t["W_dec"].clone()
    t["W_dec"][0, 0] = math.nan
    io.save_tensors(p, t, meta=m)


def _tamper_k(p):
    t, m = io.load_tensors(p)
    m["sae_config"]["k"] = 1
    io.save_tensors(p, t, meta=m)


def _truncate(p):
    b = Path(p).read_bytes()
    Path(p).write_bytes(b[: len(b) // 2])


case("SAE", "SAE file with a NaN weight", token="NaN")(lambda: _sae_file(_nan_weight))
case("SAE", "SAE metadata edited after saving (k 2 → 1)", token="sae-")(lambda: _sae_file(_tamper_k))
case("SAE", "truncated SAE file", token="sae-")(lambda: _sae_file(_truncate))


# ----------------------------------------------------------------------------- edits


def _edit(**kw):
    e = I.Edit("gender", {0: [1, 2], 1: [3]}, beta=2.0, mode="add", cls=1, classes=("male", "female"))
    return replace(e, **kw)


def _sample(e, steps=3, n=2):
    imgs, iv = I.sample_edited(MODEL, SAE, [e], n=n, steps=steps, seed=0, batch_size=n)
    return imgs


def _fired(e, steps=3):
    """Did the edit change anything (against the unedited samples)?"""
    return not torch.equal(_sample(e, steps), models.sample(MODEL, 2, steps=steps, seed=0, batch_size=2))


case("edits", "β = 1e30", token="non-finite")(lambda: _sample(_edit(beta=1e30)))
case("edits", "β = nan", token="beta")(lambda: _sample(_edit(beta=math.nan)))
case("edits", 'β = "x"', token="beta")(lambda: _sample(_edit(beta="x")))
case("edits", "steps = [99] on a 3-step schedule", token="steps")(lambda: _sample(_edit(steps=[99])))
case("edits", "steps = [-1]", token="steps")(lambda: _sample(_edit(steps=[-1])))
case("edits", "steps = [2, 50]", token="steps")(lambda: _sample(_edit(steps=[2, 50])))
case("edits", "steps = [] ", token="steps")(lambda: _sample(_edit(steps=[])))
case("edits", "steps = iter([0, 1]) fires", check=lambda fired: fired is True)(
    lambda: _fired(_edit(steps=iter([0, 1]))))
case("edits", "steps = [0.5]", token="steps")(lambda: _sample(_edit(steps=[0.5])))
case("edits", "cls = True", token="cls")(lambda: _sample(_edit(cls=True)))
case("edits", 'cls = "female" (a class name) fires', check=lambda fired: fired is True)(
    lambda: _fired(_edit(cls="female")))
case("edits", 'cls = "robot"', token="cls")(lambda: _sample(_edit(cls="robot")))
case("edits", "cls = 7", token="cls")(lambda: _sample(_edit(cls=7)))
case("edits", "feature id 2.7", token="integers")(lambda: _sample(_edit(features={0: [2.7], 1: [3]})))
case("edits", "feature id beyond the SAE", token="out of range")(lambda: _sample(_edit(features={0: [10**6], 1: [3]})))
case("edits", "target that does not sum to 1", token="sum to 1")(lambda: _sample(_edit(cls=None, target=[0.7, 0.7])))
case("edits", "target with 3 entries for 2 classes", token="target")(
    lambda: _sample(_edit(cls=None, target=[0.3, 0.3, 0.4])))
case("edits", "per-class β of the wrong length", token="beta")(lambda: _sample(_edit(beta=[1.0, 2.0, 3.0])))
case("edits", "mode = 'multiply'", token="mode")(lambda: _sample(_edit(mode="multiply")))


# ----------------------------------------------------------------------------- runner settings


def _setting(section, key, value, token):
    d = cfg(ROOT / f"run-{section}-{key}")
    d[section] = {**d.get(section, {}), key: value}
    return run_main(d, token=token)


for sec, key, val, tok in [
    ("harvest", "n", "abc", "[harvest] n"), ("harvest", "n", -5, "[harvest] n"), ("harvest", "n", 0, "[harvest] n"),
    ("harvest", "batch_size", 0, "[harvest] batch_size"), ("harvest", "steps", 0, "[harvest] steps"),
    ("harvest", "steps", 2.5, "[harvest] steps"), ("harvest", "shard_steps", [9], "shard_steps"),
    ("probe", "train_share", 1.5, "[probe] train_share"), ("probe", "train_share", 0, "[probe] train_share"),
    ("intervention", "beta", "x", "[intervention] beta"), ("intervention", "beta", math.inf, "beta"),
    ("intervention", "k", 0, "[intervention] k"), ("intervention", "n", 0, "[intervention] n"),
    ("intervention", "baselines", ["Magic"], "Magic"), ("model", "device", "cuda", "device"),
    ("model", "site", "neck!", "site"), ("sae", "lr", -1.0, "[sae] lr"), ("sae", "batch_size", 0, "[sae] batch_size"),
    ("attribution", "steps", [0, 9], "[attribution] steps"), ("judge", "spec", "clip:/no/such", "[judge]"),
]:
    case("runner settings", f"[{sec}] {key} = {val!r}")(
        lambda sec=sec, key=key, val=val, tok=tok: _setting(sec, key, val, tok))

case("runner settings", "unknown top-level key", )(lambda: run_main({**cfg(ROOT / "r1"), "outt": "x"}, token="outt"))
case("runner settings", "config is not valid JSON")(lambda: run_main("{not json", token="not valid JSON"))
case("runner settings", "config is not valid TOML")(lambda: run_main("out = [", suffix=".toml", token="not valid TOML"))
case("runner settings", "config file missing")(lambda: _missing_config())


def _missing_config():
    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = runner.main(["run", str(ROOT / "nope.toml")])
    return "clear" if code == 2 and "nope.toml" in buf.getvalue() else "unclear"


# ----------------------------------------------------------------------------- damaged files


def _damaged(src: Path, kind: str, load, damage: str):
    p = ROOT / f"{kind}-{damage}.safetensors"
    if damage == "truncated":
        b = src.read_bytes()
        p.write_bytes(b[: len(b) // 2])
    elif damage == "foreign":
        p.write_bytes(b"hello, not a tensor file\n")
    else:
        t, m = io.load_tensors(src)
        name = max((k for k, v in t.items() if v.is_floating_point()), key=lambda k: t[k].numel())
        t = dict(t)
        t[name] = t[name].clone()
        t[name].view(-1)[0] = math.nan
        io.save_tensors(p, t, meta=m)
    return load(p)


for kind, src, load in [("probe", io.DATA_DIR / "identify" / "probe.safetensors", P.load_probe),
                        ("judge", io.DATA_DIR / "judge.safetensors", J.load_judge),
                        ("sae", io.DATA_DIR / "dissect" / "sae.safetensors", S.load_sae)]:
    for damage in ("truncated", "foreign", "nan"):
        case("files", f"{kind} file {damage}", token=f"{kind}-{damage}")(
            lambda src=src, kind=kind, load=load, damage=damage: _damaged(src, kind, load, damage))


def _model_folder(damage: str):
    m = ROOT / f"model-{damage}"
    shutil.copytree(io.DATA_DIR / "embedded", m)
    if damage == "config":
        (m / "unet" / "config.json").write_text("{not json")
    else:
        w = next((m / "unet").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:1000])
    return models.load_model(str(m))


case("files", "model folder: config.json not JSON", token="config.json")(lambda: _model_folder("config"))
case("files", "model folder: truncated UNet weights", token="model-weights")(lambda: _model_folder("weights"))


@case("files", "harvest shard truncated", token="shard-")
def _():
    from helpers import hooks

    d = ROOT / "shards"
    w = hooks.ShardWriter(d, rows=4)
    w.add(torch.randn(4, 2, 2, 2), step=0, timestep=None, sample=torch.arange(4))
    w.close()
    s = next(d.glob("shard-*.safetensors"))
    s.write_bytes(s.read_bytes()[:50])
    return hooks.load_shards(d)


@case("files", "runner on a truncated model", token="model-run")
def _():
    m = ROOT / "model-run"
    shutil.copytree(io.DATA_DIR / "embedded", m)
    w = next((m / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    return run_main(cfg(ROOT / "run-trunc", model={"path": str(m)}), token="model-run")


if __name__ == "__main__":
    torch.set_num_threads(2)
    MODEL = models.load_model("embedded")
    JUDGE = J.load_judge()
    SAE, _ = S.load_sae(io.DATA_DIR / "dissect" / "sae.safetensors")
    counts = Counter()
    width = max(len(c[1]) for c in CASES)
    for group, name, action, token, check in CASES:
        verdict, detail = classify(action, token, check)
        counts[verdict] += 1
        print(f"{group:16} {name:{width}}  {verdict:9} {detail}", flush=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    order = ["clear", "correct", "unclear", "silent", "crash", "data loss"]
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in order))
