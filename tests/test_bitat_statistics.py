"""BiTAT input statistics: which vectors a conv's weight rows multiply, the streaming second moment, PCA."""
import pytest
import torch
from torch import nn

from bitat.statistics import CovarianceAccumulator, pca, statistic_mode, statistic_rows, statistic_shape


pytestmark = pytest.mark.usefixtures("one_thread")


def test_streaming_pca_recovers_known_eigenvectors_and_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    mix = q * eigenvalues.sqrt()  # x = Q diag(λ)^½ z has E[x xᵀ] = Q diag(λ) Qᵀ
    acc = CovarianceAccumulator(n)
    batches = [(torch.randn(4000, n, generator=gen, dtype=torch.float64) @ mix.T).float() for _ in range(25)]
    for rows in batches:
        acc.update(rows)
    cov = acc.covariance()[0]
    everything = torch.cat(batches).double()
    torch.testing.assert_close(cov, everything.T @ everything / len(everything))  # streaming = one pass
    values, vectors = pca(cov)
    ref_values, ref_vectors = torch.linalg.eigh(cov)
    torch.testing.assert_close(values, ref_values.flip(0))
    torch.testing.assert_close(vectors.abs(), ref_vectors.flip(1).abs())
    # and they are the true ones, up to sampling noise and sign
    assert torch.allclose(values, eigenvalues, rtol=0.05, atol=0.02)
    overlap = (vectors.T @ q).abs().diagonal()
    assert overlap.min() > 0.99
    assert values.dtype == torch.float64 and bool((values[:-1] >= values[1:]).all())


def test_centred_covariance_and_row_subsampling():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3000, 3, generator=gen) + torch.tensor([2.0, -1.0, 0.5])
    acc = CovarianceAccumulator(3)
    acc.update(rows)
    torch.testing.assert_close(acc.covariance(centered=True)[0], torch.cov(rows.T.double(), correction=0))
    capped = CovarianceAccumulator(3, max_rows_per_update=100, generator=torch.Generator().manual_seed(0))
    capped.update(rows)
    capped.update(rows)
    assert capped.count == 200
    with pytest.raises(ValueError, match="never ran"):
        CovarianceAccumulator(3).covariance()
    with pytest.raises(ValueError, match="expected rows of shape"):
        CovarianceAccumulator(4).update(rows)


@pytest.mark.parametrize("cin, cout, k, groups, cap, mode, shape", [
    (4, 8, 3, 1, 2048, "full", (1, 36)),
    (4, 8, 1, 1, 2, "full", (1, 4)),  # a 1x1 conv's patch is its channel vector, whatever the cap
    (64, 8, 3, 1, 512, "channel", (1, 64)),
    (6, 6, 3, 6, 2048, "spatial", (1, 9)),
])
def test_statistic_modes_follow_the_layer_geometry(cin, cout, k, groups, cap, mode, shape):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    assert statistic_mode(conv, cap) == mode
    assert statistic_shape(conv, mode) == shape
    depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    assert statistic_mode(depthwise, depthwise="per_channel") == "spatial_per_channel"
    assert statistic_shape(depthwise, "spatial_per_channel") == (6, 9)
    with pytest.raises(ValueError, match="depthwise statistic"):
        statistic_mode(conv, depthwise="both")


def test_full_rows_are_the_patches_the_weight_rows_multiply():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 9, 9)
    rows = statistic_rows(conv, x, "full")[0]  # (N·L, C·k·k)
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.flatten(1).T, out, rtol=1e-4, atol=1e-5)


def test_spatial_rows_give_the_depthwise_outputs_and_the_per_channel_statistic():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 4, 6, 6)
    per_channel = statistic_rows(conv, x, "spatial_per_channel")  # (C, N·L, k·k)
    out = conv(x).permute(1, 0, 2, 3).reshape(4, -1)
    torch.testing.assert_close(torch.einsum("cri,ci->cr", per_channel, conv.weight.flatten(1)), out,
                               rtol=1e-4, atol=1e-5)
    shared = statistic_rows(conv, x, "spatial")[0]
    assert shared.shape == (4 * 2 * 36, 9)
    # the shared statistic pools every channel's patches: its second moment is the mean of the per-channel ones
    acc_shared, acc_each = CovarianceAccumulator(9), CovarianceAccumulator(9, batch=4)
    acc_shared.update(shared)
    acc_each.update(per_channel)
    torch.testing.assert_close(acc_shared.covariance()[0], acc_each.covariance().mean(0))


def test_channel_rows_are_pixels():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    rows = statistic_rows(conv, x, "channel")[0]
    assert rows.shape == (8, 3)
    torch.testing.assert_close(rows[0], x[0, :, 0, 0])
