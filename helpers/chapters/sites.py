"""Chapter "Where each attribute lives": a causal site-and-step map of the embedded U-Net, with the world's ground truth.

**Question.** Chapters 4–6 edit the bottleneck ``h`` and find that gender and age move but skin tone barely does.
Is tone not *in* ``h`` (so no edit there can move it), or do the features and edits fall short of what ``h``
carries? Activation patching answers the first half: give a recipient's trajectory a donor's clean activations at
a site over a window of steps and read, with the judge, whether the recipient takes the donor's class.

**Pairs** (:func:`pairs`). A pool of :data:`POOL_N` clean samples (seed :data:`POOL_SEED`, never used elsewhere) is
sampled and judged once. For each social attribute, :data:`PAIRS_PER` recipients are drawn from the pool and each
gets a donor whose judged class of that attribute differs: the donor's class uniformly among the recipient's other
classes, then a pool member of that class at random. Everything else about the donor is whatever it happens to be,
so the same pairs also read the other attributes wherever donor and recipient happen to differ (their counts are
in every table). Pairs of the three attributes are interleaved so that any finished chunk holds all three.

**Reading** (:func:`transfer_table`). For an attribute and a patch: among pairs whose donor and recipient differ in
it, the share in which the patched recipient takes the donor's class (the *transfer rate*, Wilson 95% CI); among
pairs that agree, the share whose class changed anyway (*damage*). A patch cannot separate an attribute from the
rest of the donor: it moves whatever the site carries. A patch that replaces every input of the up path makes the
UNet's output the donor's whatever the recipient's ``x_t`` (:data:`CONFOUNDED`); the sampler combines it with the
recipient's own ``x_t``, so it is incoherent rather than an upper bound: it locates nothing. The same holds for any
patch of the 32×32 skip tensors over late steps: they carry ``x_t`` itself, and the donor's turn the image to noise.

**Sites** (:data:`GROUPS`): each down block's output on the main path (its skip tensors stay the recipient's),
the bottleneck ``mid_block`` (DiffLens' h), the first two up blocks' outputs, the skip tensors each up block
receives, all skips, and h together with all skips. Main-path sites are *nested*: a patch at ``down_blocks.k``
makes everything computed from it the donor's too (the later down blocks, their skip tensors, h), so
``down_blocks.2`` (the mid block's input) gives h exactly as the ``mid_block`` patch does — a built-in check — and
``up_blocks.i`` carries h plus the skips of the up blocks up to ``i``. **Windows** (:data:`WINDOWS`): every step, chapter 7's edit
window (steps 8–24), and finer windows for h. A window that starts at step ``s`` resumes the recipient from its
clean state entering ``s`` (:func:`helpers.patching.run_patched`), so it costs ``25 − s`` passes.

**Cells** (``cells/<config>_c<chunk>.safetensors``): the patched recipients' judged classes (uint8) of every
attribute for one chunk of :data:`CHUNK` pairs, and for chunk 0 the first :data:`SHOW` images. Resumable and
atomic; donors are recorded again per chunk (their activations are not stored: ≈ 1.4 GB per chunk in RAM).

Cost (measured; every cell's header records its ``seconds`` and UNet ``passes``): the pool pass ≈ 9 min on 2 cores;
a configuration over every step ≈ 22 s per chunk of 64 pairs at one thread (≈ 2.2 min for all 384 pairs), a window
starting at step ``s`` a fraction ``(25 − s)/25`` of that; the 30 configurations ≈ 1 h at one thread, the latent
transplants ≈ 4 min and the edits ≈ 15 min at two threads.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import io, models, patching, pipeline, world

OUT = models.DATA_DIR / "sites"
STATES = models.DATA_DIR / "cache" / "sites"  # the pool's clean states at each window's first step (recomputed)
POOL_SEED = 9_494  # fresh: no chapter or benchmark cell used it
POOL_N = 1_024
PAIRS_PER = 128  # pairs per social attribute
PAIR_SEED = 12
STEPS = 25
CHUNK = 64  # pairs whose donors are recorded at once (≈ 1.4 GB of activations at every site and step)
BATCH = 64
SHOW = 8  # images kept per configuration (chunk 0's first pairs)

SKIPS = tuple(f"up_blocks.{i}.skips.{j}" for i in range(3) for j in range(2))
GROUPS: dict[str, tuple[str, ...]] = {
    "down_blocks.0": ("down_blocks.0",),
    "down_blocks.1": ("down_blocks.1",),
    "down_blocks.2": ("down_blocks.2",),
    "mid_block": ("mid_block",),
    "up_blocks.0": ("up_blocks.0",),
    "up_blocks.1": ("up_blocks.1",),
    "skips → up_blocks.0": SKIPS[0:2],
    "skips → up_blocks.1": SKIPS[2:4],
    "skips → up_blocks.2": SKIPS[4:6],
    "skips → up_blocks.0–1": SKIPS[0:4],  # the 8×8 and 16×16 skips: every skip but the two that carry x_t itself
    "all skips": SKIPS,
    "mid_block + all skips": ("mid_block", *SKIPS),
}
_XT = ("the 32×32 skip tensors up_blocks.2 receives (conv_in's output and the first resnet's) carry the noisy input x_t "
       "itself; the donor's make the UNet predict the donor's noise, which the sampler then removes from the "
       "recipient's x_t, so the images end as noise (their roughness is measured in the chapter) and the judge's "
       "readings of them mean nothing")
CONFOUNDED = {
    "skips → up_blocks.2": _XT,
    "all skips": _XT,
    "mid_block + all skips": "every input of the up path is the donor's, so the UNet's output is the donor's whatever the "
                             "recipient's x_t; " + _XT.split("; ", 1)[1],
}
WINDOWS: dict[str, tuple[int, int]] = {  # name -> [first, stop)
    "0–24": (0, 25), "8–24": (8, 25), "0–7": (0, 8), "0–3": (0, 4), "4–7": (4, 8), "8–15": (8, 16),
    "16–24": (16, 25)}
MAP_WINDOWS = ("0–24", "8–24")
EDIT_METHODS = ("DiffLens", "DiffLens swap")  # chapter 7's bottleneck edits (their minimal-policy rows)
LATENT_VARIANTS = ("SAE(h donor)", "all latents", "top 4k latents", "top k latents")  # see Sites.latents
EDIT_WINDOW = 8  # chapter 7's edit window (steps 8–24); the ceiling it is held against is h patched there  # every site is patched over these; h (and all skips) over the finer ones too


def site_dir(out, site: str) -> Path:
    """Where the latent and edit cells of the SAE read at ``site`` live: ``out`` for the bottleneck's, ``out/lens``
    for the lens' (:data:`LENS_SITE`, whose SAE and rankings are there too)."""
    if site == "mid_block":
        return Path(out)
    if site == LENS_SITE:
        return Path(out) / "lens"
    raise ValueError(f"Sites: no SAE at {site!r}; the bottleneck ('mid_block') or the lens ({LENS_SITE!r})")


