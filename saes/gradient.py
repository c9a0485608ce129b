"""g-SAE: TopK whose training-time selection is informed by the downstream gradient (docs/methods.md §8).

Olmo, Wilson, Forsey, Hepner, Howe, Wingate 2025, "Features that Make a Difference: Leveraging Gradients for
Improved Dictionary Learning", arXiv 2411.10397 (Findings of NAACL 2025; no code released). In training each token
keeps the k latents with the largest score s = z + beta * z * |W_dec g|, where z = relu(pre_acts) and g is the
gradient of the LM's next-token loss w.r.t. the hooked activation: z_i |<d_i, g>| is the attribution-patching
estimate of what ablating latent i would cost, so latents that matter downstream win ties with larger but inert ones.
The values passed to the decoder are z, not s; the loss is the usual MSE + AuxK, so gradients only change *which*
latents are used. Inference (encode) is plain TopK (beta = 0, §8.3). Choices made where the paper is unclear [U]:

* `grad_normalisation` (§8.2) none: g arrives in raw space (the cache stores dL/dx) and the SAE works on s*x, so the
  score uses dL/d(s x) = g / s (§D.13); z_i <d_i, g / s> is then exactly the attribution estimate.
* per_token_unit (g / ||g|| per token) or batch_rms (default: g over the root mean over the batch of ||g||^2, so a
  typical token has ||g|| = 1): scale-free, so the term is |<d_i / ||d_i||, g_hat>| <= ~1 and beta is comparable
  across layers and models. Dividing by ||d_i|| (1 in training) keeps the score unchanged when export folds s into
  W_dec, as the explicit g / s does for `none`: a folded SAE selects the same latents from the same raw gradient.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes import sparse_topk as fast
from saes.topk import TopKConfig, TopKSAE

GRAD_NORMALISATIONS = ("none", "per_token_unit", "batch_rms")


@dataclass
class GradientTopKConfig(TopKConfig):
    beta: float = 1.0
    """Weight of the gradient term in the selection score z + beta * z * |W_dec g| (§8.1; sweep 0.1, 1, 10)."""
    grad_normalisation: str = "batch_rms"
    """How g is scaled before scoring: none, per_token_unit (unit norm per token) or batch_rms (unit RMS norm)."""

    def validate(self) -> None:
        super().validate()
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (0 is plain TopK), got {self.beta}.")
        if self.grad_normalisation not in GRAD_NORMALISATIONS:
            raise ValueError(f"grad_normalisation must be one of {', '.join(GRAD_NORMALISATIONS)}, "
                             f"got {self.grad_normalisation!r}.")


def normalise_grad(grad: Tensor, mode: str) -> Tensor:
    """Scale per-token gradients [batch, d_in] as `grad_normalisation` says; an all-zero g stays zero."""
    tiny = torch.finfo(grad.dtype).tiny
    if mode == "per_token_unit":
        return grad / grad.norm(dim=-1, keepdim=True).clamp_min(tiny)
    if mode == "batch_rms":
        return grad / grad.pow(2).sum(-1).mean().sqrt().clamp_min(tiny)
    return grad


class GradientTopKSAE(TopKSAE):
    architecture = "gradient_topk"
    config_cls = GradientTopKConfig
    uses_grad = True
    cfg: GradientTopKConfig

    def select(self, pre_acts: Tensor, *, train: bool, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        if not train:
            return super().select(pre_acts, train=train, x_scaled=x_scaled, grad=grad)  # plain TopK (§8.3)
        z = pre_acts.relu()  # [batch, d_sae]
        with torch.no_grad():  # the score only picks indices; gradients flow through the kept z
            indices = self.score(pre_acts, x_scaled, grad).topk(self.cfg.k, dim=-1, sorted=False).indices  # [batch, k]
        return torch.zeros_like(z).scatter(-1, indices, z.gather(-1, indices))

    def select_sparse(self, pre_acts: Tensor, *, x_scaled: Tensor, grad: Tensor | None) -> fast.Selection:
        with torch.no_grad():
            return fast.Selection.topk(self.score(pre_acts, x_scaled, grad), self.cfg.k)

    @torch.no_grad()
    def score(self, pre_acts: Tensor, x_scaled: Tensor, grad: Tensor | None) -> Tensor:
        """The training selection score z + beta * z * |<d_i, g>| (§8.1), [batch, d_sae]; no autograd."""
        if grad is None:
            raise ValueError(
                "gradient_topk trains on (x, grad) batches but got no gradient: build the activation cache with "
                "gradients (`saewb cache ... --gradients`) and read it with grads=True, or train architecture 'topk'."
            )
        if grad.shape != x_scaled.shape:
            raise ValueError(f"grad must have the activations' shape {tuple(x_scaled.shape)}, got {tuple(grad.shape)}.")
        z = pre_acts.detach().relu()
        grad = grad.to(pre_acts.dtype)
        if self.cfg.grad_normalisation == "none":
            g, rows = grad / self.input_scale, self.W_dec  # dL/d(s x) against the working-space rows
        else:
            g = normalise_grad(grad, self.cfg.grad_normalisation)
            rows = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        effect = (g @ rows.T).abs()  # [batch, d_sae], |<d_i, g>|
        return z + self.cfg.beta * z * effect
