"""The fast training path of the TopK family: after the dense encoder matmul, work scales with the selected latents
(docs/methods.md §2.1 "Fast path").

The dense step costs about 12·d·n FLOP per token: encoder forward, its two backward matmuls, decoder forward and its
two backward matmuls. Here only the encoder forward stays dense (it is needed to choose the latents), computed
without autograd. A `Selection` names the chosen (token, latent) pairs, either k per token (`indices [B, m]`) or a
variable number per token for batch-level rules (flat `indices [N]` sorted by token, with `offsets [B]`); then

* `gather_pre_acts` returns u at those pairs with a backward that touches only them: W_enc's gradient is a gather-sum
  of the inputs per latent (`embedding_bag` over the pairs sorted by latent), b_enc's an `index_add`, b_dec's
  -(grad b_enc) W_enc, and the input's (when it needs one) a gather-sum of encoder rows per token;
* `sparse_decode` is the gather-sum Σ z_i d_i per token, whose backward is again one gather-sum per latent for
  W_dec and a per-pair dot product for the values;
* `decode_error` is that decode fused with its squared error (and FVU's denominator): on CPU one compiled pass per
  token computes the residual and the per-pair dots the backward needs while the decoder rows are in cache;
* `fast_auxk` is AuxK (§1.5) on the dead latents only, through the same functions, without a host sync.

The selection rule of every variant is unchanged: it picks indices from the detached pre-activations exactly as its
dense `select` does. The dense path (`kernel="dense"`) is the reference; tests/saes/test_fast_path.py checks that
values and the gradients of every parameter agree in float64.
"""
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from saes import kernels, ops

KERNELS = ("sparse", "dense")


