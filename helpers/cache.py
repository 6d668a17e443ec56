"""Content-keyed artifact cache with atomic writes.

An artifact (a harvest, a sweep) lives in ``CACHE_DIR/<kind>-<key>/`` where ``key`` hashes
the settings that made it *and* fingerprints of its inputs (model weights, judge), so
changing any of them gives a new folder instead of a stale hit. A folder is built under a
temporary name and renamed into place only when complete: an interrupted build leaves
nothing that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .io import DATA_DIR

CACHE_DIR = Path(os.environ.get("DIFFLENS_CACHE", DATA_DIR / "cache"))


def key(settings: dict) -> str:
    """A short stable hash of JSON-able ``settings``."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def fingerprint(path) -> str:
    """Hash of a file's bytes, or of every weights/config file under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fingerprint: {path} does not exist")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def folder_for(kind: str, settings: dict, root=None) -> Path:
    return Path(root or CACHE_DIR) / f"{kind}-{key(settings)}"


MARKER = ".difflens-built"  # written into every folder :func:`building` makes: only such a folder is ever replaced


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def building(folder):
    """``with building(final) as tmp:`` write into ``tmp``; it becomes ``final`` only on success.

    An existing ``final`` is replaced only when this project built it (it holds :data:`MARKER`); any other
    folder there is refused, never deleted. Partial folders left by a build whose process died (killed,
    power cut) are removed when the next build of the same folder starts.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for old in folder.parent.glob(f".{folder.name}.partial.*"):
        try:
            pid = int((old / ".pid").read_text())
        except (OSError, ValueError):
            continue  # not one of ours with a known owner: leave it
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    if folder.exists() and not (folder / MARKER).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and was not built by this project; move it away or pick another "
                              "folder (nothing there is deleted)")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial."))
    (tmp / ".pid").write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / ".pid").unlink()
        (tmp / MARKER).write_text("")
        if folder.exists():
            if not (folder / MARKER).is_file() and (not folder.is_dir() or any(folder.iterdir())):
                raise FileExistsError(f"{folder} appeared while it was being built and was not built by this "
                                      "project; nothing there is deleted")
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
