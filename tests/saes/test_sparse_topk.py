"""The TopK fast path equals the dense reference in fp32 too, values and gradients (docs/methods.md §2.7.6); the
float64 equalities of the whole family are in test_fast_path.py."""
import pytest
import torch

from saes import build_sae


@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_path_matches_dense_forward_and_backward(with_dead, multi_topk):
    torch.manual_seed(0)
    dense = build_sae("topk", d_in=24, d_sae=96, k=5, input_scale=1.7, kernel="dense", multi_topk=multi_topk)
    sparse = build_sae("topk", d_in=24, d_sae=96, k=5, input_scale=1.7, multi_topk=multi_topk)
    with torch.no_grad():
        dense.b_dec.normal_(); dense.b_enc.normal_(std=0.1); dense.W_enc.add_(0.1 * torch.randn_like(dense.W_enc))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(40, 24)
    dead = torch.zeros(96, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    out_d, out_s = dense(x, dead_mask=dead), sparse(x, dead_mask=dead)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_s.codes, out_d.codes)
    expected = {"mse", "auxk"} if with_dead else {"mse"}
    assert set(out_d.losses) == expected | ({"multi_topk"} if multi_topk else set())
    assert set(out_s.losses) == set(out_d.losses) | {"auxk"}  # no host sync: AuxK is there, 0 without dead latents
    torch.testing.assert_close(out_s.loss, out_d.loss, atol=1e-4, rtol=1e-5)
    out_d.loss.backward()
    out_s.loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, msg=name, atol=1e-5,
                                   rtol=1e-4)


def test_old_cfg_with_sparse_kernel_false_loads_on_the_fast_path():
    from saes.topk import TopKConfig

    cfg = TopKConfig.from_dict({"d_in": 8, "d_sae": 32, "k": 4, "sparse_kernel": False})
    assert cfg.kernel == "sparse" and cfg.sparse_kernel is None