def configs() -> list[tuple[str, str]]:
    """(site group, window) of every patch, the map's order."""
    out = [(g, w) for w in MAP_WINDOWS for g in GROUPS]
    out += [("mid_block", w) for w in WINDOWS if w not in MAP_WINDOWS]
    out += [("all skips", "0–7")]
    return out


def slug(group: str, window: str) -> str:
    g = group.replace(" → ", "-to-").replace(" + ", "-plus-").replace(" ", "-").replace("(", "").replace(")", "")
    return f"{g}_{window.replace('–', '-')}"


class Sites:
    """The embedded model, the judge, the pool and its pairs; runs and reads the patching cells."""

    def __init__(self, out=OUT, states_dir=STATES, pool_n: int = POOL_N, pairs_per: int = PAIRS_PER,
                 chunk: int = CHUNK, progress: bool = True):
        from .. import judge as J

        self.out, self.states_dir = out, states_dir
        self.pool_n, self.pairs_per, self.chunk, self.progress = pool_n, pairs_per, chunk, progress
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        self.model = models.load_model("embedded")
        self.model.unet.to(memory_format=torch.channels_last)
        self.judge = J.load_judge()
        self._pool = None

    # -- the pool and its pairs --
    def pool(self) -> dict:
        """The clean pool: judged classes (``cls.<attribute>``), its pairs, and the states entering each window's
        first step (kept under ``states_dir``; recomputed when missing, and checked against the stored classes)."""
        if self._pool is not None:
            return self._pool
        path = self.out / "pool.safetensors"
        firsts = sorted({w[0] for w in WINDOWS.values() if w[0]})
        spath = self.states_dir / f"pool_{POOL_SEED}_{self.pool_n}.safetensors"
        noise = models.make_noise(self.pool_n, self.model.sample_size, POOL_SEED)
        if path.is_file() and spath.is_file():
            t, meta = io.load_tensors(path)
            st = {int(k): v for k, v in io.load_tensors(spath)[0].items()}
        else:
            t0 = time.time()
            ref = pipeline.original_pass(self.model, noise, STEPS, self.judge, state_steps=firsts,
                                         batch_size=BATCH, progress=self.progress)
            cls = {f"cls.{a}": ref.probs[a].argmax(-1).to(torch.uint8) for a in world.ATTRIBUTES}
            if path.is_file():  # states lost: the rerun must reproduce the stored reading
                t, meta = io.load_tensors(path)
                bad = [a for a in world.ATTRIBUTES if not torch.equal(t[f"cls.{a}"], cls[f"cls.{a}"])]
                if bad:
                    raise RuntimeError(f"{path}: rerunning the pool changed the judged classes of {bad}; this "
                                       "machine does not reproduce the stored cells — delete data/sites and rerun")
            else:
                t = {**cls, **pairs(cls, self.pairs_per)}
                meta = {"seed": POOL_SEED, "n": self.pool_n, "steps": STEPS, "seconds": time.time() - t0,
                        "pairs_per": self.pairs_per, "pair_seed": PAIR_SEED}
                io.save_tensors(path, t, meta=meta)
            st = ref.states
            io.save_tensors(spath, {str(k): v for k, v in st.items()})
        st[0] = noise
        self._pool = {"t": t, "meta": meta, "states": st}
        return self._pool

    def cell_path(self, group: str, window: str, chunk: int):
        return self.out / "cells" / f"{slug(group, window)}_c{chunk}.safetensors"

    def n_chunks(self) -> int:
        n = len(self.pool()["t"]["recipient"])
        return (n + self.chunk - 1) // self.chunk

    def run(self, todo: list[tuple[str, str]] | None = None) -> None:
        """Every configuration on every chunk of pairs; finished cells are skipped (resumable)."""
        from tqdm.auto import tqdm

        todo = todo or configs()
        p = self.pool()
        rec, don = p["t"]["recipient"].long(), p["t"]["donor"].long()
        for c in tqdm(range(self.n_chunks()), desc="chunks", disable=not self.progress):
            missing = [(g, w) for g, w in todo if not self.cell_path(g, w, c).is_file()]
            if not missing:
                continue
            idx = torch.arange(c * self.chunk, min((c + 1) * self.chunk, len(rec)))
            sites = sorted({s for g, _ in missing for s in GROUPS[g]})
            t0 = time.time()
            acts = patching.record(self.model, p["states"][0][don[idx]], sites, STEPS, batch_size=BATCH)
            rec_seconds = time.time() - t0
            for g, w in tqdm(missing, desc=f"chunk {c}", leave=False, disable=not self.progress):
                first, stop = WINDOWS[w]
                window = range(first, stop)
                donor = {s: {k: acts[s][k] for k in window} for s in GROUPS[g]}
                t0 = time.time()
                imgs = patching.run_patched(self.model, p["states"][first][rec[idx]], donor, STEPS, window=window,
                                            batch_size=BATCH, start_step=first)
                probs = self.judge.predict(imgs)
                t = {f"cls.{a}": probs[a].argmax(-1).to(torch.uint8) for a in world.ATTRIBUTES}
                if c == 0:
                    t["images"] = (imgs[:SHOW] * 255).round().to(torch.uint8)
                io.save_tensors(self.cell_path(g, w, c), t, meta={
                    "group": g, "sites": list(GROUPS[g]), "window": w, "steps": [first, stop - 1], "chunk": c,
                    "pairs": idx.tolist()[:1] + idx.tolist()[-1:], "seconds": time.time() - t0,
                    "donor_record_seconds": rec_seconds, "passes": len(idx) * (STEPS - first)})
            del acts

    # -- how much of the ceiling the SAE and its ranked latents can carry --
    def lens_of(self, site: str = "mid_block") -> tuple:
        """``(sae, features_dir, folder)`` of the SAE read at ``site``: chapters 3–4's at the bottleneck, the lens
        (:func:`lens`) at :data:`LENS_SITE`; ``folder`` is where this site's latent and edit cells go."""
        from .. import sae as S
        from . import dissect, identify

        folder = site_dir(getattr(self, "out", OUT), site)
        if site == "mid_block":
            sae_path, feats = dissect.OUT / "sae.safetensors", identify.OUT
        else:
            sae_path, feats = folder / "sae.safetensors", folder
        if not hasattr(self, "_saes"):
            self._saes = {}
        if site not in self._saes:
            if not Path(sae_path).is_file():
                raise FileNotFoundError(f"Sites: no SAE at {sae_path}; run `python scripts/sites.py lens` first")
            self._saes[site] = S.load_sae(sae_path)[0]
        return self._saes[site], feats, folder

    def latent_mix(self, attribute: str, variant: str, site: str = "mid_block"):
        """``mix(h, h_donor, site)`` of a latent variant (see :meth:`latents`) with the SAE read at ``site``."""
        from .. import pipeline as Pl
        from .. import sae as S
        from . import identify

        sae, feats_dir, _ = self.lens_of(site)
        if variant == "SAE(h donor)":
            return lambda h, d, site: sae.reconstruct(d.float()).to(h.dtype)
        if variant == "all latents":
            return lambda h, d, site: (h.float() + sae.reconstruct(d.float()) - sae.reconstruct(h.float())).to(h.dtype)
        k = identify.K[attribute] * (4 if variant == "top 4k latents" else 1)
        k = min(k, Pl.K_MAX)  # race: 4k = 128 > the 64 ranked latents stored per class
        if variant not in LATENT_VARIANTS:
            raise ValueError(f"latent_mix: unknown variant {variant!r}; one of {LATENT_VARIANTS}")
        feats = sorted({f for c in range(len(world.ATTRIBUTES[attribute]))
                        for f in Pl.features(feats_dir, attribute, c, k)[0]})
        idx = torch.tensor(feats)
        w = sae.W_dec[idx] * sae.input_scale  # (|S|, C)

        def mix(h, d, site):
            zd = sae.encode(S.to_rows(d.float()))[:, idx]
            zh = sae.encode(S.to_rows(h.float()))[:, idx]
            return (h.float() + S.from_rows((zd - zh) @ w, h.shape)).to(h.dtype)
        mix.latents = feats
        return mix

    def latents(self, window: str = "8–24", variants=LATENT_VARIANTS, site: str = "mid_block",
                attributes=world.SOCIAL) -> None:
        """Per social attribute, on its pairs: h patched not with the donor's h but with what the SAE carries of
        it — the donor's SAE reconstruction (``SAE(h donor)``: the ceiling less the SAE's reconstruction error), the
        recipient's h moved by the difference of *all* SAE latents (``all latents``: keeps the recipient's own
        reconstruction error), or of the ranked latents only: the union over classes of the top ``k`` per class
        that chapters 4–6 edit (``top k latents``; k of :data:`helpers.chapters.identify.K`) or of the top ``4k`` (at
        most the 64 ranked per class that are stored).
        Each writes what the donor — a natural sample of the other class — has in that part of h (an edit may push
        the same latents further than any sample has them); resumable. ``site``: the bottleneck, or the lens' site
        with its SAE and ranked latents (cells under ``lens/latent/``)."""
        from tqdm.auto import tqdm

        p = self.pool()
        first, stop = WINDOWS[window]
        steps = range(first, stop)
        folder = self.lens_of(site)[2] / "latent"
        folder.mkdir(parents=True, exist_ok=True)
        for a in attributes:
            sel = (p["t"]["drawn_for"].long() == world.SOCIAL.index(a)).nonzero().flatten()
            rec, don = p["t"]["recipient"].long()[sel], p["t"]["donor"].long()[sel]
            todo = [v for v in variants if not (folder / f"{a}_{slug(v, window)}.safetensors").is_file()]
            if not todo:
                continue
            acts = patching.record(self.model, p["states"][first][don], [site], STEPS, window=steps,
                                   batch_size=BATCH, start_step=first)
            for v in tqdm(todo, desc=f"{a}: latent variants", disable=not self.progress):
                t0 = time.time()
                mix = self.latent_mix(a, v, site)
                imgs = patching.run_patched(self.model, p["states"][first][rec], acts, STEPS, window=steps,
                                            batch_size=BATCH, start_step=first, mix=mix)
                probs = self.judge.predict(imgs)
                t = {f"cls.{b}": probs[b].argmax(-1).to(torch.uint8) for b in world.ATTRIBUTES}
                t["images"] = (imgs[:SHOW] * 255).round().to(torch.uint8)
                io.save_tensors(folder / f"{a}_{slug(v, window)}.safetensors", t, meta={
                    "attribute": a, "variant": v, "window": window, "site": site,
                    "latents": getattr(mix, "latents", None),
                    "seconds": time.time() - t0, "passes": len(rec) * (STEPS - first)})

    # -- what DiffLens' feature edits reach on the same pairs --
    def edits(self, methods=EDIT_METHODS, site: str = "mid_block", attributes=world.SOCIAL) -> None:
        """DiffLens' edits on each social attribute's pairs, every recipient asked for its donor's class, at every
        setting of the row's validation frontier in chapter 7 (chosen there, not here); resumable. ``site``: the
        bottleneck's edits, or the lens' (its frontier from the lens bench's validation; cells under
        ``lens/edits/``)."""
        import json

        from tqdm.auto import tqdm

        from . import benchmark

        p = self.pool()
        bench_out = benchmark.OUT if site == "mid_block" else Path(self.out) / "bench"
        log = json.loads((bench_out / "log.json").read_text())
        bench = None
        folder = self.lens_of(site)[2] / "edits"
        folder.mkdir(parents=True, exist_ok=True)
        for a in attributes:
            sel = (p["t"]["drawn_for"].long() == world.SOCIAL.index(a)).nonzero().flatten()
            rec, don = p["t"]["recipient"].long()[sel], p["t"]["donor"].long()[sel]
            asked = p["t"][f"cls.{a}"].long()[don]
            for method in methods:
                row = benchmark.Row(method, "minimal", EDIT_WINDOW)
                for s in tqdm(log["val"][a][row.label]["settings"], desc=f"{a}: {method}", disable=not self.progress):
                    path = folder / f"{a}_{row.slug}_{benchmark.fmt(s)}.safetensors"
                    if path.is_file():
                        continue
                    if bench is None:
                        bench = benchmark.Bench(progress=False) if site == "mid_block" else \
                            lens_bench(out=bench_out, lens_dir=site_dir(self.out, site), progress=False)
                    t0 = time.time()
                    run = bench.edit_runner(a, row, s, asked)
                    imgs = run(torch.arange(len(rec)), p["states"][EDIT_WINDOW][rec], EDIT_WINDOW)
                    probs = self.judge.predict(imgs)
                    t = {f"cls.{b}": probs[b].argmax(-1).to(torch.uint8) for b in world.ATTRIBUTES}
                    t["images"] = (imgs[:SHOW] * 255).round().to(torch.uint8)
                    io.save_tensors(path, t, meta={"attribute": a, "method": method, "row": row.label, "setting": s,
                                                   "site": site,
                                                   "window": EDIT_WINDOW, "seconds": time.time() - t0,
                                                   "passes": len(rec) * (STEPS - EDIT_WINDOW)})


