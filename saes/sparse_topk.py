"""A TopK training step whose work after the encoder matmul scales with k, not d_sae (docs/methods.md §2.1).

The dense step costs about 12·d·n FLOP per token: encoder forward, its two backward matmuls, decoder forward and
its two backward matmuls. Here only the encoder forward stays dense (it is needed to choose the top k); the
encoder backward touches the k selected rows (a sparse [n, batch] x [batch, d] product for W_enc, a gather-sum for
the input), and the decoder is a gather-sum (`embedding_bag`) whose backward is also k rows per token.
The dense path in `saes/base.py` is the reference; tests/saes/test_sparse_topk.py checks values and gradients.
"""
import torch
from torch import Tensor
from torch.nn import functional as F


class SparseTopKEncode(torch.autograd.Function):
    """(x - b_dec) [B, d], W_enc [n, d], b_enc [n], k -> relu'd top-k values [B, k], indices [B, k], pre_acts [B, n].

    pre_acts comes back detached: gradients reach W_enc and b_enc only through the selected values.
    """

    @staticmethod
    def forward(ctx, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, k: int):
        pre_acts = torch.addmm(b_enc, x_centered, W_enc.T)  # [B, n]
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)  # [B, k]
        positive = values > 0
        ctx.save_for_backward(x_centered, W_enc, indices, positive)
        ctx.mark_non_differentiable(indices, pre_acts)
        return values.relu(), indices, pre_acts

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices, _grad_pre):
        x_centered, W_enc, indices, positive = ctx.saved_tensors
        batch, k = indices.shape
        g = (grad_values * positive).to(W_enc.dtype)  # [B, k], ReLU gradient
        rows = indices.reshape(-1)
        grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")  # [B, d]
        tokens = torch.arange(batch, device=indices.device).repeat_interleave(k)
        selector = torch.sparse_coo_tensor(torch.stack([rows, tokens]), g.reshape(-1), (W_enc.shape[0], batch),
                                           check_invariants=False)
        grad_W = torch.sparse.mm(selector, x_centered)  # [n, d], only selected rows non-zero
        grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device).index_add_(0, rows, g.reshape(-1))
        return grad_x, grad_W, grad_b, None


def sparse_topk_forward(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, k: int):
    """Values [B, k], indices [B, k], detached pre_acts [B, n] and the reconstruction W_dec^T z [B, d] (no b_dec)."""
    values, indices, pre_acts = SparseTopKEncode.apply(x_centered, W_enc, b_enc, k)
    decoded = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return values, indices, pre_acts, decoded


def dead_pre_acts(pre_acts: Tensor, x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, dead_mask: Tensor) -> Tensor:
    """pre_acts with the dead latents' columns recomputed with gradients, so AuxK (§1.5) trains exactly those."""
    dead = dead_mask.nonzero().squeeze(-1)
    live_part = pre_acts.detach()
    return live_part.index_copy(1, dead, torch.addmm(b_enc[dead], x_centered, W_enc[dead].T))
