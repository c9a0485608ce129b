"""Layout 'gemma_scope': Google DeepMind's Gemma Scope JumpReLU SAEs and transcoders.

Files. Gemma Scope 1 (Gemma 2; google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,transcoders}): one folder per
SAE holding `params.npz` with W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] and
threshold [d_sae]. Gemma Scope 2 (Gemma 3; google/gemma-scope-2-*): `params.safetensors` with the same tensors
under lower-case names (w_enc, w_dec, b_enc, b_dec, threshold), an optional `affine_skip_connection`
[d_in, d_out] on skip transcoders, and sometimes a `config.json` (model_name, hf_hook_point_in/out).

Encode rule (the Gemma Scope tutorial's JumpReLUSAE, which SAELens's gemma_2/gemma_3 loaders reproduce with
apply_b_dec_to_input=False): the encoder reads the activation itself, with no b_dec subtraction and no input
normalisation,
    u = x @ W_enc + b_enc,    z = relu(u) * [u > threshold],    x_hat = z @ W_dec + b_dec
(a skip transcoder adds x @ affine_skip_connection). relu(u) * [u > θ] equals u * [u > max(θ, 0)], so a
threshold below zero loads exactly as 0 in our JumpReLU (u * [u > θ]).

Orientation comes from the tensor names (W_enc is input-major, W_dec latent-major, in both generations) and the
widths from the bias vectors (d_sae = len(b_enc), d_in = len(b_dec)); nothing is inferred from matrix shapes, so a
square SAE (d_in == d_sae) loads the same way and a transposed file fails the shape check by name.

What the source states comes from the release path (a hub snapshot keeps the repo name in its folder names):
`-res` -> blocks.N.hook_resid_post, `-mlp` -> blocks.N.hook_mlp_out, `-att` -> blocks.N.attn.hook_z (the heads'
concatenated z), `-transcoders` -> blocks.N.ln2.hook_normalized with output blocks.N.hook_mlp_out; Gemma Scope 2
folders say resid_post / mlp_out / attn_out / transcoder instead. N from `layer_N`, the stated L0 from
`average_l0_N`, the model from the repo name (gemma-scope-2b-pt -> google/gemma-2-2b, gemma-scope-2-1b-it ->
google/gemma-3-1b-it). An embedding SAE (`embedding/`) states no hook: SAELens rescales it for TransformerLens's
unscaled hook_embed, so which hook it reads is left to --hook.

Refused, with the reason: an affine skip connection (our decode cannot add x @ W_skip), cross-layer transcoders
(`clt`), a `scaling_factor` tensor other than all ones, a transcoder whose output width differs from its input.
"""
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saes.base import SAE
from saes.formats.common import LayoutError, build, read_safetensors, record_source, take

NAME = "gemma_scope"
DESCRIPTION = "params.npz (Gemma Scope 1) or params.safetensors (Gemma Scope 2)"
NPZ, SAFETENSORS, CONFIG = "params.npz", "params.safetensors", "config.json"
DTYPES = ("float32", "float64", "bfloat16", "float16")

GS1_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
GS2_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}
SKIP_REFUSAL = ("it has an affine skip connection (affine_skip_connection / w_skip): its output adds x @ W_skip, "
                "which this workbench's SAEs cannot express")


def weights_file(path: Path) -> Path | None:
    """The params file of a Gemma Scope folder (or the file itself), or None."""
    if path.is_file():
        return path if path.name in (NPZ, SAFETENSORS) else None
    for name in (NPZ, SAFETENSORS):
        if (path / name).is_file():
            return path / name
    return None


def detect(path: Path) -> bool:
    return weights_file(path) is not None


def read_npz(path: Path) -> dict[str, Tensor]:
    """Every array of an .npz as a float64 tensor; object arrays (pickles) are refused by numpy's allow_pickle=False."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.asarray(data[key], dtype=np.float64)) for key in data.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise LayoutError(f"{path} holds pickled objects, which could run code: refusing to load it. Save the "
                              "arrays as plain numeric arrays (np.savez) and import that.") from None
        raise LayoutError(f"{path} is not a readable .npz file ({str(error)[:80]}): it may be truncated or corrupt; "
                          "download or copy it again.") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise LayoutError(f"{path} is not a readable .npz file ({str(error)[:80]}): it may be truncated or corrupt; "
                          "download or copy it again.") from None


def canonical_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gemma Scope 1 writes W_enc/W_dec, Gemma Scope 2 w_enc/w_dec; both mean the same tensors."""
    out = {}
    for key, value in tensors.items():
        out["W_" + key[2:] if key in ("w_enc", "w_dec") else key] = value
    return out