@contextmanager
def serial(device: torch.device):
    """Run the enclosed bookkeeping ops (on [batch, k]-sized tensors: selections, sorts, masks, index-adds) on one
    CPU thread. Splitting an op of ~10^5 elements over threads saves microseconds on an idle machine, but on a loaded
    one every parallel region waits for a descheduled thread: measured 10-100 ms per such op on 2 shared cores, for
    a step of about 40 of them. The large matmuls, top-k, gather-sums and [batch, d_in] passes stay parallel."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_kernel(kernel: str, sparse_kernel: bool | None) -> str:
    """Validate `kernel`, folding in the deprecated boolean `sparse_kernel` (True: 'sparse', False: 'dense')."""
    if sparse_kernel is not None:
        wanted = "sparse" if sparse_kernel else "dense"
        if kernel != "sparse" and kernel != wanted:
            raise ValueError(f"sparse_kernel={sparse_kernel} contradicts kernel={kernel!r}: sparse_kernel is replaced "
                             "by kernel; pass only --sae-options kernel sparse|dense.")
        kernel = wanted
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'sparse' (the fast path, default) or 'dense' (the reference path), "
                         f"got {kernel!r}.")
    return kernel


@dataclass
class LatentPlan:
    """The selected pairs sorted by latent: what the gather-sums per latent of the backward need."""

    order: Tensor  # [N] entry positions, latent-major
    tokens: Tensor  # [N] token of each entry, in that order
    offsets: Tensor  # [n] first sorted position of each latent (empty latents repeat the next start)


class Selection:
    """Chosen (token, latent) pairs of one batch.

    Per-token layout: `indices [B, m]` (m latents per token), `offsets` None.
    Flat layout: `indices [N]` sorted by token, `tokens [N]` their tokens, `offsets [B]` where each token starts.
    """

    def __init__(self, indices: Tensor, d_sae: int, *, tokens: Tensor | None = None, offsets: Tensor | None = None):
        self.indices, self.d_sae, self.tokens, self.offsets = indices, d_sae, tokens, offsets
        self._plan: LatentPlan | None = None
        self._selected_from: tuple | None = None  # (weakref to the scores, their version, their values here)

    @classmethod
    def per_token(cls, indices: Tensor, d_sae: int) -> "Selection":
        return cls(indices, d_sae)

    @classmethod
    def topk(cls, scores: Tensor, k: int) -> "Selection":
        """The k largest scores of each token, largest first: a fixed order, so variants that select the same
        latents sum them in the same order. On CPU the compiled kernel of saes/kernels (equal scores: the smaller
        index first), else torch.topk. scores: [B, n]. The first `gather` from the same, unchanged scores returns
        the values the top-k read, instead of gathering them again."""
        values, indices = kernels.topk(scores.detach(), k)
        selection = cls(indices, scores.shape[-1])
        selection._selected_from = (weakref.ref(scores), scores._version, values)
        return selection

    @classmethod
    def batch_topk(cls, scores: Tensor, n_keep: int) -> "Selection":
        """The n_keep largest scores of the whole batch (the rule of `ops.batch_topk_codes`). scores: [B, n]."""
        return cls.from_flat(ops.batch_topk_positions(scores.detach(), n_keep), scores.shape[0], scores.shape[1])

    @classmethod
    def from_flat(cls, flat: Tensor, batch: int, d_sae: int) -> "Selection":
        """From positions in the flattened [batch, d_sae] matrix (any order): sorted, so tokens are contiguous."""
        with serial(flat.device):
            flat = _sort_keys(flat, batch * d_sae)
            tokens, indices = flat // d_sae, flat % d_sae
            offsets = torch.searchsorted(tokens, torch.arange(batch, device=flat.device, dtype=tokens.dtype))
        return cls(indices, d_sae, tokens=tokens, offsets=offsets)

    @property
    def flat(self) -> bool:
        return self.offsets is not None

    @property
    def batch(self) -> int:
        return self.offsets.shape[0] if self.flat else self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def entry_tokens(self) -> Tensor:
        """[N] token of every entry (flattened per-token layout: token b owns entries b*m .. b*m + m - 1)."""
        if self.tokens is None:
            batch, m = self.indices.shape
            with serial(self.indices.device):
                self.tokens = torch.arange(batch, device=self.indices.device).repeat_interleave(m)
        return self.tokens

    def bag_offsets(self) -> Tensor:
        """[B] start of each token's entries in the flattened order."""
        if self.flat:
            return self.offsets
        batch, m = self.indices.shape
        return torch.arange(0, batch * m, m, device=self.indices.device)

    def plan(self) -> LatentPlan:
        """Entries sorted by latent (stable, so every run sums in the same order); computed once, shared by the
        encoder's and the decoder's backward."""
        if self._plan is None:
            tokens = self.entry_tokens()
            module = kernels.load() if self.device.type == "cpu" else None
            if module is not None:  # a counting sort: the same stable order, several times faster than a sort
                order, offsets = module.latent_plan(self.indices, self.d_sae)
                self._plan = LatentPlan(order, tokens.index_select(0, order), offsets)
                return self._plan
            with serial(self.device):
                keys = self.indices.reshape(-1)
                if self.d_sae < 2**31:
                    keys = keys.int()  # int32 keys sort several times faster on CPU
                latents, order = keys.sort(stable=True)
                offsets = torch.searchsorted(latents, torch.arange(self.d_sae, device=latents.device,
                                                                   dtype=latents.dtype))
                self._plan = LatentPlan(order, tokens.index_select(0, order), offsets)
        return self._plan

    def gather(self, dense: Tensor) -> Tensor:
        """dense [B, d_sae] at the selected pairs -> shaped like `indices`."""
        if self._selected_from is not None:  # once: the top-k's values, if dense is its scores (or a detached
            source, version, values = self._selected_from  # alias), unchanged since: same memory, view, version
            self._selected_from = None
            scores = source()
            if scores is not None and _same_view(scores, dense) and dense._version == version:
                return values
        with serial(self.device):
            if self.flat:
                return dense[self.tokens, self.indices]
            return dense.gather(-1, self.indices)

    def bag_sum(self, weight: Tensor, per_entry: Tensor) -> Tensor:
        """Σ_entries per_entry · weight[latent] per token: [B, weight.shape[1]]."""
        per_entry = per_entry.to(weight.dtype)
        if self.flat:
            return F.embedding_bag(self.indices, weight, self.offsets, per_sample_weights=per_entry, mode="sum")
        return F.embedding_bag(self.indices, weight, per_sample_weights=per_entry, mode="sum")

    def latent_sum(self, rows: Tensor, per_entry: Tensor) -> Tensor:
        """Σ_entries per_entry · rows[token] per latent: [d_sae, rows.shape[1]] (zero rows for unselected latents)."""
        plan = self.plan()
        with serial(self.device):
            weights = per_entry.reshape(-1).index_select(0, plan.order).to(rows.dtype)  # faster than [ ] on CPU
        module = kernels.for_tensor(rows)
        if module is not None:  # threads split by entries, not latents as embedding_bag does: see sparse_ops.cpp
            return module.latent_sum(rows, plan.tokens, plan.offsets, weights)
        return F.embedding_bag(plan.tokens, rows, plan.offsets, per_sample_weights=weights, mode="sum")

    def entry_dots(self, rows_per_token: Tensor, weight: Tensor) -> Tensor:
        """<rows_per_token[token], weight[latent]> for every entry, shaped like `indices` (no [N, d] gather)."""
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows_per_token.contiguous(), weight, self.indices.reshape(-1), self.bag_offsets(), self.entry_tokens(), 0)
        return dots.reshape(self.indices.shape)

    def latent_total(self, per_entry: Tensor) -> Tensor:
        """Σ per_entry over the entries of each latent: [d_sae]."""
        with serial(self.device):
            out = torch.zeros(self.d_sae, dtype=per_entry.dtype, device=per_entry.device)
            return out.index_add_(0, self.indices.reshape(-1), per_entry.reshape(-1))

    def token_sum(self, per_entry: Tensor) -> Tensor:
        """Σ per_entry over the entries of each token: [B]."""
        with serial(self.device):
            if not self.flat:
                return per_entry.sum(-1)
            out = torch.zeros(self.batch, dtype=per_entry.dtype, device=per_entry.device)
            return out.index_add_(0, self.tokens, per_entry)

    def to_dense(self, values: Tensor) -> Tensor:
        """Dense codes [B, d_sae] with `values` at the selected pairs (differentiable in `values`)."""
        if self.flat:
            dense = values.new_zeros(self.batch * self.d_sae)
            return dense.index_put((self.tokens * self.d_sae + self.indices,), values).view(self.batch, self.d_sae)
        return values.new_zeros(self.batch, self.d_sae).scatter(-1, self.indices, values)


