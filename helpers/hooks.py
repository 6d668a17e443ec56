"""Scoped hooks at named sites of a U-Net; by default the bottleneck, the mid-block output ``h`` ("h-space").

Introduced in chapter 2. In the spirit of TransformerLens' ``hooks()``: every hook lives
inside a ``with`` block and is removed in ``finally``, so an exception in a cell never
leaves a hook on the model.

* :func:`capture` records ``h`` at every UNet call (or a chosen subset of sampling steps),
  with the step index and timestep.
* :func:`edit` replaces ``h`` by ``fn(h, info)`` while sampling.

Works on any diffusers ``UNet2DModel`` or ``UNet2DConditionModel``. Every function takes a
``site`` (:func:`sites` lists them): ``"mid_block"`` (the default), a down or up block, one of their
resnets or attentions, or a skip tensor an up block receives (``"up_blocks.0.skips.1"``). Under
classifier-free guidance (:func:`guided`) they see only the conditional half of each batch.
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
    """Captured activations at a hook site, one entry per captured UNet call."""

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


_BOTH = "_difflens_edit_both_halves"  # attribute set on a UNet whose guided edits also change the unconditional half


@contextmanager
def both_halves(unet):
    """Inside this block an edit under classifier-free guidance is applied to **both** halves of each guided batch —
    the same per-sample edit to the unconditional and the conditional rows (``fn`` is called on the conditional half
    first, then on the unconditional one) — the ablation of :func:`guided`'s default, which edits the conditional
    half only. Capture still records the conditional half only. Outside guided calls it changes nothing."""
    old = getattr(unet, _BOTH, False)
    setattr(unet, _BOTH, True)
    try:
        yield unet
    finally:
        setattr(unet, _BOTH, old)


DEFAULT_SITE = "mid_block"  # the U-Net bottleneck, DiffLens' h-space


def _skip_site(site: str):
    """``"up_blocks.1.skips.0"`` → ``("up_blocks.1", 0)``; any other name → ``(site, None)``."""
    parts = site.split(".")
    if len(parts) >= 2 and parts[-2] == "skips" and parts[-1].lstrip("-").isdigit():
        return ".".join(parts[:-2]), int(parts[-1])
    return site, None


def sites(unet) -> list[str]:
    """The hook sites of ``unet``, TransformerLens-style names for where :func:`capture` and :func:`edit` can act.

    * a module path — its output (for a block returning a tuple, the hidden states passed on to the next
      block): ``"mid_block"`` (the default, DiffLens' h), ``"down_blocks.2"``, ``"up_blocks.0"``,
      ``"up_blocks.0.resnets.1"``, ``"mid_block.attentions.0"``, … — any ``named_modules()`` entry works;
      this list holds the blocks and their resnets and attentions;
    * ``"up_blocks.<i>.skips.<j>"`` — the ``j``-th skip tensor the up block ``i`` receives from the down
      path (its ``res_hidden_states_tuple[j]``; the block consumes them from the last one).
    """
    out = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        mod = getattr(unet, part, None)
        if mod is None:
            continue
        blocks = [(part, mod)] if part == "mid_block" else [(f"{part}.{i}", b) for i, b in enumerate(mod)]
        for name, b in blocks:
            out.append(name)
            for sub in ("resnets", "attentions"):
                for j, m in enumerate(getattr(b, sub, None) or []):
                    if m is not None:
                        out.append(f"{name}.{sub}.{j}")
            if part == "up_blocks":
                out += [f"{name}.skips.{j}" for j in range(len(getattr(b, "resnets", None) or []))]
    return out


def resolve(unet, site: str = DEFAULT_SITE) -> tuple[torch.nn.Module, int | None]:
    """The module a site hooks and, for a skip site, which skip tensor; a clear error for a bad name."""
    if not isinstance(site, str) or not site:
        raise ValueError(f"hook site must be a module name such as {DEFAULT_SITE!r}, got {site!r}")
    path, skip = _skip_site(site)
    try:
        mod = unet.get_submodule(path)
    except AttributeError:
        known = sites(unet) if isinstance(unet, torch.nn.Module) else []
        if path == DEFAULT_SITE:
            raise ValueError(
                f"{type(unet).__name__} has no `mid_block`, so it has no bottleneck to hook. Pass a diffusers "
                "UNet2DModel or UNet2DConditionModel built with a mid block, or name another site "
                f"(site=...): {known[:12]}") from None
        raise ValueError(f"hook site {site!r}: {type(unet).__name__} has no module {path!r}; sites include "
                         f"{known}") from None
    if mod is None:
        raise ValueError(f"hook site {site!r} is empty (None) in this {type(unet).__name__}")
    if skip is not None:
        n = len(getattr(mod, "resnets", None) or [])
        if not path.startswith("up_blocks.") or path.count(".") != 1:
            raise ValueError(f"hook site {site!r}: skips are what an up block receives; use up_blocks.<i>.skips.<j>")
        if not 0 <= skip < n:
            raise ValueError(f"hook site {site!r}: {path} receives {n} skip tensors (skips.0 .. skips.{n - 1})")
    return mod, skip


def _first_tensor(output):
    """The hidden states inside a module's output (a tensor, a tuple, or a diffusers output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise ValueError(f"hook site output of type {type(output).__name__} holds no tensor to capture or edit")


def _replace_first(output, new):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]])
    output.sample = new  # a diffusers BaseOutput (e.g. Transformer2DModelOutput)
    return output


