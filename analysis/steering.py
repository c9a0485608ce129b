"""Steering a model with SAE latents (docs/methods.md §10.4): additive, clamping, ablation, signed, gradient descent
on the sparse code toward a class prototype (§10.4 c), a one-offset variant of it, and a difference-in-means baseline.

Every method is an *edit* of the activations h [batch, pos, d] at the SAE's hook, applied inside a context manager
that always removes its hook (also when an exception is raised). Generation is cache-free (the whole sequence is
recomputed each step), so an edit restricted to prompt or generated positions is applied exactly where asked,
never to positions a KV cache has already consumed (§D.12); a sweep over α runs as one batch (`per_row`).

Special positions (BOS, EOS, pad: the tokenizer's special ids, as masked out of SAE training) are never edited
unless an edit is built with `include_special=True`: the SAE never saw them, and its codes there are off-scale
(up to 724 at BOS on the demo SAE, against at most about 6 elsewhere), so an edit there says nothing about the latent.
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


@dataclass(frozen=True)
class Span:
    """What an edit knows about the sequence it is applied to."""

    prompt_len: int
    special: Tensor  # [batch, pos] bool: special-token positions

    @classmethod
    def of(cls, model, tokens: Tensor, prompt_len: int | None = None) -> "Span":
        """The span of token ids [batch, pos]; prompt_len defaults to the whole sequence."""
        from training.corpus import special_token_ids

        special = torch.isin(tokens.cpu(), torch.tensor(special_token_ids(model.tokenizer)))
        return cls(tokens.shape[1] if prompt_len is None else prompt_len, special)


Edit = Callable[[Tensor, Span], Tensor]  # (h [batch, pos, d], span) -> edited h


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
    """Which positions an edit touches by their place in the sequence: [pos] bool."""
    index = torch.arange(length, device=device)
    if positions == "all":
        return torch.ones(length, dtype=torch.bool, device=device)
    if positions == "prompt":
        return index < prompt_len
    if positions == "generated":
        return index >= prompt_len
    raise SteeringError(f"positions must be all, prompt or generated, got {positions!r}.")


def edit_mask(h: Tensor, span: Span, positions: Positions, include_special: bool) -> Tensor:
    """Where an edit acts on h [batch, pos, d]: the chosen positions, minus special tokens unless asked.
    Returns [batch, pos, 1] bool."""
    if span.special.shape[-1] != h.shape[1]:
        raise SteeringError(f"The span covers {span.special.shape[-1]} positions but the activations have "
                            f"{h.shape[1]}: build it from the tokens being run (Span.of(model, tokens)).")
    mask = position_mask(positions, h.shape[1], span.prompt_len, h.device)[None, :]  # [1, pos]
    if not include_special:
        mask = mask & ~span.special.to(h.device)  # [batch, pos]
    return mask[..., None]


# ---- edits --------------------------------------------------------------------------------------------------
def additive(direction: Tensor, alpha: float, positions: Positions = "all", include_special: bool = False) -> Edit:
    """h' = h + alpha * direction at the chosen positions (a decoder row, or any vector such as diff-in-means)."""
    check_alpha(alpha)

    def edit(h: Tensor, span: Span) -> Tensor:
        mask = edit_mask(h, span, positions, include_special)
        return h + alpha * mask * direction.to(h.dtype)

    return edit


def decoder_direction(sae: SAE, latent: int) -> Tensor:
    """The latent's decoder row in raw activation space (what adding z_i = 1 adds): [d_in]."""
    check_latent(sae, latent)
    return sae.W_dec[latent].detach() / sae.input_scale


def clamp(sae: SAE, latent: int, value: float, positions: Positions = "all", include_special: bool = False) -> Edit:
    """Set z_i to `value` and keep the SAE's error term: h' = x_hat(z with z_i := value) + (h - x_hat(z)).

    For a linear decoder this is h + (value - z_i) d_i. Clamping to 0 is ablation. For signed SAEs any sign works.
    """
    check_latent(sae, latent)
    check_alpha(value)

    def edit(h: Tensor, span: Span) -> Tensor:
        codes = sae.encode(h)  # [batch, pos, d_sae]
        edited = codes.clone()
        edited[..., latent] = value
        if not sae.signed and value < 0:
            raise SteeringError(f"{sae.architecture} codes are non-negative: clamp latent {latent} to a value >= 0, "
                                "or use additive steering with a negative alpha.")
        new = h + (sae.decode(edited) - sae.decode(codes)).to(h.dtype)
        return torch.where(edit_mask(h, span, positions, include_special), new, h)

    return edit


def ablate(sae: SAE, latent: int, positions: Positions = "all", include_special: bool = False) -> Edit:
    return clamp(sae, latent, 0.0, positions, include_special)


