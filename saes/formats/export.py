"""Write SAEs of the family in other libraries' layouts, so those libraries load them with our codes.

    export_sae(sae, Path("out/sae"), "saelens")      # out/sae/{cfg.json, sae_weights.safetensors}
    export_sae(sae, Path("out/run"), "sparsify")     # out/run/layers.6/{cfg.json, sae.safetensors}
    export_run(Path("runs/demo"), "saelens")         # every SAE of a `saewb train` run, under runs/demo/export-saelens/

'saelens': a clean SAELens v6 folder (no "saewb" section: SAELens's keys only, metadata {model_name, hook_name,
sae_lens_version}), the layout `saes.formats.saelens` loads and SAELens's `SAE.load_from_disk` runs. Per
architecture: topk, gradient_topk (plain TopK at inference) and hierarchical_topk (at its inference k) -> 'topk';
abstopk per token -> 'abstopk'; relu_l1 -> 'standard'; jumprelu -> 'jumprelu'; gated -> 'gated'; the
batch-dependent batchtopk, mutual_choice and feature_choice -> 'jumprelu' through their `to_jumprelu()` (as SAELens
saves its own BatchTopK); matching_pursuit -> 'matching_pursuit' with both early stops off (exactly k steps).
Refused, one sentence each: batch-mode AbsTopK (signed thresholds), signed MP, MP with an early stop.
'sparsify': `<out>/<hookpoint>/{cfg.json, sae.safetensors}` in sparsify's naming and orientation (encoder.weight
[n, d] as an nn.Linear, encoder.bias, W_dec [n, d], b_dec), hookpoint = the Hugging Face module name of the hook
(`hook_to_hf_module`, the inverse of `training.model.hf_module_to_hook` for the common hooks); TopK family only
(topk, gradient_topk, hierarchical_topk), without per-token normalisation; others are refused.
The input scale is folded first (`sae.export_inference()`). Everything is written into a hidden temporary folder
beside the target and renamed into place, so an interrupted export leaves no half-written folder that loads.
"""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from saes.base import SAE

