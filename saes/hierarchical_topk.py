"""HierarchicalTopK SAE (Balagansky et al. 2025, arXiv 2505.24473; code corl-team/flexsae), docs/methods.md §5.

One SAE trained across a set of budgets J ⊆ {1..K}: each token's top-K activations are sorted in descending order and
the loss averages the reconstruction error of every prefix j ∈ J. The prefix of length k is exactly the top-k set, so
inference at any k <= K is plain TopK(k) on the same encoder: `encode(x, k=...)` or `with_k(k)`.

Choices and deviations:
* the per-prefix error is `mse_sum` (sum over d_in, mean over tokens), so with J = {K} the loss is TopK's `mse`;
  FLEXSAE's reference takes the per-element mean instead (a constant factor d_in);
* the prefix errors come from the Gram identity of §5.2 on the dense path (no loop over k, no [batch, K, d_in]
  cumsum) and from a residual recursion with a hand-written backward on the fast path (default): same values and
  gradients, O(batch·d_in) memory; the FLEXSAE Triton kernel is not used;
* AuxK runs on the full-K residual (workbench choice, §5.3; whether the authors used AuxK is unverified).
"""
import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from saes import ops
from saes import sparse_topk as fast
from saes.base import SAE, SAEConfig, SAEOutput, check_k

BUDGET_SETS = ("all", "pow2")


@dataclass
class HierarchicalTopKConfig(SAEConfig):
    k_max: int = 32
    """Largest budget K: the sorted top-K activations whose prefixes are trained."""
    budgets: str | list[int] = "all"
    """Budgets J averaged in the loss: "all" (1..k_max), "pow2" (powers of two below k_max, plus k_max) or a list."""
    k: int | None = None
    """Budget `encode` uses at inference; None means k_max. Any k <= k_max is valid (prefix property, §5.1)."""
    loss_chunk: int = 1024
    """Dense path: tokens per chunk of the Gram prefix loss, recomputed in backward, so memory follows it, not the
    batch (0: off). The fast path's residual recursion keeps O(batch·d_in) memory and needs no chunking."""
    kernel: str = "sparse"
    """Training path. 'sparse' (default): the fast path of saes/sparse_topk.py, where the encoder backward and the
    decode touch only the k_max selected latents (AuxK only the dead ones); 'dense' (`--sae-options kernel dense`): the
    reference path, gradients through the dense pre-activations. Same selection, prefix losses and gradients."""

    def validate(self) -> None:
        super().validate()
        check_k(self.k_max, self.d_sae, "k_max")
        if isinstance(self.budgets, str) and self.budgets not in BUDGET_SETS:
            raise ValueError(f"budgets must be 'all', 'pow2' or a list of ints, got {self.budgets!r}.")
        if not isinstance(self.budgets, str):
            if not self.budgets or any(not 0 < int(j) <= self.k_max for j in self.budgets):
                raise ValueError(f"budgets must be a non-empty list within 1..k_max={self.k_max}, got {self.budgets}.")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0 means no chunking), got {self.loss_chunk}.")
        if self.k is not None and not 0 < self.k <= self.k_max:
            raise ValueError(f"k must satisfy 0 < k <= k_max={self.k_max} (or be None for k_max), got k={self.k}.")
        fast.check_kernel(self.kernel, None)

    @property
    def budget_list(self) -> list[int]:
        """J as a sorted list of distinct budgets."""
        if self.budgets == "all":
            return list(range(1, self.k_max + 1))
        if self.budgets == "pow2":
            return sorted({2**i for i in range(self.k_max.bit_length()) if 2**i < self.k_max} | {self.k_max})
        return sorted({int(j) for j in self.budgets})


def prefix_sq_errors(e0: Tensor, values: Tensor, rows: Tensor) -> Tensor:
    """||e0 - sum_{m<=j} v_m d_m||^2 for every prefix j at once, by the Gram identity of §5.2.

    e0: [batch, d_in] = x - b_dec; values: [batch, K] in selection order; rows: [batch, K, d_in] the matching decoder
    rows -> [batch, K]. Beyond the gathered rows it stores O(batch K^2), where a cumsum would store several
    [batch, K, d_in] tensors for backward. Computed in at least fp32, with autocast off (bf16 matmuls under
    autocast gave errors of ~1 on ||x||^2 ~ 600): the identity subtracts large terms.
    """
    with torch.autocast(e0.device.type, enabled=False):
        dtype = torch.promote_types(values.dtype, torch.float32)
        return _prefix_sq_errors(e0.to(dtype), values.to(dtype), rows.to(dtype))


def _prefix_sq_errors(e0: Tensor, values: Tensor, rows: Tensor) -> Tensor:
    corr = (rows @ e0.unsqueeze(-1)).squeeze(-1)  # [batch, K]: <d_m, e0>
    gram = rows @ rows.transpose(1, 2)  # [batch, K, K]: <d_m, d_m'>
    pair = values.unsqueeze(-1) * gram * values.unsqueeze(-2)  # [batch, K, K]: v_m v_m' <d_m, d_m'>
    # Adding term j to the prefix adds v_j^2 |d_j|^2 + 2 sum_{m<j} v_m v_j <d_m, d_j>; triu(1) holds the m < j pairs.
    quad = (pair.diagonal(dim1=1, dim2=2) + 2 * pair.triu(1).sum(1)).cumsum(-1)  # [batch, K]
    cross = (values * corr).cumsum(-1)  # [batch, K]
    return e0.pow(2).sum(-1, keepdim=True) - 2 * cross + quad


