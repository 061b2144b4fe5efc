"""Numeric properties of every counterfactual attention method (docs/method.md, section 5)."""

import pytest
import torch

from causalmm.interventions import COUNTERFACTUALS as METHODS
from causalmm.interventions import counterfactual_attention, diffusion_noise, feature_gate

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMALISED = ["random", "uniform", "reversed", "shuffle"]


def _probs(shape=(2, 3, 5, 6), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 2, -1).to(dtype)


def _causal_mask(q, k):
    i = torch.arange(q)[:, None] + (k - q)
    return (torch.arange(k)[None, :] <= i)[None, None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", NORMALISED)
def test_rows_sum_to_one_over_allowed_keys_and_zero_elsewhere(method, dtype):
    p = _probs(dtype=dtype)
    mask = _causal_mask(5, 6)
    out = counterfactual_attention(p, method, key_mask=mask, generator=torch.Generator().manual_seed(1))
    assert out.shape == p.shape and out.dtype == dtype
    full = mask.expand_as(p)
    assert torch.all(out[~full] == 0)
    sums = out.float().sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(sums, torch.ones_like(sums), atol=tol)
    assert torch.isfinite(out).all()
    assert (out >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_fully_masked_and_constant_rows_give_no_nan(method, dtype):
    p = torch.full((1, 2, 3, 4), 0.25, dtype=dtype)
    p[0, 0, 0] = float("nan")  # what a softmax over no allowed key can produce
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 0, :] = False  # query 0 may see nothing
    out = counterfactual_attention(p, method, key_mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.all(out[..., 0, :] == 0)
    if method != "reversed_raw":
        assert torch.allclose(out[..., 1:, :].float().sum(-1), torch.ones(1, 2, 2), atol=1e-2)


def test_uniform_and_reversed_against_hand_computed_values():
    p = torch.tensor([[[[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]]]])
    mask = torch.tensor([[[[True, True, True, False], [True, True, False, False]]]])
    uni = counterfactual_attention(p, "uniform", key_mask=mask)
    assert torch.allclose(uni, torch.tensor([[[[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0]]]]))
    # reversed: max - A over allowed keys = [0, .2, .3] -> /0.5 ; [0, .2] -> /0.2
    rev = counterfactual_attention(p, "reversed", key_mask=mask)
    assert torch.allclose(rev, torch.tensor([[[[0.0, 0.4, 0.6, 0], [0.0, 1.0, 0, 0]]]]))
    raw = counterfactual_attention(p, "reversed_raw", key_mask=mask)
    assert torch.allclose(raw, torch.tensor([[[[0.0, 0.2, 0.3, 0], [0.0, 0.2, 0, 0]]]]))
    # the unnormalised uniform of the original release: every allowed key gets the row mean
    mean = counterfactual_attention(p, "uniform", key_mask=mask, renormalize=False)
    assert torch.allclose(mean, torch.tensor([[[[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0]]]]))


def test_reversed_of_constant_row_is_uniform():
    p = torch.full((1, 1, 1, 4), 0.25)
    assert torch.allclose(counterfactual_attention(p, "reversed"), p)


def test_shuffle_is_a_permutation_of_allowed_values():
    p = _probs((1, 2, 4, 6))
    mask = _causal_mask(4, 6)
    out = counterfactual_attention(p, "shuffle", key_mask=mask, generator=torch.Generator().manual_seed(3))
    m = mask.expand_as(p)
    for h in range(2):
        for q in range(4):
            allowed = m[0, h, q]
            src = torch.where(allowed, p[0, h, q], 0)
            src = src / src.sum()
            assert torch.allclose(out[0, h, q][allowed].sort().values, src[allowed].sort().values)
    assert not torch.allclose(out, torch.where(m, p, 0) / torch.where(m, p, 0).sum(-1, keepdim=True))


@pytest.mark.parametrize("method", ["random", "shuffle"])
def test_seeded_determinism(method):
    p = _probs()
    a = counterfactual_attention(p, method, generator=torch.Generator().manual_seed(7))
    b = counterfactual_attention(p, method, generator=torch.Generator().manual_seed(7))
    c = counterfactual_attention(p, method, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_ignores_the_factual_map_and_differs_from_it():
    p = _probs()
    out = counterfactual_attention(p, "random", generator=torch.Generator().manual_seed(0))
    other = counterfactual_attention(_probs(seed=5), "random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, other)
    assert (out - p).abs().max() > 0.05


def test_renormalize_false_keeps_raw_noise():
    p = _probs()
    raw = counterfactual_attention(p, "random", generator=torch.Generator().manual_seed(0), renormalize=False)
    assert not torch.allclose(raw.sum(-1), torch.ones(2, 3, 5))
    assert (raw >= 0).all() and (raw < 1).all()


def test_bad_input_errors_name_the_problem():
    p = _probs()
    with pytest.raises(ValueError, match="unknown counterfactual attention method 'rnd'"):
        counterfactual_attention(p, "rnd")
    with pytest.raises(ValueError, match="batch, heads, queries, keys"):
        counterfactual_attention(p[0], "uniform")
    with pytest.raises(ValueError, match="bool"):
        counterfactual_attention(p, "uniform", key_mask=torch.ones(1, 1, 5, 6))
    with pytest.raises(ValueError, match="does not broadcast"):
        counterfactual_attention(p, "uniform", key_mask=torch.ones(1, 1, 5, 4, dtype=torch.bool))


def test_feature_gate_matches_its_definition():
    feats = torch.randn(2, 4, 3)
    probs = _probs((2, 2, 5, 5))
    out = feature_gate(feats, probs, "uniform")
    # uniform, unnormalised: every entry is the row mean 1/5, so the gate is 0.2 everywhere
    assert torch.allclose(out, feats * 0.2, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        feature_gate(torch.randn(1, 3, 2), probs[:1], "uniform")


def test_diffusion_noise_interpolates_towards_gaussian():
    x = torch.ones(1, 3, 32, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.allclose(diffusion_noise(x, 0, generator=g()), x, atol=0.05)
    far = diffusion_noise(x, 999, generator=g())
    assert abs(float(far.mean())) < 0.1 and abs(float(far.std()) - 1) < 0.1
    mid = diffusion_noise(x, 500, generator=g())
    assert torch.equal(mid, diffusion_noise(x, 500, generator=g()))
    assert 0.0 < float(mid.mean()) < 1.0
    with pytest.raises(ValueError, match="noise step"):
        diffusion_noise(x, 1000)