FORMATS = ("saelens", "sparsify")
SAELENS_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs without one as pre-6 and reshapes them."""
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
TOPK_FAMILY = ("topk", "gradient_topk", "hierarchical_topk")
BATCH_DEPENDENT = ("batchtopk", "mutual_choice", "feature_choice")


class ExportError(ValueError):
    """An SAE the target layout cannot express exactly; the message says what and what to do instead."""


# ---- hook names -----------------------------------------------------------------------------------------------
HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")


def hook_to_hf_module(hook: str) -> str:
    """sparsify's hookpoint (a Llama-style HF module name, as for SmolLM2) for one of our hooks:
    blocks.N.hook_resid_post -> layers.N (blocks.N.hook_resid_pre -> layers.N-1, the same vector),
    blocks.N.hook_mlp_out -> layers.N.mlp, blocks.N.hook_attn_out -> layers.N.self_attn, hook_embed -> embed_tokens.
    Other hooks: an ExportError asking for hookpoint= (e.g. h.N for GPT-2)."""
    if hook == "hook_embed":
        return "embed_tokens"
    match = HOOK.match(hook or "")
    if match is not None:
        layer, part = int(match.group(1)), match.group(2)
        if part == "hook_resid_post":
            return f"layers.{layer}"
        if part == "hook_resid_pre" and layer > 0:
            return f"layers.{layer - 1}"
        if part == "hook_mlp_out":
            return f"layers.{layer}.mlp"
        if part == "hook_attn_out":
            return f"layers.{layer}.self_attn"
    raise ExportError(f"The SAE's hook {hook!r} has no sparsify hookpoint name here (known: blocks.N.hook_resid_post, "
                      "blocks.N.hook_mlp_out, blocks.N.hook_attn_out, hook_embed): pass hookpoint= with the Hugging "
                      "Face module name sparsify would hook, e.g. layers.6 or h.6 for GPT-2.")


# ---- SAELens ----------------------------------------------------------------------------------------------------
def _t(tensor: Tensor) -> Tensor:
    return tensor.detach().cpu().contiguous()


def saelens_folder(sae: SAE) -> tuple[dict, dict[str, Tensor]]:
    """(cfg.json dict, tensors) of the clean SAELens v6 folder for `sae`, input scale folded."""
    name = sae.architecture
    if name in BATCH_DEPENDENT:
        try:
            sae = sae.to_jumprelu()  # type: ignore[attr-defined]
        except ValueError as error:
            raise ExportError(f"This {name} SAE cannot be exported to SAELens: {error}") from None
    elif name == "abstopk" and getattr(sae.cfg, "selection", "") != "per_token":
        raise ExportError("A batch-mode AbsTopK SAE infers with a signed threshold |u| > θ, which SAELens has no "
                          "architecture for: train it with selection='per_token' to export it as SAELens's 'abstopk'.")
    target = sae.export_inference()
    cfg = target.cfg
    arch = target.architecture
    apply_b_dec = True
    extra: dict = {}
    tensors: dict[str, Tensor] = {}
    if arch in TOPK_FAMILY:
        k = cfg.k if arch != "hierarchical_topk" else (cfg.k or cfg.k_max)
        saelens_arch, extra = "topk", {"k": int(k), "rescale_acts_by_decoder_norm": False}
    elif arch == "abstopk":
        saelens_arch, extra = "abstopk", {"k": int(cfg.k), "rescale_acts_by_decoder_norm": False}
    elif arch == "relu_l1":
        saelens_arch, apply_b_dec = "standard", bool(cfg.apply_b_dec_to_input)
    elif arch == "jumprelu":
        saelens_arch, apply_b_dec = "jumprelu", bool(cfg.apply_b_dec_to_input)
        tensors["threshold"] = _t(target.threshold)
    elif arch == "gated":
        saelens_arch = "gated"
        tensors.update(r_mag=_t(target.r_mag), b_mag=_t(target.b_mag))
    elif arch == "matching_pursuit":
        if cfg.residual_threshold > 0 or cfg.stop_on_duplicate_support:
            raise ExportError("This MP-SAE stops early (residual_threshold or stop_on_duplicate_support), and "
                              "SAELens's stop rules are not checked against ours: export one with both stops off.")
        saelens_arch = "matching_pursuit"
        extra = {"residual_threshold": 0.0, "max_iterations": int(cfg.k), "stop_on_duplicate_support": False}
    elif arch == "matching_pursuit_signed":
        raise ExportError("A signed MP-SAE keeps negative coefficients, and SAELens's matching pursuit selects only "
                          "positive correlations: it cannot be exported to SAELens.")
    else:
        raise ExportError(f"SAELens has no architecture for a {arch!r} SAE.")
    if not target.tied:
        bias = "b_gate" if arch == "gated" else "b_enc"
        tensors.update({"W_enc": _t(target.W_enc.T), bias: _t(target.b_enc)})  # SAELens W_enc: [d_in, d_sae]
    tensors.update(W_dec=_t(target.W_dec), b_dec=_t(target.b_dec))
    hook = cfg.hook_name or ""
    data = {
        "architecture": saelens_arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": cfg.token_norm,
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none", **extra,
        "metadata": {"model_name": cfg.model_name or None, "hook_name": hook or None,
                     "sae_lens_version": SAELENS_VERSION},
    }
    return data, tensors


# ---- sparsify ---------------------------------------------------------------------------------------------------
def sparsify_folder(sae: SAE, hookpoint: str | None = None) -> tuple[str, dict, dict[str, Tensor]]:
    """(hookpoint, cfg.json dict, tensors) of the sparsify hookpoint folder for a TopK-family SAE."""
    arch = sae.architecture
    if arch not in TOPK_FAMILY:
        raise ExportError(f"sparsify runs only per-token TopK (ReLU, then the k largest), so a {arch!r} SAE cannot be "
                          f"exported to it: export {', '.join(TOPK_FAMILY)} SAEs, or this one to 'saelens'.")
    if sae.cfg.token_norm != "none":
        raise ExportError(f"This SAE normalises each token ({sae.cfg.token_norm}), which sparsify has no option for: "
                          "export it to 'saelens' instead.")
    target = sae.export_inference()
    cfg = target.cfg
    k = cfg.k if arch != "hierarchical_topk" else (cfg.k or cfg.k_max)
    hookpoint = hookpoint or hook_to_hf_module(cfg.hook_name)
    data = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
            "num_latents": cfg.d_sae, "k": int(k), "multi_topk": bool(getattr(cfg, "multi_topk", False)),
            "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    tensors = {"encoder.weight": _t(target.W_enc), "encoder.bias": _t(target.b_enc),  # nn.Linear: [n, d]
               "W_dec": _t(target.W_dec), "b_dec": _t(target.b_dec)}
    return hookpoint, data, tensors


# ---- writing ----------------------------------------------------------------------------------------------------
def _write(folder: Path, cfg_name: str, weights_name: str, cfg: dict, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_name))
    (folder / cfg_name).write_text(json.dumps(cfg, indent=2))


def _swap_in(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`; an old `target` is renamed aside first and deleted after, so
    at every moment `target` is either the old folder, absent, or the new one."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _atomic(target: Path, build) -> Path:
    """build(tmp) writes the complete folder `tmp`; then it replaces `target` (see _swap_in)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(scratch / "new")
        _swap_in(scratch / "new", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}: choose one of {', '.join(FORMATS)}.")