def _prefix_errors_of_indices(e0: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    # embedding, not W_dec[indices]: under checkpointing the indexing backward accumulated in a thread-dependent
    # order on CPU, so two identical runs differed (and resume could not be bit-identical).
    return prefix_sq_errors(e0, values, torch.nn.functional.embedding(indices, W_dec))  # [chunk, K, d_in] rows


RESIDUAL_CHUNK = 128
"""Tokens per block of the residual recursion (`prefix_errors_recursive`): its [chunk, d_in] residuals stay in cache."""
SERIAL_RECURSION = True
"""Run the recursion's ~10^4 small ops on one CPU thread (see saes.sparse_topk.serial)."""


class _PrefixErrorsRecursive(torch.autograd.Function):
    """||e0 - Σ_{m<=j} v_m d_m||² for every prefix j, updating one residual latent by latent (the fast path, §5.2).

    Forward: r_0 = e0, r_j = r_{j-1} - v_j d_j, E_j = ||r_j||². Backward, j = K..1, with R_j = Σ_{i>=j} 2 g_i r_i:
    dE/dv_j = -<R_j, d_j>, dE/dd_j += -v_j R_j, dE/de0 = R_1, walking r back (r_{j-1} = r_j + v_j d_j). Memory is
    O(batch·d_in) (only the final residual is kept), work O(batch·K·d_in); there is no cancellation to guard.
    """

    @staticmethod
    def forward(ctx, e0: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, serial: bool):
        with fast.serial(e0.device) if serial else contextlib.nullcontext():
            return _PrefixErrorsRecursive._forward(ctx, e0, values, indices, W_dec, serial)

    @staticmethod
    def _forward(ctx, e0: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, serial: bool):
        ctx.serial = serial
        batch, k = values.shape
        errors = e0.new_empty(batch, k)
        final = torch.empty_like(e0)
        for start in range(0, batch, RESIDUAL_CHUNK):
            block = slice(start, start + RESIDUAL_CHUNK)
            r, v, idx = e0[block].clone(), values[block], indices[block]
            for j in range(k):
                r.addcmul_(v[:, j:j + 1], W_dec.index_select(0, idx[:, j]), value=-1)
                errors[block, j] = torch.linalg.vector_norm(r, dim=-1).square()
            final[block] = r
        ctx.save_for_backward(final, values, indices, W_dec)
        return errors

    @staticmethod
    def backward(ctx, grad_errors: Tensor):
        with fast.serial(grad_errors.device) if ctx.serial else contextlib.nullcontext():
            return _PrefixErrorsRecursive._backward(ctx, grad_errors)

    @staticmethod
    def _backward(ctx, grad_errors: Tensor):
        final, values, indices, W_dec = ctx.saved_tensors
        batch, k = values.shape
        grad_e0, grad_values = torch.empty_like(final), torch.empty_like(values)
        grad_W = torch.zeros_like(W_dec)
        grad_errors = grad_errors.to(final.dtype)
        for start in range(0, batch, RESIDUAL_CHUNK):
            block = slice(start, start + RESIDUAL_CHUNK)
            r, v, idx, g = final[block].clone(), values[block], indices[block], grad_errors[block]
            acc = torch.zeros_like(r)  # R_j
            for j in reversed(range(k)):
                acc.addcmul_(g[:, j:j + 1], r, value=2)
                rows = W_dec.index_select(0, idx[:, j])
                grad_values[block, j] = -(acc * rows).sum(-1)
                grad_W.index_add_(0, idx[:, j], acc * -v[:, j:j + 1])
                r.addcmul_(v[:, j:j + 1], rows)
            grad_e0[block] = acc
        return grad_e0, grad_values, None, grad_W, None


def prefix_errors_recursive(e0: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """The prefix errors of `prefix_sq_errors` from indices, by the residual recursion (fp32 at least, autocast off).
    e0 [batch, d_in], values and indices [batch, K] in selection order, W_dec [d_sae, d_in] -> [batch, K]."""
    with torch.autocast(e0.device.type, enabled=False):
        dtype = torch.promote_types(values.dtype, torch.float32)
        return _PrefixErrorsRecursive.apply(e0.to(dtype).contiguous(), values.to(dtype).contiguous(), indices,
                                            W_dec.to(dtype), SERIAL_RECURSION)


class HierarchicalTopKSAE(SAE):
    architecture = "hierarchical_topk"
    config_cls = HierarchicalTopKConfig
    cfg: HierarchicalTopKConfig

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        k = self.cfg.k_max if train or self.cfg.k is None else self.cfg.k
        return ops.topk_codes(pre_acts, k)

    def with_k(self, k: int) -> "HierarchicalTopKSAE":
        """A view sharing this SAE's parameters whose `encode` uses budget k (for FVU / L0 curves over k)."""
        view = copy.copy(self)  # shallow: parameters and buffers are shared, not copied
        view.cfg = dataclasses.replace(self.cfg, k=k)
        view.cfg.validate()
        return view

    def encode(self, x: Tensor, k: int | None = None) -> Tensor:
        """Inference codes with budget k (default cfg.k, else k_max). [..., d_in] -> [..., d_sae]."""
        return super().encode(x) if k is None else self.with_k(k).encode(x)

    def sorted_topk(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """Values (ReLU'd) and indices of the top-k_max pre-activations, largest first. -> [batch, k_max] twice."""
        values, indices = pre_acts.topk(self.cfg.k_max, dim=-1, sorted=True)  # sorted: prefix j = top-j (§5.5)
        return values.relu(), indices

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        """The top-k_max pairs in descending order of u per token (the prefix order, §5.5)."""
        return fast.Selection.topk(pre_acts, self.cfg.k_max)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, grad: Tensor | None = None) -> SAEOutput:
        """Train-mode pass. `mse` is the mean over j in J of the prefix-j error; codes and x_hat are at k_max."""
        self._check_input(x)
        self._check_trainable()
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        if self.fast_path:
            x_centered, pre_acts = fast.encoder_pre_acts(x_scaled, self.b_dec, self.W_enc, self.b_enc,
                                                         self.pre_acts_buffer)
            selection = self.select_sparse(pre_acts, x_scaled=x_scaled, grad=grad)
            indices = selection.indices
            values = fast.gather_pre_acts(pre_acts, x_centered, self.b_dec, self.W_enc, self.b_enc, selection,
                                          relu=True)
            codes = None
            decoded = fast.sparse_decode(values, self.W_dec, selection)
            x_hat_scaled = decoded + self.b_dec
        else:
            pre_acts = self.pre_acts(x_scaled)
            values, indices = self.sorted_topk(pre_acts)
            codes = torch.zeros_like(pre_acts).scatter(-1, indices, values)
            x_hat_scaled = ops.sparse_decode(indices, values, self.W_dec) + self.b_dec
        errors = self.prefix_errors(x_scaled, values, indices)  # [batch, k_max]
        budgets = torch.tensor(self.cfg.budget_list, device=errors.device) - 1
        losses = {"mse": errors[:, budgets].mean().to(x_scaled.dtype)}
        if codes is None:
            losses.update(self.fast_aux_losses(pre_acts, x_centered, (x_centered - decoded).detach(), dead_mask))
        else:
            losses.update(self.aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask))
        curve = self._fvu_from_errors(errors.detach(), x_scaled)
        metrics = {
            "fvu": ops.fvu(x_scaled, x_hat_scaled).detach(),
            "l0": (values != 0).sum(-1).float().mean().detach(),
            # §5.5: report FVU at several k, not the K-averaged training loss.
            **{f"fvu_k{j}": curve[j - 1] for j in (2**i for i in range(self.cfg.k_max.bit_length()))},
        }
        if codes is None:
            return SAEOutput(x_hat_scaled / self.input_scale, None, pre_acts, losses, metrics, values=values,
                             selection=selection)
        return SAEOutput(x_hat_scaled / self.input_scale, codes, pre_acts, losses, metrics)

    def prefix_errors(self, x_scaled: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """Squared error of every prefix, chunked over tokens; under autograd each chunk is recomputed in backward
        (activation checkpointing), so the gathered decoder rows never exist for the whole batch. -> [batch, k_max]"""
        e0 = x_scaled - self.b_dec  # [batch, d_in]
        if self.fast_path:  # the residual recursion: no gathered [chunk, K, d_in] rows, no recomputation
            return prefix_errors_recursive(e0, values, indices, self.W_dec)
        chunk = self.cfg.loss_chunk or e0.shape[0]
        parts = []
        for e, v, i in zip(e0.split(chunk), values.split(chunk), indices.split(chunk)):
            if torch.is_grad_enabled():
                parts.append(checkpoint(_prefix_errors_of_indices, e, v, i, self.W_dec, use_reentrant=False))
            else:
                parts.append(_prefix_errors_of_indices(e, v, i, self.W_dec))
        return torch.cat(parts)

    @staticmethod
    def _fvu_from_errors(errors: Tensor, x_scaled: Tensor) -> Tensor:
        total = (x_scaled - x_scaled.mean(0, keepdim=True)).pow(2).sum().to(errors.dtype)
        return errors.sum(0) / total.clamp_min(torch.finfo(errors.dtype).tiny)  # [k_max]

    @torch.no_grad()
    def fvu_curve(self, x: Tensor) -> Tensor:
        """Pooled FVU of raw activations x [batch, d_in] at every budget k = 1..k_max from one pass -> [k_max]."""
        self._check_input(x)
        x_scaled = x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype) * self.input_scale
        values, indices = self.sorted_topk(self.pre_acts(x_scaled))
        return self._fvu_from_errors(self.prefix_errors(x_scaled, values, indices), x_scaled)
