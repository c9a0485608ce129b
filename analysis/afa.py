"""The quasi-orthogonality diagnostics of Lee, Davies, Canby, Hockenmaier 2025 (arXiv 2503.24277), for any SAE
(docs/methods.md §9.2): the ZF relation between input norms and feature norms, ε_LBO, and the decoder's coherence.

Notation of the paper: z is the dense input (the model's activation), f the SAE's feature vector. If the dictionary
rows were ε-quasi-orthogonal (unit rows, |⟨d_i, d_j⟩| ≤ ε for i ≠ j) and z = Σ f_i d_i exactly, then
|‖z‖² − ‖f‖²| = |Σ_{i≠j} f_i f_j ⟨d_i, d_j⟩| ≤ ε (Σ|f_i|)² − ε‖f‖² ≤ ε (h − 1) ‖f‖² for h latents, so per token

    ε_LBO = |‖z‖² − ‖f̃‖²| / ((h − 1) ‖f̃‖²)

is a lower bound on the ε the SAE would need. As in the authors' ZF-plot notebook (visualization/zf-plot.ipynb):
f̃ = (f_1‖d_1‖, ..., f_h‖d_h‖, ‖b_dec‖), the decoder bias counted as one more atom whose activation is its norm (the
SAE reconstructs z as W_decᵀ f + b_dec), ‖z‖ is the norm of the input itself (not of the reconstruction), and
h = d_sae. The ZF plot is ‖f̃‖ against ‖z‖: on the diagonal the SAE activates as much as a quasi-orthogonal
dictionary should; above it, over-activated; below it, under-activated. We fit the slope through the origin
(least squares of ‖f̃‖ on ‖z‖) and the correlation, and report the medians of ε_LBO (the paper compares layers by
their median). `decoder_coherence` gives the actual max and mean |cos| between decoder rows, an upper reference
for ε_LBO when the reconstruction is exact.

Everything is computed in the SAE's own space (input scale, and an imported SAE's per-token normalisation, applied)
and norms are reported divided by the input scale, i.e. in raw units.

    report = afa_metrics(sae, chunks)               # chunks: iterable of [n, d_in] activations
    figure = zf_figure(report)                      # plotly
    card = afa_card("runs/demo")                    # the run's held-out tokens; writes runs/demo/eval/afa/
"""
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from saes.base import SAE, token_stats

BAND = 0.5
"""ε(h − 1) of the band the ZF figure draws around the diagonal (the authors draw 0.25, 0.5 and 1)."""


