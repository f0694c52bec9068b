"""Property tests for the resamplers: unbiased offspring counts, indices in range, degenerate and dead weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twistlm.errors import ConfigError, ResamplingError
from twistlm.resampling import RESAMPLERS, ess, get_resampler, log_mean_exp, normalized_weights

NAMES = sorted(RESAMPLERS)
NEG_INF = float("-inf")

log_weight_rows = st.lists(
    st.one_of(st.floats(min_value=-30, max_value=30), st.just(NEG_INF)), min_size=1, max_size=12
).filter(lambda row: any(math.isfinite(x) for x in row))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(row=log_weight_rows, seed=st.integers(0, 2**31 - 1), n=st.integers(1, 16))
def test_indices_in_range_and_zero_weights_never_chosen(name, row, seed, n):
    log_w = torch.tensor([row], dtype=torch.float64)
    idx = get_resampler(name)(log_w, n, torch.Generator().manual_seed(seed))
    assert idx.shape == (1, n)
    assert idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < len(row)
    assert all(math.isfinite(row[i]) for i in idx[0].tolist())


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(row=st.lists(st.floats(min_value=-4, max_value=4), min_size=2, max_size=6), seed=st.integers(0, 2**20))
def test_expected_offspring_counts_equal_k_times_weights(name, row, seed):
    """E[copies of k] = K ŵ_k, checked over 4,000 independent groups drawn in one batch (5 standard errors)."""
    groups, k = 4000, len(row)
    log_w = torch.tensor([row] * groups, dtype=torch.float64)
    idx = get_resampler(name)(log_w, k, torch.Generator().manual_seed(seed))
    counts = torch.zeros(groups, k, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    expected = k * normalized_weights(log_w[0])
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(groups)
    assert torch.all((mean - expected).abs() <= 5 * se + 1e-6), (mean, expected, se)


@pytest.mark.parametrize("name", ["stratified", "systematic", "residual"])
def test_low_variance_schemes_keep_counts_within_one_of_k_w(name):
    """Stratified/systematic/residual give each particle ⌊Kŵ⌋ or more copies in the systematic/residual case."""
    log_w = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64))
    idx = get_resampler(name)(log_w, 8, torch.Generator().manual_seed(0))
    counts = torch.bincount(idx[0], minlength=4)
    if name in ("systematic", "residual"):
        assert counts.tolist() == [4, 2, 1, 1]
    assert int(counts.sum()) == 8


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_weights_pick_the_only_finite_particle(name):
    log_w = torch.tensor([[NEG_INF, NEG_INF, 3.0, NEG_INF]], dtype=torch.float64)
    idx = get_resampler(name)(log_w, 4, torch.Generator().manual_seed(0))
    assert idx.tolist() == [[2, 2, 2, 2]]


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_weights_raise_a_clear_error(name):
    log_w = torch.full((2, 3), NEG_INF, dtype=torch.float64)
    with pytest.raises(ResamplingError, match="weight zero"):
        get_resampler(name)(log_w, 3, torch.Generator().manual_seed(0))


def test_nan_weights_raise():
    with pytest.raises(ResamplingError, match="NaN"):
        normalized_weights(torch.tensor([[0.0, float("nan")]]))


def test_unknown_resampler_names_the_choices():
    with pytest.raises(ConfigError, match="systematic"):
        get_resampler("bogus")


def test_ess_and_log_mean_exp():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, NEG_INF, NEG_INF, NEG_INF], [NEG_INF] * 4], dtype=torch.float64)
    assert torch.allclose(ess(log_w), torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    lme = log_mean_exp(log_w)
    assert lme[0] == pytest.approx(0.0) and lme[1] == pytest.approx(-math.log(4)) and torch.isneginf(lme[2])


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_indices(name):
    log_w = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = get_resampler(name)(log_w, 7, torch.Generator().manual_seed(5))
    b = get_resampler(name)(log_w, 7, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
