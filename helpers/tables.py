"""One table style for every chapter, and the same numbers in prose (every chapter).

A number is written the same way wherever a reader meets it — in a table, in a glued sentence, in a
caption:

* integers as integers, thousands separated (``2,000``; a float that is a whole number counts);
* any other number to 3 significant digits, positional, never in scientific notation
  (``0.308``, ``12.3``, ``0.000861``);
* an estimate with its interval as ``0.308 [0.255, 0.365]`` (the interval to the estimate's decimals);
* a missing value as an em dash, never ``NaN``;
* a share as a percentage where a column is declared one (``12.3%``).

:func:`frame` applies that to a DataFrame and adds a legend line under it; :func:`num` and :func:`ci` are
what chapters glue into prose (``glue("fd", tables.num(x), display=False)`` → ``{glue:text}`fd```).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable

DASH = "—"
MAX_DECIMALS = 8  # below 1e-8 a value is written as 0 to 8 decimals; no exponent ever


def _missing(x: Any) -> bool:
    if x is None:
        return True
    try:
        return bool(x != x)  # NaN, pandas NA
    except (TypeError, ValueError):  # pandas NA raises on bool()
        return True


def decimals(x: float, sig: int = 3) -> int:
    """How many decimals :func:`num` gives ``x`` (0 for whole numbers)."""
    x = float(x)
    if x == 0 or not math.isfinite(x) or x.is_integer():
        return 0
    return min(MAX_DECIMALS, max(0, sig - 1 - math.floor(math.log10(abs(x)))))


def num(x: Any, sig: int = 3, percent: bool = False) -> str:
    """``x`` as the book writes it (see the module docstring); strings pass through unchanged."""
    if isinstance(x, str):
        return x
    if _missing(x):
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if percent:
        return num(100 * float(x), sig) + "%"
    if isinstance(x, Integral):
        return f"{int(x):,}".replace("-", "−")
    if not isinstance(x, Real):
        try:
            x = float(x)  # 0-d tensors and numpy scalars
        except (TypeError, ValueError):
            return str(x)
    x = float(x)
    if not math.isfinite(x):
        return "∞" if x > 0 else ("−∞" if x < 0 else DASH)
    d = decimals(x, sig)
    out = f"{x:,.{d}f}"
    return "0" if float(out.replace(",", "")) == 0 and d == MAX_DECIMALS else out.replace("-", "−")


def ci(est: Any, lo: Any, hi: Any, sig: int = 3, percent: bool = False) -> str:
    """``est [lo, hi]``, the interval written to the estimate's decimals (``0.308 [0.255, 0.365]``)."""
    if _missing(est):
        return DASH
    if _missing(lo) or _missing(hi):
        return num(est, sig, percent)
    scale = 100.0 if percent else 1.0
    e = float(est) * scale
    # a whole-number estimate (an FD of 0, a keep-rate of 1) takes its interval's decimals
    d = decimals(e, sig) if not e.is_integer() else \
        min(sig, max(decimals(float(lo) * scale, sig), decimals(float(hi) * scale, sig)))
    suffix = "%" if percent else ""
    f = lambda v: f"{float(v) * scale:,.{d}f}".replace("-", "−") + suffix  # noqa: E731
    return f"{f(est)} [{f(lo)}, {f(hi)}]"


def frame(df, legend: str | None = None, sig: int = 3, percent: Iterable[str] = (), index_name: str | None = None):
    """A pandas ``Styler`` of ``df`` in the book's style, with ``legend`` as a line under the table.

    Args:
        percent: columns whose values are shares, shown as percentages.
        index_name: a readable name for the index column (default: the index's own name).
    """
    percent = set(percent)
    df = df.copy()
    if index_name is not None:
        df.index.name = index_name
    fmts = {c: (lambda v, p=(c in percent): num(v, sig, percent=p)) for c in df.columns}
    st = df.style.format(fmts, na_rep=DASH).format_index(lambda v: num(v, sig), axis=0)
    if df.columns.nlevels == 1:
        st = st.format_index(lambda v: num(v, sig), axis=1)
    if legend:
        st = st.set_caption(legend).set_table_styles(
            [{"selector": "caption",
              "props": "caption-side: bottom; text-align: left; font-size: 0.85em; color: #555; padding-top: 0.4em;"}],
            overwrite=False)
    return st


def text(df, sig: int = 3, percent: Iterable[str] = ()) -> "Any":
    """``df`` with every cell (and index value) formatted as :func:`frame` shows it, as strings — for plain-text
    outputs and tests."""
    percent = set(percent)
    out = df.copy().astype(object)
    for c in out.columns:
        out[c] = [num(v, sig, percent=c in percent) for v in df[c]]
    if out.index.nlevels == 1:
        out.index = [num(v, sig) for v in out.index]
    return out