def pairs(cls: dict[str, torch.Tensor], per: int = PAIRS_PER, seed: int = PAIR_SEED) -> dict[str, torch.Tensor]:
    """Recipient/donor pool indices and the attribute each pair was drawn for (index into ``world.SOCIAL``),
    interleaved ``gender, age, race, gender, …``. The donor's class differs from the recipient's in that attribute:
    uniformly one of the recipient's other classes present in the pool, then a random pool member of it."""
    g = torch.Generator().manual_seed(seed)
    n = len(next(iter(cls.values())))
    per_attr = []
    for a in world.SOCIAL:
        y = cls[f"cls.{a}"].long()
        present = sorted(set(y.tolist()))
        if len(present) < 2:
            raise ValueError(f"pairs: the pool shows one class of {a!r} only; no donor can differ from a recipient")
        recips = torch.randperm(n, generator=g)[:per]
        donors = []
        for r in recips.tolist():
            others = [k for k in present if k != int(y[r])]
            k = others[int(torch.randint(len(others), (1,), generator=g))]
            members = (y == k).nonzero().flatten()
            donors.append(int(members[torch.randint(len(members), (1,), generator=g)]))
        per_attr.append((recips, torch.tensor(donors)))
    rec = torch.stack([r for r, _ in per_attr], 1).flatten()
    don = torch.stack([d for _, d in per_attr], 1).flatten()
    attr = torch.arange(len(world.SOCIAL)).repeat(per)
    return {"recipient": rec.to(torch.int16), "donor": don.to(torch.int16), "drawn_for": attr.to(torch.uint8)}