def _same_view(a: Tensor, b: Tensor) -> bool:
    """a and b read the same elements of the same memory (b may be a.detach())."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _sort_keys(keys: Tensor, bound: int) -> Tensor:
    """Sorted copy of non-negative integer keys below `bound` (int32 keys when they fit: faster on CPU), as int64."""
    if bound < 2**31:
        return keys.int().sort().values.long()
    return keys.sort().values


class _GatherPreActs(torch.autograd.Function):
    """Codes at the selected pairs, act(u) * keep, from u = W_enc (s·x - b_dec) + b_enc already computed (detached).

    act is ReLU or the identity (signed variants); `keep` (bool, like the indices, or None) zeroes entries."""

    @staticmethod
    def forward(ctx, pre_acts: Tensor, x_centered: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
                selection: Selection, relu: bool, keep: Tensor | None) -> Tensor:
        u = selection.gather(pre_acts)
        with serial(u.device):
            passes = (u > 0) if relu else None  # where the activation passes the gradient
            if keep is not None:
                passes = keep if passes is None else passes & keep
            values = u if passes is None else u * passes
        ctx.selection = selection
        ctx.save_for_backward(x_centered, W_enc, passes)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_centered, W_enc, passes = ctx.saved_tensors
        selection: Selection = ctx.selection
        with serial(grad.device):
            grad = grad.to(W_enc.dtype)
            if passes is not None:
                grad = grad * passes
        needs = ctx.needs_input_grad
        grad_x = grad_b_dec = grad_W = grad_b = None
        if needs[3]:
            grad_W = selection.latent_sum(x_centered, grad)  # [n, d]
        if needs[2] or needs[4]:
            grad_b = selection.latent_total(grad)  # [n]
            if needs[2]:
                with serial(grad.device):
                    grad_b_dec = -(grad_b @ W_enc)  # Σ_tokens of -grad_x_centered, without forming it
        if needs[1]:
            grad_x = selection.bag_sum(W_enc, grad)  # [B, d]
        return None, grad_x, grad_b_dec, grad_W, grad_b if needs[4] else None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_i z_i d_i per token over the selected latents (no b_dec): [B, d]."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, selection: Selection) -> Tensor:
        ctx.selection = selection
        ctx.save_for_backward(values, W_dec)
        return selection.bag_sum(W_dec, values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        selection: Selection = ctx.selection
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = selection.entry_dots(grad_out, W_dec).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = selection.latent_sum(grad_out, values)
        return grad_values, grad_W, None


class _DecodeError(torch.autograd.Function):
    """(Σ_tokens ||r||², r, Σ_tokens ||target - center||²) with r = target - Σ_i z_i d_i: the sparse decode and its
    squared error in one pass per token (on CPU, the compiled `decode_residual`, which also computes the dots
    <r, d_i> the backward needs while the decoder rows are in cache, and Σ_tokens r for b_dec's). b_dec (or None)
    only receives the gradient of x̂ = decoded + b_dec: target = s·x - b_dec already holds it, detached."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, target: Tensor, b_dec: Tensor | None, selection: Selection,
                center: Tensor | None):
        module = kernels.for_tensor(W_dec)
        if module is not None:
            residual, dots, per_token, centered, residual_sum = module.decode_residual(
                values.detach(), W_dec.detach(), selection.indices, selection.bag_offsets(), target.detach(),
                None if center is None else center.detach())
            sq_error, total = per_token.sum(), centered.sum()
        else:
            residual = target.detach() - selection.bag_sum(W_dec.detach(), values.detach())
            dots = residual_sum = None  # computed in the backward
            sq_error = torch.linalg.vector_norm(residual).square()
            total = (residual.new_zeros(()) if center is None
                     else torch.linalg.vector_norm(target.detach() - center.detach()).square())
        ctx.selection = selection
        ctx.save_for_backward(values, W_dec, residual, dots, residual_sum)
        ctx.mark_non_differentiable(residual, total)
        ctx.set_materialize_grads(False)  # no [B, d] zero gradient for the residual, which never has one
        return sq_error, residual, total

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_residual, _grad_total):
        values, W_dec, residual, dots, residual_sum = ctx.saved_tensors
        selection: Selection = ctx.selection
        needs = ctx.needs_input_grad
        if grad is None:
            return None, None, None, None, None, None
        scale = -2 * grad.to(W_dec.dtype)  # d/d decoded of ||target - decoded||² is -2 r
        grad_values = grad_W = grad_target = grad_b_dec = None
        if needs[0]:
            if dots is None:
                dots = selection.entry_dots(residual, W_dec)
            grad_values = (dots.reshape(values.shape) * scale).to(values.dtype)
        if needs[1]:
            grad_W = selection.latent_sum(residual, values.to(W_dec.dtype) * scale)
        if needs[2]:
            grad_target = residual * -scale
        if needs[3]:
            grad_b_dec = (residual.sum(0) if residual_sum is None else residual_sum) * scale
        return grad_values, grad_W, grad_target, grad_b_dec, None, None


