"""Direct feature attribution (DFA) for SAEs on attention outputs before W_O (`blocks.L.attn.hook_z`, all heads
concatenated head-major: index h*d_head + j, as training/caching.py flattens the hook), after Kissane et al. 2024,
"Interpreting Attention Layer Outputs with Sparse Autoencoders" (docs/methods.md §10.6).

A latent's pre-activation is affine in the activation it reads, u_i = factor * (w_i . z) + const_i, where w_i is the
latent's encoder row, factor the SAE's input scale (divided by the token's norm for per-token-normalised SAEs, whose
statistics are frozen at the token's values) and const_i = b_enc_i - w_i . b_dec (minus the frozen token mean's share).
Restricting w_i to head h's slice splits u_i by head:

    u_i = sum_h factor * (w_i[h] . z_h) + const_i,

and because z_h[t] = sum_s A_h[t, s] v_h[s] (the attention pattern times the value vectors, GQA value heads repeated),
each head's part splits over source positions s:

    factor * (w_i[h] . z_h[t]) = sum_s factor * A_h[t, s] * (w_i[h] . v_h[s]).

Both splits plus the constant reproduce `sae.pre_acts` exactly. The Feature page calls `context_dfa` on demand for a
top context of a hook_z run (`heads_figures` draws it).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from saes.base import SAE, token_stats

Z_HOOK_SUFFIX = "attn.hook_z"


def is_z_hook(hook: str | None) -> bool:
    """True for an attention-output hook before W_O (blocks.L.attn.hook_z)."""
    return bool(hook) and hook.endswith(Z_HOOK_SUFFIX)


def encoder_rows(sae: SAE, latents: Tensor | list[int] | None = None) -> Tensor:
    """The rows the pre-activations read, [n, d_in] (W_enc; W_dec for a tied SAE such as MP)."""
    W = sae.W_dec if sae.tied else sae.W_enc
    W = W.detach().float()
    return W if latents is None else W[torch.as_tensor(latents, dtype=torch.long)]


def subtracts_b_dec(sae: SAE) -> bool:
    """Whether the encoder reads x - b_dec (every variant except ReLU/JumpReLU imported with apply_b_dec_to_input
    false)."""
    return bool(getattr(sae.cfg, "apply_b_dec_to_input", True))


def encoder_affine(sae: SAE, x: Tensor, latents: Tensor | list[int] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(W [n, d_in], factor [...], const [..., n]) with pre_acts(x)[..., latents] = factor * (x @ W.T) + const.

    x: raw activations [..., d_in]. factor is the input scale s, divided by the token's divisor for a per-token
    normalised SAE (statistics frozen at x's); const = b_enc - W b_dec, minus factor * mean * W.sum(-1) for a
    normalised SAE. This is the exact affine map `sae.pre_acts(normalise(x) * s)` applies to x."""
    W = encoder_rows(sae, latents)
    x = x.float()
    s = float(sae.input_scale)
    b_enc = torch.zeros(W.shape[0]) if sae.tied else sae.b_enc.detach().float()
    if not sae.tied and latents is not None:
        b_enc = b_enc[torch.as_tensor(latents, dtype=torch.long)]
    const = b_enc - (W @ sae.b_dec.detach().float() if subtracts_b_dec(sae) else 0.0)
    if sae.cfg.token_norm == "none":
        factor = torch.full(x.shape[:-1], s)
        return W, factor, const.expand(*x.shape[:-1], W.shape[0]).clone()
    mean, divisor, _ = token_stats(x.reshape(-1, x.shape[-1]), sae.cfg.token_norm)
    factor = (s / divisor).reshape(x.shape[:-1])
    shift = (factor.reshape(-1, 1) * mean) * W.sum(-1)  # [tokens, n]
    return W, factor, const - shift.reshape(*x.shape[:-1], W.shape[0])