def working_space(sae: SAE, x: Tensor) -> Tensor:
    """The input as the SAE's dictionary sees it: per-token normalised if the SAE does that, times the input scale.
    x: [..., d_in] -> [n, d_in]."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype)
    if sae.cfg.token_norm != "none":
        mean, divisor, _ = token_stats(flat, sae.cfg.token_norm)
        flat = (flat - mean) / divisor
    return flat * sae.input_scale


@torch.no_grad()
def zf_norms(sae: SAE, x: Tensor) -> dict[str, Tensor]:
    """Per-token norms of one chunk x [n, d_in], in raw units, float64 [n] each:

    norm_z: ‖z‖ of the input; norm_f: ‖f̃‖ (decoder-norm-weighted codes and ‖b_dec‖, the paper's ZF y-axis);
    norm_z_centered: ‖z − b_dec‖ and norm_code: ‖(f_i‖d_i‖)_i‖ without the bias atom (what top-AFA matches)."""
    sae._check_input(x)
    z = working_space(sae, x).double()
    codes = sae.encode(x).reshape(-1, sae.cfg.d_sae).double()
    b_dec = sae.b_dec.detach().double()
    scale = float(sae.input_scale)
    code_sq = (codes * sae.W_dec.detach().double().norm(dim=-1)).square().sum(-1)
    return {
        "norm_z": z.norm(dim=-1) / scale,
        "norm_f": (code_sq + b_dec.square().sum()).sqrt() / scale,
        "norm_z_centered": (z - b_dec).norm(dim=-1) / scale,
        "norm_code": code_sq.sqrt() / scale,
    }


def epsilon_lbo(norm_z: Tensor, norm_f: Tensor, d_sae: int) -> Tensor:
    """ε_LBO per token = |‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²), h = d_sae (NaN where ‖f̃‖ = 0). Tensors [n] -> [n]."""
    if d_sae < 2:
        raise ValueError(f"ε_LBO needs at least two latents, got d_sae={d_sae}.")
    sq_f = norm_f.double().square()
    value = (norm_z.double().square() - sq_f).abs() / ((d_sae - 1) * sq_f)
    return torch.where(sq_f > 0, value, torch.nan)


@torch.no_grad()
def decoder_coherence(W_dec: Tensor, max_latents: int = 4096, seed: int = 0, chunk: int = 1024) -> dict:
    """max and mean over i ≠ j of |cos(d_i, d_j)| of the decoder rows W_dec [n, d] (the ε of ε-quasi-orthogonality
    the dictionary actually has). Above `max_latents` rows, a fixed random subset of that many is used (its max is
    then a lower bound of the full one); `latents` says how many entered."""
    rows = W_dec.detach().double()
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    n = rows.shape[0]
    if n > max_latents:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_latents]
        rows = rows[keep.to(rows.device)]
    m = rows.shape[0]
    if m < 2:
        return {"max_abs_cos": 0.0, "mean_abs_cos": 0.0, "latents": m, "subset": n > max_latents}
    largest, total = 0.0, 0.0
    for start in range(0, m, chunk):
        gram = (rows[start:start + chunk] @ rows.T).abs()  # [chunk, m]
        local = torch.arange(gram.shape[0], device=gram.device)
        gram[local, start + local] = 0.0  # drop i = j
        largest = max(largest, float(gram.max()))
        total += float(gram.sum())
    return {"max_abs_cos": largest, "mean_abs_cos": total / (m * (m - 1)), "latents": m, "subset": n > max_latents}


def fit_zf(norm_z: Tensor, norm_f: Tensor) -> dict:
    """Slope through the origin of ‖f̃‖ on ‖z‖ (Σ z f / Σ z²), Pearson correlation, mean ratio ‖f̃‖/‖z‖ and the
    fractions of tokens above (over-activated) and below the diagonal."""
    z, f = norm_z.double(), norm_f.double()
    ok = torch.isfinite(z) & torch.isfinite(f) & (z > 0)
    z, f = z[ok], f[ok]
    if len(z) == 0:
        return {"slope": None, "correlation": None, "mean_ratio": None, "over_activated": None,
                "under_activated": None, "tokens": 0}
    zc, fc = z - z.mean(), f - f.mean()
    denominator = (zc.square().sum() * fc.square().sum()).sqrt()
    ratio = f / z
    return {"slope": float((z * f).sum() / z.square().sum()),
            "correlation": float((zc * fc).sum() / denominator) if denominator > 0 else None,
            "mean_ratio": float(ratio.mean()), "over_activated": float((ratio > 1).double().mean()),
            "under_activated": float((ratio < 1).double().mean()), "tokens": len(z)}


def summarise(values: Tensor) -> dict:
    """median, mean, quartiles and count of the finite values."""
    values = values[torch.isfinite(values)].double()
    if len(values) == 0:
        return {"median": None, "mean": None, "q25": None, "q75": None, "tokens": 0}
    q = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "mean": float(values.mean()), "q25": float(q[0]), "q75": float(q[2]),
            "tokens": len(values)}


@torch.no_grad()
def afa_metrics(sae: SAE, chunks: Iterable[Tensor], max_tokens: int | None = None, *, coherence: bool = True,
                max_points: int = 5000, include_outliers: bool = False) -> dict:
    """The diagnostics of the SAE on activation chunks ([n, d_in] tensors, or (x, contexts, outlier) tuples as
    analysis.eval_core.eval_tokens yields): ZF fit with and without the bias atom, ε_LBO summaries, the decoder's
    coherence, and up to `max_points` (‖z‖, ‖f̃‖) pairs (evenly spaced over the tokens) for `zf_figure`.

    Outlier-norm tokens (flagged in the tuples; left out of training) are left out unless `include_outliers`: on
    SmolLM2 six of them in 20k tokens, at up to 50x the median norm, set the least-squares ZF slope alone."""
    parts: dict[str, list[Tensor]] = {}
    seen = left_out = 0
    for chunk in chunks:
        x = chunk[0] if isinstance(chunk, (tuple, list)) else chunk
        outlier = chunk[2] if isinstance(chunk, (tuple, list)) and len(chunk) > 2 else None
        if outlier is not None and not include_outliers:
            left_out += int(outlier.sum())
            x = x[~outlier.to(x.device)]
        if max_tokens is not None:
            x = x[: max(max_tokens - seen, 0)]
        if len(x) == 0:
            if max_tokens is not None and seen >= max_tokens:
                break
            continue  # a chunk of outliers only
        for name, value in zf_norms(sae, x.to(sae.W_dec.device)).items():
            parts.setdefault(name, []).append(value.cpu())
        seen += len(x)
        if max_tokens is not None and seen >= max_tokens:
            break
    if not seen:
        raise ValueError("afa_metrics got no tokens: pass activation chunks of the SAE's hook.")
    norms = {name: torch.cat(values) for name, values in parts.items()}
    eps = epsilon_lbo(norms["norm_z"], norms["norm_f"], sae.cfg.d_sae)
    eps_centered = epsilon_lbo(norms["norm_z_centered"], norms["norm_code"], sae.cfg.d_sae)
    pick = torch.linspace(0, seen - 1, min(max_points, seen)).round().long().unique()
    report = {
        "architecture": sae.architecture, "d_sae": sae.cfg.d_sae, "tokens": seen,
        "outlier_tokens_left_out": left_out, "include_outliers": include_outliers,
        "zf": fit_zf(norms["norm_z"], norms["norm_f"]),
        "zf_centered": fit_zf(norms["norm_z_centered"], norms["norm_code"]),
        "epsilon_lbo": summarise(eps),
        "epsilon_lbo_centered": summarise(eps_centered),
        "points": {"norm_z": norms["norm_z"][pick].tolist(), "norm_f": norms["norm_f"][pick].tolist()},
        "definition": "ε_LBO = |‖z‖² − ‖f̃‖²| / ((d_sae − 1)‖f̃‖²) per token, f̃ = (f_i‖d_i‖, ‖b_dec‖) (Lee et al. "
                      "2025); *_centered: ‖z − b_dec‖ against ‖(f_i‖d_i‖)‖, without the bias atom",
    }
    if coherence:
        report["decoder"] = decoder_coherence(sae.W_dec)
    return report


def zf_figure(report: dict, band: float = BAND):
    """The ZF plot of an `afa_metrics` report: ‖f̃‖ against ‖z‖ per token, the diagonal, the fitted slope and the
    band of ε(h − 1) = `band` (between slopes 1/sqrt(1 + band) and 1/sqrt(1 − band))."""
    import plotly.graph_objects as go

    z, f = report["points"]["norm_z"], report["points"]["norm_f"]
    top = max(max(z, default=1.0), max(f, default=1.0)) * 1.05
    fit, eps = report["zf"], report["epsilon_lbo"]
    figure = go.Figure()
    figure.add_trace(go.Scattergl(x=z, y=f, mode="markers", name="tokens", marker={"size": 4, "opacity": 0.5}))
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="‖f̃‖ = ‖z‖",
                                line={"dash": "dash", "color": "red"}))
    if fit["slope"] is not None:
        figure.add_trace(go.Scatter(x=[0, top], y=[0, fit["slope"] * top], mode="lines",
                                    name=f"fit, slope {fit['slope']:.3f}", line={"color": "black"}))
    if 0 < band < 1:
        for slope in (1 / math.sqrt(1 + band), 1 / math.sqrt(1 - band)):
            figure.add_trace(go.Scatter(x=[0, top], y=[0, slope * top], mode="lines", showlegend=False,
                                        line={"dash": "dot", "color": "grey", "width": 1},
                                        name=f"ε(h−1) = {band}"))
    median = "n/a" if eps["median"] is None else f"{eps['median']:.3g}"
    correlation = "n/a" if fit["correlation"] is None else f"{fit['correlation']:.3f}"
    figure.update_layout(
        title=f"ZF plot, {report['architecture']} (d_sae {report['d_sae']}): r = {correlation}, "
              f"median ε_LBO = {median}",
        xaxis_title="input norm ‖z‖", yaxis_title="feature norm ‖f̃‖ (decoder-weighted codes and b_dec)",
        xaxis={"range": [0, top]}, yaxis={"range": [0, top], "scaleanchor": "x"}, width=700, height=700)
    return figure


def afa_card(run_dir: str | Path, max_tokens: int = 20000, device: str = "cpu", write: bool = True) -> dict:
    """`afa_metrics` on a run folder's evaluation tokens (its held-out shards, non-special tokens, as the report
    card's core metrics); with `write`, run_dir/eval/afa/metrics.json and run_dir/eval/afa/zf.json (the figure)."""
    from analysis.eval_core import eval_shards, eval_tokens
    from analysis.evals import check_run_dir, read_json, run_cache, run_config
    from analysis.features import load_run_sae
    from training.activation_store import write_json_atomic

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    config, summary = run_config(run_dir), read_json(run_dir / "summary.json")
    sae = load_run_sae(run_dir, device=device).eval()
    hook = sae.cfg.hook_name or summary.get("hook", "")
    cache = run_cache(run_dir, summary, hook, sae)
    shards, held_out = eval_shards(cache, int(config.get("holdout_shards", 1)))
    report = afa_metrics(sae, eval_tokens(cache, hook, shards), max_tokens)
    report |= {"run": str(run_dir), "hook": hook, "split": "held-out shards" if held_out else "training data"}
    if write:
        folder = run_dir / "eval" / "afa"
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "metrics.json", report)
        (folder / "zf.json").write_text(zf_figure(report).to_json())
    return report


def format_afa(report: dict) -> str:
    """A few lines for the terminal."""
    fit, eps, dec = report["zf"], report["epsilon_lbo"], report.get("decoder", {})

    def show(value, spec=".4g"):
        return "n/a" if value is None else format(value, spec)

    lines = [f"{report['architecture']} (d_sae {report['d_sae']}), {report['tokens']} tokens",
             f"  ZF: slope {show(fit['slope'])}, r {show(fit['correlation'])}, over-activated "
             f"{show(fit['over_activated'], '.1%')} of tokens",
             f"  ε_LBO median {show(eps['median'])} (q25 {show(eps['q25'])}, q75 {show(eps['q75'])})"]
    if dec:
        lines.append(f"  decoder max |cos| {show(dec['max_abs_cos'])}, mean |cos| {show(dec['mean_abs_cos'])} over "
                     f"{dec['latents']} latents")
    return "\n".join(lines)


__all__ = ["afa_card", "afa_metrics", "decoder_coherence", "epsilon_lbo", "fit_zf", "format_afa", "zf_figure",
           "zf_norms"]
