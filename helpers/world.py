"""The portrait world: a procedural renderer of cartoon portraits with known attributes.

Introduced in chapter 1. This is a *controlled stand-in* for face data sets such as
CelebA-HQ or FairFace: every image is drawn from a handful of discrete factors, so we know
exactly which factor a model changes. The rendered "people" are not people, and the
social-attribute names below refer only to the drawn cues listed next to them.

Social attributes (named as in DiffLens, CVPR 2025):

* ``gender`` (2): ``male`` = short hair + beard over the jaw; ``female`` = long hair that
  falls beside the face to the shoulders, no beard.
* ``age`` (3): ``young`` = dark hair, smooth forehead; ``adult`` = hair half greyed, one
  forehead line; ``old`` = white-grey hair, two forehead lines.
* ``race`` (4): here *only* a skin-tone group, ``tone1`` (lightest) … ``tone4`` (darkest).
  The paper's FairFace split has four race classes; we mirror the count, not the meaning.

Nuisance attributes, which a debiasing edit must leave alone:

* ``background`` (3): ``blue``, ``green``, ``pink`` backdrop.
* ``glasses`` (2): ``none`` or dark round frames.
* ``smile`` (2): ``neutral`` straight mouth or ``smile`` (wide curved mouth).
* ``position`` (3): head shifted ``left``, ``centre`` or ``right``.

Unlabelled continuous variation (small colour and geometry jitter, shirt colour) keeps the
distribution from being a finite set of images.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female"),
    "age": ("young", "adult", "old"),
    "race": ("tone1", "tone2", "tone3", "tone4"),
    "background": ("blue", "green", "pink"),
    "glasses": ("none", "glasses"),
    "smile": ("neutral", "smile"),
    "position": ("left", "centre", "right"),
}
SOCIAL: tuple[str, ...] = ("gender", "age", "race")
NUISANCE: tuple[str, ...] = ("background", "glasses", "smile", "position")

CUES: dict[str, str] = {
    "gender": "male: short hair and a beard; female: long hair to the shoulders, no beard",
    "age": "young: dark hair; adult: half-grey hair, one forehead line; old: white-grey hair, two lines",
    "race": "skin tone only, tone1 (lightest) to tone4 (darkest); mirrors FairFace's 4-class count, not its meaning",
    "background": "backdrop colour: blue, green or pink",
    "glasses": "dark round frames around both eyes, or none",
    "smile": "neutral short straight mouth, or a wide upward curve",
    "position": "head shifted left, centred, or shifted right",
}

SKIN = torch.tensor(
    [[0.96, 0.83, 0.72], [0.86, 0.66, 0.48], [0.64, 0.44, 0.28], [0.38, 0.24, 0.15]]
)
BACKGROUND = torch.tensor([[0.50, 0.66, 0.92], [0.55, 0.82, 0.55], [0.92, 0.62, 0.80]])
HAIR_BASE = torch.tensor([0.22, 0.13, 0.07])  # dark brown
GREY = torch.tensor([0.86, 0.86, 0.84])
GREY_MIX = (0.0, 0.5, 0.92)  # share of grey in the hair, by age class
POSITION_DX = (-0.11, 0.0, 0.11)  # head-centre shift, in image widths


@dataclass
class BiasSpec:
    """A joint distribution over the world's attributes, as a small Bayesian network.

    Every attribute has either a marginal (``probs[attr]``, a list of class probabilities) or
    one parent attribute and a conditional table (``conditionals[attr] = (parent, table)``,
    ``table[parent_class][child_class]``). Attributes not mentioned are uniform.
    """

    probs: dict[str, list[float]] = field(default_factory=dict)  # attr -> class probabilities
    conditionals: dict[str, tuple[str, list[list[float]]]] = field(default_factory=dict)  # attr -> (parent, P(attr | parent))
    name: str = "custom"  # shown in tables and figures

    def __post_init__(self):
        for attr in list(self.probs) + list(self.conditionals):
            if attr not in ATTRIBUTES:
                raise ValueError(f"BiasSpec: unknown attribute {attr!r}; known: {list(ATTRIBUTES)}")
            if attr in self.probs and attr in self.conditionals:
                raise ValueError(f"BiasSpec: {attr!r} has both a marginal and a conditional; give one")
        for attr, p in self.probs.items():
            _check_probs(p, len(ATTRIBUTES[attr]), f"probs[{attr!r}]")
        for attr, (parent, table) in self.conditionals.items():
            if parent not in ATTRIBUTES:
                raise ValueError(f"BiasSpec: conditional {attr!r} has unknown parent {parent!r}")
            if parent in self.conditionals:
                raise ValueError(
                    f"BiasSpec: parent {parent!r} of {attr!r} is itself conditional; "
                    "only one level of conditioning is supported"
                )
            if len(table) != len(ATTRIBUTES[parent]):
                raise ValueError(
                    f"BiasSpec: table for {attr!r} needs one row per {parent!r} class "
                    f"({len(ATTRIBUTES[parent])}), got {len(table)}"
                )
            for i, row in enumerate(table):
                _check_probs(row, len(ATTRIBUTES[attr]), f"conditionals[{attr!r}] row {i}")

    def marginal(self, attr: str) -> np.ndarray:
        """Exact marginal distribution of ``attr`` under this spec."""
        if attr in self.conditionals:
            parent, table = self.conditionals[attr]
            return self.marginal(parent) @ np.asarray(table, dtype=float)
        if attr in self.probs:
            return np.asarray(self.probs[attr], dtype=float)
        k = len(ATTRIBUTES[attr])
        return np.full(k, 1.0 / k)

    def sample_labels(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``n`` attribute label vectors, ``{attr: (n,) long}``."""
        labels: dict[str, torch.Tensor] = {}
        order = [a for a in ATTRIBUTES if a not in self.conditionals] + list(self.conditionals)
        for attr in order:
            if attr in self.conditionals:
                parent, table = self.conditionals[attr]
                rows = torch.tensor(table, dtype=torch.float64)[labels[parent]]
                labels[attr] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
            else:
                p = torch.tensor(self.marginal(attr), dtype=torch.float64)
                labels[attr] = torch.multinomial(p, n, replacement=True, generator=generator)
        return {a: labels[a] for a in ATTRIBUTES}

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "probs": self.probs, "conditionals": self.conditionals}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BiasSpec":
        d = json.loads(text)
        cond = {k: (v[0], v[1]) for k, v in d.get("conditionals", {}).items()}
        return cls(probs=d.get("probs", {}), conditionals=cond, name=d.get("name", "custom"))


