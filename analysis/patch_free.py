"""Patch-free dictionary circuits (He et al. 2024, arXiv 2402.12201; docs/methods.md §10.3).

With a dictionary (SAE) on every module that writes to the residual stream — the token embedding (`hook_embed`, plus
`hook_pos_embed` for learned positions), each attention output (`blocks.L.hook_attn_out`) and each MLP output
(`blocks.L.hook_mlp_out`) — the residual stream at any position is a sum of components: the active features
a_f(t)·d_f of every writer, each writer's decoder bias and its error ε = x − x̂ (a writer without a dictionary is one
error component). Any quantity linear in the residual stream is then a sum of per-component contributions, found
without patching:

- **logit** (`LogitTarget`): Σ_j w_j logit_j at a position, read through the final norm with its per-token scale
  frozen (γ ⊙ (x − mean)/σ_t (+ β) for LayerNorm, γ ⊙ x/σ_t for RMSNorm): exact;
- **latent of a residual-stream SAE** (`LatentTarget` on blocks.L.hook_resid_pre/mid/post): factor·w_f·r + κ_f:
  exact;
- **latent of an attention-output dictionary**: with the attention pattern A fixed and ln1 frozen, its pre-activation
  is Σ_h Σ_s A_h[t,s]·(ln1(r_s) W_V^h + b_V) W_O^h · w_f + const: the OV contributions of every component at every
  source position: exact;
- **attention score** (`ScoreTarget`, q_t·k_s / √d_head before the softmax, RoPE applied): bilinear in the two
  residual streams, so it splits into pairwise query-component × key-component terms (QK), kept in `pairs`; a
  node's share is half of every pair it is in, so the shares sum to the score exactly;
- **latent of an MLP-output dictionary**: nonlinear. APPROXIMATE: gradient × activation, g·c with g the gradient of
  the pre-activation with respect to the MLP's input residual (ln2 frozen) at the actual activation; what the
  linearisation misses is an explicit `approx` node, so the parts still add up to the pre-activation.

`trace_circuit` expands the target, keeps the largest contributions, and expands the largest latent nodes again
(a top-k frontier) down to `depth` levels; `graph_figure` draws the graph and `save_patch_free` writes
`RUN_DIR/circuits/patch_free.json` (nodes and edges in the shape of analysis/circuit_graph.py's graph.json), which the
Circuits page draws.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from analysis.attn_dfa import encoder_affine, pre_activations
from saes.base import SAE, token_stats

PATCH_FREE_FILE = "patch_free.json"


# ---- targets --------------------------------------------------------------------------------------------------
@dataclass
class LogitTarget:
    """Σ_j weights[j] · logit(ids[j]) at `position` (e.g. ids (IO, S), weights (1, -1): a logit difference)."""

    ids: list[int]
    weights: list[float]
    position: int = -1


@dataclass
class LatentTarget:
    """The pre-activation of `latent` of the SAE at `hook` at `position`: a writer's dictionary (attention or MLP
    output) from `saes`, or a residual-stream SAE passed as `sae` (hook blocks.L.hook_resid_pre/mid/post)."""

    hook: str
    latent: int
    position: int = -1
    sae: SAE | None = field(default=None, repr=False)


@dataclass
class ScoreTarget:
    """The attention score q_t · k_s / √d_head (before the softmax) of `head` in `layer`."""

    layer: int
    head: int
    query: int = -1
    key: int = 0


# ---- the residual stream as a sum of components ---------------------------------------------------------------
def writer_hooks(model) -> list[str]:
    """Every module output added to the residual stream, in the order they are added."""
    hooks = ["hook_embed"]
    if getattr(model.cfg, "positional_embedding_type", "") == "standard" and "hook_pos_embed" in model.hook_dict:
        hooks.append("hook_pos_embed")
    for layer in range(model.cfg.n_layers):
        hooks += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return hooks


def short_hook(hook: str) -> str:
    if not hook.startswith("blocks."):
        return hook.replace("hook_", "")
    parts = hook.split(".")
    kind = parts[-1].replace("hook_", "").replace("_out", "")
    return f"{kind}{parts[1]}"


def _param(module, name: str) -> Tensor | None:
    try:
        value = getattr(module, name)
    except Exception:  # the bridge raises for parameters a checkpoint does not have (bias-free projections)
        return None
    return value.detach().float() if isinstance(value, Tensor) else None


class FrozenNorm:
    """A norm with its per-token scale σ_t frozen: x -> γ ⊙ (x − [mean x]) / σ_t + β, linear in x but for β."""

    def __init__(self, model, module, scale: Tensor):
        self.centre = str(getattr(model.cfg, "normalization_type", "")).upper().startswith("LN")
        gamma = _param(module, "weight")
        d = model.cfg.d_model
        gamma = torch.ones(d) if gamma is None else gamma.cpu()
        self.gamma = 1 + gamma if getattr(model.cfg, "rmsnorm_uses_offset", False) else gamma
        beta = _param(module, "bias")
        self.beta = torch.zeros(d) if beta is None else beta.cpu()
        self.scale = scale.float().reshape(-1)  # [T]: σ_t, what the model divides by (hook_scale)

    def read(self, u: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """(r, κ): for any x, (norm(x) · u) = x · r + κ at `position`. u: [..., d] -> r [..., d], κ [...]."""
        r = self.gamma * u / self.scale[position]
        if self.centre:
            r = r - r.mean(-1, keepdim=True)  # (x − mean x) · v = x · (v − mean v)
        return r, (self.beta * u).sum(-1)

    def apply(self, x: Tensor, position: int) -> Tensor:
        """The frozen norm itself (the scale does not follow x)."""
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return self.gamma * x / self.scale[position] + self.beta


class Decomposition:
    """One prompt's forward pass, with every writer's output split into dictionary components."""

    def __init__(self, model, saes: dict[str, SAE], tokens: Tensor | list[int]):
        cfg = model.cfg
        if getattr(cfg, "use_normalization_before_and_after", False) or getattr(cfg, "parallel_attn_mlp", False):
            raise ValueError("Patch-free tracing supports sequential pre-norm blocks (GPT-2, Llama, Qwen2 style); "
                             "this model norms module outputs again or runs attention and MLP in parallel.")
        self.model = model
        self.cfg = cfg
        self.saes = {h: s.requires_grad_(False) for h, s in saes.items()}
        self.writers = writer_hooks(model)
        unknown = sorted(set(saes) - set(self.writers))
        if unknown:
            raise ValueError(f"Dictionaries must sit on residual-stream writers ({', '.join(self.writers[:3])}, ...); "
                             f"got {', '.join(unknown)}.")
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        self.tokens = ids[0].tolist()
        self.strings = [model.tokenizer.decode([t]) for t in self.tokens]
        self.T = ids.shape[1]
        n = cfg.n_layers
        names = list(self.writers) + ["ln_final.hook_scale", f"blocks.{n - 1}.hook_resid_post"]
        for layer in range(n):
            names += [f"blocks.{layer}.{x}" for x in (
                "ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_q",
                "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_cos", "attn.hook_sin",
                "hook_resid_mid")]
        names = [name for name in names if name in model.hook_dict]
        device = next(model.parameters()).device
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids.to(device), names_filter=names)
        self.logits = logits[0].float().cpu()
        self.cache = {k: v[0].float().cpu() for k, v in cache.items()}
        self.out = {w: self.cache[w] for w in self.writers}  # [T, d] each
        total = sum(self.out.values())
        gap = (total - self.cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max().item()
        if gap > 1e-3 * max(1.0, total.abs().max().item()):
            raise ValueError(f"The writers {self.writers[0]} ... do not add up to the residual stream (gap {gap:.3g}): "
                             "this model family is not supported by the patch-free tracer.")
        self.W_Q, self.W_K, self.W_V, self.W_O = (getattr(model, n).detach().float().cpu()
                                                  for n in ("W_Q", "W_K", "W_V", "W_O"))
        self.W_U = model.W_U.detach().float().cpu()
        self.b_U = _param(model, "b_U")
        self.n_heads = self.W_Q.shape[1]
        self.n_kv = self.W_K.shape[1]
        self._split()

    # -- components ---------------------------------------------------------------------------------------------
    def _split(self) -> None:
        """Per writer: codes [T, d_sae], the decoder rows in raw space per token [T, ...] factor, bias [T, d] and
        error [T, d]; a writer without a dictionary is all error."""
        self.parts: dict[str, dict] = {}
        for w in self.writers:
            x = self.out[w]
            sae = self.saes.get(w)
            if sae is None:
                self.parts[w] = {"codes": None, "bias": torch.zeros_like(x), "error": x.clone()}
                continue
            with torch.no_grad():
                codes = sae.encode(x).float()
                recon = sae.decode(codes).float()
            s = float(sae.input_scale)
            if sae.cfg.token_norm == "none":
                unit, mean = torch.full((self.T, 1), 1 / s), torch.zeros(self.T, 1)
            else:
                mean, _, scale = token_stats(x, sae.cfg.token_norm)
                unit = scale / s
            bias = sae.b_dec.detach().float() * unit + mean
            self.parts[w] = {"codes": codes, "unit": unit[:, 0], "W_dec": sae.W_dec.detach().float(), "bias": bias,
                             "error": x - recon}

    def components(self, position: int, upto: int) -> tuple[list[str], Tensor]:
        """(node ids, vectors [n, d_model]) of the components of the residual stream at `position` made by the first
        `upto` writers: active features, each writer's bias, each writer's error. They sum to that residual."""
        ids, vectors = [], []
        for w in self.writers[:upto]:
            part = self.parts[w]
            if part["codes"] is not None:
                active = part["codes"][position].nonzero()[:, 0]
                for f in active.tolist():
                    ids.append(f"{w}/{f}@{position}")
                vectors.append(part["codes"][position, active, None] * part["W_dec"][active] * part["unit"][position])
                ids.append(f"{w}/bias@{position}")
                vectors.append(part["bias"][position][None])
            ids.append(f"{w}/err@{position}")
            vectors.append(part["error"][position][None])
        return ids, torch.cat(vectors) if vectors else torch.zeros(0, self.cfg.d_model)

    def writer_index(self, hook: str) -> int:
        return self.writers.index(hook)

    def before_attn(self, layer: int) -> int:
        """How many writers precede layer `layer`'s attention (its input is their sum)."""
        return self.writer_index(f"blocks.{layer}.hook_attn_out")

    def residual_upto(self, hook: str) -> int:
        """How many writers make up the residual-stream hook `hook` (blocks.L.hook_resid_pre / mid / post)."""
        parts = hook.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("hook_resid_pre", "hook_resid_mid",
                                                                        "hook_resid_post"):
            raise ValueError(f"A residual-stream target needs blocks.L.hook_resid_pre/mid/post, got {hook!r}.")
        layer = int(parts[1])
        return {"hook_resid_pre": self.before_attn(layer), "hook_resid_mid": self.before_attn(layer) + 1,
                "hook_resid_post": self.before_attn(layer) + 2}[parts[2]]

    def norm(self, name: str, layer: int | None = None) -> FrozenNorm:
        if layer is None:
            return FrozenNorm(self.model, self.model.ln_final, self.cache["ln_final.hook_scale"])
        return FrozenNorm(self.model, getattr(self.model.blocks[layer], name),
                          self.cache[f"blocks.{layer}.{name}.hook_scale"])

    def pos(self, position: int) -> int:
        return position % self.T


