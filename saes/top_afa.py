"""top-AFA SAE (Lee, Davies, Canby, Hockenmaier 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality", arXiv 2503.24277; code SewoongLee/top-afa-sae), docs/methods.md §9.2.

No k: each token keeps as many latents as its input norm asks for. With a quasi-orthogonal dictionary
‖Σ z_i d_i‖ ≈ ‖z̃‖, z̃_i = z_i ‖d_i‖ (Approximate Feature Activation), and what the latents must rebuild is
s·x − b_dec, so per token:

    a_i = relu(u_i)                                  u = W_enc (s·x − b_dec) + b_enc
    sort q_i = (a_i ‖d_i‖)² in descending order;     c_j = sqrt(q_(1) + ... + q_(j)),  j = 1 .. J
    k* = the j minimising |c_j − ‖s·x − b_dec‖|     (the smallest such j on ties; J = k_cap or d_sae)
    z  = a on the k* largest q, 0 elsewhere

Training and inference use the same rule, one token at a time. Loss: mse_sum + (1/32)·AuxK, plus, with
`afa_coef` > 0, afa_coef · mean_tokens (‖z̃‖ − ‖s·x − b_dec‖)² (the paper's norm-matching term; 0 in the released
config, as here).

Choices (§9.2): the selection follows the authors' `TopAFASAE.forward` (decoder-norm-scaled squared activations,
target ‖x − b_dec‖, nearest cumulative norm, at least one latent), with two differences: u keeps our b_enc (their
TopK-family forward has none; ours starts at 0), and the full prefix j = d_sae may win (they force it out by setting
the last cumulative value to 1e8, which only matters when every latent is positive). Their norm-matching term
compares the unscaled ‖z‖ with ‖x‖ (not centred); ours compares ‖z̃‖ with the selection's own target ‖s·x − b_dec‖,
both as constants of the target (target and decoder norms detached). The decoder norms make the rule invariant to
folding the input scale (c and the target both shrink by s). Adam betas (0.9, 0.99) as their config.

Fast path (kernel 'sparse', the default): the kept pairs become a flat selection (a variable number per token, so
building it reads the total from the device once per step) and the encoder backward, decode and AuxK touch only
them, with the dense path's values and gradients (tests/saes/test_top_afa.py, float64).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import sparse_topk as fast
from saes.base import SAE, SAEConfig, SAEOutput, check_k


@dataclass
class TopAFAConfig(SAEConfig):
    k_cap: int | None = None
    """Longest prefix considered (a cap on the per-token L0, and a top-k_cap instead of a full sort); None: d_sae.
    Not tied to --k: top-AFA has no k."""
    afa_coef: float = 0.0
    """Weight of the norm-matching term mean (‖z̃‖ − ‖s·x − b_dec‖)²; 0 in the authors' released config."""
    kernel: str = "sparse"
    """Training path: 'sparse' (default; the selected pairs only after the dense encoder matmul) or 'dense' (the
    reference path through dense codes). Same selection, values and gradients."""

    def validate(self) -> None:
        super().validate()
        if self.k_cap is not None:
            check_k(self.k_cap, self.d_sae, "k_cap")
        if not self.afa_coef >= 0:
            raise ValueError(f"afa_coef must be >= 0, got {self.afa_coef}.")
        fast.check_kernel(self.kernel, None)


def afa_prefix(acts: Tensor, target: Tensor, decoder_norms: Tensor, cap: int | None) -> tuple[Tensor, Tensor]:
    """The top-AFA choice per token: (order [batch, J], the latents by decreasing (a_i‖d_i‖)², and k* [batch], how
    many of them to keep). acts: relu'd pre-activations [batch, n]; target: ‖s·x − b_dec‖ [batch]; decoder_norms
    [n]; J = cap or n."""
    with torch.no_grad():
        q = (acts * decoder_norms).square()
        if cap is None or cap >= q.shape[-1]:
            q_sorted, order = q.sort(dim=-1, descending=True)
        else:
            q_sorted, order = q.topk(cap, dim=-1, sorted=True)
        cumulative = q_sorted.cumsum(-1).sqrt()  # c_j, j = 1..J
        k = (cumulative - target.unsqueeze(-1)).abs().argmin(-1) + 1  # first minimum: the smallest prefix on ties
    return order, k


class TopAFASAE(SAE):
    architecture = "top_afa"
    config_cls = TopAFAConfig
    adam_betas = (0.9, 0.99)  # AFA training/config.py
    cfg: TopAFAConfig

    def _prefix(self, pre_acts: Tensor, x_scaled: Tensor) -> tuple[Tensor, Tensor]:
        target = (x_scaled - self.b_dec).detach().norm(dim=-1)
        return afa_prefix(pre_acts.detach().relu(), target, self.W_dec.detach().norm(dim=-1), self.cfg.k_cap)

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        order, k = self._prefix(pre_acts, x_scaled)
        ranks = torch.arange(order.shape[-1], device=order.device)
        keep = torch.zeros(pre_acts.shape, dtype=torch.bool, device=pre_acts.device)
        keep.scatter_(-1, order, ranks < k.unsqueeze(-1))
        return pre_acts.relu() * keep

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        order, k = self._prefix(pre_acts, x_scaled)
        batch, n = pre_acts.shape
        ranks = torch.arange(order.shape[-1], device=order.device)
        flat = (torch.arange(batch, device=order.device).unsqueeze(-1) * n + order)[ranks < k.unsqueeze(-1)]
        return fast.Selection.from_flat(flat, batch, n)

    # ---- the norm-matching term ---------------------------------------------------------------------------
    def _afa_term(self, code_sq_norm: Tensor, x_scaled: Tensor) -> Tensor:
        """afa_coef · mean over tokens of (‖z̃‖ − ‖s·x − b_dec‖)²; code_sq_norm: Σ_i (z_i‖d_i‖)² per token [batch]."""
        target = (x_scaled - self.b_dec).detach().norm(dim=-1)
        norm = code_sq_norm.clamp_min(torch.finfo(code_sq_norm.dtype).tiny).sqrt()  # no NaN gradient at z = 0
        return self.cfg.afa_coef * (norm - target).square().mean()

    def aux_losses(self, pre_acts, codes, x_scaled, x_hat_scaled, dead_mask) -> dict[str, Tensor]:
        losses = super().aux_losses(pre_acts, codes, x_scaled, x_hat_scaled, dead_mask)
        if self.cfg.afa_coef > 0:
            scaled = codes * self.W_dec.detach().norm(dim=-1)
            losses["afa"] = self._afa_term(scaled.square().sum(-1), x_scaled)
        return losses

    def _fast_forward(self, x: Tensor, *, dead_mask: Tensor | None, grad: Tensor | None) -> SAEOutput:
        out = super()._fast_forward(x, dead_mask=dead_mask, grad=grad)
        if self.cfg.afa_coef > 0:
            selection = out.selection
            scaled = out.values * self.W_dec.detach().norm(dim=-1)[selection.indices]
            x_scaled = x.to(self.W_enc.dtype) * self.input_scale
            out.losses["afa"] = self._afa_term(selection.token_sum(scaled.square()), x_scaled)
        return out
