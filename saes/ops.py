"""Pure tensor functions shared by the SAE variants (docs/methods.md §1, §2).

Shapes: `batch` tokens, `d_in` input width, `d_sae` latents, `k` active latents per token.
"""
import math

import torch
from torch import Tensor

from saes import kernels


def topk_codes(pre_acts: Tensor, k: int) -> Tensor:
    """Dense codes keeping the k largest pre-activations per token, ReLU'd (§2.1). The same selection as the fast
    path's (`kernels.topk`: the compiled kernel on CPU, equal scores by the smaller index).

    pre_acts: [batch, d_sae] -> codes [batch, d_sae] with at most k non-zeros per row.
    """
    flat = pre_acts.reshape(-1, pre_acts.shape[-1])
    indices = kernels.topk(flat.detach(), k)[1].reshape(*pre_acts.shape[:-1], k)  # [batch, k]
    return torch.zeros_like(pre_acts).scatter(-1, indices, pre_acts.gather(-1, indices).relu())


def batch_topk_positions(scores: Tensor, n_keep: int) -> Tensor:
    """Positions in scores.flatten() of its n_keep largest entries, in no set order (NaN counts as largest, as in
    torch.topk; among entries equal to the n_keep-th value, which ones is unspecified, as there).

    scores: [batch, d_sae] -> long [min(n_keep, batch * d_sae)]. On CPU a one-dimensional torch.topk over millions
    of scores runs on one thread (about 0.2 s at 4096 x 2304); instead, a threshold τ at or below the n_keep-th
    largest value is read from a strided sample, the entries not below τ are kept, and the top-k runs on them
    alone. Exact: whenever at least n_keep entries pass, τ cannot exceed the n_keep-th value, so every entry of
    the top n_keep passed; when fewer pass (a sample that overshot) the full top-k runs instead.
    """
    flat = scores.flatten()
    n = flat.numel()
    n_keep = min(n_keep, n)
    if flat.device.type != "cpu" or n < (1 << 20) or 8 * n_keep > n:
        return flat.topk(n_keep, sorted=False).indices
    sample = flat[::sample_stride(n, scores.shape[-1])]
    expected = sample.numel() * n_keep / n  # sampled entries expected among the top n_keep
    rank = min(sample.numel(), math.ceil(expected + 4 * math.sqrt(expected)) + 1)  # 4 sigma of headroom
    tau = sample.topk(rank, sorted=False).values.min()
    candidates = (flat < tau).logical_not_().nonzero().squeeze(1)  # >= tau, and NaN
    if candidates.numel() < n_keep:
        return flat.topk(n_keep, sorted=False).indices
    return candidates[flat[candidates].topk(n_keep, sorted=False).indices]


def sample_stride(n: int, d_sae: int) -> int:
    """batch_topk_positions' sampling stride: about 131k of n scores, coprime with d_sae so that the sample
    visits every latent's column."""
    stride = max(1, n // (1 << 17))
    while math.gcd(stride, d_sae) != 1:
        stride += 1
    return stride


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Sum of the selected decoder rows, without materialising dense codes (§2.1).

    indices, values: [batch, k]; W_dec: [d_sae, d_in] -> [batch, d_in]. No b_dec.
    """
    return torch.nn.functional.embedding_bag(
        indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, pooled over the batch (§1.7):
    sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return residual / total.clamp_min(torch.finfo(x.dtype).tiny)


def mse_sum(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over d_in (§1.7, the default training loss)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def auxk_loss(
    pre_acts: Tensor, residual: Tensor, W_dec: Tensor, dead_mask: Tensor, k_aux: int, *, signed: bool = False
) -> Tensor:
    """AuxK loss of Gao et al. (§1.5): dead latents predict the detached residual.

    pre_acts: [batch, d_sae]; residual: [batch, d_in] = x - x_hat in the SAE's working space;
    W_dec: [d_sae, d_in]; dead_mask: [d_sae] bool. The auxiliary decode has NO b_dec
    (adding it double-counts the bias, the bug fixed in sparsify PR #134).
    Normalised by the residual's variance around its batch mean (OAI / dictionary_learning).
    signed=True (AbsTopK, §4.2): the dead latents are ranked by |u| and keep their sign instead of being ReLU'd.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre_acts.new_zeros(())
    k_aux = min(k_aux, n_dead)
    residual = residual.detach()
    scores = pre_acts.abs() if signed else pre_acts
    dead_scores = scores.masked_fill(~dead_mask, float("-inf"))  # [batch, d_sae]
    indices = dead_scores.topk(k_aux, dim=-1).indices  # [batch, k_aux]
    values = pre_acts.gather(-1, indices)  # [batch, k_aux]
    aux_hat = sparse_decode(indices, values if signed else values.relu(), W_dec)  # [batch, d_in]
    numerator = (residual - aux_hat).pow(2).sum()
    denominator = (residual - residual.mean(0, keepdim=True)).pow(2).sum()
    return torch.nan_to_num(numerator / denominator, nan=0.0, posinf=0.0)


def batch_topk_codes(pre_acts: Tensor, k: int, *, signed: bool = False) -> Tensor:
    """Dense codes keeping the k*batch largest entries of the whole batch (BatchTopK §3.1, AbsTopK batch mode §4.2).

    Unsigned: ranks and keeps relu(u). Signed: ranks |u| and keeps u with its sign.
    pre_acts: [batch, d_sae] -> codes [batch, d_sae]; the mean L0 per token is exactly k (no ties, enough non-zeros).
    """
    scores = pre_acts.abs() if signed else pre_acts.relu()
    flat = scores.flatten()  # [batch * d_sae]
    indices = batch_topk_positions(scores, k * pre_acts.shape[0])  # [k * batch]
    values = pre_acts.flatten()[indices] if signed else flat[indices]
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)


def min_kept(codes: Tensor) -> Tensor | None:
    """Smallest non-zero |z| of a batch: the per-batch estimate of a batch-mode threshold (§3.1). None if all zero."""
    magnitudes = codes.detach().abs()
    kept = magnitudes[magnitudes > 0]
    return kept.min() if kept.numel() else None


@torch.no_grad()
def fold_decoder_norm(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> Tensor:
    """z_i <- z_i ||d_i||, d_i <- d_i / ||d_i|| in place (§3.3 "Reporting"): same x_hat, comparable latents.

    Exact for positively homogeneous activations (ReLU; JumpReLU once its thresholds are scaled too).
    W_enc, W_dec: [d_sae, d_in]; b_enc: [d_sae]. Returns the old norms [d_sae].
    """
    norms = W_dec.norm(dim=-1).clamp_min(torch.finfo(W_dec.dtype).tiny)  # [d_sae]
    W_enc.mul_(norms[:, None])
    b_enc.mul_(norms)
    W_dec.div_(norms[:, None])
    return norms


def project_out_radial_grad(W_dec: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the row (§1.3, step 2).

    Assumes unit-norm rows. W_dec: [d_sae, d_in], rows are latents.
    """
    if W_dec.grad is None:
        return
    radial = (W_dec.grad * W_dec.data).sum(-1, keepdim=True)  # [d_sae, 1]
    W_dec.grad.addcmul_(radial, W_dec.data, value=-1)  # in place, no [d_sae, d_in] temporary


@torch.no_grad()
def normalise_rows(W_dec: Tensor) -> None:
    """Renormalise every decoder row (latent) to unit norm (§1.3, step 5)."""
    eps = torch.finfo(W_dec.dtype).eps
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True) + eps)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iterations from the mean (§1.2). points: [n, d_in] -> [d_in]."""
    points = points.float()
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # [n]
        new = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved < tol:
            break
    return median
