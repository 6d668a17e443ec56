"""Atomic file writes and safetensors checkpoints shared by every module that saves state."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# the shipped artifacts (embedded model, judge, chapter results); a pip-installed package points here with DIFFLENS_DATA
DATA_DIR = Path(os.environ.get("DIFFLENS_DATA", REPO_ROOT / "data"))


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Atomically save tensors with safetensors; ``meta`` (JSON-able) goes in the header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"meta": json.dumps(meta or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors and the ``meta`` dict written by :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return load_file(str(path)), meta
    except (Exception,) as e:  # safetensors raises its own error types for truncated or foreign files
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
                         "not what it should be — restore or rebuild it") from None


def check_finite(tensors: dict[str, torch.Tensor], path, what: str = "weights") -> None:
    """Refuse NaN or inf in the floating-point tensors read from ``path``, naming the file and the tensors."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path} holds NaN or inf in {bad[:5]} ({what}); restore or rebuild it")


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path, what: str) -> None:
    """``module.load_state_dict(tensors)`` (strict) after :func:`check_finite`; a tensor whose shape does not match
    the file's own metadata is named with the file instead of torch's bare error."""
    check_finite(tensors, path, what)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: its {what} do not match the configuration stored with them ({str(e)[:300]}); "
                         "the file was edited or is from another version — restore or rebuild it") from None


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<prefix>.<name>": t}``: several named tensors (e.g. judge probabilities per attribute) in one file."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`prefixed`: the tensors under ``prefix``, by name."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors plus JSON-able rest (for safetensors)."""
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        state_meta[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                state_meta[str(pid)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`flatten_optimizer`: load the state back into ``opt``."""
    state = {int(pid): dict(rest) for pid, rest in meta["state"].items()}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