# ---- expansions -----------------------------------------------------------------------------------------------
@dataclass
class Expansion:
    """A traced quantity as a sum: Σ weights + const (+ approx, the MLP linearisation's residual) = value."""

    node: str
    value: float
    ids: list[str]
    weights: Tensor
    const: float
    exact: bool = True
    approx: float = 0.0
    mechanism: str = "direct"
    heads: Tensor | None = None  # [n, n_heads] OV contributions by head
    pairs: dict | None = None  # QK: {"query": ids, "key": ids, "matrix": [nq, nk]}

    def total(self) -> float:
        return float(self.weights.double().sum()) + self.const + self.approx


def expand_logit(dec: Decomposition, target: LogitTarget, node: str = "target") -> Expansion:
    """Direct contributions of every component at the position to Σ_j w_j logit_j, final norm frozen (exact)."""
    t = dec.pos(target.position)
    ids_t, weights_t = torch.tensor(target.ids), torch.tensor(target.weights, dtype=torch.float32)
    u = (dec.W_U[:, ids_t] * weights_t).sum(-1)  # [d]
    r, kappa = dec.norm("ln_final").read(u, t)
    ids, vectors = dec.components(t, len(dec.writers))
    const = float(kappa) + (float((dec.b_U[ids_t] * weights_t).sum()) if dec.b_U is not None else 0.0)
    value = float((dec.logits[t, ids_t] * weights_t).sum())
    return Expansion(node, value, ids, vectors @ r, const, mechanism="direct (frozen final norm)")