def _refuse_foreign(out: Path, files: bool) -> None:
    """An existing non-empty `out` is replaced only when it holds what such an export writes: the SAELens files
    (files=True), or only folders (files=False: SAE or hookpoint folders)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: choose another output path.")
    names = {p.name for p in out.iterdir()}
    if files and names <= {SAELENS_CFG, SAELENS_WEIGHTS, "sparsity.safetensors"}:
        return
    if not files and all((out / n).is_dir() for n in names):
        return
    raise ExportError(f"{out} already holds other files ({', '.join(sorted(names)[:4])}): export into a new or empty "
                      "folder.")


def export_sae(sae: SAE, out: Path, format: str, *, hookpoint: str | None = None) -> Path:
    """Write `sae` in `format` under `out` and return the folder the other library loads: `out` itself for
    'saelens'; `out/<hookpoint>` for 'sparsify' (other hookpoints already in `out` are kept). Raises ExportError
    (a ValueError) with one sentence when the format cannot express the SAE; nothing is written then."""
    _check_format(format)
    out = Path(out)
    if format == "saelens":
        cfg, tensors = saelens_folder(sae)
        _refuse_foreign(out, files=True)
        return _atomic(out, lambda tmp: _write(tmp, SAELENS_CFG, SAELENS_WEIGHTS, cfg, tensors))
    name, cfg, tensors = sparsify_folder(sae, hookpoint)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: choose another output path.")
    return _atomic(out / name, lambda tmp: _write(tmp, SPARSIFY_CFG, SPARSIFY_WEIGHTS, cfg, tensors))


def run_saes(run_dir: Path) -> dict[str, Path]:
    """The SAE folders of a `saewb train` run: the run folder itself (one SAE) or its `<name>/` folders."""
    from saes import is_native

    run_dir = Path(run_dir)
    if is_native(run_dir):
        return {run_dir.name: run_dir}
    found = {p.name: p for p in sorted(run_dir.iterdir()) if p.is_dir() and is_native(p)} if run_dir.is_dir() else {}
    if not found:
        raise ExportError(f"{run_dir} holds no SAE written by `saewb train` (a folder whose cfg.json has a 'saewb' "
                          "section): pass a run folder.")
    return found


def export_run(run_dir: Path, format: str, out: Path | None = None) -> Path:
    """Export every SAE of a training run; returns the export folder (default `run_dir/export-<format>`).
    'saelens': one SAELens folder per SAE, `out` itself for a one-SAE run, else `out/<name>/`.
    'sparsify': one sparsify run, `out/<hookpoint>/`, when the SAEs' hooks differ, else one run per SAE,
    `out/<name>/<hookpoint>/`. Every SAE is converted before anything is written, so one that cannot be exported
    fails the whole export; the folder is replaced as a whole."""
    from saes import load_sae

    _check_format(format)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"export-{format}"
    folders = run_saes(run_dir)
    loaded = {name: load_sae(folder) for name, folder in folders.items()}
    single = len(loaded) == 1 and next(iter(folders.values())) == run_dir
    plans: list[tuple[Path, str, str, dict, dict]] = []  # (relative folder, cfg name, weights name, cfg, tensors)
    for name, sae in loaded.items():
        try:
            if format == "saelens":
                cfg, tensors = saelens_folder(sae)
                plans.append((Path(".") if single else Path(name), SAELENS_CFG, SAELENS_WEIGHTS, cfg, tensors))
            else:
                hookpoint, cfg, tensors = sparsify_folder(sae)
                plans.append((Path(name) / hookpoint, SPARSIFY_CFG, SPARSIFY_WEIGHTS, cfg, tensors))
        except ExportError as error:
            raise ExportError(f"{folders[name]}: {error}") from None
    if format == "sparsify":
        hookpoints = [plan[0].name for plan in plans]
        if len(set(hookpoints)) == len(hookpoints):  # one sparsify run holding every hookpoint
            plans = [(Path(plan[0].name), *plan[1:]) for plan in plans]
    _refuse_foreign(out, files=format == "saelens" and single)

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for relative, cfg_name, weights_name, cfg, tensors in plans:
            _write(tmp / relative, cfg_name, weights_name, cfg, tensors)

    return _atomic(out, build)


__all__ = ["ExportError", "FORMATS", "export_run", "export_sae", "hook_to_hf_module"]
