"""The sparse TopK training path equals the dense reference, values and gradients (docs/methods.md §2.7.6)."""
import pytest
import torch

from saes import build_sae


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_path_matches_dense_forward_and_backward(with_dead):
    torch.manual_seed(0)
    dense = build_sae("topk", d_in=24, d_sae=96, k=5, input_scale=1.7, dtype="float64")
    sparse = build_sae("topk", d_in=24, d_sae=96, k=5, input_scale=1.7, dtype="float64", sparse_kernel=True)
    with torch.no_grad():
        dense.b_dec.normal_(); dense.b_enc.normal_(std=0.1); dense.W_enc.add_(0.1 * torch.randn_like(dense.W_enc))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(40, 24, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    out_d, out_s = dense(x, dead_mask=dead), sparse(x, dead_mask=dead)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat)
    torch.testing.assert_close(out_s.codes, out_d.codes)
    assert set(out_s.losses) == set(out_d.losses) == ({"mse", "auxk"} if with_dead else {"mse"})
    torch.testing.assert_close(out_s.loss, out_d.loss)
    out_d.loss.backward()
    out_s.loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, msg=name)


def test_sparse_kernel_refuses_multi_topk():
    with pytest.raises(ValueError, match="multi_topk"):
        build_sae("topk", d_in=8, d_sae=32, k=4, sparse_kernel=True, multi_topk=True)
