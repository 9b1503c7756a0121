"""The count of active factors (pyro_ldvae/api/factor_selection.py) on fits with a known structure."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_ldvae.api.factor_selection import count_active, principal_logit_spread


def three_factors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Independent z ``(500, 3)`` and loadings ``(100, 3)`` with spreads about 3 : 2.5 : 2."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(500, 3)), rng.normal(size=(100, 3)) * np.array([3.0, 2.5, 2.0])


def test_spread_matches_the_principal_axes_of_the_logits():
    z, w = three_factors()
    logits = z @ (w - w.mean(0)).T  # (cells, genes)
    expected = np.linalg.svd(logits - logits.mean(0), compute_uv=False)[:3] / np.sqrt(len(z) - 1)
    np.testing.assert_allclose(principal_logit_spread(z, w), expected, rtol=1e-8)


def test_a_rotated_fit_has_the_same_spread():
    z, w = three_factors()
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    np.testing.assert_allclose(principal_logit_spread(z @ rotation, w @ rotation), principal_logit_spread(z, w))


def test_a_factor_split_over_two_columns_counts_once():
    z, w = three_factors()
    rng = np.random.default_rng(2)
    # The third factor carried by two columns whose z are correlated (-0.9 or so), as fits do.
    z_a = 0.8 * z[:, 2] + 0.2 * rng.normal(size=len(z))
    z_b = -0.8 * z[:, 2] + 0.2 * rng.normal(size=len(z))
    split_z = np.column_stack([z[:, :2], z_a, z_b, 0.01 * rng.normal(size=len(z))])
    split_w = np.column_stack([w[:, :2], 0.8 * w[:, 2], -0.8 * w[:, 2], rng.normal(size=len(w))])
    per_column = np.sqrt(split_z.var(0) * (split_w**2).sum(0))
    assert (per_column[:4] > 0.3 * per_column.max()).sum() == 4  # each column on its own looks active
    assert count_active(principal_logit_spread(split_z, split_w), 0.3) == 3


def test_a_shift_shared_by_all_genes_is_ignored():
    z, w = three_factors()
    shifted = w + np.array([5.0, -3.0, 10.0])  # the softmax over genes cannot see it
    np.testing.assert_allclose(principal_logit_spread(z, shifted), principal_logit_spread(z, w))


def test_count_active_and_bad_input():
    assert count_active(np.array([2.0, 1.0, 0.5, 0.1]), 0.3) == 2
    assert count_active(np.zeros(4), 0.3) == 0
    with pytest.raises(ValueError, match="threshold must be in"):
        count_active(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="must share n_latent"):
        principal_logit_spread(np.ones((5, 3)), np.ones((4, 2)))


def test_linear_scvi_lists_the_strongest_factors_and_checks_the_threshold():
    from pyro_ldvae import LinearSCVI, simulate

    adata = simulate(n_cells=150, n_genes=20, n_latent=2, seed=3)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=4, loadings_prior="ard", seed=3)
    model.train(max_epochs=2, progress_bar=False)
    active = model.get_active_factors()
    spread = principal_logit_spread(model.get_latent_representation(), model.get_loadings().to_numpy())
    assert len(active) == count_active(spread, 0.3) >= 1
    assert active == list(model.get_factor_variance_explained(sort=True).index[: len(active)])
    assert len(model.get_active_factors(threshold=1.0)) == 1
    with pytest.raises(ValueError, match="threshold must be in"):
        model.get_active_factors(threshold=1.5)
