"""The book's one number style (helpers.tables)."""
import math

import numpy as np
import pandas as pd
from hypothesis import given, strategies as st

from helpers import tables


def _parse(s: str) -> float:
    return float(s.replace(",", "").replace("−", "-").rstrip("%"))


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False).filter(lambda x: abs(x) > 1e-6))
def test_num_is_positional_and_keeps_three_significant_digits(x):
    s = tables.num(x)
    assert "e" not in s.lower() and "nan" not in s.lower()
    # positional, 3 significant digits (whole parts are never cut: 1,234.5 → 1,234)
    tol = max(0.5 * 10 ** (math.floor(math.log10(abs(x))) - 2), 0.5) if abs(x) >= 100 else \
        0.5 * 10 ** (math.floor(math.log10(abs(x))) - 2) * 1.0001
    assert abs(_parse(s) - x) <= tol, (x, s)


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_integers_stay_integers(i):
    assert _parse(tables.num(i)) == i and "." not in tables.num(i)
    assert tables.num(float(i)) == tables.num(i)  # a whole-number float (a count) is shown as one


def test_the_cases_the_book_had():
    assert tables.num(128.0) == "128"  # chapter 2's counts were 128.000
    assert tables.num(8.608e-04) == "0.000861" and tables.num(0.762) == "0.762"  # no 8.608e-04 beside 0.762
    assert tables.num(float("nan")) == tables.num(None) == tables.num(pd.NA) == "—"  # never NaN
    assert tables.num(2000) == "2,000" and tables.num(0.95) == "0.950" and tables.num(np.float32(0.5)) == "0.500"
    assert tables.num(0.123, percent=True) == "12.3%"
    assert tables.ci(0.308, 0.255, 0.365) == "0.308 [0.255, 0.365]"
    assert tables.ci(0.0, 0.0, 0.0123) == "0.000 [0.000, 0.012]"  # a zero estimate takes its interval's decimals
    assert tables.ci(0.4, float("nan"), 0.5) == "0.400" and tables.ci(float("nan"), 0, 1) == "—"


def test_frame_formats_cells_and_index_and_adds_a_legend():
    df = pd.DataFrame({"count": [128.0, 3.0], "FD": [8.608e-4, np.nan], "keep": [0.95, 0.5]},
                      index=pd.Index([0.5, 2.0], name="β"))
    html = tables.frame(df, legend="keep: share of samples whose other attributes are unchanged",
                        percent=["keep"]).to_html()
    for want in (">128<", ">0.000861<", ">—<", ">95%<", ">0.500<", ">2<", "caption-side: bottom", "keep: share"):
        assert want in html, want
    for bad in ("NaN", "nan", "e-04", "128.000"):
        assert bad not in html, bad
    txt = tables.text(df, percent=["keep"])
    assert txt.loc["0.500", "count"] == "128" and txt.loc["2", "keep"] == "50%" and txt.loc["0.500", "FD"] == "0.000861"
