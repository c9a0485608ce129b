"""`saewb import`: a published SAE becomes a run folder that every command and app page uses like a trained one.

The SAE loads through `saes.load_sae` (any layout of saes.formats, local or hf:), is checked against the model
(the hook exists and has the SAE's width), and a few thousand corpus tokens are cached at its hook. On them the
import measures its fingerprint, FVU, L0 and latent density (special tokens excluded, outlier-norm tokens kept, as
SAEBench does), and refuses (unless --force) when FVU > 1 or L0 is more than 3x off what the source states: the
usual sign of a wrong hook, model or normalisation. Only then is the run folder written (atomically): cfg.json +
sae_weights.safetensors, config.json (the cache it was checked on, so eval, features and circuits find it),
summary.json and import.json (source facts and fingerprint).
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from saes.base import SAE

MAX_FVU = 1.0
L0_FACTOR = 3.0
DENSE = 0.1  # a latent firing on more than 10% of tokens counts as dense
DENSITY = "import_density.safetensors"  # measured log10 firing frequency per latent


@dataclass
class ImportConfig:
    """Import a published SAE into a run folder after checking it on the model: SAELens (v6 and older), sparsify,
    Gemma Scope 1/2, Llama Scope, dictionary_learning or OpenAI, from a local path or hf:ORG/REPO/PATH."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
    """Folder or file of the SAE, or hf:ORG/REPO/PATH (downloaded with huggingface_hub)."""
    model: str | None = None
    """Model the SAE reads ('smollm2', 'tiny', a local HF folder or a hub name); default what the source states."""
    hook: str | None = None
    """Hook the SAE reads, in this workbench's names (blocks.N.hook_resid_post ...); default what the source states."""
    hook_out: str | None = None
    """For a transcoder: the hook it predicts; default what the source states."""
    out: Path | None = None
    """Run folder to write; default runs/<the source's last path part>."""
    layout: str | None = None
    """Force a layout (saelens, sparsify, gemma_scope, llama_scope, dictionary_learning, openai) instead of
    detecting it from the files."""
    input_scale: float | None = None
    """Dataset scale s for a SAELens SAE saved with normalize_activations='expected_average_only_in' (reads s*x)."""
    tokens: int = 8192
    """Corpus tokens cached at the hook for the check (and as the run's evaluation cache)."""
    corpus: str = "austen"
    """Text the check runs on ('austen' embedded, a local file or folder, or hf:DATASET)."""
    dtype: str = "float32"
    """Dtype the model runs in while caching."""
    device: str = "cpu"
    """Device for the model and the check ('cpu', 'cuda')."""
    force: bool = False
    """Write the run even when the check fails (FVU > 1 or L0 more than 3x off the stated one)."""
    overwrite: bool = False
    """Replace an existing run folder at --out."""

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = self.source.rstrip("/").split("/")[-1].split(":")[-1] or "imported"
        return Path("runs") / Path(name).stem


@torch.no_grad()
def fingerprint(sae: SAE, cache, hook: str, hook_out: str | None = None) -> dict:
    """FVU, L0, never-fired and dense fractions and log10 densities over every cached non-special token."""
    target = hook_out or hook
    hooks = [hook] if target == hook else [hook, target]
    sq_err, sq_sum, n, l0 = 0.0, 0.0, 0, 0.0
    total = torch.zeros(cache.d_in(target), dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    d_in = cache.d_in(hook)
    for index in range(cache.n_shards):
        rows = cache.shard_rows(index, hooks, outlier_factor=0)  # [n, d_in (+ d_out)]
        for chunk in rows.split(4096):
            x, y = chunk[:, :d_in], chunk[:, d_in:] if len(hooks) > 1 else chunk
            codes = sae.encode(x)
            y_hat = sae.decode(codes)
            sq_err += (y - y_hat).double().pow(2).sum().item()
            sq_sum += y.double().pow(2).sum().item()
            total += y.double().sum(0)
            active = codes != 0
            l0 += active.sum().item()
            fires += active.sum(0).double()
            n += len(chunk)
    if n == 0:
        raise ValueError(f"The cache at {cache.path} has no usable tokens: pass a larger --tokens.")
    density = fires / n
    return {"fvu": sq_err / (sq_sum - total.pow(2).sum().item() / n), "l0": l0 / n,
            "never_fired_frac": (density == 0).double().mean().item(),
            "dense_frac": (density > DENSE).double().mean().item(), "tokens": n,
            "log10_density": torch.where(density > 0, density.log10(), torch.full_like(density, -math.inf))}


def problems(print_: dict, stated_l0: float | None) -> list[str]:
    """What in the fingerprint says the import is wrong."""
    found = []
    if not print_["fvu"] <= MAX_FVU:
        found.append(f"FVU {print_['fvu']:.3g} > {MAX_FVU:g}: the SAE reconstructs worse than the mean activation")
    if stated_l0 and print_["l0"] > 0:
        ratio = print_["l0"] / stated_l0
        if not 1 / L0_FACTOR <= ratio <= L0_FACTOR:
            found.append(f"L0 {print_['l0']:.3g} is {ratio:.2g}x the {stated_l0:g} the source states")
    elif stated_l0 and print_["l0"] == 0:
        found.append(f"L0 is 0 (no latent fires) but the source states {stated_l0:g}")
    return found


def activation_width(model, hook: str) -> int:
    from training.model import stop_layer

    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0] * 4], device=next(model.parameters()).device)
    _, acts = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop_layer([hook], model.cfg.n_layers))
    act = acts[hook]
    return act.shape[-1] if act.dim() <= 3 else math.prod(act.shape[2:])  # hook_z: heads x d_head


