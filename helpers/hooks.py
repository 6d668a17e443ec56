"""Scoped hooks on the U-Net bottleneck: the mid-block output ``h`` ("h-space").

Introduced in chapter 2. In the spirit of TransformerLens' ``hooks()``: every hook lives
inside a ``with`` block and is removed in ``finally``, so an exception in a cell never
leaves a hook on the model.

* :func:`capture` records ``h`` at every UNet call (or a chosen subset of sampling steps),
  with the step index and timestep.
* :func:`edit` replaces ``h`` by ``fn(h, info)`` while sampling.

Works on any diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (anything with a
``mid_block``). Under classifier-free guidance (:func:`guided`) they see only the conditional
half of each batch.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import io


@dataclass
class StepInfo:
    """Where sampling is when a hook fires."""

    step: int  # index of the UNet call inside this ``with`` block (0, 1, ...)
    timestep: torch.Tensor  # the timestep passed to the UNet (scalar or (batch,))


@dataclass
class Cache:
    """Captured bottleneck activations, one entry per captured UNet call."""

    steps: list[int] = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)
    activations: list[torch.Tensor] = field(default_factory=list)  # each (batch, channels, height, width)

    def stack(self) -> torch.Tensor:
        """All captures as ``(n_steps, batch, channels, height, width)`` (same batch per step)."""
        if not self.activations:
            raise ValueError("Cache.stack: nothing was captured (did sampling run inside the `with` block?)")
        return torch.stack(self.activations)


class ShardWriter:
    """Streams captured activations to ``folder`` in safetensors shards of ``rows`` samples.

    Memory holds at most one shard. Each shard is written atomically, and ``manifest.json``
    is written only by :meth:`close`, so an interrupted harvest leaves a folder that
    :func:`load_shards` refuses instead of a half-written one it would trust.
    """

    def __init__(self, folder, rows: int = 4096, meta: dict | None = None, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        if (self.folder / "manifest.json").exists() or any(self.folder.glob("shard-*.safetensors")):
            raise FileExistsError(f"ShardWriter: {self.folder} already holds shards; pass an empty or new folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows, self.meta, self.dtype = int(rows), dict(meta or {}), dtype
        self._buf: dict[str, list[torch.Tensor]] = {"h": [], "step": [], "timestep": [], "sample": []}
        self._n_buf, self.shards, self.total = 0, [], 0

    def add(self, h: torch.Tensor, step: int, timestep: torch.Tensor | None,
            sample: torch.Tensor | None = None) -> None:
        """Queue ``h`` ``(batch, channels, height, width)`` captured at ``step``/``timestep``.

        ``sample`` (``(batch,)`` ints) names the sample of each row; ``-1`` when not given.
        """
        b = len(h)
        t = torch.as_tensor(timestep if timestep is not None else -1).float().flatten()
        self._buf["h"].append(h.detach().to("cpu", self.dtype))
        self._buf["sample"].append(torch.full((b,), -1, dtype=torch.long) if sample is None
                                   else torch.as_tensor(sample, dtype=torch.long).flatten().clone())
        self._buf["step"].append(torch.full((b,), int(step), dtype=torch.long))
        self._buf["timestep"].append(t.expand(b).clone() if t.numel() == 1 else t[:b].clone())
        self._n_buf += b
        if self._n_buf >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self._n_buf:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        io.save_tensors(self.folder / name, {k: torch.cat(v) for k, v in self._buf.items()})
        self.shards.append({"file": name, "rows": self._n_buf})
        self.total += self._n_buf
        self._buf = {k: [] for k in self._buf}
        self._n_buf = 0

    def close(self) -> None:
        """Write the last shard and the manifest that marks the harvest complete."""
        self.flush()
        io.write_json(self.folder / "manifest.json", {"shards": self.shards, "rows": self.total, "meta": self.meta})


def load_shards(folder) -> dict[str, torch.Tensor]:
    """Concatenate a completed harvest: ``{"h": (rows, C, H, W), "step", "timestep", "sample": (rows,)}``."""
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.is_file():
        raise FileNotFoundError(
            f"load_shards: {folder} has no manifest.json, so its harvest never finished; "
            "delete the folder and harvest again")
    shards = json.loads(man.read_text())["shards"]
    parts = [io.load_tensors(folder / s["file"])[0] for s in shards]
    return {k: torch.cat([p[k] for p in parts]) for k in ("h", "step", "timestep", "sample")}


_GUIDED = "_difflens_guided"  # attribute set on a UNet while it runs classifier-free guided batches


@contextmanager
def guided(unet, active: bool = True):
    """Mark ``unet``'s calls inside the block as classifier-free-guided batches ``[uncond; cond]``.

    diffusers' text-to-image pipelines run the unconditional and the conditional (prompt) halves
    of a guided step as one batch, in that order. Inside this block the bottleneck hooks see and
    edit only the **conditional half** and pass the unconditional half through untouched:

    * the prompt's content (a doctor's gender, say) lives in the conditional activations; the
      unconditional half is the same for every prompt, so capturing it would mix prompt-free
      activations into the SAE's and the probe's training data;
    * guidance output is ``ε_u + g·(ε_c − ε_u)``: an edit of the conditional half alone is
      amplified by ``g``, while the same edit on both halves would largely cancel in the
      difference — editing only ``cond`` is also what DiffLens' released SD code does.

    Capture records and ``fn`` receive ``(batch, C, H, W)`` for the conditional samples only.
    """
    old = getattr(unet, _GUIDED, False)
    setattr(unet, _GUIDED, bool(active))
    try:
        yield unet
    finally:
        setattr(unet, _GUIDED, old)


def _mid_block(unet) -> torch.nn.Module:
    mid = getattr(unet, "mid_block", None)
    if mid is None:
        raise ValueError(
            f"{type(unet).__name__} has no `mid_block`, so it has no bottleneck to hook. "
            "Pass a diffusers UNet2DModel or UNet2DConditionModel built with a mid block."
        )
    return mid


@contextmanager
def bottleneck_hooks(unet, fn: Callable[[torch.Tensor, StepInfo], torch.Tensor | None] | None = None,
                     record: bool = False, steps: Iterable[int] | None = None, sink: ShardWriter | None = None):
    """Install a timestep tracker on ``unet`` and a forward hook on its mid block.

    ``fn(h, info)`` may return a replacement for ``h`` (``None`` keeps it). With ``record``,
    ``h`` (after ``fn``) is detached into the yielded :class:`Cache`. ``steps`` limits both to
    those UNet-call indices. With ``sink`` (a :class:`ShardWriter`), recorded activations
    stream to disk instead of the cache. Hooks are removed on exit, also after an exception.
    """
    mid = _mid_block(unet)
    for m, what in ((unet, "the UNet"), (mid, "its mid block")):
        if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule":
            raise ValueError(
                f"{what} was compiled as a whole with torch.compile; hooks installed afterwards are silently "
                "skipped by the compiled code (dynamo does not guard on module hooks). Compile the blocks around "
                "the bottleneck instead: helpers.models.compile_blocks(model).")
    keep = None if steps is None else set(int(s) for s in steps)
    cache = Cache()
    state = {"step": -1, "t": None, "half": False}

    def pre(module, args, kwargs):
        state["step"] += 1
        state["half"] = getattr(module, _GUIDED, False)  # read here, not in the mid-block hook (torch.compile)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state["t"] = torch.as_tensor(t).detach().cpu() if t is not None else None

    def post(module, args, output):
        step = state["step"]
        if keep is not None and step not in keep:
            return None
        info = StepInfo(step=step, timestep=state["t"])
        full = output
        half = state["half"]
        if half:
            if output.shape[0] % 2:
                raise ValueError(f"guided UNet call with an odd batch {output.shape[0]}; expected [uncond; cond]")
            output = full[full.shape[0] // 2:]
        h = output
        if fn is not None:
            new = fn(h, info)
            if new is not None:
                if new.shape != h.shape:
                    raise ValueError(f"bottleneck edit changed h's shape {tuple(h.shape)} -> {tuple(new.shape)}")
                h = new
        if record and sink is not None:
            sink.add(h, step, info.timestep)
        elif record:
            cache.steps.append(step)
            cache.timesteps.append(info.timestep)
            cache.activations.append(h.detach().cpu())
        if h is output:
            return None
        return torch.cat([full[: full.shape[0] // 2], h]) if half else h

    handles = []
    try:
        handles.append(unet.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mid.register_forward_hook(post))
        yield cache
    finally:
        for hd in handles:
            hd.remove()


def capture(unet, steps: Iterable[int] | None = None, sink: ShardWriter | None = None):
    """``with capture(unet) as cache:`` records ``h`` at every (or each listed) UNet call.

    Pass ``sink=ShardWriter(folder)`` to stream to disk instead; call ``sink.close()`` after
    the harvest completes.
    """
    return bottleneck_hooks(unet, None, record=True, steps=steps, sink=sink)


def edit(unet, fn: Callable[[torch.Tensor, StepInfo], torch.Tensor | None], steps: Iterable[int] | None = None,
         record: bool = False):
    """``with edit(unet, fn):`` replaces ``h`` by ``fn(h, info)`` at every (or each listed) UNet call."""
    return bottleneck_hooks(unet, fn, record=record, steps=steps)
