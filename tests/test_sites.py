"""The site-and-step map's pairs and readings (helpers.chapters.sites) on fabricated pools and cells."""
import math

import pytest
import torch

from helpers import io, world
from helpers.chapters import sites as S


def _pool(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"cls.{a}": torch.randint(len(c), (n,), generator=g).to(torch.uint8) for a, c in world.ATTRIBUTES.items()}


def test_pairs_differ_in_the_attribute_they_were_drawn_for_and_interleave():
    cls = _pool()
    p = S.pairs(cls, per=10, seed=3)
    assert len(p["recipient"]) == 30 and p["drawn_for"][:6].tolist() == [0, 1, 2, 0, 1, 2]
    for i in range(30):
        a = world.SOCIAL[int(p["drawn_for"][i])]
        y = cls[f"cls.{a}"]
        assert y[int(p["recipient"][i])] != y[int(p["donor"][i])]
    again = S.pairs(cls, per=10, seed=3)
    assert all(torch.equal(p[k], again[k]) for k in p)
    one = {**cls, "cls.race": torch.zeros(40, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="one class of 'race'"):
        S.pairs(one, per=4)


def test_wilson_matches_the_closed_form():
    lo, hi = S.wilson(30, 100)
    z, p, n = 1.959963984540054, 0.3, 100
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert lo == pytest.approx(c - h, abs=1e-9) and hi == pytest.approx(c + h, abs=1e-9)
    assert all(math.isnan(x) for x in S.wilson(0, 0))


@pytest.fixture
def fabricated(tmp_path, monkeypatch):
    """A pool of 40 with 3 × 4 pairs; "mid_block 8–24" hands every recipient its donor's classes (perfect transfer,
    no damage), "down_blocks.0 8–24" leaves every recipient as it was (no transfer); chunks of 6 pairs."""
    monkeypatch.setattr(S, "configs", lambda: [("mid_block", "8–24"), ("down_blocks.0", "8–24")])
    cls = _pool()
    pr = S.pairs(cls, per=4, seed=1)
    io.save_tensors(tmp_path / "pool.safetensors", {**cls, **pr}, meta={"n": 40})
    rec, don = pr["recipient"].long(), pr["donor"].long()
    for c in range(2):
        idx = slice(6 * c, 6 * c + 6)
        io.save_tensors(tmp_path / "cells" / f"{S.slug('mid_block', '8–24')}_c{c}.safetensors",
                        {f"cls.{a}": cls[f"cls.{a}"][don[idx]] for a in world.ATTRIBUTES})
        io.save_tensors(tmp_path / "cells" / f"{S.slug('down_blocks.0', '8–24')}_c{c}.safetensors",
                        {f"cls.{a}": cls[f"cls.{a}"][rec[idx]] for a in world.ATTRIBUTES})
    return tmp_path, cls, pr


def test_transfer_table_reads_perfect_and_null_patches(fabricated):
    out, cls, pr = fabricated
    tab = S.transfer_table(out)
    full = tab[(tab.site == "mid_block")]
    none = tab[(tab.site == "down_blocks.0")]
    assert (full.transfer[full.n > 0] == 1.0).all() and (full.damage.dropna() == 0).all()
    assert (none.transfer[none.n > 0] == 0.0).all()
    g = full[full.attribute == "gender"].iloc[0]
    assert g.n == 4 and g["n agree"] == 0  # a social attribute is read on the pairs drawn for it
    assert S.separated(tab, ("mid_block", "8–24"), ("down_blocks.0", "8–24"), "gender") is True
    assert S.separated(tab, ("mid_block", "8–24"), ("mid_block", "0–7"), "gender") is None


def test_an_unfinished_configuration_is_not_read(fabricated):
    out, *_ = fabricated
    (out / "cells" / f"{S.slug('down_blocks.0', '8–24')}_c1.safetensors").unlink()
    assert set(S.transfer_table(out).site) == {"mid_block"}


def test_ceiling_vs_edit_takes_the_best_transfer_within_the_ceilings_leakage(fabricated):
    out, cls, pr = fabricated
    sel = pr["drawn_for"].long() == 0
    rec, don = pr["recipient"].long()[sel], pr["donor"].long()[sel]

    def edit(name, setting, took: int, damage_all: bool):
        t = {f"cls.{a}": cls[f"cls.{a}"][rec].clone() for a in world.ATTRIBUTES}
        t["cls.gender"][:took] = cls["cls.gender"][don[:took]]
        if damage_all:  # every other attribute changes: leakage 1
            for a in world.ATTRIBUTES:
                if a != "gender":
                    t[f"cls.{a}"] = (t[f"cls.{a}"] + 1) % len(world.ATTRIBUTES[a])
        io.save_tensors(out / "edits" / f"gender_{name}_{setting}.safetensors", t,
                        meta={"method": name, "setting": setting})

    edit("DiffLens", 1.0, 2, False)
    edit("DiffLens", 2.0, 4, True)  # more transfer, but leaking beyond the ceiling's (zero) leakage
    summ, curve = S.ceiling_vs_edit(out)
    r = summ[(summ.attribute == "gender") & (summ.method == "DiffLens")].iloc[0]
    assert r["ceiling transfer"] == 1.0 and r["ceiling leakage"] == 0.0
    assert r["edit transfer at matched leakage"] == 0.5 and r["share of ceiling"] == 0.5
    assert r["edit best transfer"] == 1.0 and r["its leakage"] == 1.0
    assert list(curve.setting) == [1.0, 2.0]


def test_the_lens_ceiling_and_edits_are_read_from_their_own_site_and_folder(fabricated):
    """With ``site``, the ceiling is that site's patch and the edits are the lens' (``lens/edits``); the bottleneck's
    edits are not mixed in."""
    out, cls, pr = fabricated
    sel = pr["drawn_for"].long() == 0
    rec, don = pr["recipient"].long()[sel], pr["donor"].long()[sel]
    t = {f"cls.{a}": cls[f"cls.{a}"][rec].clone() for a in world.ATTRIBUTES}
    t["cls.gender"][:1] = cls["cls.gender"][don[:1]]
    io.save_tensors(out / "lens" / "edits" / "gender_DiffLens_3.safetensors", t,
                    meta={"method": "DiffLens", "setting": 3.0})
    io.save_tensors(out / "edits" / "gender_DiffLens_9.safetensors", t, meta={"method": "DiffLens", "setting": 9.0})
    summ, curve = S.ceiling_vs_edit(out, site="mid_block")
    assert list(curve.setting) == [9.0]
    assert S.ceiling_vs_edit(out, site=S.LENS_SITE)[0].empty  # no patch at the lens' site: no ceiling to hold it to
    down = {f"cls.{a}": cls[f"cls.{a}"] for a in world.ATTRIBUTES}  # the lens' site given perfect transfer
    rec_all, don_all = pr["recipient"].long(), pr["donor"].long()
    for c in range(2):
        idx = slice(6 * c, 6 * c + 6)
        io.save_tensors(out / "cells" / f"{S.slug(S.LENS_SITE, '8–24')}_c{c}.safetensors",
                        {f"cls.{a}": down[f"cls.{a}"][don_all[idx]] for a in world.ATTRIBUTES})
    import unittest.mock as um
    with um.patch.object(S, "configs", lambda: [("mid_block", "8–24"), ("down_blocks.0", "8–24"),
                                                (S.LENS_SITE, "8–24")]):
        summ, curve = S.ceiling_vs_edit(out, site=S.LENS_SITE)
    r = summ[summ.attribute == "gender"].iloc[0]
    assert list(curve.setting) == [3.0] and r["ceiling transfer"] == 1.0 and r["edit best transfer"] == 0.25
    with pytest.raises(ValueError, match="no SAE at 'up_blocks.1'"):
        S.Sites.__new__(S.Sites).lens_of("up_blocks.1")


def test_latent_mixes_are_identities_when_the_donor_is_the_recipient_and_move_only_their_latents():
    from helpers import sae as SA
    from helpers.chapters import dissect

    s = S.Sites.__new__(S.Sites)  # latent_mix needs only the shipped SAE and rankings, not the model
    sae = SA.load_sae(dissect.OUT / "sae.safetensors")[0]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, sae.cfg.d_in, 8, 8, generator=g) * 3
    d = torch.randn(2, sae.cfg.d_in, 8, 8, generator=g) * 3
    for v in ("all latents", "top k latents", "top 4k latents"):
        mix = s.latent_mix("race", v)
        torch.testing.assert_close(mix(h, h, "mid_block"), h, atol=1e-4, rtol=0)
    torch.testing.assert_close(s.latent_mix("race", "SAE(h donor)")(h, d, "mid_block"), sae.reconstruct(d))
    torch.testing.assert_close(s.latent_mix("race", "all latents")(h, d, "mid_block"),
                               h + sae.reconstruct(d) - sae.reconstruct(h), atol=1e-4, rtol=0)
    # a transplant of the ranked latents leaves the recipient's other latents as they were
    mix = s.latent_mix("gender", "top k latents")
    zo, zh, zd = (sae.encode(SA.to_rows(x)) for x in (mix(h, d, "mid_block"), h, d))
    moved = (zo[:, mix.latents] - zd[:, mix.latents]).abs().mean() < (zh[:, mix.latents] - zd[:, mix.latents]).abs().mean()
    assert moved  # the ranked latents move toward the donor's (TopK re-selection makes it approximate)
    with pytest.raises(ValueError, match="unknown variant"):
        s.latent_mix("race", "top 3 latents")