# ----------------------------------------------------------------------------- reading the cells


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``k / n`` (``nan`` when ``n`` is 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(method="wilson")
    return float(ci.low), float(ci.high)


def load(out=None) -> tuple[dict, dict[tuple[str, str], dict[str, torch.Tensor]]]:
    """The pool's tensors and, per configuration whose every chunk exists, the patched classes of all pairs."""
    out = Path(out or OUT)
    pool, meta = io.load_tensors(out / "pool.safetensors")
    n = len(pool["recipient"])
    cells = {}
    for g, w in configs():
        parts = []
        c = 0
        while True:
            p = out / "cells" / f"{slug(g, w)}_c{c}.safetensors"
            if not p.is_file():
                break
            parts.append(io.load_tensors(p)[0])
            c += 1
        if parts and sum(len(x["cls.gender"]) for x in parts) == n:
            cells[(g, w)] = {a: torch.cat([x[f"cls.{a}"] for x in parts]).long() for a in world.ATTRIBUTES}
    return {**pool, "meta": meta}, cells


def transfer_table(out=None, drawn_only: bool = True) -> "pd.DataFrame":
    """One row per configuration × attribute: pairs that differ (``n``), transfer rate with its Wilson CI, pairs
    that agree and the share of them damaged. With ``drawn_only`` a social attribute is read on the pairs drawn for
    it (its donor differs by design); nuisance attributes are always read on every pair where they happen to differ."""
    import pandas as pd

    out = Path(out or OUT)
    pool, cells = load(out)
    rec, don = pool["recipient"].long(), pool["donor"].long()
    rows = []
    for (g, w), cl in cells.items():
        for a in world.ATTRIBUTES:
            y = pool[f"cls.{a}"].long()
            sel = torch.ones(len(rec), dtype=torch.bool)
            if drawn_only and a in world.SOCIAL:
                sel = pool["drawn_for"].long() == world.SOCIAL.index(a)
            o = patching.transfer(y[rec][sel], y[don][sel], cl[a][sel])
            k, n = int(o["took"][o["differ"]].sum()), int(o["differ"].sum())
            d, m = int(o["changed"][~o["differ"]].sum()), int((~o["differ"]).sum())
            lo, hi = wilson(k, n)
            rows.append({"site": g, "window": w, "attribute": a, "n": n, "transfer": k / n if n else float("nan"),
                         "lo": lo, "hi": hi, "n agree": m, "damage": d / m if m else float("nan"),
                         "confounded": g in CONFOUNDED})
    return pd.DataFrame(rows)


def separated(table, a: tuple[str, str], b: tuple[str, str], attribute: str) -> bool | None:
    """Do the transfer CIs of configurations ``a`` and ``b`` (site, window) for ``attribute`` exclude each other?
    ``None`` when either is missing."""
    def get(cfg):
        r = table[(table.site == cfg[0]) & (table.window == cfg[1]) & (table.attribute == attribute)]
        return None if r.empty else r.iloc[0]
    ra, rb = get(a), get(b)
    if ra is None or rb is None:
        return None
    return bool(ra.hi < rb.lo or rb.hi < ra.lo)


def _leakage(pool, sel, patched: dict[str, torch.Tensor], attribute: str) -> tuple[int, int]:
    """Changed / read over the attributes other than ``attribute``, on pairs whose donor agrees with the recipient
    on that attribute (where neither a patch nor an edit has any business changing it)."""
    rec, don = pool["recipient"].long()[sel], pool["donor"].long()[sel]
    changed = total = 0
    for b in world.ATTRIBUTES:
        if b == attribute:
            continue
        y = pool[f"cls.{b}"].long()
        agree = y[rec] == y[don]
        changed += int((patched[b][agree] != y[rec][agree]).sum())
        total += int(agree.sum())
    return changed, total


def ceiling_vs_edit(out=None, window: str = "8–24", site: str = "mid_block") -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Per social attribute: the ceiling (``site`` patched from the donor over ``window``: transfer rate and leakage,
    with Wilson CIs) and each edit method's curve over its settings on the same recipients (transfer, leakage). The
    summary gives each method's best transfer among its settings that leak no more than the ceiling (``None`` when
    every setting leaks more), as a share of the ceiling, and its best transfer at any leakage. ``site``: the
    bottleneck's edits, or the lens' (:data:`LENS_SITE`)."""
    import pandas as pd

    out = Path(out or OUT)
    pool, cells = load(out)
    edits_dir = site_dir(out, site) / "edits"
    curve, summary = [], []
    for a in world.SOCIAL:
        sel = pool["drawn_for"].long() == world.SOCIAL.index(a)
        y = pool[f"cls.{a}"].long()
        donor_cls = y[pool["donor"].long()[sel]]
        key = (site, window)
        if key not in cells:
            continue
        patched = {b: v[sel] for b, v in cells[key].items()}
        k = int((patched[a] == donor_cls).sum())
        n = len(donor_cls)
        lc, lt = _leakage(pool, sel, patched, a)
        ceil = {"attribute": a, "ceiling transfer": k / n, "ceiling lo": wilson(k, n)[0],
                "ceiling hi": wilson(k, n)[1], "ceiling leakage": lc / lt, "n": n}
        for p in sorted(edits_dir.glob(f"{a}_*.safetensors")):
            t, m = io.load_tensors(p)
            ke = int((t[f"cls.{a}"].long() == donor_cls).sum())
            le, lt2 = _leakage(pool, sel, {b: t[f"cls.{b}"].long() for b in world.ATTRIBUTES}, a)
            curve.append({"attribute": a, "method": m["method"], "setting": m["setting"], "transfer": ke / n,
                          "lo": wilson(ke, n)[0], "hi": wilson(ke, n)[1], "leakage": le / lt2})
        cdf = pd.DataFrame([c for c in curve if c["attribute"] == a])
        for method, g in (cdf.groupby("method") if len(cdf) else []):
            lk, tr = g["leakage"].to_numpy(), g["transfer"].to_numpy()
            ok = lk <= ceil["ceiling leakage"]
            at = float(tr[ok].max()) if ok.any() else None
            summary.append({**ceil, "method": method, "edit transfer at matched leakage": at,
                            "share of ceiling": None if at is None or not ceil["ceiling transfer"] else
                            at / ceil["ceiling transfer"],
                            "edit best transfer": float(tr.max()),
                            "its leakage": float(lk[tr.argmax()])})
    curve = pd.DataFrame(curve)
    return pd.DataFrame(summary), curve.sort_values(["attribute", "method", "setting"]) if len(curve) else curve


def decomposition(out=None, window: str = "8–24", site: str = "mid_block") -> "pd.DataFrame":
    """Per social attribute, on its pairs: transfer (Wilson CI) and leakage of the full transplant at ``site`` (the
    ceiling) and of each latent variant (:meth:`Sites.latents`) — where along ceiling → SAE → all latents → ranked
    latents the transfer is lost. ``site``: the bottleneck or the lens' (:data:`LENS_SITE`)."""
    import pandas as pd

    out = Path(out or OUT)
    pool, cells = load(out)
    latent_dir = site_dir(out, site) / "latent"
    rows = []
    for a in world.SOCIAL:
        sel = pool["drawn_for"].long() == world.SOCIAL.index(a)
        donor_cls = pool[f"cls.{a}"].long()[pool["donor"].long()[sel]]
        n = len(donor_cls)
        found = []
        if (site, window) in cells:
            found.append(("h donor (ceiling)", {b: v[sel] for b, v in cells[(site, window)].items()}, None))
        for v in LATENT_VARIANTS:
            path = latent_dir / f"{a}_{slug(v, window)}.safetensors"
            if path.is_file():
                t, m = io.load_tensors(path)
                found.append((v, {b: t[f"cls.{b}"].long() for b in world.ATTRIBUTES}, m.get("latents")))
        for v, patched, lat in found:
            k = int((patched[a] == donor_cls).sum())
            lc, lt = _leakage(pool, sel, patched, a)
            lo, hi = wilson(k, n)
            rows.append({"attribute": a, "patch": v, "latents": None if lat is None else len(lat), "n": n,
                         "transfer": k / n, "lo": lo, "hi": hi, "leakage": lc / lt if lt else float("nan")})
    return pd.DataFrame(rows)


