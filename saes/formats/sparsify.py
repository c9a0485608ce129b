"""Layout 'sparsify': EleutherAI sparsify (`eai-sparsify`, formerly the `sae` package) SAEs and transcoders.

A run folder holds one folder per hookpoint, `<run>/<hookpoint>/{cfg.json, sae.safetensors}` (with several seeds,
`<run>/<hookpoint>/seed<N>/`; the best checkpoints under `<run>/best/`), and the run's `config.json`. The
hookpoint is the Hugging Face module name relative to the model's base model (`layers.6`, `layers.6.mlp`); it maps
to our hook names through `training.model.hf_module_to_hook`.

What sparsify runs, read from `sparsify/sparse_coder.py` and `sparsify/fused_encoder.py` (eai-sparsify 1.3.3):
- tensors as `save_model(SparseCoder)` writes them: `encoder.weight` [n, d] (an nn.Linear, so already our W_enc),
  `encoder.bias` [n], `W_dec` [n, d] (already ours), `b_dec` [d]; `W_skip` [d, d] when `skip_connection`;
- `encode`: x - b_dec unless `transcode` (a transcoder's b_dec lives in the output space), then
  `relu(encoder(x))` and only then the top-k (`fused_encoder`: ReLU before selection). Dense codes equal ours,
  top-k then ReLU: a kept negative value becomes 0 in either order, and the positive ones are the same;
- `decode`: sum of top_acts * W_dec rows + b_dec (`decoder_impl`, embedding_bag); `W_skip` only in `forward`.
cfg.json keys: `k`, `num_latents` (0 means d_in * `expansion_factor`), `transcode` (honoured: b_dec is not
subtracted, folded into the encoder bias), `activation` ('topk'; 'groupmax', the max of each of k contiguous
groups, is refused), `skip_connection` / a `W_skip` tensor (refused: the output adds x @ W_skip.T),
`normalize_decoder` and `multi_topk` (training only: they do not change the codes), `signed` (kept by the
`sae` package of June–August 2024 for old folders: true meant no ReLU and top-k by |u| with signs kept, which
loads as AbsTopK per token; today's sparsify ignores the key), `d_in`. Any other key is refused by name.
The computation runs in the dtype of the file's first tensor, as `SparseCoder.load_from_disk` does.
"""
import json
import re
from pathlib import Path

import torch

from saes.base import SAE
from saes.formats.common import LayoutError, build, read_safetensors, record_source, take

NAME = "sparsify"
DESCRIPTION = "<run>/<hookpoint>/cfg.json + sae.safetensors (EleutherAI sparsify)"
CFG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
INFERENCE_IRRELEVANT = ("normalize_decoder", "multi_topk", "expansion_factor")
KNOWN_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
              "skip_connection", "transcode", "signed", "d_in"}
SEED_FOLDER = re.compile(r"^seed\d+$")
MAX_DEPTH = 3  # <run>/best/<hookpoint>/seed<N>


def is_hookpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def hookpoint_folders(run: Path) -> dict[str, Path]:
    """Hookpoint folders under a run folder, by their path relative to it ('layers.3', 'layers.3/seed1',
    'best/layers.3'); hidden folders (a half-written export's temp folder) are skipped."""
    found: dict[str, Path] = {}

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if is_hookpoint_folder(child):
                found[child.relative_to(run).as_posix()] = child
            elif depth < MAX_DEPTH:
                walk(child, depth + 1)

    if run.is_dir():
        walk(run, 1)
    return found