def _table(rows):
    import pandas as pd
    return pd.DataFrame([{"site": s, "window": "0–24", "attribute": "race", "transfer": t, "lo": lo, "hi": hi,
                          "confounded": s in S.CONFOUNDED} for s, t, lo, hi in rows])


def test_where_and_compare_read_ci_separation():
    tab = _table([("mid_block", 0.6, 0.5, 0.7), (S.SKIPS_COHERENT, 0.2, 0.1, 0.3), ("down_blocks.0", 0.65, 0.55, 0.75),
                  ("mid_block + all skips", 0.99, 0.95, 1.0)])
    w = S.where(tab, "race")
    assert w["best"] == "down_blocks.0" and w["tied with best"] == ["mid_block"]  # the confounded patch is not a site
    assert w["h vs skips"] == "higher" and w["h best"] is True
    assert S.compare(tab, "race", (S.SKIPS_COHERENT, "0–24"), ("mid_block", "0–24")) == "lower"
    tab2 = _table([("mid_block", 0.3, 0.2, 0.4), (S.SKIPS_COHERENT, 0.8, 0.7, 0.9)])
    w2 = S.where(tab2, "race")
    assert w2["best"] == S.SKIPS_COHERENT and w2["h best"] is False and w2["h vs skips"] == "lower"
    with pytest.raises(ValueError, match="no cells"):
        S.where(tab2, "gender")


