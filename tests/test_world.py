import numpy as np
import pytest
import torch

from helpers import world


def test_same_seed_same_batch_and_other_seed_differs():
    a, b = world.sample(64, seed=11), world.sample(64, seed=11)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in world.ATTRIBUTES)
    c = world.sample(64, seed=12)
    assert not torch.equal(a.images, c.images)


def test_resolution_is_a_parameter():
    for r in (16, 32, 64):
        b = world.sample(4, seed=0, resolution=r)
        assert b.images.shape == (4, 3, r, r)
        assert 0 <= b.images.min() and b.images.max() <= 1


def _px(img, x, y):  # colour at a point given in image-width units
    s = img.shape[-1]
    return img[:, int(y * s), int(x * s)]


def test_labels_match_drawn_cues():
    b = world.sample(300, world.uniform_spec(), seed=5, resolution=64)
    for i in range(len(b.images)):
        img = b.images[i]
        lab = {k: int(v[i]) for k, v in b.labels.items()}
        cx = 0.5 + world.POSITION_DX[lab["position"]]
        # backdrop colour in the top corners (the vertical shading there is < 1%)
        corner = _px(img, 0.03, 0.03)
        assert torch.allclose(corner, world.BACKGROUND[lab["background"]], atol=0.07), lab
        # skin tone on the neck (drawn at 92% of the face's tone), below beard and mouth
        neck = _px(img, cx, 0.79) / 0.92
        tone = ((world.SKIN - neck) ** 2).sum(1).argmin().item()
        assert tone == lab["race"], (lab, neck)
        # long hair beside the neck only for female portraits
        side = _px(img, cx + 0.235, 0.72)
        hair_like = not torch.allclose(side, world.SKIN[lab["race"]], atol=0.1)
        shaded_bg = world.BACKGROUND[lab["background"]] * (1 - 0.12 * 0.72)  # the backdrop's vertical shading
        is_bg = torch.allclose(side, shaded_bg, atol=0.07)
        assert (lab["gender"] == 1) == (hair_like and not is_bg), lab
        # hair greyness on the crown grows with age
        crown = _px(img, cx, 0.24)
        mix = world.GREY_MIX[lab["age"]]
        expect = (1 - mix) * world.HAIR_BASE + mix * world.GREY
        assert torch.allclose(crown, expect, atol=0.12), (lab, crown)


def test_spec_marginals_and_conditionals_are_sampled():
    spec = world.default_spec()
    lab = spec.sample_labels(40_000, torch.Generator().manual_seed(0))
    for a in world.ATTRIBUTES:
        emp = np.bincount(lab[a].numpy(), minlength=len(world.ATTRIBUTES[a])) / 40_000
        np.testing.assert_allclose(emp, spec.marginal(a), atol=0.012)
    old = lab["age"] == 2
    assert abs(lab["glasses"][old].float().mean().item() - 0.7) < 0.03
    female = lab["gender"] == 1
    assert abs((lab["background"][female] == 2).float().mean().item() - 0.6) < 0.03


def test_default_spec_is_biased_as_documented():
    spec = world.default_spec()
    for a in world.SOCIAL:
        assert 0.7 <= spec.marginal(a).max() <= 0.8


def test_bad_specs_and_labels_are_refused():
    with pytest.raises(ValueError, match="unknown attribute"):
        world.BiasSpec(probs={"hat": [0.5, 0.5]})
    with pytest.raises(ValueError, match="sum to 1"):
        world.BiasSpec(probs={"gender": [0.5, 0.6]})
    with pytest.raises(ValueError, match="needs 2 probabilities"):
        world.BiasSpec(probs={"gender": [1.0]})
    with pytest.raises(ValueError, match="one row per"):
        world.BiasSpec(conditionals={"glasses": ("age", [[0.5, 0.5]])})
    labels = world.default_spec().sample_labels(3, torch.Generator().manual_seed(0))
    labels["race"] = torch.tensor([0, 1, 9])
    with pytest.raises(ValueError, match="race"):
        world.render(labels, torch.Generator())


def test_spec_json_round_trip():
    spec = world.default_spec()
    back = world.BiasSpec.from_json(spec.to_json())
    for a in world.ATTRIBUTES:
        np.testing.assert_allclose(back.marginal(a), spec.marginal(a))


def test_contexts_have_their_own_bias_and_captions_name_what_they_mention():
    from helpers import world as W

    g = torch.Generator().manual_seed(0)
    shares = {c: W.context_spec(c).sample_labels(4000, g)["gender"].float().mean().item() for c in W.CONTEXTS}
    assert shares["doctor"] < 0.2 and shares["nurse"] > 0.85 and abs(shares["person"] - 0.25) < 0.03
    assert W.context_spec("ceo").marginal("race")[0] == pytest.approx(0.8)
    # correlations of the default world stay (glasses with age)
    assert W.context_spec("doctor").conditionals["glasses"] == W.default_spec().conditionals["glasses"]
    bare = W.sample_captioned(8, "nurse", seed=3)
    assert bare.captions == ["a portrait of a nurse"] * 8 and bare.images.shape == (8, 3, 32, 32)
    again = W.sample_captioned(8, "nurse", seed=3, mention_rate=0.6)
    assert again.captions == W.sample_captioned(8, "nurse", seed=3, mention_rate=0.6).captions
    assert torch.equal(again.images, bare.images)  # mentions change captions, never the renders
    lab = {a: 0 for a in W.ATTRIBUTES} | {"gender": 1, "smile": 1, "glasses": 1, "age": 2}
    assert W.caption(lab, "person", ("gender", "smile", "age", "glasses")) == "a portrait of a smiling old woman wearing glasses"
    assert W.caption(lab, "doctor", ("gender",)) == "a portrait of a doctor, a woman"
    assert W.caption(lab, "ceo", ("age",)) == "a portrait of an old CEO"
    with pytest.raises(ValueError, match="unknown context 'pilot'"):
        W.context_spec("pilot")
    with pytest.raises(ValueError, match="cannot mention"):
        W.caption(lab, "doctor", ("hair",))


def test_a_word_level_clip_tokenizer_of_the_captions_keeps_every_word_whole(tmp_path):
    import re

    from transformers import CLIPTokenizer

    from helpers import tiny
    from helpers import world as W

    caps = W.sample_captioned(500, "person", seed=1, mention_rate=0.7).captions + list(W.CONTEXTS.values())
    tok = CLIPTokenizer.from_pretrained(tiny.write_tokenizer(tmp_path / "tok", caps, max_length=40))
    words = {w for c in caps for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", c.lower())}
    assert all(len(tok(w).input_ids) == 3 for w in words)  # <start> word <end>
    ids = tok("a portrait of a smiling middle-aged CEO").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "portrait</w>", "of</w>", "a</w>", "smiling</w>",
                                                    "middle</w>", "-</w>", "aged</w>", "ceo</w>"]
    assert ids[0] == len(tok) - 2 and ids[-1] == len(tok) - 1  # the special tokens stay last
    plain = CLIPTokenizer.from_pretrained(tiny.write_tokenizer(tmp_path / "chars"))
    assert len(plain("doctor").input_ids) == 8  # characters only without words