def _latent_readout(sae: SAE, x: Tensor, latent: int) -> tuple[Tensor, float, float]:
    """(u [d], κ, pre-activation) with pre = x · u + κ at this token (the SAE's norm statistics frozen)."""
    W, factor, const = encoder_affine(sae, x[None], [latent])
    return W[0] * factor[0], float(const[0, 0]), float(pre_activations(sae, x[None], [latent])[0, 0])


def expand_latent(dec: Decomposition, target: LatentTarget, node: str | None = None) -> Expansion | None:
    """The pre-activation of a latent as a sum over upstream components: exact for residual-stream SAEs and
    attention outputs (OV, pattern fixed), approximate (gradient × activation) for MLP outputs; None for the
    embedding, whose features are leaves."""
    t = dec.pos(target.position)
    hook = target.hook
    node = node or f"{hook}/{target.latent}@{t}"
    if hook in ("hook_embed", "hook_pos_embed"):
        return None
    if target.sae is not None and hook not in dec.writers:
        upto = dec.residual_upto(hook)
        x = sum(dec.out[w][t] for w in dec.writers[:upto])
        u, kappa, pre = _latent_readout(target.sae, x, target.latent)
        ids, vectors = dec.components(t, upto)
        return Expansion(node, pre, ids, vectors @ u, kappa, mechanism="direct (residual-stream SAE)")
    sae = dec.saes.get(hook)
    if sae is None:
        raise ValueError(f"No dictionary at {hook}: pass saes with one there, or a residual-stream SAE as sae=.")
    u, kappa, pre = _latent_readout(sae, dec.out[hook][t], target.latent)
    layer = int(hook.split(".")[1])
    if hook.endswith("hook_attn_out"):
        return _expand_ov(dec, layer, t, u, kappa, pre, node)
    return _expand_mlp(dec, layer, t, u, kappa, pre, node)


