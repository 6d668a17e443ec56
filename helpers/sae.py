"""TopK sparse autoencoder on bottleneck activations (chapter 3).

The SAE reads one ``h`` vector at a time: every spatial position of the mid-block output
``(batch, C, H, W)`` is a row of ``C`` channels (a 1×1 map, the paper's P2 setting).
Architecture as in Gao et al. (2024), "Scaling and evaluating sparse autoencoders":

    x̃ = x / input_scale − b_dec
    z = ReLU(TopK(W_enc x̃ + b_enc))               (k active latents per row)
    x̂ = (W_decᵀ z + b_dec) · input_scale           (decoder rows kept unit-norm)

``b_dec`` is subtracted before encoding and added after decoding, the same way in
training and in use (one code path: :meth:`TopKSAE.encode_topk` / :meth:`TopKSAE.decode_topk`).
``input_scale`` is a fixed scalar set from the data once, so the SAE's hyper-parameters do not
depend on the model's activation scale; callers always work in the model's raw units.

Training decodes only the ``k`` active latents of each row (an ``embedding_bag`` over the
decoder rows) and recomputes only those ``k`` encoder pre-activations with gradient, so a
step costs ``O(batch · k · C)`` beyond the one no-grad encoder matmul that picks the TopK —
instead of the dense ``O(batch · latents · C)`` of a 1×1-conv SAE (:meth:`TopKSAE.forward_dense`
keeps that formulation for comparison; ``bench/sae_speed.py`` times both).

AuxK (Gao et al. §A.2): latents that have not fired for ``dead_rows`` rows are "dead"; the
top ``aux_k`` of them per row are asked to reconstruct the main reconstruction's residual,
which gives them gradient and brings them back. ``aux_k=0`` turns it off (what the paper's
released code did); chapter 3 shows the dead share both ways.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import io


@dataclass
class SAEConfig:
    """Shape of a TopK SAE."""

    d_in: int  # channels of h (the bottleneck width)
    expansion: int = 8  # latents = expansion · d_in
    k: int = 8  # active latents per row
    site: str = "mid_block"  # the hook site whose activations it reads (helpers.hooks.sites)

    @property
    def d_sae(self) -> int:
        return self.expansion * self.d_in

    def __post_init__(self):
        if self.d_in < 1 or self.expansion < 1:
            raise ValueError(f"SAEConfig: d_in and expansion must be ≥ 1, got {self.d_in}, {self.expansion}")
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"SAEConfig: k must be in 1..{self.d_sae} (the number of latents), got {self.k}")


@dataclass
class SAETrainConfig:
    """How to train it."""

    steps: int = 5000  # optimizer steps
    batch_size: int = 4096  # rows per step
    lr: float = 4e-4  # Adam peak learning rate
    warmup_steps: int = 100  # linear warm-up
    decay_start: float = 0.8  # linear decay to 0 over the last 20% of steps
    aux_k: int = 64  # dead latents used by AuxK per row (Gao et al.: d_in / 2); 0 turns AuxK off
    aux_coef: float = 1 / 32  # weight of the AuxK loss
    dead_rows: int = 500_000  # a latent is dead when it has not fired in this many training rows
    log_every: int = 50  # history interval (steps)
    tied_init: bool = True  # encoder starts as the decoder's transpose (False: independent random encoder)
    seed: int = 0


class _SelectedPre(torch.autograd.Function):
    """The TopK pre-activations ``(N, k)`` with a sparse backward.

    Forward takes them from the no-grad encoder matmul that chose them (no extra work).
    Backward touches only the ``k`` selected encoder rows per input row: the encoder-weight
    gradient is one sparse × dense product (``N·k·d`` multiply-adds instead of ``N·latents·d``),
    and the input gradient (which reaches ``b_dec``) is an ``embedding_bag``.
    """

    @staticmethod
    def forward(ctx, xc, w_enc, b_enc, idx, selected):
        ctx.save_for_backward(xc, w_enc, idx)
        return selected.clone()

    @staticmethod
    def backward(ctx, g):
        xc, w_enc, idx = ctx.saved_tensors
        n, k = idx.shape
        m = w_enc.shape[0]
        rows = idx.reshape(-1)
        gflat = g.reshape(-1).contiguous()
        g_w = g_b = g_x = None
        if ctx.needs_input_grad[1]:
            cols = torch.arange(n, device=g.device).repeat_interleave(k)
            gt = torch.sparse_coo_tensor(torch.stack([rows, cols]), gflat, (m, n), check_invariants=False)
            g_w = torch.sparse.mm(gt, xc)
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, rows, gflat)
        if ctx.needs_input_grad[0]:
            g_x = F.embedding_bag(idx, w_enc, per_sample_weights=g.contiguous(), mode="sum")
        return g_x, g_w, g_b, None, None


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder over rows of ``d_in`` channels."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        m, d = cfg.d_sae, cfg.d_in
        w = torch.randn(m, d)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # (latents, d_in), unit-norm rows
        self.W_enc = nn.Parameter(w.clone())  # (latents, d_in), tied at init
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))

    # ---- shapes -------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str = "x") -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"TopKSAE: this SAE reads {self.cfg.d_in}-channel rows but {what} has {x.shape[-1]} "
                f"(shape {tuple(x.shape)}). The SAE belongs to another model's bottleneck: harvest this "
                "model's h and train an SAE on it, or load the SAE that was trained on this model.")

    def check_h(self, h: torch.Tensor, site: str | None = None) -> None:
        """Raise a clear error when ``h`` ``(batch, channels, H, W)`` captured at ``site`` is not what this SAE reads."""
        site = site or self.cfg.site
        if site != self.cfg.site:
            raise ValueError(f"TopKSAE: the SAE was trained on activations at {self.cfg.site!r}, not at {site!r}; "
                             "edit at its own site or train an SAE on the activations at that site")
        if h.ndim != 4 or h.shape[1] != self.cfg.d_in:
            raise ValueError(
                f"TopKSAE: the SAE was trained on {self.cfg.d_in}-channel activations at {self.cfg.site!r}, but h at "
                f"{site!r} has shape {tuple(h.shape)}; train an SAE on this model's activations at that site "
                "(chapter 3, or the runner's sae stage) or load the one that goes with it.")

    # ---- encode / decode (normalized units inside) ----------------------------------------
    def _pre(self, xn: torch.Tensor) -> torch.Tensor:
        return F.linear(xn - self.b_dec, self.W_enc, self.b_enc)

    def encode_topk(self, x: torch.Tensor, return_pre: bool = False):
        """Rows ``(N, d_in)`` → ``(values, indices)`` of the ``k`` active latents, each ``(N, k)``.

        Values are ≥ 0 (ReLU after TopK). With gradients enabled, only the selected ``k``
        pre-activations are recomputed with autograd (sparse backward).
        """
        self._check(x)
        xn = x / self.input_scale
        grad = torch.is_grad_enabled() and self.W_enc.requires_grad
        with torch.no_grad():
            pre = self._pre(xn)
            top = pre.topk(self.cfg.k, dim=-1)
        idx = top.indices
        if grad:
            vals = _SelectedPre.apply(xn - self.b_dec, self.W_enc, self.b_enc, idx, top.values)
        else:
            vals = top.values
        vals = F.relu(vals)
        return (vals, idx, pre) if return_pre else (vals, idx)

    def decode_topk(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(values, indices)`` → reconstructed rows ``(N, d_in)`` in raw units."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        return (out + self.b_dec) * self.input_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent codes ``(N, latents)`` (zeros except the ``k`` active ones)."""
        vals, idx = self.encode_topk(x)
        return torch.zeros(len(x), self.cfg.d_sae, dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latent codes ``(N, latents)`` → rows ``(N, d_in)`` in raw units (any z, e.g. edited)."""
        if z.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"TopKSAE.decode: expected {self.cfg.d_sae} latents, got {z.shape[-1]}")
        return (z @ self.W_dec + self.b_dec) * self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_topk(*self.encode_topk(x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward 1×1-conv formulation (dense matmuls over all latents), for comparison."""
        self._check(x)
        xn = x / self.input_scale
        pre = self._pre(xn)
        top = pre.topk(self.cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        return (z @ self.W_dec + self.b_dec) * self.input_scale

    # ---- h maps -----------------------------------------------------------------------------
    def latents_of(self, h: torch.Tensor) -> torch.Tensor:
        """Mid-block output ``(B, C, H, W)`` → dense latent maps ``(B, latents, H, W)``."""
        self._check(h.movedim(1, -1), "h")
        z = self.encode(to_rows(h))
        return from_rows(z, h.shape)

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """Mid-block output ``(B, C, H, W)`` → its SAE reconstruction, same shape."""
        self._check(h.movedim(1, -1), "h")
        return from_rows(self(to_rows(h)), h.shape)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def to_rows(h: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·H·W, C)``: one row per spatial position."""
    if h.ndim != 4:
        raise ValueError(f"to_rows: expected h of shape (batch, channels, height, width), got {tuple(h.shape)}")
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


def from_rows(rows: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a map of ``shape`` = (B, ·, H, W); the row width may differ from C."""
    b, _, hh, ww = shape
    return rows.reshape(b, hh, ww, rows.shape[-1]).permute(0, 3, 1, 2)


# ---- metrics ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(sae: TopKSAE, rows: torch.Tensor, batch_size: int = 16384) -> dict:
    """FVU, mean L0 and dead share (latents that never fire on ``rows``) on held-out rows."""
    rows = rows.float()
    mu = rows.mean(0)
    sse, sst, l0, n = 0.0, 0.0, 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=rows.device)
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size]
        vals, idx = sae.encode_topk(x)
        xh = sae.decode_topk(vals, idx)
        sse += (x - xh).pow(2).sum().item()
        sst += (x - mu).pow(2).sum().item()
        l0 += (vals > 0).sum().item()
        fired[idx[vals > 0]] = True
        n += len(x)
    return {"fvu": sse / sst, "l0": l0 / n, "dead_share": 1 - fired.float().mean().item(), "rows": n}


