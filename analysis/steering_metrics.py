"""What a steered generation did (docs/methods.md §10.4): concept strength, fluency and side effects, per
generation and as sweeps over the strength alpha, as a table and plotly figures (and W&B when on).

For a steered continuation, both the steered and the unsteered model score the same token sequence (teacher
forcing); "continuation" means the positions that predict the generated tokens:
- target_logprob_change: mean over the continuation and the chosen target tokens of log p_steered - log p_unsteered
  (measured at the output, and where every position mode can act: a generated-only edit first acts on the
  prediction of the second generated token);
- target_activation_in_text: the concept in the output, read back: mean code of the target latent at the
  generated positions when the *unsteered* model reads the steered text (no edit applied);
- target_activation_at_hook: the same code on the edited activations at the hook itself. Not a measure of
  success: an edit along the latent raises it by construction;
- kl: mean over the continuation of KL(steered || unsteered) next-token distributions;
- perplexity: of the generated tokens under the unsteered model (fluency; lower reads more natural);
- off_target_changed / off_target_drift: latents other than the target whose code changed at the hook (mean
  count per generated position) and the mean L2 norm of that change.
Code-based metrics leave out generated special tokens (e.g. EOS), as SAE training does.
"""
import json
import math
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import Tensor

from analysis.steering import Edit, Span, additive, check_hook, decoder_direction, generate, per_row, prompt_tokens
from saes.base import SAE


@torch.no_grad()
def score(model, sae: SAE, hook: str, tokens: Tensor, prompt_len: int, edit: Edit | None, latent: int | None = None,
          target_ids: list[int] | None = None) -> dict:
    """Metrics of one steered sequence tokens [1, pos] (see the module docstring)."""
    check_hook(model, hook)
    span = Span.of(model, tokens, prompt_len)
    captured = {}

    def capture(name: str, change: Edit | None):
        def fn(h: Tensor, hook) -> Tensor:
            out = change(h, span) if change is not None else h
            captured[name] = out.detach()
            return out
        return fn

    with model.hooks(fwd_hooks=[(hook, capture("base", None))]):
        base_logits = model(tokens)[0].float()  # [pos, vocab]
    with model.hooks(fwd_hooks=[(hook, capture("steered", edit))]):
        steered_logits = model(tokens)[0].float()
    gen = slice(prompt_len - 1, tokens.shape[1] - 1)  # positions predicting the generated tokens
    base_lp, steered_lp = base_logits.log_softmax(-1), steered_logits.log_softmax(-1)
    generated = tokens[0, prompt_len:]
    metrics = {
        "kl": (steered_lp[gen].exp() * (steered_lp[gen] - base_lp[gen])).sum(-1).mean().item(),
        "perplexity": math.exp(-base_lp[gen].gather(-1, generated[:, None]).mean().item()),
    }
    if target_ids:
        ids = torch.tensor(target_ids)
        metrics["target_logprob_change"] = (steered_lp[gen][:, ids] - base_lp[gen][:, ids]).mean().item()
    regular = ~span.special[0, prompt_len:]  # [gen]; the SAE's codes at special tokens are off-scale (never trained)
    codes_base = sae.encode(captured["base"][0, prompt_len:][regular])  # [gen', d_sae]: unsteered model on the text
    codes_steered = sae.encode(captured["steered"][0, prompt_len:][regular])
    change = codes_steered - codes_base
    if latent is not None:
        metrics["target_activation_in_text"] = codes_base[:, latent].float().mean().item()
        metrics["target_activation_at_hook"] = codes_steered[:, latent].float().mean().item()
        change[:, latent] = 0
    metrics["off_target_changed"] = (change.abs() > 1e-6).sum(-1).float().mean().item()
    metrics["off_target_drift"] = change.norm(dim=-1).mean().item()
    return metrics