def decode_error(values: Tensor, W_dec: Tensor, selection: Selection, target: Tensor, b_dec: Tensor | None = None,
                 center: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The squared error of the sparse decode, and FVU's denominator, in one fused op: (Σ_tokens ||r||², r [B, d]
    detached, Σ_tokens ||target - center||² detached, 0 without center) with r = target - Σ_i z_i d_i.

    values shaped like selection.indices; target [B, d]: s·x - b_dec (b_dec detached) for the main reconstruction,
    whose b_dec then gets the gradient of x̂ = decoded + b_dec here, or AuxK's residual (b_dec None)."""
    return _DecodeError.apply(values, W_dec, target, b_dec, selection, center)


def gather_pre_acts(pre_acts: Tensor, x_centered: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
                    selection: Selection, *, relu: bool = False, keep: Tensor | None = None) -> Tensor:
    """The pre-activations at the selected pairs (ReLU'd when `relu`, zeroed where `keep` is False), differentiable
    in W_enc, b_enc, b_dec (and x) with a sparse backward. pre_acts [B, n] detached; x_centered = s·x - b_dec computed
    from a detached b_dec (b_dec's encoder gradient is added here)."""
    return _GatherPreActs.apply(pre_acts.detach(), x_centered, b_dec, W_enc, b_enc, selection, relu, keep)


def sparse_decode(values: Tensor, W_dec: Tensor, selection: Selection) -> Tensor:
    """Σ z_i d_i per token: values shaped like selection.indices -> [B, d_in]. No b_dec."""
    return _SparseDecode.apply(values, W_dec, selection)


