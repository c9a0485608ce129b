"""Ground-truth and stability metrics: recovery of a planted dictionary (training/synthetic.py) and agreement of the
latents of two runs (e.g. two seeds).

- Planted recovery: for each true direction, the best |cosine| with any decoder row; report the mean and the fraction
  above a threshold (0.9).
- Stability: a one-to-one matching of the decoder rows of two SAEs maximising the summed |cosine| (Hungarian
  assignment via scipy.optimize.linear_sum_assignment when scipy is importable, else greedy: repeatedly take the
  largest remaining |cosine|); report the mean matched |cosine| and the fraction above the threshold.
  |cosine| because signed SAEs may learn a latent with the opposite sign.
"""
import json
from pathlib import Path

import torch
from torch import Tensor

from analysis.eval_core import core_metrics
from saes.base import SAE
from training.synthetic import PlantedDictionary, best_cosines


def planted_recovery(W_dec: Tensor, directions: Tensor, threshold: float = 0.9) -> dict:
    """How well decoder rows [d_sae, d_in] recover planted unit directions [n_true, d_in]."""
    if W_dec.shape[-1] != directions.shape[-1]:
        raise ValueError(f"Decoder rows have width {W_dec.shape[-1]} but the planted directions "
                         f"{directions.shape[-1]}: train the SAE on activations sampled from this planted dictionary.")
    best = best_cosines(W_dec.detach().float().cpu(), directions.float().cpu())
    return {"mean_best_cosine": best.mean().item(), "fraction_recovered": (best > threshold).float().mean().item(),
            "threshold": threshold}


@torch.no_grad()
def planted_benchmark(sae: SAE, planted: PlantedDictionary, n_tokens: int = 8192, seed: int = 0,
                      threshold: float = 0.9) -> dict:
    """Recovery of the planted directions plus the core metrics on fresh samples of the planted data."""
    generator = torch.Generator().manual_seed(seed)
    x = planted.sample(n_tokens, generator)  # [n_tokens, d_in]
    metrics = core_metrics(sae, x.split(4096))["metrics"]
    return planted_recovery(sae.W_dec, planted.directions, threshold) | {
        "fvu": metrics["fvu"], "l0": metrics["l0"], "dead_frac": metrics["dead_frac"], "tokens": n_tokens}


def unit_rows(W: Tensor) -> Tensor:
    W = W.detach().double().cpu()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def greedy_matching(sims: Tensor) -> tuple[Tensor, Tensor]:
    """Rows and columns of a greedy one-to-one matching: pairs taken in descending order of `sims`."""
    n_rows, n_cols = sims.shape
    order = sims.flatten().argsort(descending=True)
    used_r, used_c, rows, cols = set(), set(), [], []
    for start in range(0, len(order), 1 << 20):
        for flat in order[start:start + (1 << 20)].tolist():
            i, j = divmod(flat, n_cols)
            if i not in used_r and j not in used_c:
                used_r.add(i)
                used_c.add(j)
                rows.append(i)
                cols.append(j)
        if len(rows) == min(n_rows, n_cols):
            break
    return torch.tensor(rows), torch.tensor(cols)


def matched_cosines(W_a: Tensor, W_b: Tensor, method: str = "auto") -> Tensor:
    """|cosines| of a one-to-one matching of decoder rows [n_a, d_in] and [n_b, d_in]: [min(n_a, n_b)].
    method: 'auto' (Hungarian when scipy is importable, else greedy), 'hungarian' or 'greedy'."""
    if W_a.shape[-1] != W_b.shape[-1]:
        raise ValueError(f"Stability compares SAEs of the same activations: widths d_in {W_a.shape[-1]} and "
                         f"{W_b.shape[-1]} differ, pick two runs of the same hook.")
    sims = (unit_rows(W_a) @ unit_rows(W_b).T).abs()  # [n_a, n_b]
    if method in ("auto", "hungarian"):
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            if method == "hungarian":
                raise ValueError("Hungarian matching needs scipy: `pip install scipy`, or use method='greedy'."
                                 ) from None
        else:
            rows, cols = linear_sum_assignment(sims.numpy(), maximize=True)
            return sims[torch.as_tensor(rows), torch.as_tensor(cols)].float()
    elif method != "greedy":
        raise ValueError(f"method must be auto, hungarian or greedy, got {method!r}.")
    rows, cols = greedy_matching(sims)
    return sims[rows, cols].float()


def matching_method() -> str:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return "greedy"
    return "hungarian"


def stability(W_a: Tensor, W_b: Tensor, threshold: float = 0.9, method: str = "auto") -> dict:
    """Matched-latent agreement of two SAEs: mean matched |cosine| and the fraction above `threshold`."""
    matched = matched_cosines(W_a, W_b, method)
    return {"mean_matched_cosine": matched.mean().item(),
            "fraction_matched": (matched > threshold).float().mean().item(), "threshold": threshold,
            "matching": matching_method() if method == "auto" else method}


def run_stability(run_a: str | Path, run_b: str | Path, threshold: float = 0.9) -> dict:
    """Stability of the SAEs of two run folders (same hook), e.g. two seeds of one job."""
    from saes import load_sae

    a, b = load_sae(run_a), load_sae(run_b)
    if a.cfg.hook_name != b.cfg.hook_name:
        raise ValueError(f"{run_a} reads {a.cfg.hook_name!r} and {run_b} reads {b.cfg.hook_name!r}: stability "
                         "compares runs of the same hook.")
    result = stability(a.W_dec, b.W_dec, threshold)
    return result | {"runs": [str(run_a), str(run_b)], "seeds": [seed_of(run_a), seed_of(run_b)]}


def seed_of(run: str | Path) -> int | None:
    for folder in (Path(run), Path(run).parent):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text()).get("seed")
    return None