def sweep(model, sae: SAE, hook: str, prompt: str, latent: int, alphas: list[float], *,
          make_edit: Callable[[float], Edit | None] | None = None, method: str = "additive",
          target_ids: list[int] | None = None, max_new_tokens: int = 20, positions: str = "all") -> list[dict]:
    """One row per alpha: the continuation's text and its metrics (the continuations generated as one batch).
    `make_edit(alpha)` defaults to adding alpha times the latent's decoder row; pass e.g.
    `lambda a: clamp(sae, latent, a)`, a `gradient_descent` edit, or an additive edit along a difference-in-means
    vector to compare methods on the same footing (None = unsteered)."""
    tokens = prompt_tokens(model, prompt)
    if make_edit is None:
        vector = decoder_direction(sae, latent)
        make_edit = lambda alpha: additive(vector, alpha, positions)  # type: ignore[arg-type]  # noqa: E731
    edits = [make_edit(alpha) for alpha in alphas]
    outs = generate(model, hook, tokens.repeat(len(edits), 1), per_row(edits), max_new_tokens)  # one batch
    rows = []
    for alpha, edit, out in zip(alphas, edits, outs.split(1)):
        text = model.tokenizer.decode(out[0, tokens.shape[1]:])
        rows.append({"method": method, "alpha": alpha, "text": text,
                     **score(model, sae, hook, out, tokens.shape[1], edit, latent, target_ids)})
    return rows


def tradeoff_figure(rows: list[dict], strength: str = "target_activation_in_text",
                    baseline: dict | None = None) -> go.Figure:
    """Concept strength against fluency (perplexity), one line per method, points labelled by alpha; `baseline`
    (the unsteered continuation's metrics, e.g. `score(..., edit=None, ...)`) is drawn as its own marker."""
    figure = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        figure.add_trace(go.Scatter(x=[r[strength] for r in mine], y=[r["perplexity"] for r in mine],
                                    mode="lines+markers+text", text=[f"α={r['alpha']:g}" for r in mine],
                                    textposition="top center", name=method))
    if baseline is not None:
        figure.add_trace(go.Scatter(x=[baseline[strength]], y=[baseline["perplexity"]], mode="markers",
                                    marker=dict(symbol="x", size=12, color="black"), name="unsteered"))
    figure.update_layout(title="Steering: concept strength vs fluency", xaxis_title=strength,
                         yaxis_title="perplexity under the unsteered model", template="plotly_white")
    return figure


def metrics_figure(rows: list[dict]) -> go.Figure:
    """Every metric against alpha, one line per method."""
    figure = go.Figure()
    keys = [k for k in rows[0] if k not in ("method", "alpha", "text")]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for key in keys:
            figure.add_trace(go.Scatter(x=[r["alpha"] for r in mine], y=[r.get(key) for r in mine],
                                        name=f"{method}: {key}", mode="lines+markers"))
    figure.update_layout(title="Steering metrics vs alpha", xaxis_title="alpha", template="plotly_white")
    return figure


def save_sweep(rows: list[dict], folder: Path, wandb_mode: str = "off") -> Path:
    """rows.json + figures in `folder` (e.g. runs/<run>/steering/); mirrored to W&B unless off."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(rows, indent=2))
    tradeoff_figure(rows).write_html(folder / "tradeoff.html")
    metrics_figure(rows).write_html(folder / "metrics.html")
    if wandb_mode != "off":
        import os

        os.environ["WANDB_MODE"] = wandb_mode
        import wandb

        run = wandb.init(project="saewb", name=f"steering-{folder.name}", dir=str(folder), job_type="steering")
        run.log({"steering": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
    return folder


def logit_lens_latents(model, sae: SAE, token: str, n: int = 5) -> list[tuple[int, float]]:
    """Latents whose decoder direction most raises `token`'s logit along the direct path (through the final norm's
    weight and the unembedding, `training.model.direct_logits`): a quick way to find a latent to steer with.
    Returns (latent, score) pairs, best first; the score is the logit change per unit of code."""
    from training.model import direct_logits

    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens for this tokenizer; pick a single-token word.")
    directions = sae.W_dec.detach() / sae.input_scale  # [d_sae, d]
    scores = direct_logits(model, directions, token_ids=ids)[:, 0]  # [d_sae]
    top = scores.topk(n)
    return list(zip(top.indices.tolist(), top.values.tolist()))
