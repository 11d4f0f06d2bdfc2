"""BiTAT transform: V stays orthonormal and s positive and normalised under training; PCA initialisation;
block aggregation (concatenated s, block-diagonal V) and Reading B's block-wide normalisation."""
import pytest
import torch

from bitat.transform import ImportanceTransform, aggregate, link_block


pytestmark = pytest.mark.usefixtures("one_thread")


def random_covariance(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, 3 * n, generator=gen, dtype=torch.float64)
    return a @ a.transpose(1, 2) / (3 * n)


def orthonormality_error(v: torch.Tensor) -> float:
    eye = torch.eye(v.shape[-1], dtype=v.dtype)
    return (v.transpose(-1, -2) @ v - eye).norm(dim=(-2, -1)).max().item()


@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp", "householder"])
@pytest.mark.parametrize("batch", [1, 3])
def test_v_stays_orthonormal_and_s_positive_normalised_while_training(orthogonal_map, batch):
    torch.manual_seed(0)
    n = 8
    t = ImportanceTransform(n, batch, orthogonal_map)
    t.init_from_covariance(random_covariance(n, batch))
    target = torch.randn(batch, n, n)
    v0 = t.basis_matrix().detach().clone()
    opt = torch.optim.Adam(t.parameters(), lr=0.05)
    for _ in range(25):  # a loss that pulls V and s far from their start
        loss = ((t.sigma() - target) ** 2).sum() + t.importance()[..., 0].sum() * 3
        opt.zero_grad()
        loss.backward()
        opt.step()
    v, s = t.basis_matrix().detach(), t.importance().detach()
    assert (v - v0).abs().max() > 1e-2, "V did not move"
    assert orthonormality_error(v) < 1e-5
    assert bool((s > 0).all())
    torch.testing.assert_close(s.sum(dim=1), torch.full((batch,), float(n)))


def test_pca_initialisation_reproduces_the_normalised_covariance():
    n = 6
    cov = random_covariance(n, seed=3)
    t = ImportanceTransform(n)
    assert torch.equal(t.basis_matrix().detach(), torch.eye(n).unsqueeze(0))  # V = I, s = 1 before calibration
    torch.testing.assert_close(t.importance().detach(), torch.ones(1, n))
    t.init_from_covariance(cov)
    expected = cov[0] * n / cov[0].trace()  # Reading A: Σ s = n
    torch.testing.assert_close(t.sigma().detach()[0].double(), expected, rtol=1e-4, atol=1e-5)
    s = t.importance().detach()[0]
    assert bool((s[:-1] >= s[1:]).all()), "importance follows the eigenvalues, largest first"
    with pytest.raises(ValueError, match="does not fit"):
        t.init_from_covariance(random_covariance(n + 1))


def test_a_dead_input_gives_identity_and_uniform_importance():
    t = ImportanceTransform(4, batch=2)
    cov = random_covariance(4, batch=2)
    cov[1] = 0.0
    t.init_from_covariance(cov)
    torch.testing.assert_close(t.basis_matrix().detach()[1], torch.eye(4))
    torch.testing.assert_close(t.importance().detach()[1], torch.ones(4))
    assert torch.isfinite(t.importance_raw).all()


def test_block_aggregation_concatenates_s_and_stacks_v_block_diagonally():
    sizes = (3, 5, 4)
    transforms = [ImportanceTransform(n) for n in sizes]
    for i, (t, n) in enumerate(zip(transforms, sizes)):
        t.init_from_covariance(random_covariance(n, seed=i))
    s, v = aggregate(transforms)
    assert s.shape == (12,) and v.shape == (12, 12)
    torch.testing.assert_close(s[3:8], transforms[1].importance().detach()[0])
    torch.testing.assert_close(v[3:8, 3:8], transforms[1].basis_matrix().detach()[0])
    assert v[:3, 3:].abs().max() == 0 and v[3:8, 8:].abs().max() == 0  # zero off-diagonal blocks
    assert orthonormality_error(v) < 1e-5


def test_reading_b_normalises_importance_across_the_block():
    small, large = ImportanceTransform(3, reading="B"), ImportanceTransform(5, reading="B")
    link_block([small, large])
    small.init_from_covariance(random_covariance(3, seed=1) * 10.0)  # ten times the input energy
    large.init_from_covariance(random_covariance(5, seed=2))
    s_small, s_large = small.importance().detach(), large.importance().detach()
    torch.testing.assert_close(s_small.sum() + s_large.sum(), torch.tensor(8.0))
    assert s_small.mean() > 5 * s_large.mean(), "Reading B ranks directions across layers by input energy"
    # Reading A normalises each layer on its own
    a = ImportanceTransform(3)
    a.init_from_covariance(random_covariance(3, seed=1) * 10.0)
    torch.testing.assert_close(a.importance().detach().sum(), torch.tensor(3.0))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="orthogonal_map"):
        ImportanceTransform(3, orthogonal_map="qr")
    with pytest.raises(ValueError, match="reading"):
        ImportanceTransform(3, reading="C")