def test_losses_names_the_largest_drop_along_the_chain():
    import pandas as pd
    dec = pd.DataFrame([{"attribute": "race", "patch": p, "transfer": t} for p, t in
                        zip(S.CHAIN, (0.6, 0.55, 0.5, 0.2, 0.15))])
    summ = pd.DataFrame([{"attribute": "race", "method": "DiffLens", "edit transfer at matched leakage": 0.1,
                          "edit best transfer": 0.3}])
    out = S.losses(dec, summ, "race")
    assert out["largest"] == "all latents → top 4k latents" and out["largest drop"] == pytest.approx(0.3)
    assert out["chain"][-1] == ("best edit", 0.1) and out["edit at matched leakage"] is True
    summ2 = summ.assign(**{"edit transfer at matched leakage": [None]})
    out2 = S.losses(dec, summ2, "race")
    assert out2["chain"][-1] == ("best edit", 0.3) and out2["edit at matched leakage"] is False


def test_sae_verdicts_read_ci_separation():
    import pandas as pd
    dec = pd.DataFrame([{"attribute": "age", "patch": p, "lo": lo, "hi": hi} for p, lo, hi in
                        (("h donor (ceiling)", 0.6, 0.76), ("all latents", 0.55, 0.72), ("top k latents", 0.05, 0.16))])
    assert S.sae_verdicts(dec) == {"age": {"SAE loses": False, "ranked latents lose": True}}


def test_roughness_separates_portraits_from_noise():
    from helpers import world as W
    imgs = W.sample(8, seed=3).images
    imgs = imgs.float() / 255 if imgs.dtype == torch.uint8 else imgs
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert S.roughness(imgs) < 0.1 < 0.3 < S.roughness(noise)


def test_fd_verdict_reads_halving_and_the_paired_ci():
    v = S.fd_verdict(0.30, 0.14, {"diff": -0.16, "lo": -0.2, "hi": -0.1})
    assert v["halved"] and v["lower"] and not v["higher"] and v["ratio"] == pytest.approx(0.14 / 0.30)
    v = S.fd_verdict(0.30, 0.2, {"diff": -0.1, "lo": -0.2, "hi": 0.01})
    assert not v["halved"] and not v["lower"] and not v["higher"]
    assert S.fd_verdict(0.3, 0.4, {"diff": 0.1, "lo": 0.05, "hi": 0.15})["higher"]


def test_best_edit_outcome_picks_the_setting_with_most_transfer_per_pair(fabricated):
    out, cls, pr = fabricated
    sel = pr["drawn_for"].long() == 0
    rec, don = pr["recipient"].long()[sel], pr["donor"].long()[sel]
    for setting, took in ((1.0, 1), (2.0, 3)):
        t = {f"cls.{a}": cls[f"cls.{a}"][rec].clone() for a in world.ATTRIBUTES}
        t["cls.gender"][:took] = cls["cls.gender"][don[:took]]
        io.save_tensors(out / "edits" / f"gender_DiffLens_{setting}.safetensors", t,
                        meta={"method": "DiffLens", "setting": setting})
    label, took = S.best_edit_outcome("gender", out=out)
    assert label == "DiffLens at β 2" and took.tolist() == [True, True, True, False]
    with pytest.raises(FileNotFoundError, match="no edit cells"):
        S.best_edit_outcome("age", out=out)