def stated_facts(path: Path, config: dict) -> dict:
    """hook, hook_out, model, l0 and site as the release naming of `path` (and its config.json) states them."""
    text = path.resolve().as_posix() if path.exists() else path.as_posix()
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|_|$)", text)
    l0 = re.search(r"average_l0_(\d+)", text)
    facts: dict = {"hook": None, "hook_out": None, "model": None, "l0": float(l0.group(1)) if l0 else None,
                   "site": None, "generation": None}
    gs2 = re.search(r"gemma-scope-2-(\d+(?:\.\d+)?[bm])-(pt|it)", text)
    gs1 = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders?)(?:-canonical)?(?:/|$)", text)
    if gs2:
        size, kind = gs2.groups()
        facts["generation"] = 2
        facts["model"] = f"google/gemma-3-{size}" + ("" if size == "270m" and kind == "pt" else f"-{kind}")
        inside = text.split(gs2.group(0), 1)[-1]  # the folders inside the release
        facts["site"] = next((site for site in ("transcoder", *GS2_SITES) if site in inside), None)
    elif gs1:
        size, kind, site = gs1.groups()
        facts["generation"] = 1
        facts["model"] = f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")
        facts["site"] = "transcoder" if site.startswith("transcoder") else site
    if config.get("model_name"):  # Gemma Scope 2 config.json: SAELens's spelling fix-ups
        model = str(config["model_name"]).replace("-v3", "-3")
        model = model if model.startswith("google/") else "google/" + model
        facts["model"] = model.replace("-pt", "") if "270m" in model else model
    if config.get("hf_hook_point_out") or "affine_connection" in config:
        facts["site"] = "transcoder"
    if "embedding" in text.split("/")[-4:]:
        facts["site"] = "embedding"
    if layer and facts["site"] in ("transcoder",):
        n = int(layer.group(1))
        facts["hook"], facts["hook_out"] = f"blocks.{n}.ln2.hook_normalized", f"blocks.{n}.hook_mlp_out"
    elif layer and facts["site"] is not None and facts["site"] != "embedding":
        hook = {**GS1_SITES, **GS2_SITES}[facts["site"]]
        facts["hook"] = f"blocks.{int(layer.group(1))}.{hook}"
    return facts


def read_config(folder: Path) -> dict:
    file = folder / CONFIG
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LayoutError(f"{file} is not readable JSON ({error}): fix or re-download it.") from None
    return config if isinstance(config, dict) else {}


def load(path: Path, *, input_scale: float | None = None, dtype: str = "float32", **options) -> SAE:
    """The Gemma Scope SAE at `path` (its folder or its params file) as a JumpReLU SAE with the same codes and
    reconstructions. Options: dtype (default float32)."""
    if options:
        raise LayoutError(f"The {NAME} layout has no option(s) {', '.join(sorted(options))}; it takes dtype= only.")
    if input_scale is not None:
        raise LayoutError(f"{path}: a Gemma Scope SAE reads raw activations (no dataset scale), so input_scale "
                          "does not apply; drop --input-scale.")
    if dtype not in DTYPES:
        raise LayoutError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    file = weights_file(path)
    if file is None:
        raise LayoutError(f"{path} holds neither {NPZ} nor {SAFETENSORS}: it is not a Gemma Scope SAE folder.")
    folder = file.parent
    if any(re.search(r"(?:^|_)clt(?:_|$)", part) for part in folder.parts[-3:]):
        raise LayoutError(f"{file}: a cross-layer transcoder (clt) writes to many layers, which this workbench's "
                          "single-hook SAEs cannot express; it is refused.")
    config = read_config(folder)
    tensors = canonical_names(read_npz(file) if file.suffix == ".npz" else
                              {k: v.double() for k, v in read_safetensors(file).items()})
    for skip in ("affine_skip_connection", "w_skip", "W_skip"):
        if skip in tensors:
            raise LayoutError(f"{file}: {SKIP_REFUSAL}; it is refused rather than loaded without the skip term.")
    if config.get("affine_connection"):
        raise LayoutError(f"{folder / CONFIG} says affine_connection=true: {SKIP_REFUSAL}; it is refused.")
    for name in ("b_enc", "b_dec"):
        if name not in tensors:
            take(tensors, name, (), file)  # one sentence naming the missing tensor
        if tensors[name].dim() != 1:
            raise LayoutError(f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected a vector: "
                              "the file is not a Gemma Scope SAE, or the layout is wrong.")
    d_sae, d_in = tensors["b_enc"].numel(), tensors["b_dec"].numel()
    W_enc_raw = tensors.get("W_enc")
    if W_enc_raw is not None and W_enc_raw.dim() == 2 and W_enc_raw.shape[1] == d_sae and W_enc_raw.shape[0] != d_in:
        raise LayoutError(f"{file}: a transcoder from width {W_enc_raw.shape[0]} to width {d_in}; this workbench's "
                          "SAEs need equal input and output widths, so it is refused.")
    W_enc = take(tensors, "W_enc", (d_in, d_sae), file).T  # ours: [d_sae, d_in]
    W_dec = take(tensors, "W_dec", (d_sae, d_in), file)
    threshold = take(tensors, "threshold", (d_sae,), file)
    if "scaling_factor" in tensors:
        factor = take(tensors, "scaling_factor", (d_sae,), file)
        if not torch.equal(factor, torch.ones_like(factor)):
            raise LayoutError(f"{file}: a scaling_factor other than ones (a fine-tuned rescale of the codes) has no "
                              "reference rule here; it is refused.")
    facts = stated_facts(folder, config)
    sae = build("jumprelu", W_enc=W_enc, b_enc=tensors["b_enc"], W_dec=W_dec, b_dec=tensors["b_dec"],
                extra={"threshold": threshold.clamp(min=0.0)}, apply_b_dec_to_input=False, dtype="float64")
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    transcoder = facts["site"] == "transcoder"
    return record_source(sae, NAME, path, hook=facts["hook"], model=facts["model"], l0=facts["l0"],
                         hook_out=facts["hook_out"], transcoder=transcoder, site=facts["site"],
                         generation=facts["generation"] or (1 if file.suffix == ".npz" else 2),
                         negative_thresholds=int((threshold < 0).sum()))
