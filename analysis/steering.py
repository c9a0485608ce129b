"""Steering a model with SAE latents (algorithms.md §10.4): additive, clamping, ablation, signed, gradient-descent
toward a class prototype, and a difference-in-means baseline.

Every method is an *edit* of the activations h [batch, pos, d] at the SAE's hook, applied inside a context manager
that always removes its hook (also when an exception is raised). Generation is cache-free (the whole sequence is
recomputed each step), so an edit restricted to prompt or generated positions is applied exactly where asked,
never to positions a KV cache has already consumed (§D.12).
"""
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from saes.base import SAE

Positions = Literal["all", "prompt", "generated"]
Edit = Callable[[Tensor, int], Tensor]  # (h [batch, pos, d], prompt_len) -> edited h


class SteeringError(ValueError):
    """Bad steering input; the message says how to fix it."""


# ---- input checks -------------------------------------------------------------------------------------------
def check_latent(sae: SAE, latent: int) -> None:
    if not 0 <= latent < sae.cfg.d_sae:
        raise SteeringError(f"Latent {latent} is out of range: this SAE has latents 0..{sae.cfg.d_sae - 1}.")


def check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha):
        raise SteeringError(f"Steering strength alpha must be a finite number, got {alpha}.")


def check_hook(model, hook: str) -> None:
    if hook not in model.hook_dict:
        raise SteeringError(f"The model has no hook {hook!r}: steer at the hook the SAE was trained on "
                            "(its cfg.json metadata.hook_name).")


def position_mask(positions: Positions, length: int, prompt_len: int, device) -> Tensor:
    """Which positions an edit touches: [pos] bool."""
    index = torch.arange(length, device=device)
    if positions == "all":
        return torch.ones(length, dtype=torch.bool, device=device)
    if positions == "prompt":
        return index < prompt_len
    if positions == "generated":
        return index >= prompt_len
    raise SteeringError(f"positions must be all, prompt or generated, got {positions!r}.")


# ---- edits --------------------------------------------------------------------------------------------------
def additive(direction: Tensor, alpha: float, positions: Positions = "all") -> Edit:
    """h' = h + alpha * direction at the chosen positions (a decoder row, or any vector such as diff-in-means)."""
    check_alpha(alpha)

    def edit(h: Tensor, prompt_len: int) -> Tensor:
        mask = position_mask(positions, h.shape[1], prompt_len, h.device)[None, :, None]
        return h + alpha * mask * direction.to(h.dtype)

    return edit


def decoder_direction(sae: SAE, latent: int) -> Tensor:
    """The latent's decoder row in raw activation space (what adding z_i = 1 adds): [d_in]."""
    check_latent(sae, latent)
    return sae.W_dec[latent].detach() / sae.input_scale


def clamp(sae: SAE, latent: int, value: float, positions: Positions = "all") -> Edit:
    """Set z_i to `value` and keep the SAE's error term: h' = x_hat(z with z_i := value) + (h - x_hat(z)).

    For a linear decoder this is h + (value - z_i) d_i. Clamping to 0 is ablation. For signed SAEs any sign works.
    """
    check_latent(sae, latent)
    check_alpha(value)

    def edit(h: Tensor, prompt_len: int) -> Tensor:
        codes = sae.encode(h)  # [batch, pos, d_sae]
        edited = codes.clone()
        edited[..., latent] = value
        if not sae.signed and value < 0:
            raise SteeringError(f"{sae.architecture} codes are non-negative: clamp latent {latent} to a value >= 0, "
                                "or use additive steering with a negative alpha.")
        new = h + (sae.decode(edited) - sae.decode(codes)).to(h.dtype)
        mask = position_mask(positions, h.shape[1], prompt_len, h.device)[None, :, None]
        return torch.where(mask, new, h)

    return edit


def ablate(sae: SAE, latent: int, positions: Positions = "all") -> Edit:
    return clamp(sae, latent, 0.0, positions)


def signed_steer(sae: SAE, latent: int, alpha: float, positions: Positions = "all") -> Edit:
    """Bidirectional steering for signed SAEs (AbsTopK): alpha < 0 pushes along -d_i, which is a feature of its own."""
    if not sae.signed:
        raise SteeringError(f"{sae.architecture} is not a signed SAE: use additive steering (alpha may be negative).")
    return additive(decoder_direction(sae, latent), alpha, positions)