def _check_not_compiled(unet, site: str) -> None:
    path, _ = _skip_site(site)
    names = [""] + [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 2)]
    for n in names:
        m = unet.get_submodule(n) if n else unet
        if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule":
            what = "the UNet" if not n else f"{n!r}"
            raise ValueError(
                f"{what} was compiled with torch.compile; hooks at {site!r} installed afterwards are silently "
                "skipped by the compiled code (dynamo does not guard on module hooks). Compile the blocks around "
                f"the site instead: helpers.models.compile_blocks(model, keep={site!r}).")


@contextmanager
def site_hooks(unet, fn: Callable[[torch.Tensor, StepInfo], torch.Tensor | None] | None = None,
               record: bool = False, steps: Iterable[int] | None = None, sink: ShardWriter | None = None,
               site: str = DEFAULT_SITE, first_step: int = 0):
    """Install a timestep tracker on ``unet`` and a hook at ``site`` (see :func:`sites`).

    ``fn(h, info)`` may return a replacement for ``h`` (``None`` keeps it). With ``record``,
    ``h`` (after ``fn``) is detached into the yielded :class:`Cache`. ``steps`` limits both to
    those UNet-call indices. With ``sink`` (a :class:`ShardWriter`), recorded activations
    stream to disk instead of the cache. Hooks are removed on exit, also after an exception.
    ``first_step`` numbers the first UNet call inside the block (a sampler resumed at step s passes s).
    """
    mod, skip = resolve(unet, site)
    _check_not_compiled(unet, site)
    keep = None if steps is None else set(int(s) for s in steps)
    cache = Cache()
    state = {"step": int(first_step) - 1, "t": None, "half": False, "both": False}

    def pre(module, args, kwargs):
        state["step"] += 1
        state["half"] = getattr(module, _GUIDED, False)  # read here, not in the site hook (torch.compile)
        state["both"] = getattr(module, _BOTH, False)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state["t"] = torch.as_tensor(t).detach().cpu() if t is not None else None

    def apply(h, info):
        """``fn`` on one block of rows; its replacement (shape checked) or ``h`` itself."""
        new = fn(h, info) if fn is not None else None
        if new is None:
            return h
        if new.shape != h.shape:
            raise ValueError(f"edit at {site!r} changed h's shape {tuple(h.shape)} -> {tuple(new.shape)}")
        return new

    def process(full):
        """``fn`` and recording on one tensor; returns the replacement or ``None``."""
        step = state["step"]
        if keep is not None and step not in keep:
            return None
        info = StepInfo(step=step, timestep=state["t"])
        half = state["half"]
        output = full
        if half:
            if full.shape[0] % 2:
                raise ValueError(f"guided UNet call with an odd batch {full.shape[0]}; expected [uncond; cond]")
            output = full[full.shape[0] // 2:]
        h = apply(output, info)
        if record and sink is not None:
            sink.add(h, step, info.timestep)
        elif record:
            cache.steps.append(step)
            cache.timesteps.append(info.timestep)
            cache.activations.append(h.detach().cpu())
        if not half:
            return None if h is output else h
        uncond = full[: full.shape[0] // 2]
        new_uncond = apply(uncond, info) if state["both"] else uncond
        if h is output and new_uncond is uncond:
            return None
        return torch.cat([new_uncond, h])

    def post(module, args, output):
        new = process(_first_tensor(output))
        return None if new is None else _replace_first(output, new)

    def pre_skip(module, args, kwargs):
        if "res_hidden_states_tuple" in kwargs:
            skips = kwargs["res_hidden_states_tuple"]
        elif len(args) > 1:
            skips = args[1]
        else:
            raise ValueError(f"hook site {site!r}: the up block was called without its skip tensors")
        new = process(skips[skip])
        if new is None:
            return None
        skips = tuple(new if i == skip % len(skips) else s for i, s in enumerate(skips))
        if "res_hidden_states_tuple" in kwargs:
            return args, {**kwargs, "res_hidden_states_tuple": skips}
        return (args[0], skips, *args[2:]), kwargs

    handles = []
    try:
        handles.append(unet.register_forward_pre_hook(pre, with_kwargs=True))
        if skip is None:
            handles.append(mod.register_forward_hook(post))
        else:
            handles.append(mod.register_forward_pre_hook(pre_skip, with_kwargs=True))
        yield cache
    finally:
        for hd in handles:
            hd.remove()



def capture(unet, steps: Iterable[int] | None = None, sink: ShardWriter | None = None, site: str = DEFAULT_SITE,
            first_step: int = 0):
    """``with capture(unet) as cache:`` records ``h`` at ``site`` at every (or each listed) UNet call.

    Pass ``sink=ShardWriter(folder)`` to stream to disk instead; call ``sink.close()`` after
    the harvest completes.
    """
    return site_hooks(unet, None, record=True, steps=steps, sink=sink, site=site, first_step=first_step)


def edit(unet, fn: Callable[[torch.Tensor, StepInfo], torch.Tensor | None], steps: Iterable[int] | None = None,
         record: bool = False, site: str = DEFAULT_SITE, first_step: int = 0):
    """``with edit(unet, fn):`` replaces ``h`` at ``site`` by ``fn(h, info)`` at every (or each listed) UNet call."""
    return site_hooks(unet, fn, record=record, steps=steps, site=site, first_step=first_step)
