"""Activation patching across sampling: a recipient's trajectory run with a donor's activations at named sites.

Introduced in the chapter "Where each attribute lives". The causal question it answers: if the activations at a
site (the bottleneck ``h``, a down block's output, the skip tensors an up block receives, …) over some sampling
steps were those of another sample's clean run, does the recipient's image take the donor's attribute? It is the
reference for an edit at that site and window: the effect of writing there what a natural sample of the other class
has (an edit that writes more than any sample has can exceed it, at a price in leakage).

* :func:`record` — a clean run of the donors, keeping the activations at ``sites`` for the steps of ``window``;
* :func:`run_patched` — the recipients' run in which, at each step of the window, every site's output is replaced
  by the donor's (row ``i`` of the recipients gets donor ``i``).

Both accept a sampler resumed at ``start_step`` (see :func:`helpers.models.sample`): a window that begins at step
``s`` need not re-run the recipient's steps before it. Hooks live in ``with`` blocks (:func:`helpers.hooks.site_hooks`),
so they are removed after an error too. Pixel models only (the same restriction as resuming).

Patching a sample with its own recorded activations gives its clean image bit for bit (tested), and so does a
patch at a module the forward pass never calls.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Iterable, Sequence

import torch

from . import hooks, models

Acts = dict[str, dict[int, torch.Tensor]]  # site -> step -> (n, C, H, W)


def _window(window: Iterable[int] | None, steps: int) -> list[int]:
    w = sorted(set(range(steps) if window is None else (int(s) for s in window)))
    bad = [s for s in w if not 0 <= s < steps]
    if bad:
        raise ValueError(f"patching: window steps {bad} are outside the sampled steps 0..{steps - 1}")
    return w


@torch.no_grad()
def record(model: models.Diffusion, noise: torch.Tensor, sites: Sequence[str], steps: int,
           window: Iterable[int] | None = None, batch_size: int = 128, start_step: int = 0, bar=None) -> Acts:
    """Clean sampling of ``noise`` (the state entering ``start_step``), keeping each site's output at the steps of
    ``window`` (default: every step) as float32 on the CPU: ``{site: {step: (n, C, H, W)}}``."""
    if model.text_conditioned:
        raise ValueError("patching.record: pixel models only (text-to-image sampling runs through the pipeline)")
    w = [s for s in _window(window, steps) if s >= start_step]
    for s in sites:
        hooks.resolve(model.unet, s)  # one clear error for a bad site name before any sampling
    parts: dict[str, dict[int, list[torch.Tensor]]] = {s: {t: [] for t in w} for s in sites}
    for b in range(0, len(noise), batch_size):
        with ExitStack() as stack:
            caches = {s: stack.enter_context(hooks.site_hooks(model.unet, record=True, steps=w, site=s,
                                                               first_step=start_step)) for s in sites}
            models.sample(model, noise=noise[b:b + batch_size], steps=steps, batch_size=batch_size,
                          start_step=start_step, bar=bar, progress=False)
        for s, c in caches.items():
            for t, a in zip(c.steps, c.activations):
                parts[s][t].append(a.float())
    return {s: {t: torch.cat(v) for t, v in d.items() if v} for s, d in parts.items()}


@torch.no_grad()
def run_patched(model: models.Diffusion, noise: torch.Tensor, donor: Acts, steps: int,
                window: Iterable[int] | None = None, batch_size: int = 128, start_step: int = 0,
                bar=None, mix: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor] | None = None) -> torch.Tensor:
    """Sample the recipients (``noise``: their state entering ``start_step``) with every site of ``donor`` replaced,
    at each step of ``window``, by the donor's recorded output (row ``i`` ← donor ``i``). Images in [0, 1].

    ``mix(h, h_donor, site)`` replaces the plain transplant: it gets the recipient's own activation at that moment
    and the donor's, and returns what the site outputs instead — e.g. the donor's SAE reconstruction, or the
    recipient's h moved by the difference of a few SAE latents (a transplant confined to those latents).

    ``window`` must lie within ``start_step .. steps - 1`` and the donor must hold every site at every step of it."""
    if model.text_conditioned:
        raise ValueError("patching.run_patched: pixel models only")
    w = _window(window, steps)
    if w and w[0] < start_step:
        raise ValueError(f"run_patched: the window starts at step {w[0]}, before the resumed sampler's first step "
                         f"{start_step}; resume at or before the window's first step")
    for s, d in donor.items():
        hooks.resolve(model.unet, s)
        missing = [t for t in w if t not in d]
        if missing:
            raise ValueError(f"run_patched: the donor recorded no {s!r} at steps {missing}; record them first")
        if any(len(d[t]) != len(noise) for t in w):
            raise ValueError(f"run_patched: {len(noise)} recipients but the donor's {s!r} has "
                             f"{len(d[w[0]])} rows; pair every recipient with one donor")
    outs = []
    for b in range(0, len(noise), batch_size):
        def put(site, b=b):
            def fn(h, info):
                d = donor[site][info.step][b:b + len(h)].to(h.device, h.dtype)
                return d if mix is None else mix(h, d, site)
            return fn

        with ExitStack() as stack:
            for s in donor:
                stack.enter_context(hooks.site_hooks(model.unet, put(s), steps=w, site=s, first_step=start_step))
            outs.append(models.sample(model, noise=noise[b:b + batch_size], steps=steps, batch_size=batch_size,
                                      start_step=start_step, bar=bar, progress=False))
    return torch.cat(outs) if outs else noise.new_zeros((0, 3, model.sample_size, model.sample_size))


def transfer(recipient: torch.Tensor, donor: torch.Tensor, patched: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair outcomes of one attribute (judged classes, ``(n,)`` each):

    * ``differ`` — donor and recipient differ (the pairs a transfer rate is read on);
    * ``took`` — the patched recipient has the donor's class (read among ``differ``: the transfer rate);
    * ``changed`` — the patched recipient's class is not its own (among pairs that agree: damage, not transfer)."""
    recipient, donor, patched = (torch.as_tensor(x).long() for x in (recipient, donor, patched))
    if not recipient.shape == donor.shape == patched.shape:
        raise ValueError("transfer: recipient, donor and patched classes must have the same shape")
    return {"differ": recipient != donor, "took": patched == donor, "changed": patched != recipient}