@contextmanager
def steering(model, hook: str, edit: Edit | None, prompt_len: int) -> Iterator[None]:
    """Apply `edit` at `hook` for the duration of the block; the hook is always removed afterwards."""
    check_hook(model, hook)
    if edit is None:
        yield
        return

    def fn(activation: Tensor, hook) -> Tensor:
        return edit(activation, prompt_len)

    with model.hooks(fwd_hooks=[(hook, fn)]):
        yield


# ---- generation ---------------------------------------------------------------------------------------------
def prompt_tokens(model, prompt: str) -> Tensor:
    """BOS + the prompt's tokens, as in the activation cache: [1, pos]."""
    if not prompt.strip():
        raise SteeringError("The prompt is empty: give some text to continue.")
    from training.corpus import bos_eos

    bos, _ = bos_eos(model.tokenizer)
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([[bos] + ids])


@torch.no_grad()
def generate(model, hook: str, tokens: Tensor, edit: Edit | None, max_new_tokens: int = 20,
             temperature: float = 0.0, seed: int = 0) -> Tensor:
    """Continue `tokens` [1, pos] with the edit applied; greedy when temperature is 0. Returns [1, pos + new]."""
    n_ctx = model.cfg.n_ctx
    if max_new_tokens < 1 or tokens.shape[1] + max_new_tokens > n_ctx:
        raise SteeringError(f"The prompt ({tokens.shape[1]} tokens) plus {max_new_tokens} new tokens must fit the "
                            f"model's context of {n_ctx} tokens, with at least one new token.")
    generator = torch.Generator().manual_seed(seed)
    prompt_len = tokens.shape[1]
    with steering(model, hook, edit, prompt_len):
        for _ in range(max_new_tokens):
            logits = model(tokens)[0, -1].float()
            if temperature > 0:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt[None]], dim=1)
    return tokens


# ---- baselines and optimised directions ---------------------------------------------------------------------
@torch.no_grad()
def hook_activations(model, hook: str, texts: list[str]) -> Tensor:
    """Activations at `hook` of every non-BOS token of the texts: [n_tokens, d]."""
    check_hook(model, hook)
    rows = []
    for text in texts:
        tokens = prompt_tokens(model, text)
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        rows.append(cache[hook][0, 1:])
    return torch.cat(rows)


def diff_in_means(model, hook: str, positive: list[str], negative: list[str]) -> Tensor:
    """The difference-in-means steering vector mean(h | positive) - mean(h | negative): [d]."""
    return hook_activations(model, hook, positive).mean(0) - hook_activations(model, hook, negative).mean(0)


def soft_codes(sae: SAE, h: Tensor) -> Tensor:
    """Dense, differentiable codes: ReLU'd pre-activations (raw pre-activations for signed SAEs). [n, d_sae]."""
    pre = sae.pre_acts(h.to(sae.W_enc.dtype) * sae.input_scale)
    return pre if sae.signed else pre.relu()


@dataclass
class GradientSteeringResult:
    delta: Tensor  # [d_sae] offset in latent space
    direction: Tensor  # [d] = decode_no_bias(delta), what is added to h
    losses: list[float]  # objective per optimisation step


def gradient_steering(model, sae: SAE, hook: str, prompt: str, prototype_texts: list[str], steps: int = 50,
                      lr: float = 0.05, l1: float = 1e-3) -> GradientSteeringResult:
    """Steered generation by gradient descent on sparse features (EXPERIMENTAL: our reading of the method, §C.12).

    Codes are taken as the SAE's dense pre-activations (ReLU'd unless the SAE is signed): a differentiable
    surrogate of `encode`, whose top-k selection has no useful gradient. The class prototype is the mean code over
    the prototype texts' tokens. We optimise a latent-space offset delta so that the codes of
    h + decode_no_bias(delta) over the prompt move toward the prototype:
    minimise mean_pos ||codes(h + decode_no_bias(delta)) - prototype||^2 + l1 * ||delta||_1, with Adam.
    Generation then adds decode_no_bias(delta) at every position (`additive(result.direction, 1.0)`).
    """
    prototype = soft_codes(sae, hook_activations(model, hook, prototype_texts)).mean(0).detach()  # [d_sae]
    h = hook_activations(model, hook, [prompt]).detach()  # [pos, d]
    delta = torch.zeros(sae.cfg.d_sae, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    losses = []
    for _ in range(steps):
        codes = soft_codes(sae, h + sae.decode_no_bias(delta))
        loss = (codes - prototype).pow(2).sum(-1).mean() + l1 * delta.abs().sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    delta = delta.detach()
    return GradientSteeringResult(delta, sae.decode_no_bias(delta).detach(), losses)
