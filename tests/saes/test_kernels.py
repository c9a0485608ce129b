"""The compiled CPU kernels (saes/kernels): the top-k returns exactly the order of a stable descending sort (the k
largest, largest first, equal scores by index, NaN first); the fused decode and the latent plan equal their
definitions; and the fast path that uses them still equals the dense path."""
import importlib.util
import os
import shutil
import time

import pytest
import torch

from saes import build_sae, kernels
from saes import sparse_topk as fast
from saes.sparse_topk import Selection

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
    assert all(map(torch.equal, kernels.topk(scores, k), (values, indices)))


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
    # one NaN per row, at every residue of the vectorised NaN check, and in the tail of a 2,305-wide row
    single = torch.randn(9, 2305, generator=generator)
    for row in range(8):
        single[row, 8 * (row + 3) + row] = float("nan")
    single[8, 2304] = float("nan")
    # NaN ranks above +inf even when the +inf comes first, in a two-level row and in a small one
    with_inf = torch.randn(2, 2304, generator=generator)
    with_inf[:, 3], with_inf[:, 10], with_inf[1, 700] = float("inf"), float("nan"), float("inf")
    small = with_inf[:, :96].clone()
    for s in (scores, masked, single, with_inf, small):
        assert torch.equal(kernel.topk_last_dim(s, 32)[1], reference(s, 32))


def test_topk_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SAEWB_KERNELS", "0")
    scores = torch.randn(8, 300)
    assert kernels.load() is None and kernels.unavailable_reason() == "SAEWB_KERNELS=0"
    assert all(map(torch.equal, kernels.topk(scores, 4), scores.topk(4, dim=-1)))


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


# ---- the fused decode and the latent plan (sparse_ops.cpp) ----------------------------------------------------
def random_selection(batch: int, d_sae: int, m: int, flat: bool, generator) -> Selection:
    """Per-token: m distinct latents per token; flat: a variable number per token (token 1 has none)."""
    scores = torch.randn(batch, d_sae, generator=generator)
    if not flat:
        return Selection.topk(scores, m)
    keep = scores > 1.0
    keep[1] = False
    return Selection.from_flat(keep.flatten().nonzero().flatten(), batch, d_sae)