def write_run(out: Path, sae: SAE, files: dict[str, dict], density: torch.Tensor, overwrite: bool,
              sparsity: Path | None) -> Path:
    """Write the run folder in a temporary sibling and rename it into place, so a failure leaves nothing."""
    from safetensors.torch import save_file

    from saes import save_sae

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_sae(sae, tmp)
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2))
        save_file({"log10_density": density.float().contiguous()}, str(tmp / DENSITY))  # [d_sae], -inf: never
        if sparsity is not None:
            shutil.copyfile(sparsity, tmp / "source_sparsity.safetensors")
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_sae(cfg: ImportConfig) -> Path:
    """Load, check and write; returns the run folder. Raises ValueError (one sentence) on bad input."""
    from saes import load_sae
    from training.activation_store import ActivationCache
    from training.caching import CacheConfig, cache_activations
    from training.model import canonical_name, check_hooks, load_model

    out = cfg.out_dir()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} already exists: pass another --out, or --overwrite to replace it.")
    if cfg.tokens < 256:
        raise ValueError(f"--tokens {cfg.tokens} is too few for the check: pass at least 256 (default 8192).")
    sae = load_sae(cfg.source, layout=cfg.layout, input_scale=cfg.input_scale)
    facts = dict(sae.cfg.metadata.get("source", {}))
    model_name = cfg.model or facts.get("model")
    hook = cfg.hook or facts.get("hook")
    hook_out = cfg.hook_out or facts.get("hook_out")
    if not model_name:
        raise ValueError(f"{cfg.source} does not state its model: pass --model (e.g. --model smollm2).")
    if not hook:
        raise ValueError(f"{cfg.source} does not state its hook: pass --hook (e.g. --hook blocks.15.hook_resid_post).")
    if facts.get("transcoder") and not hook_out:
        raise ValueError(f"{cfg.source} is a transcoder that does not state its output hook: pass --hook-out.")
    for stated, given, what in ((facts.get("hook"), hook, "hook"), (facts.get("model"), model_name, "model")):
        if stated and stated != given:
            print(f"saewb import: note: the source states {what} {stated!r}; checking it at {given!r}.")
    model = load_model(model_name, device=cfg.device, dtype=cfg.dtype)
    hooks = [hook] + ([hook_out] if hook_out and hook_out != hook else [])
    check_hooks(model, hooks)
    for h in hooks:
        width = activation_width(model, h)
        if width != sae.cfg.d_in:
            raise ValueError(f"The SAE reads vectors of width d_in={sae.cfg.d_in} but {model_name}'s {h!r} has width "
                             f"{width}: pass the --model and --hook the SAE was trained on.")
    cache_cfg = CacheConfig(model=canonical_name(model_name), hooks=hooks, corpus=cfg.corpus, tokens=cfg.tokens,
                            context_length=min(128, cfg.tokens // 4), shard_tokens=max(cfg.tokens // 4, 64),
                            dtype=cfg.dtype, device=cfg.device)  # type: ignore[arg-type]
    cache_dir = cache_activations(cache_cfg, model=model)
    sae = sae.to(cfg.device).eval()
    measured = fingerprint(sae, ActivationCache(cache_dir), hook, hook_out if hook_out != hook else None)
    log10_density = measured.pop("log10_density")
    found = problems(measured, facts.get("l0"))
    print(fingerprint_table(cfg.source, facts, measured))
    if found and not cfg.force:
        raise ValueError(f"the import check failed: {'; '.join(found)}. This usually means a wrong --hook, --model or "
                         "normalisation; fix it, or pass --force to import anyway. Nothing was written.")
    for problem in found:
        print(f"saewb import: WARNING: {problem} (imported anyway: --force).")
    sae.cfg.hook_name, sae.cfg.model_name = hook, canonical_name(model_name)
    sparsity = facts.pop("sparsity_file", None)
    record = {"source": cfg.source, "facts": facts, "fingerprint": measured, "problems": found,
              "check": {"max_fvu": MAX_FVU, "l0_factor": L0_FACTOR, "tokens": "non-special, outliers included"}}
    sae.cfg.metadata["source"] = facts
    config = {"source": "import", "import": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "cache": json.loads(json.dumps(asdict(cache_cfg), default=str)), "holdout_shards": 1, "seed": None}
    summary = {"architecture": sae.architecture, "hook": hook, "hook_out": hook_out, "d_in": sae.cfg.d_in,
               "d_sae": sae.cfg.d_sae, "cache": str(cache_dir), "eval_split": "every cached token (imported SAE)",
               "eval_tokens": measured["tokens"], "train_tokens": None, "imported_from": cfg.source,
               **{k: measured[k] for k in ("fvu", "l0", "never_fired_frac", "dense_frac")}}
    return write_run(out, sae, {"config.json": config, "summary.json": summary, "import.json": record},
                     log10_density, cfg.overwrite, Path(sparsity) if sparsity else None)


def fingerprint_table(source: str, facts: dict, measured: dict) -> str:
    stated_l0 = facts.get("l0")
    lines = [f"Import check of {source} ({facts.get('layout')}, {measured['tokens']} tokens):",
             f"  FVU              {measured['fvu']:.4f}   (must be <= {MAX_FVU:g})",
             f"  L0               {measured['l0']:.2f}   (source states {stated_l0 if stated_l0 else 'nothing'}; "
             f"must be within {L0_FACTOR:g}x)",
             f"  never fired      {measured['never_fired_frac']:.1%}",
             f"  dense (>{DENSE:.0%})     {measured['dense_frac']:.1%}"]
    return "\n".join(lines)
