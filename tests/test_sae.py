"""TopK SAE: planted-dictionary recovery, exact save/load, sparse = dense, clear errors."""
import pytest
import torch

from helpers import sae as S


def planted(n, dictionary, k=4, seed=0):
    """Rows that are each a positive mix of ``k`` atoms of ``dictionary`` plus an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    atoms, d = dictionary.shape
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :k]
    coef = 0.5 + torch.rand(n, k, generator=g)
    return torch.einsum("nk,nkd->nd", coef, dictionary[idx]) + 0.3 + 0.01 * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def dictionary():
    g = torch.Generator().manual_seed(123)
    d = torch.randn(128, 32, generator=g)
    return d / d.norm(dim=1, keepdim=True)


def test_recovers_planted_dictionary(dictionary):
    x = planted(60_000, dictionary)
    sae, hist = S.train_sae(x, S.SAEConfig(d_in=32, expansion=8, k=4),
                            S.SAETrainConfig(steps=1000, batch_size=1024, lr=2e-3, aux_k=16, dead_rows=50_000),
                            progress=False)
    cos = (dictionary @ sae.W_dec.detach().T).max(1).values  # best-matching decoder row per true atom
    assert (cos > 0.9).float().mean() >= 0.95 and cos.mean() > 0.95, cos
    held = S.evaluate(sae, planted(10_000, dictionary, seed=1))
    assert held["fvu"] < 0.2 and held["l0"] <= 4
    assert hist[-1]["fvu"] < hist[0]["fvu"]
    # decoder rows stay unit-norm through training
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))


def test_sparse_path_equals_dense_formulation():
    torch.manual_seed(0)
    sae = S.TopKSAE(S.SAEConfig(d_in=16, expansion=4, k=3))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.input_scale.fill_(1.7)
    x = torch.randn(64, 16)
    a, b = sae(x), sae.forward_dense(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # same loss => same gradients
    a.pow(2).sum().backward()
    g_sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    sae.forward_dense(x).pow(2).sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(g_sparse[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # dense codes decode to the same rows
    torch.testing.assert_close(sae.decode(sae.encode(x)), a, rtol=1e-5, atol=1e-5)


def test_h_maps_roundtrip_shapes():
    sae = S.TopKSAE(S.SAEConfig(d_in=8, expansion=2, k=2))
    h = torch.randn(3, 8, 4, 5)
    assert sae.latents_of(h).shape == (3, 16, 4, 5)
    assert sae.reconstruct(h).shape == h.shape
    torch.testing.assert_close(S.from_rows(S.to_rows(h), h.shape), h)
    # row order matches positions: row 0 is sample 0 at (0, 0)
    torch.testing.assert_close(S.to_rows(h)[0], h[0, :, 0, 0])


def test_save_load_exact(tmp_path):
    torch.manual_seed(1)
    sae = S.TopKSAE(S.SAEConfig(d_in=8, expansion=2, k=3))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.input_scale.fill_(3.0)
    S.save_sae(sae, tmp_path / "s.safetensors", meta={"note": "x"})
    back, meta = S.load_sae(tmp_path / "s.safetensors")
    assert back.cfg == sae.cfg and meta == {"note": "x"}
    for (n, a), (_, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(10, 8)
    assert torch.equal(sae(x), back(x))


def test_clear_errors(tmp_path, tiny_unet_dir):
    from helpers import models

    sae = S.TopKSAE(S.SAEConfig(d_in=128, expansion=2, k=4))
    with pytest.raises(ValueError, match="reads 128-channel rows but h has 32"):
        sae.reconstruct(torch.randn(1, 32, 4, 4))
    m = models.load_model(tiny_unet_dir)
    from helpers import intervention as I

    e = I.Edit("gender", {0: [1]}, beta=2.0, mode="add", cls=0)
    with pytest.raises(ValueError, match="128-channel activations at 'mid_block', but h at 'mid_block' has shape"):
        I.sample_edited(m, sae, [e], n=1, steps=2)
    with pytest.raises(FileNotFoundError, match="no SAE file"):
        S.load_sae(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="k must be"):
        S.SAEConfig(d_in=4, expansion=1, k=5)
    with pytest.raises(ValueError, match="fewer than one batch"):
        S.train_sae(torch.randn(10, 128), sae.cfg, S.SAETrainConfig(batch_size=64), progress=False)


def test_scaled_k():
    assert S.scaled_k(512) == 32 and S.scaled_k(128) == 8


def test_bad_training_data_and_tampered_files_are_refused(tmp_path):
    cfg = S.SAEConfig(d_in=8, expansion=2, k=2)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(256, 8, generator=g)
    tc = S.SAETrainConfig(steps=5, batch_size=64, log_every=5)
    for bad_rows, msg in ((torch.where(torch.arange(256)[:, None] == 7, float("nan"), rows), "1 of 256 rows hold NaN"),
                          (rows.clone().index_fill_(0, torch.tensor([3, 9]), float("inf")), "2 of 256 rows hold NaN or inf"),
                          (torch.ones(256, 8), "zero variance"), (torch.zeros(256, 8), "zero variance")):
        with pytest.raises(ValueError, match=msg):
            S.train_sae(bad_rows, cfg, tc, progress=False)
    for kw, msg in (({"steps": 0}, "steps must be an integer ≥ 1"), ({"batch_size": 0}, "batch_size must be")):
        with pytest.raises(ValueError, match=msg):
            S.train_sae(rows, cfg, S.SAETrainConfig(**{"steps": 5, "batch_size": 64, **kw}), progress=False)
    with pytest.raises(ValueError, match="loss became"):
        S.train_sae(rows * 1e30, cfg, tc, progress=False)
    sae, _ = S.train_sae(rows, cfg, tc, progress=False)
    S.save_sae(sae, tmp_path / "ok.safetensors")
    S.load_sae(tmp_path / "ok.safetensors")
    from helpers import io

    t, m = io.load_tensors(tmp_path / "ok.safetensors")
    m["sae_config"]["k"] = 1  # tampered metadata
    io.save_tensors(tmp_path / "k.safetensors", t, meta=m)
    with pytest.raises(ValueError, match="digest mismatch"):
        S.load_sae(tmp_path / "k.safetensors")
    t2 = dict(t, W_dec=t["W_dec"].clone().fill_(float("nan")))
    io.save_tensors(tmp_path / "nan.safetensors", t2, meta=m)
    with pytest.raises(ValueError, match="NaN or inf in"):
        S.load_sae(tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        S.load_sae(tmp_path / "cut.safetensors")