def _check_probs(p, k: int, where: str) -> None:
    if len(p) != k:
        raise ValueError(f"BiasSpec: {where} needs {k} probabilities, got {len(p)}")
    if any(x < 0 for x in p) or not math.isclose(sum(p), 1.0, abs_tol=1e-6):
        raise ValueError(f"BiasSpec: {where} must be non-negative and sum to 1, got {p}")


def default_spec() -> BiasSpec:
    """The biased spec the embedded model is trained on.

    Majority classes: male 75%, adult 72%, tone1 72%. Two nuisance attributes are
    correlated with social ones, so an edit that moves the wrong factor shows up:
    glasses become likely with age, and the backdrop colour depends on gender.
    """
    return BiasSpec(
        name="default",
        probs={
            "gender": [0.75, 0.25],
            "age": [0.16, 0.72, 0.12],
            "race": [0.72, 0.12, 0.09, 0.07],
            "smile": [0.5, 0.5],
            "position": [0.3, 0.4, 0.3],
        },
        conditionals={
            "glasses": ("age", [[0.85, 0.15], [0.7, 0.3], [0.3, 0.7]]),
            "background": ("gender", [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]),
        },
    )


def uniform_spec() -> BiasSpec:
    """Every attribute uniform and independent (used to train the judge)."""
    return BiasSpec(name="uniform")


