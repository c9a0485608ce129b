"""The compiled top-k kernel (saes/kernels) returns exactly the order of a stable descending sort: the k largest,
largest first, equal scores by index, NaN first; and the fast path that uses it still equals the dense path."""
import importlib.util
import os
import shutil
import time

import pytest
import torch

from saes import build_sae, kernels

HAS_TOOLCHAIN = shutil.which("c++") is not None and (shutil.which("ninja") is not None
                                                     or importlib.util.find_spec("ninja") is not None)


def reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: positions of a stable sort by descending score (torch.sort puts NaN above everything)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.fixture(scope="module")
def kernel():
    module = kernels.load()
    if module is None:
        if HAS_TOOLCHAIN and kernels.unavailable_reason() != "SAEWB_KERNELS=0":
            pytest.fail(f"a C++ compiler and ninja are here but the kernel did not build: "
                        f"{kernels.unavailable_reason()}")
        pytest.skip(f"no compiled kernel: {kernels.unavailable_reason()}")
    return module


# (rows, n, k): the two-level path (n >= 64k) with and without a tail, its many-candidates branch (n = 24,576:
# 384 level-2 blocks), and the small rows where every element is a candidate.
SHAPES = [(64, 2304, 32), (33, 2305, 32), (16, 2048 + 63, 32), (4, 24576, 32), (9, 4096, 64), (50, 96, 5),
          (7, 7, 7), (5, 1, 1), (3, 100, 1), (6, 640, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_a_stable_descending_sort(kernel, shape, dtype):
    rows, n, k = shape
    scores = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + k), dtype=dtype)
    values, indices = kernel.topk_last_dim(scores, k)
    expected = reference(scores, k)
    assert torch.equal(indices, expected)
    assert torch.equal(values, scores.gather(-1, expected))
    assert torch.equal(kernels.topk_indices(scores, k), expected)


def test_ties_go_to_the_smaller_index(kernel):
    generator = torch.Generator().manual_seed(0)
    # ties among a few candidates (ranked without branches), among hundreds (nth_element), and in small rows
    rounded = torch.randn(40, 2304, generator=generator).mul(10).round()
    few_values = torch.randint(0, 6, (40, 2304), generator=generator).float()
    small = torch.randint(0, 3, (40, 96), generator=generator).double()
    for scores, k in ((rounded, 32), (few_values, 32), (small, 5)):
        assert torch.equal(kernel.topk_last_dim(scores, k)[1], reference(scores, k))
    constant = torch.zeros(3, 2304)  # an all-zero input against b_enc = 0: every score equal
    assert torch.equal(kernel.topk_last_dim(constant, 32)[1], torch.arange(32).expand(3, 32))


def test_nan_ranks_first_and_minus_infinity_last(kernel):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(12, 2304, generator=generator)
    scores[2, [7, 900, 2000]] = float("nan")
    scores[5, 1234] = float("nan")
    masked = scores.clone()  # AuxK's scores: every latent but 10 dead ones at -inf
    keep = torch.zeros(2304, dtype=torch.bool)
    keep[torch.randperm(2304, generator=generator)[:10]] = True
    masked[:, ~keep] = float("-inf")
    for s in (scores, masked):
        assert torch.equal(kernel.topk_last_dim(s, 32)[1], reference(s, 32))


def test_topk_indices_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SAEWB_KERNELS", "0")
    scores = torch.randn(8, 300)
    assert kernels.load() is None and kernels.unavailable_reason() == "SAEWB_KERNELS=0"
    assert torch.equal(kernels.topk_indices(scores, 4), scores.topk(4, dim=-1).indices)


@pytest.mark.parametrize("architecture", ["topk", "abstopk", "hierarchical_topk"])
def test_fast_path_with_the_kernel_equals_the_dense_path(kernel, architecture):
    """At 2,304 latents the selection takes the kernel's two-level path; values and gradients stay the dense ones."""
    torch.manual_seed(0)
    budget = {"k_max": 8} if architecture == "hierarchical_topk" else {"k": 8}
    dense = build_sae(architecture, d_in=16, d_sae=2304, dtype="float64", kernel="dense", **budget)
    sparse = build_sae(architecture, d_in=16, d_sae=2304, dtype="float64", **budget)
    with torch.no_grad():
        dense.b_enc.normal_(std=0.1)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(24, 16, dtype=torch.float64)
    out_d, out_s = dense(x), sparse(x)
    torch.testing.assert_close(out_s.codes, out_d.codes)
    out_d.loss.backward()
    out_s.loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, msg=name)


def test_a_killed_builds_lock_is_cleared_only_when_stale(tmp_path, monkeypatch):
    """torch's builder would wait forever on the lock of a build that was killed; a recent lock is another
    process building now and stays."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = kernels._build_directory("saewb_probe") / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    kernels._clear_stale_lock("saewb_probe")
    assert lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    kernels._clear_stale_lock("saewb_probe")
    assert not lock.exists()