def _looks_like_sparsify_cfg(path: Path) -> bool:
    try:
        cfg = json.loads((path / CFG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "d_in" in cfg and "d_sae" not in cfg and ("k" in cfg or "num_latents" in cfg
                                                                               or "expansion_factor" in cfg)


def detect(path: Path) -> bool:
    if is_hookpoint_folder(path):
        return _looks_like_sparsify_cfg(path)
    return path.is_dir() and any(_looks_like_sparsify_cfg(p) for p in hookpoint_folders(path).values())


def hookpoint_name(folder: Path) -> str:
    """The module name a hookpoint folder stands for: its name, or its parent's for a `seed<N>` folder."""
    return folder.parent.name if SEED_FOLDER.match(folder.name) else folder.name


def resolve(path: Path, hookpoint: str | None) -> tuple[Path, Path | None]:
    """(hookpoint folder, run folder or None) for a hookpoint folder, or a run folder and an optional hookpoint."""
    if hookpoint is not None:
        folder = path / hookpoint
        if not is_hookpoint_folder(folder):
            known = ", ".join(hookpoint_folders(path)) or "none"
            raise LayoutError(f"{path} has no sparsify hookpoint {hookpoint!r} ({CFG} + {WEIGHTS}); its hookpoints: "
                              f"{known}.")
        return folder, path
    if is_hookpoint_folder(path):
        run = path.parent.parent if SEED_FOLDER.match(path.name) else path.parent
        return path, run
    found = hookpoint_folders(path)
    if not found:
        raise LayoutError(f"{path} holds no sparsify hookpoint folder (<hookpoint>/{CFG} + {WEIGHTS}).")
    if len(found) > 1:
        raise LayoutError(f"{path} is a sparsify run with {len(found)} hookpoints ({', '.join(found)}): pass one "
                          f"hookpoint folder (e.g. {path / next(iter(found))}) or hookpoint=NAME.")
    return next(iter(found.values())), path


def run_model_name(run: Path | None) -> str | None:
    """The model a sparsify run trained on, from its config.json (`model`, RunConfig's positional argument)."""
    for folder in (run, run.parent if run is not None else None):
        if folder is None or not (folder / RUN_CONFIG).is_file():
            continue
        try:
            model = json.loads((folder / RUN_CONFIG).read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            return None
        return model if isinstance(model, str) and model else None
    return None


def hooks_of(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """(hook read, hook predicted) in our names; (None, None) when the module name is not one we know."""
    from training.model import hf_module_to_hook

    try:
        out = hf_module_to_hook(hookpoint)
    except ValueError:
        return None, None
    if not transcode:
        return out, None
    # A transcoder reads the module's input and predicts its output (sparsify/trainer.py: inputs[0], outputs).
    match = re.match(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)$", out)
    if match is None:
        return None, out
    layer, part = match.groups()
    inputs = {"hook_resid_post": "hook_resid_pre", "hook_mlp_out": "mlp.hook_in", "hook_attn_out": "attn.hook_in"}
    return f"blocks.{layer}.{inputs[part]}", out


def refuse(path: Path, key: str, value, why: str) -> None:
    raise LayoutError(f"{path / CFG}: {key}={value!r} is not supported ({why}); the SAE would load with different "
                      "codes, so it is refused.")


def file_dtype(path: Path) -> torch.dtype:
    """The dtype of the file's first tensor, which `SparseCoder.load_from_disk` builds the whole module in."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype
    except (SafetensorError, OSError, ValueError, StopIteration) as error:
        raise LayoutError(f"{path} is not a readable safetensors file ({str(error)[:80]}): it may be truncated or "
                          "corrupt; download or copy it again.") from None


def load(path: Path, hookpoint: str | None = None, **_) -> SAE:
    """The sparsify SAE at `path` (a hookpoint folder, or a run folder with one hookpoint or `hookpoint=`), with
    sparsify's codes and reconstructions."""
    path = Path(path)
    folder, run = resolve(path, hookpoint)
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LayoutError(f"{folder / CFG} is not readable JSON ({error}): fix or re-download it.") from None
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise LayoutError(f"{folder / CFG} has no 'd_in': it is not a sparsify cfg.json.")
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise LayoutError(f"{folder / CFG} has keys this loader does not know ({', '.join(unknown)}); they may change "
                          f"the codes, so the SAE is refused (known: {', '.join(sorted(KNOWN_KEYS))}).")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        refuse(folder, "activation", activation, "only 'topk' has a counterpart here; 'groupmax' keeps the max of "
                                                 "each of k contiguous groups of latents")
    if cfg.get("skip_connection"):
        refuse(folder, "skip_connection", cfg["skip_connection"], "a skip connection adds x @ W_skip.T to the "
                                                                  "output, which this workbench's SAEs cannot express")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    k = int(cfg.get("k", 32))
    if not 0 < k <= d_sae:
        raise LayoutError(f"{folder / CFG}: k={k} must satisfy 0 < k <= num_latents={d_sae}.")
    transcode, signed = bool(cfg.get("transcode", False)), bool(cfg.get("signed", False))

    weights = folder / WEIGHTS
    tensors = read_safetensors(weights)
    dtype = file_dtype(weights)
    if "W_skip" in tensors:
        raise LayoutError(f"{weights} holds W_skip (a skip connection adds x @ W_skip.T to the output, which this "
                          "workbench's SAEs cannot express): refused.")
    extra = sorted(set(tensors) - set(TENSORS))
    if extra:
        raise LayoutError(f"{weights} holds tensors sparsify's SparseCoder does not have ({', '.join(extra)}): "
                          "`SparseCoder.load_from_disk` would refuse it too.")
    W_enc = take(tensors, "encoder.weight", (d_sae, d_in), weights).double()  # nn.Linear: [n, d], our orientation
    b_enc = take(tensors, "encoder.bias", (d_sae,), weights).double()
    W_dec = take(tensors, "W_dec", (d_sae, d_in), weights).double()  # [n, d], our orientation
    b_dec = take(tensors, "b_dec", (d_in,), weights).double()
    fields = {"k": k, "selection": "per_token"} if signed else {"k": k}
    hook, hook_out = hooks_of(hookpoint_name(folder), transcode)
    sae = build("abstopk" if signed else "topk", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                dtype="float64", apply_b_dec_to_input=not transcode, hook_name=hook or "", **fields)
    sae = sae.to(dtype)
    sae.cfg.dtype = str(dtype).replace("torch.", "")
    facts = {"hookpoint": hookpoint_name(folder), "transcoder": transcode, "hook_out": hook_out, "signed": signed,
             **{key: cfg[key] for key in INFERENCE_IRRELEVANT if key in cfg}}
    return record_source(sae, NAME, folder, hook=hook, model=run_model_name(run), l0=k, **facts)