# ----------------------------------------------------------------------------- rendering


def render(labels: dict[str, torch.Tensor], generator: torch.Generator, resolution: int = 32,
           supersample: int = 2) -> torch.Tensor:
    """Render portraits for given labels; returns ``(batch, 3, resolution, resolution)`` in [0, 1].

    All geometry is in units of the image width, so any resolution works. Drawing happens at
    ``supersample`` times the resolution and is average-pooled down (anti-aliasing).
    """
    n = len(labels["gender"])
    for attr, classes in ATTRIBUTES.items():
        if attr not in labels:
            raise ValueError(f"render: labels lack {attr!r}; pass all of {list(ATTRIBUTES)}")
        lab = labels[attr]
        if len(lab) != n or (n and (int(lab.min()) < 0 or int(lab.max()) >= len(classes))):
            raise ValueError(f"render: labels[{attr!r}] must have {n} entries in 0..{len(classes) - 1}")
    if resolution < 16:
        raise ValueError(f"render: resolution must be >= 16, got {resolution}")
    g = generator
    S = resolution * supersample

    def u(*shape, lo=-1.0, hi=1.0):  # uniform jitter
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    # per-image jitter, drawn in a fixed order for determinism
    bg_col = (BACKGROUND[labels["background"]] + 0.04 * u(n, 3)).clamp(0, 1)
    skin = (SKIN[labels["race"]] + 0.025 * u(n, 1)).clamp(0, 1)
    mix = torch.tensor(GREY_MIX)[labels["age"]].unsqueeze(1) + 0.04 * u(n, 1)
    hair_col = ((1 - mix) * (HAIR_BASE + 0.05 * u(n, 3)) + mix * GREY).clamp(0, 1)
    shirt = torch.rand(n, 3, generator=g) * 0.6 + 0.2
    cx = 0.5 + torch.tensor(POSITION_DX)[labels["position"]] + 0.012 * u(n)
    cy = 0.47 + 0.012 * u(n)
    rx = 0.205 + 0.01 * u(n)
    ry = 0.265 + 0.01 * u(n)

    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    Y = coords.view(1, S, 1)
    X = coords.view(1, 1, S)

    def col(v):  # per-image scalar -> broadcastable (n,1,1)
        return v.view(n, 1, 1)

    cxv, cyv, rxv, ryv = col(cx), col(cy), col(rx), col(ry)
    dx, dy = (X - cxv) / rxv, (Y - cyv) / ryv
    head = dx**2 + dy**2 <= 1.0

    female = col(labels["gender"] == 1)
    male = ~female
    # long hair: a rounded panel behind the head, from crown to the shoulders
    panel = ((X - cxv).abs() <= rxv * 1.32) & (Y >= cyv - ryv * 0.6) & (Y <= cyv + ryv * 1.55)
    crown = ((X - cxv) / (rxv * 1.32)) ** 2 + ((Y - (cyv - ryv * 0.6)) / (ryv * 0.62)) ** 2 <= 1.0
    long_hair = female & (panel | crown)
    # hair cap on top of the head (both genders); short hair hugs the skull
    cap_shape = ((X - cxv) / (rxv * 1.1)) ** 2 + ((Y - cyv + 0.04) / (ryv * 1.08)) ** 2 <= 1.0
    cap = cap_shape & (Y <= cyv - ryv * 0.42)
    # shoulders / shirt
    body = (((X - cxv) / (rxv * 2.1)) ** 2 + ((Y - 1.08) / 0.26) ** 2 <= 1.0)
    neck = ((X - cxv).abs() <= rxv * 0.38) & (Y >= cyv + ryv * 0.7) & (Y <= cyv + ryv * 1.4)
    # beard: lower part of the face (male only)
    beard = male & head & (dy >= 0.38) & ~(((dx / 0.42) ** 2 + ((dy - 0.5) / 0.16) ** 2) <= 1.0)
    # eyes
    ey = cyv - ryv * 0.02
    eox = rxv * 0.42
    er = 0.028
    eye_l = (X - (cxv - eox)) ** 2 + (Y - ey) ** 2 <= er**2
    eye_r = (X - (cxv + eox)) ** 2 + (Y - ey) ** 2 <= er**2
    eyes = eye_l | eye_r
    # glasses: dark rings around the eyes and a bridge
    gr_out, gr_in = 0.082, 0.052
    dl = ((X - (cxv - eox)) ** 2 + (Y - ey) ** 2).sqrt()
    dr = ((X - (cxv + eox)) ** 2 + (Y - ey) ** 2).sqrt()
    ring = ((dl <= gr_out) & (dl >= gr_in)) | ((dr <= gr_out) & (dr >= gr_in))
    bridge = ((X - cxv).abs() <= eox - gr_in) & ((Y - ey).abs() <= 0.014)
    glasses = col(labels["glasses"] == 1) & (ring | bridge)
    # mouth: neutral = short straight line; smile = wide upward curve
    my = cyv + ryv * 0.5
    mx = X - cxv
    smile = col(labels["smile"] == 1)
    curve = my - 0.95 * mx**2 / rxv + 0.012
    mouth_smile = (mx.abs() <= rxv * 0.52) & ((Y - curve).abs() <= 0.026)
    mouth_flat = (mx.abs() <= rxv * 0.28) & ((Y - my).abs() <= 0.018)
    mouth = torch.where(smile, mouth_smile, mouth_flat)
    # forehead lines: adult one, old two
    age = col(labels["age"])
    fy1, fy2 = cyv - ryv * 0.30, cyv - ryv * 0.20
    line1 = (mx.abs() <= rxv * 0.45) & ((Y - fy1).abs() <= 0.011)
    line2 = (mx.abs() <= rxv * 0.45) & ((Y - fy2).abs() <= 0.011)
    wrinkles = head & (((age >= 1) & line1) | ((age >= 2) & line2))

    # composite by layer index (later layers on top), then look colours up once
    layers = [
        (long_hair, hair_col),
        (body, shirt),
        (neck, skin * 0.92),
        (head, skin),
        (cap & (head | cap_shape), hair_col),
        (beard, hair_col * 0.85),
        (wrinkles, skin * 0.62),
        (eyes, torch.tensor([0.08, 0.06, 0.06])),
        (mouth & head, torch.tensor([0.62, 0.16, 0.18])),
        (glasses, torch.tensor([0.06, 0.06, 0.08])),
    ]
    idx = torch.zeros(n, S, S, dtype=torch.long)
    palette = [bg_col]
    for k, (mask, colour) in enumerate(layers, start=1):
        idx.masked_fill_(mask.expand(n, S, S), k)
        palette.append(colour.expand(n, 3))
    pal = torch.stack(palette, dim=1)  # (n, layers, 3)
    img = torch.gather(pal, 1, idx.view(n, S * S, 1).expand(n, S * S, 3))
    img = img.view(n, S, S, 3).permute(0, 3, 1, 2)
    # subtle vertical shading of the backdrop (unlabelled)
    shade = 1.0 - 0.12 * Y.unsqueeze(1) * (idx == 0).unsqueeze(1)
    img = img * shade

    if supersample > 1:
        img = torch.nn.functional.avg_pool2d(img, supersample)
    return img.clamp(0, 1)