def signed_steer(sae: SAE, latent: int, alpha: float, positions: Positions = "all",
                 include_special: bool = False) -> Edit:
    """Bidirectional steering for signed SAEs (AbsTopK): alpha < 0 pushes along -d_i, which is a feature of its own."""
    if not sae.signed:
        raise SteeringError(f"{sae.architecture} is not a signed SAE: use additive steering (alpha may be negative).")
    return additive(decoder_direction(sae, latent), alpha, positions, include_special)


class GradientDescentEdit:
    """Steering by gradient descent on the sparse code (Bhattacharyya & Rooshenas 2025; §10.4 c).

    Per edited token, starting from z_0 = enc(h), run `steps` Adam steps on J(z) = ||z - p||^2 (or 1 - cos(z, p))
    + l1 ||z||_1 toward the class prototype p, projecting onto z >= 0 after each step unless the SAE is signed;
    then replace h by dec(z_T) + (h - dec(z_0)), the SAE error kept. Every coordinate of z is free, so latents
    outside z_0's support can switch on. Tokens are optimised independently (J is a sum over tokens and Adam
    works per coordinate). `losses` holds mean J per step of the last call, for inspection.
    """

    def __init__(self, sae: SAE, prototype: Tensor, steps: int = 20, lr: float = 0.05, l1: float = 0.0,
                 objective: Literal["l2", "cosine"] = "l2", positions: Positions = "all",
                 include_special: bool = False):
        if steps < 0 or not lr >= 0 or not l1 >= 0:
            raise SteeringError(f"steps, lr and l1 must be >= 0, got steps={steps}, lr={lr}, l1={l1}.")
        if objective not in ("l2", "cosine"):
            raise SteeringError(f"objective must be l2 or cosine, got {objective!r}.")
        if prototype.shape != (sae.cfg.d_sae,):
            raise SteeringError(f"The prototype must be one code of {sae.cfg.d_sae} latents, "
                                f"got shape {tuple(prototype.shape)}.")
        self.sae, self.prototype = sae, prototype.detach().float()
        self.steps, self.lr, self.l1, self.objective = steps, lr, l1, objective
        self.positions, self.include_special = positions, include_special
        self.losses: list[float] = []

    def objective_of(self, z: Tensor) -> Tensor:
        """J per token: [n, d_sae] -> [n]."""
        if self.objective == "l2":
            j = (z - self.prototype).pow(2).sum(-1)
        else:
            j = 1 - torch.nn.functional.cosine_similarity(z, self.prototype[None], dim=-1)
        return j + self.l1 * z.abs().sum(-1)

    def __call__(self, h: Tensor, span: Span) -> Tensor:
        mask = edit_mask(h, span, self.positions, self.include_special)  # [batch, pos, 1]
        rows = mask[..., 0].expand(h.shape[:2]).reshape(-1)  # [batch * pos]
        flat = h.reshape(-1, h.shape[-1])  # [batch * pos, d]
        self.losses = []
        if self.steps == 0 or self.lr == 0 or not rows.any():
            return h
        with torch.enable_grad():
            z0 = self.sae.encode(flat[rows]).detach().float()  # [n, d_sae]
            z = z0.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([z], lr=self.lr)
            for _ in range(self.steps):
                loss = self.objective_of(z)
                optimiser.zero_grad()
                loss.sum().backward()
                optimiser.step()
                if not self.sae.signed:
                    with torch.no_grad():
                        z.clamp_(min=0)
                self.losses.append(loss.mean().item())
        delta = self.sae.decode_no_bias(z.detach() - z0).to(h.dtype)  # dec(z_T) - dec(z_0): [n, d]
        out = flat.clone()
        out[rows] = flat[rows] + delta
        return out.reshape(h.shape)


def gradient_descent(sae: SAE, prototype: Tensor, steps: int = 20, lr: float = 0.05, l1: float = 0.0,
                     objective: Literal["l2", "cosine"] = "l2", positions: Positions = "all",
                     include_special: bool = False) -> GradientDescentEdit:
    """The seed paper's steering (§10.4 c) as an edit; `prototype_code` gives p. Defaults T = 20, Adam lr 0.05,
    lambda = 0 are ours (§10.4). lr = 0 or steps = 0 leaves h untouched."""
    return GradientDescentEdit(sae, prototype, steps, lr, l1, objective, positions, include_special)