def _expand_ov(dec: Decomposition, layer: int, t: int, u: Tensor, kappa: float, pre: float, node: str) -> Expansion:
    """OV: with the pattern A fixed and ln1 frozen, u · attn_out(t) = Σ_h Σ_s A_h[t,s] (ln1(r_s) W_V + b_V) W_O^h u
    (+ b_O · u)."""
    A = dec.cache[f"blocks.{layer}.attn.hook_pattern"]  # [H, T, S]
    attn = dec.model.blocks[layer].attn
    rep = dec.n_heads // dec.n_kv
    o = torch.einsum("hdm,m->hd", dec.W_O[layer], u)  # [H, dh]: W_O^h u
    p = torch.einsum("hmd,hd->hm", dec.W_V[layer].repeat_interleave(rep, 0), o)  # [H, d]: W_V^h W_O^h u
    ln1 = dec.norm("ln1", layer)
    const = kappa
    b_V, b_O = _param(attn, "b_V"), _param(attn, "b_O")
    if b_V is None:
        b_V = _param(dec.model, "b_V")
        b_V = None if b_V is None else b_V[layer]
    if b_O is None:
        b_O = _param(dec.model, "b_O")
        b_O = None if b_O is None else b_O[layer]
    if b_V is not None:
        const += float((b_V.cpu().reshape(dec.n_kv, -1).repeat_interleave(rep, 0) * o).sum())  # Σ_s A = 1
    if b_O is not None:
        const += float(b_O.cpu().reshape(-1) @ u)
    const += float((ln1.beta * p).sum())  # the norm's bias, through V and O, weighted by Σ_s A = 1
    ids, heads = [], []
    before = dec.before_attn(layer)
    for s in range(t + 1):
        if float(A[:, t, s].abs().max()) == 0:
            continue
        r, _ = ln1.read(p, s)  # [H, d]
        comp_ids, vectors = dec.components(s, before)
        ids += comp_ids
        heads.append((vectors @ r.T) * A[:, t, s])  # [n, H]
    heads_t = torch.cat(heads) if heads else torch.zeros(0, dec.n_heads)
    return Expansion(node, pre, ids, heads_t.sum(-1), const, mechanism="OV (attention pattern and ln1 frozen)",
                     heads=heads_t)


