"""Downstream metrics with the SAE spliced in at its hook (algorithms.md §10.5, Appendix D 10).

CE_clean, CE_sae (reconstruction, no error term), CE_zero and CE_mean (zero- and mean-ablation of the hook), then
CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), KL score = (KL_zero - KL_sae) / KL_zero with KL from
the clean next-token distribution, and delta LM loss = CE_sae - CE_clean (comparable across layers).

One loss mask for every pass: position t is scored when neither token t (input) nor token t+1 (target) is special.
The SAE and the ablations replace the hook only at non-special positions (the SAE never saw BOS/EOS in training), so
every pass differs from the clean one only where the SAE would act.
"""
import torch
from torch import Tensor

from analysis.eval_core import MIN_EVAL_TOKENS, budget, inference_budget
from analysis.splice import check_hook, splice
from saes.base import SAE
from training.activation_store import ActivationCache


def eval_contexts(cache: ActivationCache, shards: list[int], max_contexts: int) -> tuple[Tensor, Tensor]:
    """Token ids [contexts, ctx] and special flags [contexts, ctx] of the first `max_contexts` eval contexts."""
    tokens, special = [], []
    for index in shards:
        tokens.append(cache.tokens(index))
        special.append(cache.read(index, "special").bool().reshape(tokens[-1].shape))
        if sum(len(t) for t in tokens) >= max_contexts:
            break
    return torch.cat(tokens)[:max_contexts], torch.cat(special)[:max_contexts]


def loss_mask(special: Tensor) -> Tensor:
    """Positions t whose input t and target t+1 are both regular tokens: [contexts, ctx-1] bool."""
    return ~special[:, :-1] & ~special[:, 1:]


def recovered(clean: float, spliced: float, ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); NaN when the ablation does not change the loss."""
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


def check_contexts(model, tokens: Tensor, special: Tensor) -> Tensor:
    """The loss mask, after refusing evaluation sets too small to mean anything or from another tokenizer."""
    if len(tokens) == 0 or tokens.shape[1] < 2:
        raise ValueError("No evaluation contexts of at least 2 tokens: cache more --cache.tokens or hold out more "
                         "shards.")
    if special.shape != tokens.shape:
        raise ValueError(f"special flags {tuple(special.shape)} and tokens {tuple(tokens.shape)} differ: read both "
                         "from the same cache shards (eval_contexts).")
    mask = loss_mask(special)
    if int(mask.sum()) < MIN_EVAL_TOKENS:
        raise ValueError(f"The evaluation contexts give {int(mask.sum())} scored positions (at least "
                         f"{MIN_EVAL_TOKENS} needed): raise --max-contexts or cache more tokens.")
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"The cache holds token ids up to {int(tokens.max())} but the model's vocabulary has "
                         f"{model.cfg.d_vocab}: evaluate with the model the cache was written with.")
    return mask


def pass_scores(logits: Tensor, targets: Tensor, mask: Tensor, clean_logp: Tensor | None):
    """Summed next-token NLL and KL(clean || this pass) over the masked positions, and this pass's log-probs."""
    logp = logits[:, :-1].float().log_softmax(-1)  # [batch, ctx-1, vocab]
    nll = -logp.gather(-1, targets[..., None])[..., 0]  # [batch, ctx-1]
    ce_sum = nll[mask].double().sum().item()
    if clean_logp is None:
        return ce_sum, 0.0, logp
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)  # [batch, ctx-1]
    return ce_sum, kl[mask].double().sum().item(), logp


@torch.no_grad()
def downstream(model, sae: SAE, hook: str, tokens: Tensor, special: Tensor, mean: Tensor | None = None,
               ks: list[int] | None = None, batch_size: int = 8, sae_mode: str = "sae") -> dict:
    """CE loss clean / SAE / zero- and (with `mean`) mean-ablated, CE loss recovered, KL score and delta LM loss;
    with `ks`, the SAE pass again at each budget. tokens, special: [contexts, ctx].
    `sae_mode` is the splice of the "SAE" pass: 'sae' (the metric) or a control ('sae_with_error', 'zero')."""
    check_hook(model, hook)
    mask = check_contexts(model, tokens, special)
    n_tokens = int(mask.sum())
    device = next(model.parameters()).device
    passes = {"clean": ("clean", None), "sae": (sae_mode, mean), "zero": ("zero", None)}
    if mean is not None:
        passes["mean"] = ("mean", mean)
    ce = dict.fromkeys(passes, 0.0)
    kl = dict.fromkeys(passes, 0.0)
    # the SAE pass already is the pass at the SAE's own budget: reuse it rather than run the model again
    same_k = inference_budget(sae) if ks and sae_mode == "sae" else None
    k_ce, k_kl = dict.fromkeys([k for k in ks or [] if k != same_k], 0.0), dict.fromkeys(ks or [], 0.0)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)  # [batch, ctx]
        m = mask[start:start + batch_size].to(device)  # [batch, ctx-1]: the same mask in every pass
        positions = ~special[start:start + batch_size].to(device)
        clean_logp = None
        for name, (mode, pass_mean) in passes.items():
            with splice(model, hook, mode, sae, mean=pass_mean, positions=positions):
                c, k, logp = pass_scores(model(batch), batch[:, 1:], m, clean_logp)
            clean_logp = logp if name == "clean" else clean_logp
            ce[name] += c
            kl[name] += k
        for k_value in k_ce:
            with budget(sae, k_value) as view, splice(model, hook, "sae", view, positions=positions):
                c, k, _ = pass_scores(model(batch), batch[:, 1:], m, clean_logp)
            k_ce[k_value] += c
            k_kl[k_value] += k
    if same_k in (ks or []):
        k_ce[same_k], k_kl[same_k] = ce["sae"], kl["sae"]
    ce = {name: value / n_tokens for name, value in ce.items()}
    kl = {name: value / n_tokens for name, value in kl.items()}
    result = {"tokens": n_tokens, "contexts": len(tokens),
              **{f"ce_{name}": value for name, value in ce.items()},
              **{f"kl_{name}": value for name, value in kl.items() if name != "clean"},
              "ce_loss_recovered": recovered(ce["clean"], ce["sae"], ce["zero"]),
              "kl_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] > 0 else float("nan"),
              "delta_lm_loss": ce["sae"] - ce["clean"]}
    if "mean" in ce:
        result["ce_loss_recovered_mean_ablation"] = recovered(ce["clean"], ce["sae"], ce["mean"])
    result["budget"] = {k: {"ce_sae": k_ce[k] / n_tokens, "delta_lm_loss": k_ce[k] / n_tokens - ce["clean"],
                            "kl_sae": k_kl[k] / n_tokens,
                            "ce_loss_recovered": recovered(ce["clean"], k_ce[k] / n_tokens, ce["zero"])}
                        for k in ks or []}
    return result