@contextmanager
def steering(model, hook: str, edit: Edit | None, span: Span) -> Iterator[None]:
    """Apply `edit` at `hook` for the duration of the block; the hook is always removed afterwards."""
    check_hook(model, hook)
    if edit is None:
        yield
        return

    def fn(activation: Tensor, hook) -> Tensor:
        return edit(activation, span)

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
             temperature: float = 0.0, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Continue `tokens` [batch, pos] with the edit applied; greedy when temperature is 0. Returns
    [batch, pos + new]. `progress(done, total)` is called after each new token (e.g. to move a progress bar).
    A sweep runs as one batch: the prompt repeated once per edit, with `per_row(edits)` as the edit.

    Cache-free: the whole sequence is recomputed at each step. (TransformerLens 4.3's bridge returns wrong logits
    from its KV cache on SmolLM2, off by up to 30, so the cache is not used.)"""
    n_ctx = model.cfg.n_ctx
    if max_new_tokens < 1 or tokens.shape[1] + max_new_tokens > n_ctx:
        raise SteeringError(f"The prompt ({tokens.shape[1]} tokens) plus {max_new_tokens} new tokens must fit the "
                            f"model's context of {n_ctx} tokens, with at least one new token.")
    generator = torch.Generator().manual_seed(seed)
    prompt_len = tokens.shape[1]
    for _ in range(max_new_tokens):
        with steering(model, hook, edit, Span.of(model, tokens, prompt_len)):  # the span grows with the text
            logits = model(tokens)[:, -1].float()  # [batch, vocab]
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)  # [batch, 1]
        tokens = torch.cat([tokens, nxt.to(tokens.device)], dim=1)
        if progress is not None:
            progress(tokens.shape[1] - prompt_len, max_new_tokens)
    return tokens


def per_row(edits: list[Edit | None]) -> Edit:
    """One edit for a batch whose row i is edited by edits[i] (None: left as it is), e.g. a sweep over α run as one
    batch of generations. Each edit sees its row alone, [1, pos, d], with that row's span."""

    def edit(h: Tensor, span: Span) -> Tensor:
        if h.shape[0] != len(edits):
            raise SteeringError(f"per_row has {len(edits)} edits but the batch has {h.shape[0]} rows: repeat the "
                                f"prompt once per edit.")
        rows = [h[i:i + 1] if e is None else e(h[i:i + 1], Span(span.prompt_len, span.special[i:i + 1]))
                for i, e in enumerate(edits)]
        return torch.cat(rows)

    return edit


# ---- baselines and optimised directions ---------------------------------------------------------------------
@torch.no_grad()
def hook_activations(model, hook: str, texts: list[str]) -> Tensor:
    """Activations at `hook` of every non-special token of the texts: [n_tokens, d]."""
    check_hook(model, hook)
    rows = []
    for text in texts:
        tokens = prompt_tokens(model, text)
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        rows.append(cache[hook][0][~Span.of(model, tokens).special[0]])
    return torch.cat(rows)


def diff_in_means(model, hook: str, positive: list[str], negative: list[str]) -> Tensor:
    """The difference-in-means steering vector mean(h | positive) - mean(h | negative): [d]."""
    return hook_activations(model, hook, positive).mean(0) - hook_activations(model, hook, negative).mean(0)


@torch.no_grad()
def prototype_code(model, sae: SAE, hook: str, texts: list[str]) -> Tensor:
    """The class prototype of §10.4 c: the mean SAE code over the texts' non-special tokens. [d_sae]."""
    return sae.encode(hook_activations(model, hook, texts)).float().mean(0)


def soft_codes(sae: SAE, h: Tensor) -> Tensor:
    """Dense, differentiable codes: ReLU'd pre-activations (raw pre-activations for signed SAEs). [n, d_sae]."""
    pre = sae.pre_acts(h.to(sae.W_enc.dtype) * sae.input_scale)
    return pre if sae.signed else pre.relu()


@dataclass
class DenseOffsetResult:
    delta: Tensor  # [d_sae] offset in latent space
    direction: Tensor  # [d] = decode_no_bias(delta), what is added to h
    losses: list[float]  # objective per optimisation step


def dense_prototype_offset(model, sae: SAE, hook: str, prompt: str, prototype_texts: list[str], steps: int = 50,
                           lr: float = 0.05, l1: float = 1e-3) -> DenseOffsetResult:
    """One global steering vector optimised toward a class prototype through dense pre-activations (ours; not the
    seed paper's method, which is `gradient_descent`).

    Codes are the SAE's ReLU'd pre-activations (a differentiable surrogate of `encode`, whose top-k selection has
    no useful gradient); the prototype is their mean over the prototype texts' tokens. One latent-space offset
    delta, shared by every position, is optimised so the codes of h + decode_no_bias(delta) over the prompt move
    toward it: minimise mean_pos ||codes(h + decode_no_bias(delta)) - prototype||^2 + l1 * ||delta||_1 with Adam.
    Generation then adds `result.direction` everywhere (`additive(result.direction, 1.0)`).
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
    return DenseOffsetResult(delta, sae.decode_no_bias(delta).detach(), losses)
