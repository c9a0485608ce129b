"""The TopK family's fast path on a CUDA device equals its dense path on CPU, in float64: codes, reconstruction,
losses and the gradient of every parameter. On CUDA the fast path takes other branches than on CPU (torch ops
instead of the compiled kernels, AuxK ranked over all latents with the live ones masked, no host sync), so the CPU
tests do not cover them. Skipped without a GPU; a session lent one runs `pytest tests/saes/test_fast_path_cuda.py`.
"""
import pytest
import torch

from tests.saes.test_fast_path import PARAMS, VARIANTS, batch, dead_mask, pair


def same_step_on(device: str, variant: str, dead: str, seed: int = 0) -> None:
    """One step of the dense path on CPU and of the fast path on `device`, from the same weights and batch."""
    architecture, fields = VARIANTS[variant]
    dense, fast = pair(architecture, fields, seed)
    fast.to(device)
    x, grad = batch(seed)
    mask = dead_mask(dead)
    out_d = dense(x, dead_mask=mask, grad=grad)
    out_f = fast(x.to(device), dead_mask=None if mask is None else mask.to(device), grad=grad.to(device))
    assert out_f.x_hat.device.type == torch.device(device).type
    torch.testing.assert_close(out_f.codes.cpu(), out_d.codes)
    torch.testing.assert_close(out_f.x_hat.cpu(), out_d.x_hat)
    for name, value in out_d.losses.items():
        torch.testing.assert_close(out_f.losses[name].cpu(), value, msg=name)
    out_d.loss.backward()
    out_f.loss.backward()
    for name in PARAMS:
        torch.testing.assert_close(getattr(fast, name).grad.cpu(), getattr(dense, name).grad, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dead", ["no_mask", "few_dead", "many_dead"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_on_cuda_equals_the_dense_path_on_cpu(variant, dead):
    same_step_on("cuda", variant, dead)
