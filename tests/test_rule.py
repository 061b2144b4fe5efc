"""The decoding rule against hand-computed numbers, and token selection through transformers' processors."""

import math

import pytest
import torch

from causalmm.decoding import GenerationOptions, TokenSelector, contrast, plausible


def test_contrast_matches_the_hand_computed_example():
    # docs/method.md, section 4: l = [2, 1, -3], l_V = [1, 1.5, -3], gamma 1, epsilon 0.1
    fl, lv = torch.tensor([2.0, 1.0, -3.0]), torch.tensor([1.0, 1.5, -3.0])
    z = contrast(fl, [lv], gamma=1.0, epsilon=0.1)
    assert z[:2].tolist() == [3.0, 0.5] and z[2] == -math.inf
    # two branches: (1 + 2 gamma) l - gamma (l_a + l_b) with gamma 0.5
    la, lb = torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    z2 = contrast(fl, [la, lb], gamma=0.5, epsilon=0.0)
    assert torch.allclose(z2, torch.tensor([2 * 2 - 0.5, 2 * 1 - 1.0, 2 * -3.0]))


def test_plausibility_cut_is_on_the_factual_probabilities():
    fl = torch.tensor([2.0, 1.0, -3.0])
    p = fl.softmax(-1)
    for eps in (0.0, 0.01, 0.1, 0.5, 1.0):
        assert plausible(fl, eps).tolist() == (p >= eps * p.max()).tolist()
    # a counterfactual that favours a cut token cannot bring it back
    z = contrast(fl, [torch.tensor([5.0, 5.0, -50.0])], gamma=10.0, epsilon=0.1)
    assert z[2] == -math.inf and z.argmax() == 0


def test_log_probabilities_would_shift_each_row_by_one_constant():
    """Why the contrast has no log-prob option (docs/method.md): the rule's weights sum to one, so log-softmax
    inputs move every score of a row by the same amount and no decision changes."""
    g = torch.Generator().manual_seed(0)
    fl, cfs = torch.randn(4, 50, generator=g) * 3, [torch.randn(4, 50, generator=g) * 3 for _ in range(2)]
    raw = contrast(fl, cfs, gamma=1.3, epsilon=0.0)
    logp = contrast(fl.log_softmax(-1), [c.log_softmax(-1) for c in cfs], gamma=1.3, epsilon=0.0)
    shift = logp - raw
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)
    assert torch.equal(raw.argmax(-1), logp.argmax(-1))
    assert torch.allclose(raw.softmax(-1), logp.softmax(-1), atol=1e-5)


def test_greedy_with_repetition_penalty_by_hand():
    scores = torch.tensor([2.0, 1.9, -1.0, -0.5])
    assert TokenSelector(GenerationOptions())(scores, [0], torch.Generator()) == 0
    # penalty 1.2 on token 0 (positive: divided): 2.0 / 1.2 = 1.67 < 1.9
    assert TokenSelector(GenerationOptions(repetition_penalty=1.2))(scores, [0], torch.Generator()) == 1
    # on a negative score it multiplies: -0.5 * 1.2 = -0.6 < -1.0 is false, so token 3 still beats 2
    sel = TokenSelector(GenerationOptions(repetition_penalty=1.2))
    assert sel(torch.tensor([-1.0, -0.5]), [1], torch.Generator()) == 1
    assert sel(torch.tensor([-0.55, -0.5]), [1], torch.Generator()) == 0  # -0.6 < -0.55


@pytest.mark.parametrize("top_k, top_p, allowed", [(2, None, {0, 1}), (None, 0.5, {0}), (None, 0.8, {0, 1})])
def test_sampling_draws_only_from_the_kept_tokens(top_k, top_p, allowed):
    # probabilities 0.6, 0.3, 0.1: top-k 2 keeps {0, 1}; top-p 0.5 keeps the top token only; 0.8 keeps two
    scores = torch.tensor([0.6, 0.3, 0.1]).log()
    sel = TokenSelector(GenerationOptions(do_sample=True, top_k=top_k, top_p=top_p))
    g = torch.Generator().manual_seed(0)
    drawn = {sel(scores, [], g) for _ in range(200)}
    assert drawn == allowed


def test_sampling_is_a_function_of_the_generator_seed():
    scores = torch.randn(100, generator=torch.Generator().manual_seed(1))
    sel = TokenSelector(GenerationOptions(do_sample=True, temperature=0.7))
    a = [sel(scores, [], torch.Generator().manual_seed(s)) for s in range(20)]
    b = [sel(scores, [], torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b and len(set(a)) > 1