def compare(table, attribute: str, a: tuple[str, str], b: tuple[str, str]) -> str | None:
    """``"higher"``, ``"lower"`` or ``"tied"``: configuration ``a``'s transfer of ``attribute`` against ``b``'s,
    "tied" when their 95% CIs overlap; ``None`` when either is missing."""
    sep = separated(table, a, b, attribute)
    if sep is None:
        return None
    if not sep:
        return "tied"
    ta = table[(table.site == a[0]) & (table.window == a[1]) & (table.attribute == attribute)].transfer.iloc[0]
    tb = table[(table.site == b[0]) & (table.window == b[1]) & (table.attribute == attribute)].transfer.iloc[0]
    return "higher" if ta > tb else "lower"


SKIPS_COHERENT = "skips → up_blocks.0–1"  # the skip tensors a patch can replace without replacing x_t itself


def roughness(images: torch.Tensor) -> float:
    """Mean absolute difference of horizontally adjacent pixels of ``(n, 3, H, W)`` images in [0, 1]: a few
    hundredths for the world's flat-shaded portraits, several tenths for noise."""
    x = torch.as_tensor(images).float()
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def where(table, attribute: str, window: str = "0–24") -> dict:
    """Where ``attribute`` lives, from the map over ``window``: the non-confounded site group with the highest
    transfer, the groups tied with it (CIs overlap), h's (``mid_block``) transfer against the skip tensors' that a
    patch can replace coherently (:data:`SKIPS_COHERENT`; :func:`compare`), and whether h is among the best (``h best``: it is the best or tied with it)."""
    t = table[(table.attribute == attribute) & (table.window == window) & ~table.confounded]
    if t.empty:
        raise ValueError(f"where: no cells for {attribute!r} over {window!r}")
    top = t.sort_values("transfer", ascending=False).iloc[0]
    tied = [s for s in t.site if s != top.site and compare(table, attribute, (s, window), (top.site, window)) == "tied"]
    h = t[t.site == "mid_block"]
    return {"best": top.site, "best transfer": float(top.transfer), "tied with best": tied,
            "h": float(h.transfer.iloc[0]) if len(h) else None,
            "h vs skips": compare(table, attribute, ("mid_block", window), (SKIPS_COHERENT, window)),
            "h best": bool(len(h)) and (top.site == "mid_block" or "mid_block" in tied)}