# ---- training -------------------------------------------------------------------------------------
def train_sae(rows: torch.Tensor, cfg: SAEConfig, tc: SAETrainConfig | None = None, progress: bool = True,
              desc: str = "train SAE", dense: bool = False) -> tuple[TopKSAE, list[dict]]:
    """Train a TopK SAE on ``rows`` ``(N, d_in)`` (any float dtype); returns ``(sae, history)``.

    ``dense=True`` runs the same loop with the dense 1×1-conv formulation of the main
    reconstruction (same loss and gradients, more arithmetic); it exists for ``bench/``.

    ``history`` has one dict per ``log_every`` steps: step, fvu (on the training batch),
    l0, dead_share (not fired in the last ``dead_rows`` rows), aux (AuxK loss), lr.
    """
    tc = tc or SAETrainConfig()
    if rows.ndim != 2 or rows.shape[1] != cfg.d_in:
        raise ValueError(f"train_sae: rows must be (N, {cfg.d_in}); got {tuple(rows.shape)}. "
                         "Use sae.to_rows(h) to turn (B, C, H, W) activations into rows.")
    if not isinstance(tc.steps, int) or tc.steps < 1:
        raise ValueError(f"train_sae: steps must be an integer ≥ 1, got {tc.steps!r} (0 would return an untrained SAE)")
    if not isinstance(tc.batch_size, int) or tc.batch_size < 1:
        raise ValueError(f"train_sae: batch_size must be an integer ≥ 1, got {tc.batch_size!r}")
    bad = sum(int((~torch.isfinite(rows[i:i + 65536])).any(1).sum()) for i in range(0, len(rows), 65536))
    if bad:
        raise ValueError(f"train_sae: {bad} of {len(rows)} rows hold NaN or inf; the activations are broken "
                         "(check the harvest's dtype, e.g. float16 overflow) — an SAE trained on them would be NaN")
    if len(rows) < tc.batch_size:
        raise ValueError(f"train_sae: {len(rows)} rows is fewer than one batch ({tc.batch_size}); "
                         "harvest more activations or lower batch_size")
    g = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    dev = rows.device  # the SAE trains where its rows are; random draws stay on the CPU generator
    sae = TopKSAE(cfg).to(dev)
    m = cfg.d_sae
    with torch.no_grad():  # data-dependent init: scale, b_dec at the mean, encoder tied to decoder
        probe = rows[torch.randperm(len(rows), generator=g)[:65536]].float()
        scale = probe.pow(2).sum(1).mean().div(cfg.d_in).sqrt()
        if not float(probe.var(0).sum()) > 0:
            raise ValueError("train_sae: every row is the same (zero variance): there is nothing to learn; check "
                             "that the harvest captured the right site and samples")
        sae.input_scale.fill_(scale)
        sae.b_dec.copy_(probe.mean(0) / scale)
        if not tc.tied_init:
            w = torch.randn(m, cfg.d_in, generator=g)
            sae.W_enc.copy_(w / w.norm(dim=1, keepdim=True))
    opt = torch.optim.Adam(sae.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=6.25e-10)

    def lr_at(s):
        warm = min(1.0, (s + 1) / max(1, tc.warmup_steps))
        start = int(tc.decay_start * tc.steps)
        decay = 1.0 if s < start else max(0.0, (tc.steps - s) / max(1, tc.steps - start))
        return tc.lr * warm * decay

    since = torch.zeros(m, dtype=torch.long, device=dev)  # rows since each latent last fired
    history: list[dict] = []
    acc = {"fvu": 0.0, "l0": 0.0, "aux": 0.0, "n": 0}
    t0 = time.time()
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        idx_rows = torch.randint(0, len(rows), (tc.batch_size,), generator=g)
        x = rows[idx_rows].float()
        xn = x / sae.input_scale
        if dense:
            pre_g = sae._pre(xn)
            top = pre_g.topk(cfg.k, dim=-1)
            vals, idx, pre = F.relu(top.values), top.indices, pre_g.detach()
            z = torch.zeros_like(pre_g).scatter(1, idx, vals)
            recon = z @ sae.W_dec + sae.b_dec
        else:
            vals, idx, pre = sae.encode_topk(x, return_pre=True)
            recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        err = xn - recon
        var = (xn - xn.mean(0)).pow(2).sum(1).mean()
        fvu = err.pow(2).sum(1).mean() / var
        loss = fvu
        if not torch.isfinite(fvu):
            raise ValueError(f"train_sae: the loss became {float(fvu.detach())} at step {step}; lower lr ({tc.lr}) or check "
                             "the rows for extreme values")
        aux_val = 0.0
        dead = since >= tc.dead_rows
        n_dead = int(dead.sum())
        if tc.aux_k > 0 and n_dead > 0:
            ka = min(tc.aux_k, n_dead)
            masked = pre.masked_fill(~dead, float("-inf"))
            atop = masked.topk(ka, dim=-1)
            aidx = atop.indices
            avals = F.relu(_SelectedPre.apply(xn - sae.b_dec, sae.W_enc, sae.b_enc, aidx, atop.values))
            e = err.detach()
            ehat = F.embedding_bag(aidx, sae.W_dec, per_sample_weights=avals, mode="sum")
            aux = (e - ehat).pow(2).sum(1).mean() / e.pow(2).sum(1).mean().clamp_min(1e-12)
            loss = loss + tc.aux_coef * aux
            aux_val = aux.item()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial gradient
            gw = sae.W_dec.grad
            if gw is not None:
                gw.sub_((gw * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            hit = torch.zeros(m, dtype=torch.bool, device=dev)
            hit[idx[vals > 0]] = True
            since += tc.batch_size
            since[hit] = 0
        acc["fvu"] += fvu.item()
        acc["l0"] += (vals > 0).float().sum(1).mean().item()
        acc["aux"] += aux_val
        acc["n"] += 1
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            k = acc["n"]
            rec = {"step": step + 1, "fvu": acc["fvu"] / k, "l0": acc["l0"] / k, "aux": acc["aux"] / k,
                   "dead_share": float(dead.float().mean()), "lr": lr_at(step), "seconds": time.time() - t0}
            history.append(rec)
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", dead=f"{rec['dead_share']:.2f}")
            acc = {"fvu": 0.0, "l0": 0.0, "aux": 0.0, "n": 0}
    bar.close()
    sae.eval()
    return sae, history


# ---- save / load ------------------------------------------------------------------------------------
def _digest(cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the config and the weights together: metadata edited after saving no longer matches."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_sae(sae: TopKSAE, path, meta: dict | None = None) -> Path:
    """Write weights and config (plus ``meta``, e.g. training settings and history) atomically."""
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    cfg = asdict(sae.cfg)
    return io.save_tensors(path, tensors, meta={"sae_config": cfg, "digest": _digest(cfg, tensors), **(meta or {})})


def load_sae(path) -> tuple[TopKSAE, dict]:
    """Read an SAE written by :func:`save_sae`; returns ``(sae, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_sae: no SAE file at {path}; train one (chapter 3) or fix the path")
    tensors, meta = io.load_tensors(path)  # names the file when it is truncated or not safetensors
    if "sae_config" not in meta:
        raise ValueError(f"load_sae: {path} has no 'sae_config' in its metadata, so it was not written by save_sae")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"load_sae: {path} holds NaN or inf in {bad}; retrain or restore it")
    cfg = meta.pop("sae_config")
    digest = meta.pop("digest", None)
    if digest is not None and digest != _digest(cfg, tensors):
        raise ValueError(f"load_sae: {path}'s config or weights were changed after it was saved (digest mismatch); "
                         "retrain or restore it")
    try:
        sae = TopKSAE(SAEConfig(**cfg))
        sae.load_state_dict(tensors, strict=True)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"load_sae: {path}'s config does not fit its weights ({e})") from None
    sae.eval()
    return sae, meta


def scaled_k(d_in: int, ref_k: int = 32, ref_d_in: int = 512) -> int:
    """k for a ``d_in``-channel bottleneck at the paper's P2 ratio (k=32 active of 512·8 latents)."""
    return max(1, round(ref_k * d_in / ref_d_in))