def pre_activations(sae: SAE, x: Tensor, latents: Tensor | list[int] | None = None) -> Tensor:
    """What the SAE's own encoder computes before selection, [..., n]: sae.pre_acts(normalise(x) * s)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    if sae.cfg.token_norm != "none":
        mean, divisor, _ = token_stats(flat, sae.cfg.token_norm)
        flat = (flat - mean) / divisor
    with torch.no_grad():
        u = sae.pre_acts(flat.to(sae.W_dec.dtype) * sae.input_scale).float()
    u = u.reshape(*shape[:-1], -1)
    return u if latents is None else u[..., torch.as_tensor(latents, dtype=torch.long)]


def flat_z(z: Tensor, n_heads: int | None = None) -> tuple[Tensor, int]:
    """(z as [..., n_heads*d_head], n_heads) from [..., n_heads, d_head] or already flat (then n_heads is needed)."""
    if n_heads is None:
        if z.dim() < 2:
            raise ValueError("A flat z needs n_heads: pass n_heads=model.cfg.n_heads.")
        return z.reshape(*z.shape[:-2], -1), z.shape[-2]
    if z.shape[-1] % n_heads:
        raise ValueError(f"z's width {z.shape[-1]} is not a multiple of n_heads={n_heads}.")
    return z, n_heads


@dataclass
class HeadDFA:
    """Per-latent parts of the pre-activation. heads: [..., n, n_heads]; sources: [..., n, n_heads, src] (when the
    attention pattern was given); bias: [..., n]; pre_act: [..., n] (the SAE's own pre-activation)."""

    heads: Tensor
    bias: Tensor
    pre_act: Tensor
    sources: Tensor | None = None

    def total(self) -> Tensor:
        """heads.sum + bias: equals pre_act up to float rounding."""
        return self.heads.sum(-1) + self.bias


def head_parts(sae: SAE, z: Tensor, latents: Tensor | list[int], n_heads: int | None = None) -> HeadDFA:
    """Split latents' pre-activations by head. z: [..., n_heads, d_head] or [..., n_heads*d_head] (then pass
    n_heads); returns heads [..., n, n_heads], bias [..., n], pre_act [..., n]."""
    flat, n_heads = flat_z(z, n_heads)
    W, factor, const = encoder_affine(sae, flat, latents)  # W [n, H*dh]
    Wh = W.reshape(W.shape[0], n_heads, -1)  # [n, H, dh]
    zh = flat.float().reshape(*flat.shape[:-1], n_heads, -1)  # [..., H, dh]
    heads = torch.einsum("nhd,...hd->...nh", Wh, zh) * factor[..., None, None]
    return HeadDFA(heads, const, pre_activations(sae, flat, latents))


def z_from_values(pattern: Tensor, v: Tensor) -> Tensor:
    """z_h[t] = sum_s A_h[t, s] v_h[s]. pattern [..., H, T, S], v [..., S, H_kv, dh] (value heads repeated for
    grouped-query attention, head h reading value head h // (H / H_kv)) -> z [..., T, H, dh]."""
    return torch.einsum("...hts,...shd->...thd", pattern.float(), expand_kv(v, pattern.shape[-3]).float())


def expand_kv(v: Tensor, n_heads: int) -> Tensor:
    """[..., S, H_kv, dh] -> [..., S, n_heads, dh], as Hugging Face's repeat_kv (head h uses kv head h // rep)."""
    n_kv = v.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} heads cannot share {n_kv} value heads.")
    return v.repeat_interleave(n_heads // n_kv, dim=-2) if n_kv != n_heads else v


def source_parts(sae: SAE, pattern: Tensor, v: Tensor, latents: Tensor | list[int], dest: int | None = None
                 ) -> HeadDFA:
    """Split latents' pre-activations at destination tokens by head and source position through the attention
    pattern. pattern [H, T, S] and v [S, H_kv, dh] of one sequence; dest an index into T (None: every destination).
    Returns heads [(T,) n, H], sources [(T,) n, H, S], bias and pre_act [(T,) n]."""
    n_heads = pattern.shape[-3]
    ve = expand_kv(v, n_heads).float()  # [S, H, dh]
    A = pattern.float() if dest is None else pattern.float()[:, dest]  # [H, T, S] or [H, S]
    z = torch.einsum("hts,shd->thd", A, ve) if dest is None else torch.einsum("hs,shd->hd", A, ve)
    flat = z.reshape(*z.shape[:-2], -1)
    W, factor, const = encoder_affine(sae, flat, latents)
    Wh = W.reshape(W.shape[0], n_heads, -1)
    wv = torch.einsum("nhd,shd->nhs", Wh, ve)  # [n, H, S]: w_i[h] . v_h[s]
    if dest is None:
        sources = torch.einsum("nhs,hts->tnhs", wv, A) * factor[:, None, None, None]
    else:
        sources = wv * A[None] * factor
    return HeadDFA(sources.sum(-1), const, pre_activations(sae, flat, latents), sources)


# ---- per latent, per destination token -----------------------------------------------------------------------
def head_attribution(sae: SAE, z_t: Tensor, latent: int, n_heads: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One latent at one destination token: (parts [n_heads], bias [], pre_act []), parts.sum() + bias = pre_act.
    z_t: [n_heads, d_head], or [n_heads*d_head] with n_heads."""
    dfa = head_parts(sae, z_t, [latent], n_heads)
    return dfa.heads[0], dfa.bias[0], dfa.pre_act[0]


def source_attribution(sae: SAE, pattern: Tensor, v: Tensor, latent: int, dest: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """One latent at destination `dest`: (parts [n_heads, src], bias [], pre_act []); parts.sum() + bias = pre_act.
    pattern [H, T, S], v [S, H_kv, d_head]."""
    dfa = source_parts(sae, pattern, v, [latent], dest)
    return dfa.sources[0], dfa.bias[0], dfa.pre_act[0]


def layer_of(hook: str) -> int:
    if not is_z_hook(hook) or not hook.startswith("blocks."):
        raise ValueError(f"Attention DFA needs an SAE on blocks.L.attn.hook_z, got hook {hook!r}.")
    return int(hook.split(".")[1])


@torch.no_grad()
def context_dfa(model, sae: SAE, hook: str, tokens: Tensor | list[int], latent: int, dest: int = -1) -> dict:
    """Run the model on one context and attribute `latent` at position `dest` to heads and source tokens.

    Returns {"heads": [H], "sources": [H, dest+1], "bias", "pre_act" (the SAE's), "code" (the latent's activation),
    "z_gap" (max |A v - hook_z|, a check of the value split), "tokens": the token strings}."""
    layer = layer_of(hook)
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    dest = dest % ids.shape[1]
    ids = ids[:, :dest + 1]  # later tokens cannot influence dest (causal attention)
    device = next(model.parameters()).device
    names = [hook, f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    _, cache = model.run_with_cache(ids.to(device), names_filter=names, stop_at_layer=layer + 1)
    z, pattern, v = (cache[name][0].float().cpu() for name in names)  # [T, H, dh], [H, T, S], [S, Hkv, dh]
    dfa = source_parts(sae, pattern, v, [latent], dest)
    z_gap = (z_from_values(pattern, v)[dest] - z[dest]).abs().max().item()
    code = sae.encode(z[dest].reshape(1, -1))[0, latent].item()
    strings = [model.tokenizer.decode([t]) for t in ids[0].tolist()]
    return {"heads": dfa.heads[0], "sources": dfa.sources[0], "bias": dfa.bias[0].item(),
            "pre_act": dfa.pre_act[0].item(), "code": code, "z_gap": z_gap, "tokens": strings,
            "layer": layer, "dest": dest, "latent": latent}


def context_tokens(cache_path: str | None, row: int, window_ids: list[int], centre: int) -> tuple[list[int], bool]:
    """The token ids up to and including a feature-store example's centre token: the whole context from the
    activation cache when it can be read (global token row `row`), else the stored window (left context only).
    Returns (ids, whole_context)."""
    if cache_path:
        try:
            from training.activation_store import ActivationCache

            cache = ActivationCache(cache_path, verify=False)
            ctx = cache.context_length
            context, position = divmod(int(row), ctx)
            for index, shard in enumerate(cache.manifest["shards"]):
                if context < shard["contexts"]:
                    ids = cache.tokens(index)[context, :position + 1].tolist()
                    if ids and ids[-1] == window_ids[centre]:  # the cache is the one the store was built from
                        return ids, True
                    break
                context -= shard["contexts"]
        except (OSError, ValueError, KeyError):
            pass
    return list(window_ids[:centre + 1]), False


def heads_figures(result: dict, n_heads_label: str = "head"):
    """(bar chart of the per-head parts, heatmap over heads x source tokens) for a `context_dfa` result."""
    import plotly.graph_objects as go

    heads = result["heads"].tolist()
    labels = [f"{n_heads_label} {h}" for h in range(len(heads))]
    bar = go.Figure(go.Bar(x=labels, y=heads, marker_color=["royalblue" if v >= 0 else "crimson" for v in heads]))
    bar.update_layout(height=300, margin=dict(t=40, b=20), yaxis_title="part of the pre-activation",
                      title=f"L{result['layer']} heads: pre-activation {result['pre_act']:.3g} = parts "
                            f"{sum(heads):.3g} + bias {result['bias']:.3g}")
    sources = result["sources"]
    toks = [f"{i}:{t!r}" for i, t in enumerate(result["tokens"])]
    limit = float(sources.abs().max()) or 1.0
    heat = go.Figure(go.Heatmap(z=sources.tolist(), x=toks, y=labels, colorscale="RdBu", zmid=0, zmin=-limit,
                                zmax=limit, colorbar=dict(title="part")))
    heat.update_layout(height=160 + 30 * len(heads), margin=dict(t=40, b=20),
                       title=f"By source token (destination {toks[result['dest']]})")
    return bar, heat