CHAIN = ("h donor (ceiling)", "SAE(h donor)", "all latents", "top 4k latents", "top k latents")


def losses(dec, summary, attribute: str) -> dict:
    """Where the transfer of ``attribute`` is lost between the ceiling and the edits: the chain ceiling → the donor's
    SAE reconstruction → all latents → top 4k → top k ranked latents → the best edit at no more leakage than the
    ceiling (or, when every edit setting leaks more, at any leakage: ``edit at matched leakage`` says which). Returns
    the chain's transfers, each step's drop, and the step with the largest drop."""
    d = dec[dec.attribute == attribute].set_index("patch")
    chain = [(p, float(d.loc[p, "transfer"])) for p in CHAIN if p in d.index]
    s = summary[summary.attribute == attribute]
    matched = s["edit transfer at matched leakage"].dropna()
    edit = float(matched.max()) if len(matched) else float(s["edit best transfer"].max()) if len(s) else None
    if edit is not None:
        chain.append(("best edit", edit))
    drops = [(f"{a} → {b}", ta - tb) for (a, ta), (b, tb) in zip(chain, chain[1:])]
    big = max(drops, key=lambda x: x[1]) if drops else (None, None)
    return {"chain": chain, "drops": drops, "largest": big[0], "largest drop": big[1],
            "edit at matched leakage": bool(len(matched))}


