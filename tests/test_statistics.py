"""The statistics the suites and tables quote, taken from scipy: the chi-square goodness-of-fit test (with
Cochran's pooling of rare categories, which scipy does not do) and the growth exponent c of a + b * N^c."""
import math

import numpy as np
import pytest
import torch

from harness.oracles import assert_distribution, chi_square_pvalue
from harness.plots import growth_exponent


@pytest.mark.parametrize("counts, probs, statistic, dof, pvalue", [
    # 1 dof: P(chi2 > x) = erfc(sqrt(x / 2)); (60 - 50)^2 / 50 + (40 - 50)^2 / 50 = 4
    ([60, 40], [0.5, 0.5], 4.0, 1, math.erfc(math.sqrt(2.0))),
    # 2 dof: P(chi2 > x) = exp(-x / 2); (10^2 + 10^2 + 0) / 20 = 10
    ([30, 10, 20], [1, 1, 1], 10.0, 2, math.exp(-5.0)),
    # unnormalized probabilities are scaled to the draws: expected 25 and 75
    ([25, 75], [1, 3], 0.0, 1, 1.0),
])
def test_chi_square_matches_closed_forms(counts, probs, statistic, dof, pvalue):
    got = chi_square_pvalue(torch.tensor(counts), torch.tensor(probs, dtype=torch.float64))
    assert got == (pytest.approx(statistic, rel=1e-12), pytest.approx(pvalue, rel=1e-12), dof)


def test_chi_square_at_table_critical_values():
    # the 5% and 1% critical values of chi-square on 1 and 10 dof, as printed in every statistics table
    from scipy.stats import chi2

    for dof, critical, alpha in [(1, 3.841, 0.05), (10, 18.307, 0.05), (10, 23.209, 0.01)]:
        assert chi2.sf(critical, dof) == pytest.approx(alpha, rel=1e-3)
    # a statistic of 3.841 on 1 dof: 2 categories of 10,000 draws each expected, 10,000 + d observed
    d = math.sqrt(3.841 * 10_000 / 2)
    _, pvalue, dof = chi_square_pvalue(torch.tensor([10_000 + d, 10_000 - d]), torch.tensor([0.5, 0.5]))
    assert (dof, pvalue) == (1, pytest.approx(0.05, rel=1e-3))


def test_chi_square_agrees_with_the_incomplete_gamma_tail():
    """The p-value scipy computes is the regularized upper incomplete gamma function Q(dof/2, x/2) (Abramowitz &
    Stegun 26.4), which the hand-written version evaluated with torch.special.gammaincc."""
    generator = torch.Generator().manual_seed(0)
    for categories in (2, 5, 40, 300):
        probs = torch.rand(categories, generator=generator, dtype=torch.float64) + 0.05
        counts = torch.multinomial(probs, 20_000, replacement=True, generator=generator).bincount(minlength=categories)
        counts[0] += 150  # a biased first category, so that the p-values are not all near 1
        statistic, pvalue, dof = chi_square_pvalue(counts, probs)
        tail = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                       torch.tensor(statistic / 2, dtype=torch.float64)).item()
        assert dof == categories - 1 and pvalue == pytest.approx(tail, rel=1e-9, abs=1e-300)


def test_chi_square_pools_rare_categories():
    # 100 draws: expected 50, 45, 2, 2, 1; the last three (under 5) are pooled into one category expected 5
    counts = torch.tensor([48, 44, 4, 3, 1])
    statistic, _, dof = chi_square_pvalue(counts, torch.tensor([0.5, 0.45, 0.02, 0.02, 0.01], dtype=torch.float64))
    assert dof == 2
    assert statistic == pytest.approx((48 - 50) ** 2 / 50 + (44 - 45) ** 2 / 45 + (8 - 5) ** 2 / 5, rel=1e-12)
    # nothing left to compare: one category, or no draws
    assert chi_square_pvalue(torch.tensor([7]), torch.tensor([1.0])) == (0.0, 1.0, 0)
    assert chi_square_pvalue(torch.tensor([0, 0]), torch.tensor([0.5, 0.5])) == (0.0, 1.0, 0)
    with pytest.raises(ValueError, match="counts has 2 categories, probs has 3"):
        chi_square_pvalue(torch.tensor([1, 2]), torch.tensor([0.2, 0.3, 0.5]))


def test_a_category_expected_exactly_five_times_is_not_pooled():
    # Cochran's rule pools categories expected fewer than 5 times: 100 draws expected 90, 5, 5 keep three categories
    _, _, dof = chi_square_pvalue(torch.tensor([88, 6, 6]), torch.tensor([18.0, 1.0, 1.0], dtype=torch.float64))
    assert dof == 2


def test_assert_distribution_rejects_a_biased_sampler():
    generator = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    fair = torch.multinomial(probs, 10_000, replacement=True, generator=generator).bincount(minlength=4)
    assert assert_distribution(fair, probs) >= 1e-4
    biased = torch.multinomial(torch.tensor([0.12, 0.2, 0.3, 0.38]), 10_000, replacement=True,
                               generator=generator).bincount(minlength=4)
    with pytest.raises(AssertionError, match=r"chi-square .* on 3 dof over 10000 draws"):
        assert_distribution(biased, probs)


def grid_search_exponent(n, values) -> float:
    """The hand-written fit growth_exponent replaced, kept here as the reference it must agree with: c on a 0.01
    grid in [0, 3], a and b by linear least squares for each c, residuals relative to the value, b >= 0."""
    n, y = np.asarray(n, float), np.asarray(values, float)
    weight = 1.0 / np.abs(y)
    best_c, best_residual = float("nan"), float("inf")
    for c in np.arange(0.0, 3.0 + 1e-9, 0.01):
        design = np.stack([np.ones_like(n), n**c], axis=1) * weight[:, None]
        coef, *_ = np.linalg.lstsq(design, y * weight, rcond=None)
        residual = float(((design @ coef - y * weight) ** 2).sum())
        if coef[1] >= 0 and residual < best_residual:
            best_c, best_residual = float(c), residual
    return best_c


SIZES = np.array([16, 32, 64, 128, 256, 512, 1024])


@pytest.mark.parametrize("c", [0.5, 1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_growth_exponent_recovers_c_under_noise(c, offset):
    """value = offset + 10 (N / 1024)^c with 1% multiplicative noise (seeded): the fit finds c within 0.05, and
    lands within half a step of the grid search it replaced (the grid rounds the same optimum to 0.01)."""
    rng = np.random.default_rng(int(100 * c + offset))
    values = (offset + 10 * (SIZES / 1024) ** c) * (1 + 0.01 * rng.standard_normal(len(SIZES)))
    fitted = growth_exponent(SIZES, values)
    assert fitted == pytest.approx(c, abs=0.05)
    assert fitted == pytest.approx(grid_search_exponent(SIZES, values), abs=0.0051)


def test_growth_exponent_of_exact_curves_and_degenerate_input():
    assert growth_exponent(SIZES, 3.0 + 2e-4 * SIZES**1.7) == pytest.approx(1.7, abs=1e-4)
    # repeated sizes (two runs of each) are fitted together
    assert growth_exponent(np.tile(SIZES, 2), np.tile(5.0 + SIZES, 2)) == pytest.approx(1.0, abs=1e-4)
    # logarithmic growth is slower than any power: c goes to 0 (and the fit still converges)
    assert growth_exponent(SIZES, np.log2(SIZES)) < 0.05
    # three parameters: two sizes fit any c
    assert math.isnan(growth_exponent([16, 32, 16], [1.0, 2.0, 1.1]))
