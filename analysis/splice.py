"""Splicing an SAE into a model at its hook, and ablating the hook (docs/methods.md §10.5 downstream metrics).

Modes of `splice`, a context manager that installs one forward hook through `model.hooks()` and always removes it
(also when the block raises, §D.12):
- `sae`: h -> decode(edit(encode(h))) (the reconstruction replaces the activation; no error term);
- `sae_with_error`: h -> decode(edit(z)) + (h - decode(z)): the error term is kept, so without an edit this is h up
  to rounding but routed through the SAE (the control that must give CE loss recovered = 1), and with an edit it is
  the usual "change latents, keep what the SAE misses" intervention;
- `zero`: h -> 0;  `mean`: h -> a fixed mean activation (mean-ablation);  `clean`: nothing installed.

`edit(codes) -> codes` ([batch, pos, d_sae], any dtype the SAE gives) changes latents between encode and decode;
steering and circuit code can pass one. `positions` [batch, pos] bool restricts every mode to those positions
(elsewhere h is kept). The evals' SAEBench convention passes none (every position, BOS included, as SAEBench
does); their special-masked convention passes the training tokens, since the SAE never saw BOS/EOS or outlier-norm
tokens in training (eval_downstream.CONVENTIONS).
Activations with trailing head dimensions (e.g. attn.hook_z [batch, pos, heads, d_head]) are flattened to the SAE's
d_in and reshaped back.
"""
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

from saes.base import SAE

Mode = Literal["clean", "sae", "sae_with_error", "zero", "mean"]
MODES = ("clean", "sae", "sae_with_error", "zero", "mean")
LatentEdit = Callable[[Tensor], Tensor]  # codes [batch, pos, d_sae] -> edited codes, same shape


def check_hook(model, hook: str) -> None:
    if hook not in model.hook_dict:
        raise ValueError(f"The model has no hook {hook!r}: evaluate the SAE with the model it was trained on "
                         "(its cfg.json metadata.hook_name names the hook).")


def replacement(mode: Mode, sae: SAE | None = None, mean: Tensor | None = None,
                edit: LatentEdit | None = None) -> Callable[[Tensor], Tensor]:
    """The function h [batch, pos, d] -> h' [batch, pos, d] of a mode (h' keeps h's dtype)."""
    if mode in ("sae", "sae_with_error"):
        if sae is None:
            raise ValueError(f"Splice mode {mode!r} needs an SAE: pass sae=<the SAE>.")

        def fn(h: Tensor) -> Tensor:
            codes = sae.encode(h)
            x_hat = sae.decode(edit(codes) if edit else codes).to(h.dtype)
            if mode == "sae":
                return x_hat
            return x_hat + (h - (sae.decode(codes).to(h.dtype) if edit else x_hat))

        return fn
    if edit is not None:
        raise ValueError(f"A latent edit needs an SAE in the loop: use mode 'sae' or 'sae_with_error', not {mode!r}.")
    if mode == "zero":
        return torch.zeros_like
    if mode == "mean":
        if mean is None:
            raise ValueError("Mean-ablation needs the mean activation: pass mean=<tensor [d]>.")
        return lambda h: mean.to(device=h.device, dtype=h.dtype).expand_as(h).clone()
    raise ValueError(f"Unknown splice mode {mode!r}: use one of {', '.join(MODES)}.")


@contextmanager
def splice(model, hook: str, mode: Mode = "sae", sae: SAE | None = None, *, mean: Tensor | None = None,
           edit: LatentEdit | None = None, positions: Tensor | None = None) -> Iterator[None]:
    """Within the block, every forward of `model` has its `hook` activation replaced as `mode` says."""
    check_hook(model, hook)
    if mode == "clean":
        yield
        return
    fn = replacement(mode, sae, mean, edit)

    def hook_fn(activation: Tensor, hook) -> Tensor:
        shape = activation.shape
        flat = activation.reshape(*shape[:2], -1) if activation.dim() > 3 else activation  # [batch, pos, d_in]
        new = fn(flat)
        if positions is not None:
            mask = positions.to(new.device)
            if mask.shape != flat.shape[:2]:
                raise ValueError(f"positions mask {tuple(mask.shape)} does not match the activation's "
                                 f"[batch, pos] {tuple(flat.shape[:2])}: build it from the same tokens.")
            new = torch.where(mask[..., None], new, flat)
        return new.reshape(shape)

    with model.hooks(fwd_hooks=[(hook, hook_fn)]):
        yield


def zero_ablation(model, hook: str, positions: Tensor | None = None):
    return splice(model, hook, "zero", positions=positions)


def mean_ablation(model, hook: str, mean: Tensor, positions: Tensor | None = None):
    return splice(model, hook, "mean", mean=mean, positions=positions)