def sae_verdicts(dec) -> dict[str, dict[str, bool]]:
    """Per attribute, from :func:`decomposition`'s Wilson CIs: does the SAE lose transfer (the ceiling's CI excludes
    the all-latent transplant's), and do the ranked latents at natural values (``top k latents``)?"""
    out = {}
    for a, d in dec.groupby("attribute"):
        d = d.set_index("patch")

        def sep(x, y):
            if x not in d.index or y not in d.index:
                return None
            return bool(d.loc[x, "hi"] < d.loc[y, "lo"] or d.loc[y, "hi"] < d.loc[x, "lo"])
        out[a] = {"SAE loses": sep("h donor (ceiling)", "all latents"),
                  "ranked latents lose": sep("h donor (ceiling)", "top k latents")}
    return out


# ----------------------------------------------------------------------------- a lens where tone lives

LENS_SITE = "up_blocks.0"  # the first up block's output: h plus the 8×8 skips, 128 channels at 16×16
LENS_OUT = OUT / "lens"  # its SAE, probe, rankings and footprints (chapters 3–4's recipe at this site)
LENS_BENCH = OUT / "bench"  # chapter 7's protocol with DiffLens rows that edit at the lens' site
LENS_ATTRIBUTES = ("race",)  # the attribute the bottleneck carries least (the map); gender/age: see the chapter


def lens(site: str = LENS_SITE, out=None, progress: bool = True) -> dict:
    """Chapters 3–4's recipe at ``site``: harvest the same 1,000 samples (seed, steps and split as chapter 2) with the
    activations captured there, train a TopK SAE with chapter 3's settings (8× expansion, k scaled to the width,
    the same optimizer steps), the per-step probe on the site's pooled activations, and rank the SAE latents of each
    social attribute's classes by IG through that probe at chapter 4's steps, with their footprints. Writes
    ``sae.safetensors``, ``probe.safetensors``, ``rank_latents_<a>``, ``footprints_<a>`` and ``log.json`` to ``out``;
    a finished stage is not redone. Cost (measured, ``log.json``): harvest ≈ 12 min at one thread beside another run
    (≈ 1.6 GB of shards in the cache), SAE ≈ 4 min and IG ≈ 8 min on 2 cores, peak memory ≈ 6 GB."""
    import json
    import resource
    from dataclasses import asdict

    from .. import harvest as H
    from .. import probe as P
    from .. import sae as S
    from . import identify

    out = Path(out or LENS_OUT)
    out.mkdir(parents=True, exist_ok=True)
    logp = out / "log.json"
    log = json.loads(logp.read_text()) if logp.is_file() else {"site": site}
    hs = H.HarvestSettings(site=site)
    fresh, t0 = not H.is_cached("embedded", hs), time.time()
    folder = H.cached("embedded", hs, progress=progress)
    if fresh:  # a harvest found in the cache says nothing of its cost
        log["harvest_seconds"] = time.time() - t0
    summary = H.load_summary(folder)
    n_train = pipeline.n_train(hs.n)
    if not (out / "sae.safetensors").is_file():
        t0 = time.time()
        sae, hist, ev, n_rows = pipeline.train_sae(folder, n_train, desc=f"sae @ {site}", progress=progress)
        log["sae_seconds"], log["sae_held_out"], log["sae_train_rows"] = time.time() - t0, ev, n_rows
        log["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        S.save_sae(sae, out / "sae.safetensors", meta={"history": hist, "held_out": ev, "train_rows": n_rows,
                                                     "harvest": folder.name, "harvest_settings": asdict(hs),
                                                     "train": asdict(S.SAETrainConfig())})
        io.write_json(logp, log)
    sae, _ = S.load_sae(out / "sae.safetensors")
    if not (out / "probe.safetensors").is_file():
        t0 = time.time()
        probe, acc = pipeline.train_probe(summary, {a: world.ATTRIBUTES[a] for a in world.SOCIAL}, n_train)
        P.save_probe(probe, out / "probe.safetensors", meta={"held_out_accuracy": acc.to_dict(orient="list"),
                                                              "train_samples": n_train, "harvest": folder.name,
                                                              "site": site})
        log["probe_seconds"] = time.time() - t0
        io.write_json(logp, log)
    probe, _ = P.load_probe(out / "probe.safetensors")
    if not all((out / f"footprints_{a}.safetensors").is_file() for a in world.SOCIAL):
        t0 = time.time()
        pipeline.rank_and_footprints(sae, probe, folder, summary.labels(), list(world.SOCIAL), identify.IG_STEPS,
                                     n_train, out, progress=progress)
        log["ig_seconds"] = time.time() - t0
        io.write_json(logp, log)
    return log