def _expand_mlp(dec: Decomposition, layer: int, t: int, u: Tensor, kappa: float, pre: float, node: str) -> Expansion:
    """APPROXIMATE: gradient × activation through the MLP (ln2 frozen); the linearisation's miss is `approx`."""
    ln2 = dec.norm("ln2", layer)
    upto = dec.before_attn(layer) + 1
    r = sum(dec.out[w][t] for w in dec.writers[:upto]).clone().requires_grad_(True)
    mlp = dec.model.blocks[layer].mlp
    device = next(dec.model.parameters()).device
    with torch.enable_grad():
        out = mlp(ln2.apply(r, t).to(device)[None, None])[0, 0].float().cpu()
        value = out @ u
        (g,) = torch.autograd.grad(value, r)
    ids, vectors = dec.components(t, upto)
    weights = vectors @ g
    return Expansion(node, pre, ids, weights, kappa, exact=False, approx=pre - kappa - float(weights.double().sum()),
                     mechanism="MLP: gradient x activation (APPROXIMATE; ln2 frozen)")


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of [..., d_head] vectors at one position (cos, sin: [rot_dim]; Llama/NeoX rotate_half;
    a rot_dim below d_head rotates only the first rot_dim dimensions)."""
    n = cos.shape[-1]
    head, tail = x[..., :n], x[..., n:]
    half = n // 2
    rotated = torch.cat([-head[..., half:], head[..., :half]], -1)
    return torch.cat([head * cos + rotated * sin, tail], -1)


def expand_score(dec: Decomposition, target: ScoreTarget, node: str = "target") -> Expansion:
    """QK: the score q_t·k_s/√d is bilinear in the residual streams at t and s (ln1 frozen, RoPE linear at a fixed
    position): Σ_ij Q(c_i)·K(c_j)/√d over components plus query/key bias components. Each component's share is
    half of each pair it is in (exact sum); `pairs` keeps the full matrix."""
    L, h = target.layer, target.head
    t, s = dec.pos(target.query), dec.pos(target.key)
    if s > t:
        raise ValueError(f"Key position {s} is after query position {t}: causal attention never scores it.")
    attn = dec.model.blocks[L].attn
    kv = h // (dec.n_heads // dec.n_kv)
    ln1 = dec.norm("ln1", L)
    before = dec.before_attn(L)
    scaling = getattr(getattr(attn, "_original_component", attn), "scaling", None)
    scaling = float(scaling) if scaling is not None else 1 / math.sqrt(dec.W_Q.shape[-1])
    cos, sin = (dec.cache.get(f"blocks.{L}.attn.hook_{n}") for n in ("cos", "sin"))
    rotary = cos is not None and getattr(dec.cfg, "positional_embedding_type", "") == "rotary"

    def side(W: Tensor, bias_name: str, pos: int, tag: str) -> tuple[list[str], Tensor]:
        comp_ids, vectors = dec.components(pos, before)
        centred = vectors - vectors.mean(-1, keepdim=True) if ln1.centre else vectors
        mapped = (ln1.gamma * centred / ln1.scale[pos]) @ W  # [n, dh]
        bias = ln1.beta @ W
        b = _param(attn, bias_name)
        if b is None:
            stacked = _param(dec.model, bias_name)
            b = None if stacked is None else stacked[L]
        if b is not None:
            b = b.cpu().reshape(-1, W.shape[-1])
            bias = bias + b[h if tag == "query" else kv]
        mapped = torch.cat([mapped, bias[None]])
        if rotary:
            mapped = rope(mapped, cos[pos], sin[pos])
        return comp_ids + [f"{node}/{tag}_bias"], mapped

    q_ids, Q = side(dec.W_Q[L, h], "b_Q", t, "query")
    k_ids, K = side(dec.W_K[L, kv], "b_K", s, "key")
    matrix = Q @ K.T * scaling  # [nq, nk]
    weights = torch.cat([matrix.sum(1) / 2, matrix.sum(0) / 2])
    scores = dec.cache.get(f"blocks.{L}.attn.hook_attn_scores")
    value = float(scores[h, t, s]) if scores is not None else float(matrix.sum())
    return Expansion(node, value, q_ids + k_ids, weights, 0.0, mechanism="QK (ln1 frozen; pairs split half-half)",
                     pairs={"query": q_ids, "key": k_ids, "matrix": matrix})


def expand_target(dec: Decomposition, target, node: str = "target") -> Expansion:
    if isinstance(target, LogitTarget):
        return expand_logit(dec, target, node)
    if isinstance(target, ScoreTarget):
        return expand_score(dec, target, node)
    if isinstance(target, LatentTarget):
        found = expand_latent(dec, target, node)
        if found is None:
            raise ValueError("An embedding latent is a leaf: it has nothing upstream to trace.")
        return found
    raise TypeError(f"Unknown target {target!r}: use LogitTarget, LatentTarget or ScoreTarget.")


# ---- the graph ------------------------------------------------------------------------------------------------
def describe_target(dec: Decomposition, target) -> str:
    if isinstance(target, LogitTarget):
        terms = " ".join(f"{'+' if w >= 0 else '-'}{abs(w):g}·logit({dec.model.tokenizer.decode([i])!r})"
                         for i, w in zip(target.ids, target.weights))
        return f"{terms} @{dec.pos(target.position)}"
    if isinstance(target, ScoreTarget):
        return f"score L{target.layer}H{target.head} q@{dec.pos(target.query)} k@{dec.pos(target.key)}"
    return f"{target.hook} #{target.latent} pre-act @{dec.pos(target.position)}"


def node_info(dec: Decomposition, node_id: str) -> dict:
    """Graph fields of a component id ('hook/latent@t', 'hook/bias@t', 'hook/err@t')."""
    hook, rest = node_id.rsplit("/", 1)
    what, t = rest.split("@")
    t = int(t)
    tok = dec.strings[t]
    base = {"id": node_id, "hook": hook, "order": dec.writer_index(hook), "position": t}
    if what == "bias":
        return base | {"kind": "bias", "label": f"{short_hook(hook)} bias @{t}"}
    if what == "err":
        label = "no dictionary" if dec.parts[hook]["codes"] is None else "error"
        return base | {"kind": "error", "label": f"{short_hook(hook)} {label} @{t} {tok!r}"}
    return base | {"kind": "latent", "latent": int(what), "label": f"{short_hook(hook)} #{what} @{t} {tok!r}"}


def expandable(node_id: str) -> bool:
    """A latent of an attention- or MLP-output dictionary ('blocks.L.hook_attn_out/7@3'): it has an upstream."""
    hook, _, rest = node_id.rpartition("/")
    return hook.startswith("blocks.") and rest.split("@")[0].isdigit()


def trace_circuit(model, saes: dict[str, SAE], tokens: Tensor | list[int], target, depth: int = 2, top_k: int = 4,
                  max_edges: int = 8) -> dict:
    """Trace `target` down `depth` levels: at each level every expanded node keeps its `max_edges` largest
    |contributions| (plus its own bias and, for MLP latents, the approximation node), and the `top_k` largest latent
    nodes of attention or MLP dictionaries are expanded next. Returns the graph as a JSON-ready dict."""
    if depth < 1 or top_k < 0 or max_edges < 1:
        raise ValueError("depth and max_edges must be >= 1 and top_k >= 0.")
    dec = Decomposition(model, saes, tokens)
    label = describe_target(dec, target)
    root = expand_target(dec, target)
    n_cols = len(dec.writers)
    nodes = {"target": {"id": "target", "hook": "target", "order": n_cols, "kind": "target", "label": label,
                        "value": root.value}}
    edges: dict[tuple[str, str], float] = {}
    checks, expanded, frontier, pairs = [], {"target"}, [root], None
    if root.pairs is not None:
        m = root.pairs["matrix"]
        flat = m.abs().flatten().argsort(descending=True)[:max_edges].tolist()
        pairs = [{"query": root.pairs["query"][i // m.shape[1]], "key": root.pairs["key"][i % m.shape[1]],
                  "weight": float(m.flatten()[i])} for i in flat]
    for level in range(depth):
        new: dict[str, float] = {}
        for exp in frontier:
            parent = nodes[exp.node]
            order = parent["order"]
            ranked = [i for i in exp.weights.abs().argsort(descending=True).tolist() if float(exp.weights[i]) != 0]
            keep = ranked[:max_edges]
            if level < depth - 1:  # the largest expandable latents join even when outside the top max_edges
                keep += [i for i in [i for i in ranked if expandable(exp.ids[i])][:top_k] if i not in keep]
            for i in keep:
                cid = exp.ids[i]
                if cid not in nodes:
                    nodes[cid] = (node_info(dec, cid) if not cid.startswith(exp.node + "/")
                                  else {"id": cid, "hook": parent["hook"], "order": order - 0.5, "kind": "bias",
                                        "label": f"{cid.rsplit('/', 1)[1].replace('_', ' ')}"})
                w = float(exp.weights[i])
                edges[(cid, exp.node)] = edges.get((cid, exp.node), 0.0) + w
                if nodes[cid]["kind"] == "latent" and cid not in expanded:
                    new[cid] = max(new.get(cid, 0.0), abs(w))
            extra = [("const", exp.const, "bias", "bias (b_enc - w.b_dec, b_U, b_V, b_O, norm beta)")]
            if not exp.exact:
                extra.append(("approx", exp.approx, "approx", "MLP nonlinearity (approximation miss)"))
            for suffix, value, kind, text in extra:
                if value != 0:
                    cid = f"{exp.node}/{suffix}"
                    nodes[cid] = {"id": cid, "hook": parent["hook"], "order": order - 0.5, "kind": kind,
                                  "label": text}
                    edges[(cid, exp.node)] = value
            kept = sum(float(exp.weights[i]) for i in keep) + exp.const + exp.approx
            checks.append({"node": exp.node, "mechanism": exp.mechanism, "exact": exp.exact, "value": exp.value,
                           "sum_of_parts": exp.total(), "kept_parts": kept, "n_parts": len(exp.ids),
                           "approx": exp.approx})
        if level == depth - 1:
            break
        frontier = []
        for cid in sorted(new, key=lambda c: -new[c]):
            info = nodes[cid]
            if len(frontier) >= top_k:
                break
            if info["hook"] in ("hook_embed", "hook_pos_embed"):
                continue  # embedding features are leaves
            exp = expand_latent(dec, LatentTarget(info["hook"], info["latent"], info["position"]), cid)
            expanded.add(cid)
            if exp is not None:
                nodes[cid]["value"] = exp.value
                frontier.append(exp)
        if not frontier:
            break
    for n in nodes.values():
        n["effect"] = n.get("value", 0.0) if n["kind"] == "target" else sum(
            w for (s, _), w in edges.items() if s == n["id"])
    columns: dict[float, list[dict]] = {}
    for n in nodes.values():
        columns.setdefault(n["order"], []).append(n)
    for column in columns.values():
        for rank, n in enumerate(sorted(column, key=lambda n: -abs(n["effect"]))):
            n["rank"] = rank
    return {"method": "patch-free", "target": {"label": label, "value": root.value, "kind": type(target).__name__,
                                               **{k: v for k, v in asdict(target).items() if k != "sae"}},
            "tokens": dec.strings, "hooks": dec.writers,
            "dictionaries": {w: dec.parts[w]["codes"] is not None for w in dec.writers},
            "settings": {"depth": depth, "top_k": top_k, "max_edges": max_edges},
            "conventions": CONVENTIONS, "checks": checks, "qk_pairs": pairs,
            "nodes": list(nodes.values()),
            "edges": [{"source": s, "target": t, "weight": w} for (s, t), w in edges.items()]}


CONVENTIONS = {
    "norms": "every LayerNorm/RMSNorm scale frozen at its per-token value (the model's own hook_scale)",
    "direct": "exact: component . (gamma * u / sigma_t) for a logit or a residual-stream SAE's encoder row",
    "ov": "exact: attention pattern fixed, sum_h A_h[t,s] (ln1(c_s) W_V^h) W_O^h . u",
    "qk": "exact: pairwise Q(c_i).K(c_j)/sqrt(d_head), RoPE applied; a node's share is half of each of its pairs",
    "mlp": "APPROXIMATE: gradient x activation (ln2 frozen); the miss is an explicit 'approx' node",
    "node effect": "sum of the node's outgoing edge weights (its contributions to the nodes it feeds)",
}


def graph_figure(graph: dict):
    """Layered plotly figure: x = the writers that hold a node (embedding, attn0, mlp0, ...; the target last; a model
    with 61 writers would not fit otherwise), y = rank by |effect|; edge colour = sign, width = |weight|; biases and
    approximations sit in a column just left of the node they feed. Full labels are in the hover text."""
    import plotly.graph_objects as go

    from analysis.circuit_graph import layered_edges

    n_writers = len(graph["hooks"])
    columns = sorted({n["order"] for n in graph["nodes"]})
    x_of = {order: i for i, order in enumerate(columns)}
    nodes = [n | {"order": x_of[n["order"]]} for n in graph["nodes"]]
    fig, position = layered_edges(graph | {"nodes": nodes})
    symbols = {"latent": "circle", "error": "square", "bias": "diamond", "approx": "x", "target": "star"}
    short = {"bias": "bias", "approx": "approx."}
    fig.add_trace(go.Scatter(
        x=[position[n["id"]][0] for n in nodes], y=[position[n["id"]][1] for n in nodes], mode="markers+text",
        text=[short.get(n["kind"], n["label"].split(" '")[0].split(' "')[0]) for n in nodes],  # no token text
        textposition="middle right", showlegend=False,
        hoverinfo="text", textfont=dict(size=10),
        hovertext=[f"{n['label']}<br>{n['id']}<br>effect {n['effect']:.4g}"
                   + (f"<br>value {n['value']:.4g}" if "value" in n else "") for n in nodes],
        marker=dict(size=12, symbol=[symbols.get(n["kind"], "circle") for n in nodes],
                    color=[n["effect"] for n in nodes], colorscale="RdBu", cmid=0, colorbar=dict(title="effect"))))
    names = [short_hook(h) for h in graph["hooks"]] + ["target"]
    ticks = [names[int(o)] if float(o).is_integer() and int(o) <= n_writers else "" for o in columns]
    root = graph["checks"][0]
    fig.update_layout(title=f"Patch-free circuit for {graph['target']['label']} = {root['value']:.4g} "
                            f"(all parts sum to {root['sum_of_parts']:.4g})",
                      xaxis=dict(tickvals=list(range(len(columns))), ticktext=ticks, range=[-0.5, len(columns) + 0.5]),
                      yaxis=dict(showticklabels=False), height=300 + 25 * max(1, max(n["rank"] for n in nodes)))
    return fig


def save_patch_free(graph: dict, run_dir: str | Path) -> Path:
    """RUN_DIR/circuits/patch_free.json (+ the figure as patch_free.html and patch_free.plotly.json, which
    `python -m bench.readme_figures` renders); the Circuits page draws it."""
    from training.activation_store import write_json_atomic

    out = Path(run_dir) / "circuits"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PATCH_FREE_FILE, graph)  # the Circuits page never reads half a graph
    figure = graph_figure(graph)
    figure.write_html(str(out / "patch_free.html"), include_plotlyjs="cdn")
    (out / "patch_free.plotly.json").write_text(figure.to_json())
    return out / PATCH_FREE_FILE


def load_patch_free(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "circuits" / PATCH_FREE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- small dictionaries for every writer ------------------------------------------------------------------------
def train_writer_saes(model, tokens: Tensor, d_sae: int = 128, k: int = 8, steps: int = 200, seed: int = 0,
                      progress: bool = False) -> dict[str, SAE]:
    """A small TopK SAE on every residual-stream writer, trained full-batch on the activations of `tokens`
    ([batch, seq], special positions included); for notebooks and tests on small models."""
    from saes import build_sae
    from training.trainer import LoopConfig, train_sae

    hooks = writer_hooks(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=hooks)
    saes = {}
    for i, hook in enumerate(hooks):
        rows = cache[hook].reshape(-1, cache[hook].shape[-1]).float().cpu()
        scale = 1.0 / max(rows.norm(dim=-1).median().item(), 1e-8)
        sae = build_sae("topk", seed=seed + i, d_in=rows.shape[-1], d_sae=d_sae, k=min(k, d_sae),
                        input_scale=scale, hook_name=hook)
        sae.init_b_dec(rows, "mean")
        train_sae(sae, (rows for _ in range(steps)), steps, LoopConfig(lr=3e-3, warmup_steps=0, dead_tokens=10**9),
                  progress=progress)
        saes[hook] = sae.requires_grad_(False)
    return saes