# d_in: the plain loop (45: not a multiple of 8, the dots' tail), and in float32 the register-blocked loop with a
# short last chunk (72 = 64 + 8) and with whole chunks only (128)
# batch: one block of tokens, and three with a short last one (the residual's column sums add per block of 64)
@pytest.mark.parametrize("batch", [37, 150])
@pytest.mark.parametrize("d_in", [45, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flat", [False, True])
def test_decode_residual_matches_its_definition(kernel, flat, dtype, d_in, batch):
    generator = torch.Generator().manual_seed(3)
    d_sae = 300
    selection = random_selection(batch, d_sae, 7, flat, generator)
    values = torch.randn(selection.indices.shape, generator=generator, dtype=dtype)
    W = torch.randn(d_sae, d_in, generator=generator, dtype=dtype)
    target = torch.randn(batch, d_in, generator=generator, dtype=dtype)
    center = torch.randn(d_in, generator=generator, dtype=dtype)
    residual, dots, sq, centered, residual_sum = kernel.decode_residual(
        values, W, selection.indices, selection.bag_offsets(), target, center)
    tokens, latents = selection.entry_tokens(), selection.indices.reshape(-1)
    codes = torch.zeros(batch, d_sae, dtype=dtype).index_put((tokens, latents), values.reshape(-1))
    wide = [t.double() for t in (codes, W, target, center)]  # the reference in float64
    expected = wide[2] - wide[0] @ wide[1]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)

    def close(got, want):
        torch.testing.assert_close(got.double(), want, **tol)

    close(residual, expected)
    close(dots, (expected[tokens] * wide[1][latents]).sum(-1))
    close(sq, expected.pow(2).sum(-1))
    close(centered, (wide[2] - wide[3]).pow(2).sum(-1))
    close(residual_sum, expected.sum(0))
    without = kernel.decode_residual(values, W, selection.indices, selection.bag_offsets(), target)
    assert torch.equal(without[0], residual) and not without[3].any()


def test_decode_residual_gives_the_same_sums_for_any_thread_count(kernel):
    """Column sums add per block of tokens, then across blocks: one thread and two give bit-identical results."""
    generator = torch.Generator().manual_seed(6)
    selection = random_selection(2000, 300, 8, False, generator)
    values = torch.randn(selection.indices.shape, generator=generator)
    W, target = torch.randn(300, 64, generator=generator), torch.randn(2000, 64, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(kernel.decode_residual(values, W, selection.indices, selection.bag_offsets(), target))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("flat", [False, True])
def test_latent_plan_is_a_stable_sort_by_latent(kernel, flat):
    generator = torch.Generator().manual_seed(4)
    selection = random_selection(50, 400, 9, flat, generator)
    keys = selection.indices.reshape(-1)
    order, offsets = kernel.latent_plan(keys, 400)
    latents, expected = keys.sort(stable=True)
    assert torch.equal(order, expected)
    assert torch.equal(offsets, torch.searchsorted(latents, torch.arange(400)))
    with pytest.raises(RuntimeError, match="outside"):
        kernel.latent_plan(torch.tensor([0, 400]), 400)


def skewed_plan(batch: int, d_sae: int, m: int, generator):
    """A per-token selection whose latent frequencies are heavy-tailed as in a trained SAE: latent 3 is chosen by
    every token, latents 0-9 by most, and the last third of the latents never (empty bags)."""
    scores = torch.randn(batch, d_sae, generator=generator)
    scores[:, : d_sae * 2 // 3] += 4.0 * torch.rand(d_sae * 2 // 3, generator=generator).pow(8)
    scores[:, :10] += 3.0
    scores[:, 3] += 100.0
    scores[:, d_sae * 2 // 3:] = -1e9
    return Selection.topk(scores, m)


# d_in: the plain loop (45) and every pass of float32's register-blocked loop. AVX2: 96 + 32 + 8 columns (136),
# 4 x 96 + 32 + 8 (424), 96 only (576). AVX-512: 128 + 8 (136), 384 + 32 + 8 (424), 384 + 128 + 64 (576).
# row_block_bytes: the default (0: 4 MiB blocks; 2,000 x 576 rows are two in float32, three in float64) and 100 KiB
# (44 blocks in float32, 88 in float64, so every latent's entries are split between blocks)
@pytest.mark.parametrize("batch,d_in,row_block_bytes", [(150, 45, 0), (150, 136, 0), (150, 424, 0), (2000, 576, 0),
                                                        (2000, 576, 100 << 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latent_sum_matches_its_definition(kernel, dtype, d_in, batch, row_block_bytes):
    """out[j] = Σ over the entries of latent j of weight · rows[token], against a float64 reference; latents
    without entries give zero rows."""
    generator = torch.Generator().manual_seed(8)
    d_sae = 240
    selection = skewed_plan(batch, d_sae, 9, generator)
    plan = selection.plan()
    rows = torch.randn(batch, d_in, generator=generator, dtype=dtype)
    weights = torch.randn(plan.tokens.shape, generator=generator, dtype=dtype)
    got = kernel.latent_sum(rows, plan.tokens, plan.offsets, weights, row_block_bytes)
    latents = selection.indices.reshape(-1).index_select(0, plan.order)
    expected = torch.zeros(d_sae, d_in, dtype=torch.float64).index_add_(
        0, latents, weights.double()[:, None] * rows.double()[plan.tokens])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.double(), expected, **tol)
    assert not got[d_sae * 2 // 3:].any()
    with pytest.raises(RuntimeError, match="outside"):
        kernel.latent_sum(rows, plan.tokens + batch, plan.offsets, weights)
    decreasing = plan.offsets.clone()
    decreasing[5] = decreasing[6] + 1  # starts at 0 and stays in range, but latent 5's range ends before it starts
    with pytest.raises(RuntimeError, match="never decrease"):
        kernel.latent_sum(rows, plan.tokens, decreasing, weights)


def test_latent_sum_is_the_same_for_any_thread_count_and_splits_threads_by_entries(kernel):
    """Each latent is summed by one thread in entry order (bit-identical with one thread and two), even when one
    latent holds most entries; the same for any row block size, and when a latent's tokens do not ascend (the
    token blocks then split its entries otherwise)."""
    generator = torch.Generator().manual_seed(9)
    selection = skewed_plan(2000, 240, 9, generator)
    plan = selection.plan()
    rows = torch.randn(2000, 576, generator=generator)
    weights = torch.randn(plan.tokens.shape, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for block_bytes in (0, 100 << 10):
                results.append(kernel.latent_sum(rows, plan.tokens, plan.offsets, weights, block_bytes))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])
    # the same rows and entry order with the token numbers reversed: every latent's tokens descend
    for block_bytes in (0, 100 << 10):
        flipped = kernel.latent_sum(rows.flip(0), 1999 - plan.tokens, plan.offsets, weights, block_bytes)
        assert torch.equal(flipped, results[0])


@pytest.mark.parametrize("flat", [False, True])
def test_selection_plan_is_the_same_with_and_without_the_kernel(kernel, flat, monkeypatch):
    compiled = random_selection(50, 400, 9, flat, torch.Generator().manual_seed(7))
    compiled_plan = compiled.plan()  # computed now, with the kernel
    monkeypatch.setattr(kernels, "load", lambda verbose=False: None)
    plain = random_selection(50, 400, 9, flat, torch.Generator().manual_seed(7))
    assert torch.equal(compiled.indices, plain.indices)
    for field in ("order", "tokens", "offsets"):
        assert torch.equal(getattr(compiled_plan, field), getattr(plain.plan(), field)), field


@pytest.mark.parametrize("flat", [False, True])
def test_decode_error_equals_its_definition_with_and_without_the_kernel(kernel, flat, monkeypatch):
    """Loss, residual, FVU denominator and the gradients of values, W_dec, target and b_dec, against autograd of
    the plain formula, on the compiled path and on the torch path (no kernel) alike."""
    generator = torch.Generator().manual_seed(5)
    batch, d_in, d_sae = 29, 24, 200
    selection = random_selection(batch, d_sae, 6, flat, generator)

    def leaves():
        g = torch.Generator().manual_seed(6)
        return [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
                for shape in (selection.indices.shape, (d_sae, d_in), (batch, d_in), (d_in,))]

    values, W, scaled_x, b_dec = leaves()  # target = s·x - b_dec with b_dec detached, as encoder_pre_acts gives it
    codes = torch.zeros(batch, d_sae, dtype=torch.float64).index_put(
        (selection.entry_tokens(), selection.indices.reshape(-1)), values.reshape(-1))
    expected = (scaled_x - (codes @ W + b_dec)).pow(2).sum()
    expected.backward()
    center = scaled_x.detach().mean(0)
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(kernels, "for_tensor", lambda tensor: None)
        v, w, sx, b = leaves()
        sq, residual, total = fast.decode_error(v, w, selection, sx - b.detach(), b, center=center - b.detach())
        torch.testing.assert_close(sq, expected.detach())
        torch.testing.assert_close(residual, (scaled_x - codes @ W - b_dec).detach())
        torch.testing.assert_close(total, (scaled_x - center).pow(2).sum().detach())
        sq.backward()
        for got, want, name in zip((v, w, sx, b), (values, W, scaled_x, b_dec), ("values", "W_dec", "x", "b_dec")):
            torch.testing.assert_close(got.grad, want.grad, msg=f"{name} (kernel: {use_kernel})")