class PreActsBuffer:
    """One [B, n] tensor that the fast path's encoder forward writes into at every training step, on CPU.

    A fresh tensor that large (38 MB at B=4096, n=2304) comes from mmap and page-faults on its first write at every
    step; reusing one saves that (`python -m bench.train_throughput` measures the step). The trainer lends one to each
    SAE for the forward only (`lend_pre_acts_buffer`) and drops `pre_acts` right after it, so nothing reads the
    buffer once the next step has overwritten it. It stays allocated between steps, so the backward's temporaries
    no longer reuse its memory: the step's peak grows by those (0.3 GiB at n = 131,072)."""

    def __init__(self):
        self.tensor: Tensor | None = None

    def get(self, x_centered: Tensor, n: int) -> Tensor | None:
        """The buffer shaped [B, n] like x_centered's dtype, or None where it would not help (CUDA's caching
        allocator already reuses memory; autocast picks its own output dtype)."""
        if x_centered.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return None
        shape = (x_centered.shape[0], n)
        if self.tensor is None or self.tensor.shape != shape or self.tensor.dtype != x_centered.dtype:
            self.tensor = None  # free the old one before allocating its successor
            self.tensor = x_centered.new_empty(shape)
        return self.tensor


@contextmanager
def lend_pre_acts_buffer(sae, buffer: PreActsBuffer):
    """Within the block, `sae`'s fast-path forward writes its pre-activations into `buffer`."""
    sae.pre_acts_buffer = buffer
    try:
        yield
    finally:
        sae.pre_acts_buffer = None


def encoder_pre_acts(x_scaled: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
                     buffer: PreActsBuffer | None = None) -> tuple[Tensor, Tensor]:
    """(x_centered, u): the dense encoder forward without autograd (its backward is `gather_pre_acts`'s).

    x_centered = s·x - b_dec keeps x's autograd history (b_dec detached); u [B, n] is detached, written into
    `buffer` when one is given (and fits this device)."""
    x_centered = x_scaled - b_dec.detach()
    with torch.no_grad():
        out = None if buffer is None else buffer.get(x_centered, W_enc.shape[0])
        if out is None:
            pre_acts = torch.addmm(b_enc, x_centered, W_enc.T)
        else:
            pre_acts = torch.addmm(b_enc, x_centered, W_enc.T, out=out)
    return x_centered, pre_acts


def fast_auxk(pre_acts: Tensor, x_centered: Tensor, residual: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
              W_dec: Tensor, dead_mask: Tensor, k_aux: int, *, signed: bool = False,
              dead_columns: bool | None = None) -> Tensor:
    """`ops.auxk_loss` on the fast path, equal in value and gradients (§1.5).

    The dense rule takes the k_aux = min(aux_k, n_dead) largest scores among the dead latents. With `dead_columns`
    (the default on CPU, where reading the mask costs nothing) that is the top-k_aux of the dead columns alone, and
    with no dead latent the term is a constant 0. Without it (the default elsewhere: no host sync) the min(aux_k, n)
    largest scores are chosen with live latents scored -inf and live picks zeroed (fewer dead latents than k_aux);
    with no dead latent the loss is multiplied by 0, so it is 0 with zero gradients; the decode always does
    min(aux_k, n) pairs per token (`python -m bench.auxk` compares the two). residual: s·x - x̂ [B, d] of the main
    reconstruction, a constant here.
    """
    batch, d_sae = pre_acts.shape
    k_aux = min(k_aux, d_sae)
    valid = None
    with torch.no_grad():
        scores = pre_acts.abs() if signed else pre_acts
        if dead_columns is None:
            dead_columns = pre_acts.device.type == "cpu"
        if dead_columns:  # rank the dead columns alone: no [B, n] masked copy, no decode of live picks
            dead = dead_mask.nonzero().flatten()
            if dead.numel() == 0:
                return pre_acts.new_zeros(())  # no dead latent: no term to differentiate
            chosen = Selection.topk(scores.index_select(1, dead), min(k_aux, dead.numel()))
            selection = Selection(dead[chosen.indices], d_sae)  # [B, min(k_aux, n_dead)], largest first
        else:  # how many latents are dead is unknown without a sync: mask the live ones instead
            selection = Selection.topk(scores.masked_fill(~dead_mask, float("-inf")), k_aux)
            with serial(pre_acts.device):
                valid = dead_mask[selection.indices]  # [B, k_aux]
    values = gather_pre_acts(pre_acts, x_centered, b_dec, W_enc, b_enc, selection, relu=not signed, keep=valid)
    residual = residual.detach()  # the target of the dead latents' decode [B, d_in]
    numerator, _, denominator = decode_error(values, W_dec, selection, residual, center=residual.mean(0))
    loss = torch.nan_to_num(numerator / denominator, nan=0.0, posinf=0.0)
    return loss if valid is None else loss * dead_mask.any()