def lens_rows() -> list:
    """Chapter 7's DiffLens family (every DiffLens row it validated), edited at the lens' site instead."""
    from . import benchmark

    rows = [r for r in benchmark.rows() if benchmark.METHODS[r.method].kind == "difflens"]
    return sorted(rows, key=lambda r: r.policy != "minimal")  # chapter 7's winning policy first (order only)


def lens_bench(out=None, lens_dir=None, progress: bool = True):
    """Chapter 7's bench with its DiffLens rows editing at the lens' site (the lens' SAE and ranked features, the same
    k per attribute as chapter 4); who gets edited, the seeds, the Original passes and every metric are chapter 7's
    (its Original passes are reused, not rerun)."""
    from . import benchmark, identify

    lens_dir = Path(lens_dir or LENS_OUT)
    return benchmark.Bench(out=out or LENS_BENCH, progress=progress, shared=benchmark.OUT,
                           lens=(lens_dir / "sae.safetensors", lens_dir, identify.K))


def lens_vs_h(split: str = "test", attribute: str = "race", bench_out=None, lens_bench_out=None,
              n_boot: int = 2000) -> dict:
    """Chapter 7's best bottleneck DiffLens row against the lens bench's best row (each declared on validation by
    :func:`helpers.chapters.benchmark.freeze`), at their settings matched to keep 0.95, on ``split``'s seed: each
    one's FD (CI), keep, the share of samples edited and, among its edited samples, the share that reached the class
    asked, the share whose class changed at all, and how often each other attribute's class flipped; the paired
    bootstrap difference lens − h of FD and keep, and :func:`fd_verdict`."""
    import json

    from . import benchmark as BM

    bench_out, lens_bench_out = Path(bench_out or BM.OUT), Path(lens_bench_out or LENS_BENCH)
    orig = io.load_tensors(bench_out / f"original_{split}.safetensors")[0]
    out = {}
    for name, folder in (("h", bench_out), ("lens", lens_bench_out)):
        best = json.loads((folder / "log.json").read_text())["frozen"]["choices"][attribute]["best DiffLens"]
        if best is None:
            raise ValueError(f"lens_vs_h: no DiffLens row of {folder} reached keep 0.95 on validation for {attribute}")
        row = BM.Row(*best["row"])
        c = BM.find(BM.cells(folder, split, attribute), attribute, row, best["setting"])
        m = c["meta"]["metrics"]
        edited = c["t"]["asked"] >= 0
        flips = {b: float((orig[f"cls.{b}"] != c["t"][f"cls.{b}"])[edited].float().mean())
                 for b in world.ATTRIBUTES if b != attribute}
        share_edited = float(edited.float().mean())
        reached = float((c["t"][f"cls.{attribute}"].long() == c["t"]["asked"].long())[edited].float().mean())
        out[name] = {"row": row, "label": best["label"], "setting": best["setting"], "val FD": best["val FD"],
                     "flips among edited": flips, "reached among edited": reached,
                     "changed among edited": float((orig[f"cls.{attribute}"] != c["t"][f"cls.{attribute}"])[edited]
                                                   .float().mean()),
                     "share of samples edited": share_edited,
                     **{k: m[k] for k in ("FD", "FD lo", "FD hi", "keep all", "keep all lo", "keep all hi",
                                          "FD original")}}
    p = BM.paired(lens_bench_out, split, attribute, (out["lens"]["row"], out["lens"]["setting"]),
                  (out["h"]["row"], out["h"]["setting"]), n_boot=n_boot, out_b=bench_out, shared=bench_out)
    out["FD diff"], out["keep diff"] = p["FD"], p["keep all"]
    out["verdict"] = fd_verdict(out["h"]["FD"], out["lens"]["FD"], p["FD"])
    return out


def fd_verdict(fd_h: float, fd_lens: float, diff: dict) -> dict:
    """The issue's goal for race: the lens' FD at keep ≥ 0.95 at most half the bottleneck's (point estimates), and
    whether the paired difference lens − h is below zero with its CI (``diff``: ``{"diff", "lo", "hi"}``)."""
    return {"halved": bool(fd_lens <= fd_h / 2), "ratio": fd_lens / fd_h if fd_h else float("nan"),
            "lower": bool(diff["hi"] < 0), "higher": bool(diff["lo"] > 0)}


def best_edit_outcome(attribute: str, site: str = "mid_block", out=None) -> tuple[str, torch.Tensor]:
    """The edit setting with the highest transfer on ``attribute``'s pairs at ``site`` (its edits over the validation
    settings, :meth:`Sites.edits`) and, per pair, whether the recipient took the donor's class — for a paired
    (McNemar) comparison of two sites' best edits on the same pairs."""
    out = Path(out or OUT)
    pool, _ = load(out)
    sel = pool["drawn_for"].long() == world.SOCIAL.index(attribute)
    donor_cls = pool[f"cls.{attribute}"].long()[pool["donor"].long()[sel]]
    folder = site_dir(out, site) / "edits"
    best = None
    for p in sorted(folder.glob(f"{attribute}_*.safetensors")):
        t, m = io.load_tensors(p)
        took = t[f"cls.{attribute}"].long() == donor_cls
        if best is None or took.float().mean() > best[1].float().mean():
            best = (f"{m['method']} at β {m['setting']:g}", took)
    if best is None:
        raise FileNotFoundError(f"best_edit_outcome: no edit cells for {attribute} in {folder}")
    return best