@dataclass
class Batch:
    """Rendered images ``(batch, 3, H, W)`` in [0, 1] and their labels ``{attr: (batch,)}``."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]


def sample(n: int, spec: BiasSpec | None = None, seed: int = 0, resolution: int = 32) -> Batch:
    """Draw ``n`` labelled portraits from ``spec`` (default: :func:`default_spec`).

    Deterministic: the same ``(n, spec, seed, resolution)`` always gives the same batch.
    """
    if n < 0:
        raise ValueError(f"sample: n must be >= 0, got {n}")
    spec = spec or default_spec()
    g = torch.Generator().manual_seed(int(seed))
    labels = spec.sample_labels(n, g)
    return Batch(render(labels, g, resolution=resolution), labels)


def iterate(spec: BiasSpec, batch_size: int, seed: int, resolution: int = 32):
    """Endless stream of fresh batches; batch ``i`` is ``sample(batch_size, spec, seed*1_000_003 + i)``."""
    i = 0
    while True:
        yield sample(batch_size, spec, seed=seed * 1_000_003 + i, resolution=resolution)
        i += 1


def variations(attr: str, base: dict[str, int] | None = None, seed: int = 0,
               resolution: int = 32) -> Batch:
    """One render per class of ``attr``, all other attributes fixed to ``base`` and same jitter."""
    if attr not in ATTRIBUTES:
        raise ValueError(f"variations: unknown attribute {attr!r}; known: {list(ATTRIBUTES)}")
    base = {a: 0 for a in ATTRIBUTES} | {"position": 1} | dict(base or {})
    k = len(ATTRIBUTES[attr])
    labels = {a: torch.full((k,), int(base[a])) for a in ATTRIBUTES}
    labels[attr] = torch.arange(k)
    # same jitter for every image: render one at a time from the same generator seed
    imgs = [render({a: v[i:i + 1] for a, v in labels.items()}, torch.Generator().manual_seed(seed), resolution)
            for i in range(k)]
    return Batch(torch.cat(imgs), labels)


def render_classes(attribute: str, classes: torch.Tensor, seed: int, spec: BiasSpec | None = None,
                   resolution: int = 32) -> torch.Tensor:
    """World renders in [-1, 1], one per entry of ``classes``, each of that class of ``attribute``.

    Other attributes follow ``spec`` *given* the class (rejection sampling keeps the world's correlations).
    """
    spec = spec or default_spec()
    g = torch.Generator().manual_seed(seed)
    want = torch.as_tensor(classes).long()
    pool = {a: torch.empty(0, dtype=torch.long) for a in ATTRIBUTES}
    while True:
        lab = spec.sample_labels(max(256, 8 * len(want)), g)
        pool = {a: torch.cat([pool[a], lab[a]]) for a in ATTRIBUTES}
        counts = torch.bincount(pool[attribute], minlength=int(want.max()) + 1)
        if all(counts[c] >= (want == c).sum() for c in want.unique()):
            break
    rows = torch.empty(len(want), dtype=torch.long)
    for c in want.unique():
        rows[want == c] = (pool[attribute] == c).nonzero().flatten()[: int((want == c).sum())]
    labels = {a: pool[a][rows] for a in ATTRIBUTES}
    return render(labels, g, resolution=resolution) * 2 - 1


# ----------------------------------------------------------------------------- prompts and captions (issue 18)
#
# A text-to-image stand-in for the paper's occupation prompts: each *context* ("a portrait of a doctor") has its
# own BiasSpec, so the bias depends on the prompt as it does in Stable Diffusion. The renders carry no visual cue
# of an occupation: a context only shifts the distribution of the drawn attributes. The numbers are ours, chosen
# to give each context a different majority (not measurements of any real model or population).

CONTEXTS: dict[str, str] = {
    "person": "a portrait of a person",
    "doctor": "a portrait of a doctor",
    "nurse": "a portrait of a nurse",
    "teacher": "a portrait of a teacher",
    "ceo": "a portrait of a CEO",
}
_CONTEXT_PROBS: dict[str, dict[str, list[float]]] = {
    "person": {},
    "doctor": {"gender": [0.85, 0.15], "age": [0.10, 0.60, 0.30]},
    "nurse": {"gender": [0.10, 0.90], "age": [0.45, 0.50, 0.05]},
    "teacher": {"gender": [0.30, 0.70]},
    "ceo": {"gender": [0.90, 0.10], "age": [0.05, 0.45, 0.50], "race": [0.80, 0.10, 0.06, 0.04]},
}
# words a caption may use for a class ("" = the class is not named even when mentioned)
WORDS: dict[str, tuple[str, ...]] = {
    "gender": ("man", "woman"),
    "age": ("young", "middle-aged", "old"),
    "race": ("with very light skin", "with light skin", "with brown skin", "with dark skin"),
    "background": ("on a blue background", "on a green background", "on a pink background"),
    "glasses": ("", "wearing glasses"),
    "smile": ("", "smiling"),
    "position": ("on the left", "", "on the right"),
}


def context_spec(context: str) -> BiasSpec:
    """The joint distribution of renders captioned with ``context`` (:data:`CONTEXTS`): the default spec with the
    context's own shares of gender, age and skin tone; its correlations (glasses with age, backdrop with
    gender) stay."""
    if context not in CONTEXTS:
        raise ValueError(f"context_spec: unknown context {context!r}; known: {list(CONTEXTS)}")
    base = default_spec()
    probs = {**base.probs, **_CONTEXT_PROBS[context]}
    return BiasSpec(probs=probs, conditionals=dict(base.conditionals), name=f"{context} ({CONTEXTS[context]})")


def caption(labels: dict[str, int], context: str = "person", mention: tuple[str, ...] = ()) -> str:
    """The caption of one render: its context's prompt, with the attributes in ``mention`` named in words
    (:data:`WORDS`), e.g. ``caption(l, "doctor", ("gender", "smile"))`` → "a portrait of a smiling doctor, a man".
    Nuisance classes without a word (no glasses, neutral mouth, centred head) stay unnamed."""
    if context not in CONTEXTS:
        raise ValueError(f"caption: unknown context {context!r}; known: {list(CONTEXTS)}")
    bad = [a for a in mention if a not in WORDS]
    if bad:
        raise ValueError(f"caption: cannot mention {bad}; attributes with words: {list(WORDS)}")
    noun = CONTEXTS[context].removeprefix("a portrait of a ").removeprefix("a portrait of ")
    pre = [WORDS[a][int(labels[a])] for a in ("smile", "age") if a in mention and WORDS[a][int(labels[a])]]
    text = f"a portrait of {'an' if (pre or [noun])[0][0] in 'aeiou' else 'a'} {' '.join(pre + [noun])}"
    if "gender" in mention and context != "person":
        text += f", a {WORDS['gender'][int(labels['gender'])]}"
    elif "gender" in mention:
        text = text.replace(" person", " " + WORDS["gender"][int(labels["gender"])])
    post = [WORDS[a][int(labels[a])] for a in ("race", "glasses", "background", "position")
            if a in mention and WORDS[a][int(labels[a])]]
    return " ".join([text] + post)


@dataclass
class Captioned(Batch):
    """A :class:`Batch` with one caption per render and the context it was drawn from."""

    captions: list[str] = field(default_factory=list)
    context: str = "person"


def sample_captioned(n: int, context: str = "person", seed: int = 0, mention_rate: float = 0.0,
                     resolution: int = 32) -> Captioned:
    """``n`` renders drawn from :func:`context_spec` with their captions. Each attribute is named in a caption with
    probability ``mention_rate`` (independently per sample and attribute, seeded): 0 gives the bare prompt, which is
    what a text-to-image model is asked at sampling time; > 0 teaches it the attribute words, so text alignment
    (CLIP-T) becomes measurable."""
    if not 0 <= mention_rate <= 1:
        raise ValueError(f"sample_captioned: mention_rate must be in [0, 1], got {mention_rate}")
    b = sample(n, spec=context_spec(context), seed=seed, resolution=resolution)
    g = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    named = torch.rand(n, len(WORDS), generator=g) < mention_rate
    caps = [caption({a: int(v[i]) for a, v in b.labels.items()}, context,
                    tuple(a for j, a in enumerate(WORDS) if named[i, j])) for i in range(n)]
    return Captioned(b.images, b.labels, caps, context)
