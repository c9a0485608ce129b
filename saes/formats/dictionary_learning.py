"""Layout 'dictionary_learning': a saprmarks/dictionary_learning trainer folder, `ae.pt` (the dictionary's state
dict, read with weights_only=True only) + `config.json` ({"trainer": {"dict_class", "activation_dim", "dict_size",
"k", "layer", "lm_name", "submodule_name", ...}, "buffer": {...}}).

Each class's inference rule, from dictionary.py and trainers/*.py of the reference (x the raw activation; all
weights as saved: a run with normalize_activations already has its norm factor folded into the biases and
thresholds by `scale_biases`, so the files read raw activations):
- AutoEncoder (the pre-April and April-update StandardTrainers): encoder.weight [d_sae, d_in], encoder.bias,
  decoder.weight [d_in, d_sae], bias [d_in].  z = relu(encoder(x - bias)),  x_hat = decoder(z) + bias.
  -> relu_l1 with b_dec subtracted. `AutoEncoder.from_pretrained` rescales to unit decoder columns by default
  (codes times ||d_i||, same reconstruction); here the saved codes are kept unless normalize_decoder=True.
- AutoEncoderNew (the April-update class): encoder.weight, encoder.bias, decoder.weight, decoder.bias.
  z = relu(encoder(x)), x_hat = decoder(z) -> relu_l1 without the subtraction. StandardTrainer's config says
  dict_class 'AutoEncoder' whatever class it trained, so the tensor names (decoder.bias, no bias) decide.
- GatedAutoEncoder: encoder.weight (no bias), decoder.weight, decoder_bias, r_mag, gate_bias, mag_bias.
  e = encoder(x - decoder_bias); z = [e + gate_bias > 0] * relu(exp(r_mag) * e + mag_bias) -> GatedSAE.
- JumpReluAutoEncoder: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold [d_sae];
  apply_b_dec_to_input is False (an attribute, not saved): u = x @ W_enc + b_enc, z = relu(u * [u > θ]), which is
  u * [u > max(θ, 0)] -> jumprelu without the subtraction, θ clamped at 0 (exact).
- AutoEncoderTopK: encoder.weight, encoder.bias, decoder.weight, b_dec, k and threshold buffers. encode's default
  (use_threshold=False) keeps the top k of relu(encoder(x - b_dec)) -> topk. With use_threshold=True (an option
  here too) it is relu(u) * [relu(u) > threshold] -> batchtopk with that threshold.
- BatchTopKSAE: same tensors; encode's default use_threshold=True: relu(u) * [relu(u) > threshold], one scalar
  threshold -> batchtopk (k from the buffer). MatryoshkaBatchTopKSAE: W_enc [d_in, d_sae], b_enc, W_dec, b_dec, k,
  threshold, group_sizes; the same inference on (x - b_dec) @ W_enc + b_enc (all groups active once loaded)
  -> batchtopk, group sizes in the source facts. A threshold still at its initial -1 (never tracked) loads as
  uncalibrated: this workbench refuses to encode until saes.calibrate_thresholds measures one.
k: the `k` buffer, which must agree with trainer.k when both exist (as from_pretrained checks).
Stated facts: hook from trainer.submodule_name or the folder names (resid_post_layer_N / resid_out_layerN ->
blocks.N.hook_resid_post, mlp_out_layer_N -> blocks.N.hook_mlp_out, attn_out_layer_N -> blocks.N.hook_attn_out,
embed -> hook_embed), else blocks.{trainer.layer}.hook_resid_post as SAELens's converter assumes; model =
trainer.lm_name; l0 = k for the TopK family.
"""
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from saes.base import SAE
from saes.formats.common import LayoutError, build, read_torch_state, record_source, take

NAME = "dictionary_learning"
DESCRIPTION = "ae.pt + config.json (saprmarks/dictionary_learning)"
AE, CONFIG = "ae.pt", "config.json"
DTYPES = ("float32", "float64", "bfloat16", "float16")
CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE")
SITES = {"resid_post": "hook_resid_post", "resid_out": "hook_resid_post", "resid": "hook_resid_post",
         "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
SUBMODULE = re.compile(r"(resid_post|resid_out|resid|mlp_out|attn_out)_layer_?(\d+)")


def folder_of(path: Path) -> Path | None:
    """The trainer folder of `path` (the folder, or its ae.pt), when it holds ae.pt and config.json."""
    folder = path.parent if path.is_file() and path.name == AE else path
    return folder if folder.is_dir() and (folder / AE).is_file() and (folder / CONFIG).is_file() else None


def detect(path: Path) -> bool:
    return folder_of(path) is not None


def infer_class(state: dict[str, Tensor]) -> str | None:
    """The class a state dict's tensor names identify, when they identify one."""
    keys = set(state)
    if {"W_enc", "group_sizes"} <= keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "gate_bias" in keys:
        return "GatedAutoEncoder"
    if "bias" in keys and "encoder.weight" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    return None  # AutoEncoderTopK and BatchTopKSAE have the same tensors


def stated_hook(trainer: dict, folder: Path) -> str | None:
    names = [trainer.get("submodule_name"), folder.name, folder.parent.name]
    for name in names:
        if not name:
            continue
        match = SUBMODULE.search(str(name))
        if match:
            return f"blocks.{int(match.group(2))}.{SITES[match.group(1)]}"
        if str(name) in ("embed", "embed_out", "embeddings"):
            return "hook_embed"
    layer = trainer.get("layer")
    return f"blocks.{int(layer)}.hook_resid_post" if isinstance(layer, int) else None


def k_of(state: dict[str, Tensor], trainer: dict, file: Path) -> int:
    buffer = int(state["k"].item()) if "k" in state else None
    stated = trainer.get("k")
    if buffer is not None and stated is not None and int(stated) != buffer:
        raise LayoutError(f"{file}: the k buffer says {buffer} but config.json trainer.k says {stated}: the two "
                          "files are from different SAEs; re-download the folder.")
    k = buffer if buffer is not None else stated
    if k is None:
        raise LayoutError(f"{file} has no k buffer and config.json no trainer.k: add the k it was trained with.")
    return int(k)


def scalar_threshold(state: dict[str, Tensor], file: Path) -> Tensor:
    threshold = state.get("threshold")
    if threshold is None or threshold.numel() != 1:
        take(state, "threshold", (), file)  # one sentence: missing, or not a scalar
    return threshold.double().reshape(())


def load(path: Path, *, input_scale: float | None = None, dtype: str = "float32", normalize_decoder: bool = False,
         use_threshold: bool = False, **options) -> SAE:
    """The dictionary_learning folder at `path` (or its ae.pt) as an SAE of the family with the reference's codes
    and reconstructions. Options: dtype (default float32); normalize_decoder (AutoEncoder: unit decoder columns, as
    AutoEncoder.from_pretrained does); use_threshold (AutoEncoderTopK: its threshold instead of top-k)."""
    if options:
        raise LayoutError(f"The {NAME} layout has no option(s) {', '.join(sorted(options))}; it takes dtype=, "
                          "normalize_decoder= and use_threshold=.")
    if input_scale is not None:
        raise LayoutError(f"{path}: a dictionary_learning SAE reads raw activations (a normalisation factor is "
                          "folded into its biases when saved), so input_scale does not apply; drop --input-scale.")
    if dtype not in DTYPES:
        raise LayoutError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    folder = folder_of(path)
    if folder is None:
        raise LayoutError(f"{path} does not hold {AE} and {CONFIG}: it is not a dictionary_learning folder.")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LayoutError(f"{folder / CONFIG} is not readable JSON ({error}): fix or re-download it.") from None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise LayoutError(f"{folder / CONFIG} has no 'trainer' section: it is not a dictionary_learning config.")
    file = folder / AE
    state = {k: v for k, v in read_torch_state(file).items()}
    dict_class = trainer.get("dict_class") or (config.get("dictionary") or {}).get("dict_class") or infer_class(state)
    if dict_class == "AutoEncoder" and "decoder.bias" in state and "bias" not in state:
        dict_class = "AutoEncoderNew"
    if dict_class not in CLASSES:
        raise LayoutError(f"{folder / CONFIG}: dict_class {dict_class!r} is not supported (known: "
                          f"{', '.join(CLASSES)}); add trainer.dict_class if it is missing.")
    if use_threshold and dict_class not in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        raise LayoutError(f"use_threshold applies to AutoEncoderTopK only; {file} is a {dict_class}.")
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    d_in, d_sae = int(trainer.get("activation_dim", 0)), int(trainer.get("dict_size", 0))
    if d_in <= 0 or d_sae <= 0:  # older configs: the widths are the bias lengths
        bias = next((state[n] for n in ("bias", "b_dec", "decoder_bias", "decoder.bias") if n in state), None)
        enc_bias = next((state[n] for n in ("encoder.bias", "b_enc", "gate_bias") if n in state), None)
        if bias is None or enc_bias is None:
            raise LayoutError(f"{folder / CONFIG} states no activation_dim/dict_size and {file} has no biases to "
                              "read them from: add trainer.activation_dim and trainer.dict_size.")
        d_in, d_sae = bias.numel(), enc_bias.numel()

    extra: dict[str, Tensor] = {}
    fields: dict = {}
    facts: dict = {"dict_class": dict_class, "trainer_class": trainer.get("trainer_class")}
    apply_b_dec = True
    l0 = None
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        ours = "relu_l1"
        W_enc = take(state, "encoder.weight", (d_sae, d_in), file)
        b_enc = take(state, "encoder.bias", (d_sae,), file)
        W_dec = take(state, "decoder.weight", (d_in, d_sae), file).T
        if dict_class == "AutoEncoder":
            b_dec = take(state, "bias", (d_in,), file)
        else:
            b_dec, apply_b_dec = take(state, "decoder.bias", (d_in,), file), False
        if normalize_decoder:
            if dict_class != "AutoEncoder":
                raise LayoutError("normalize_decoder applies to AutoEncoder only (what from_pretrained normalises).")
            norms = W_dec.norm(dim=-1)  # [d_sae]
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    elif dict_class == "GatedAutoEncoder":
        ours = "gated"
        W_enc = take(state, "encoder.weight", (d_sae, d_in), file)
        W_dec = take(state, "decoder.weight", (d_in, d_sae), file).T
        b_dec = take(state, "decoder_bias", (d_in,), file)
        b_enc = take(state, "gate_bias", (d_sae,), file)
        extra = {"r_mag": take(state, "r_mag", (d_sae,), file), "b_mag": take(state, "mag_bias", (d_sae,), file)}
    elif dict_class == "JumpReluAutoEncoder":
        ours, apply_b_dec = "jumprelu", False
        W_enc = take(state, "W_enc", (d_in, d_sae), file).T
        b_enc = take(state, "b_enc", (d_sae,), file)
        W_dec = take(state, "W_dec", (d_sae, d_in), file)
        b_dec = take(state, "b_dec", (d_in,), file)
        threshold = take(state, "threshold", (d_sae,), file)
        extra = {"threshold": threshold.clamp(min=0.0)}
        facts["negative_thresholds"] = int((threshold < 0).sum())
    else:  # the TopK family
        k = k_of(state, trainer, file)
        l0 = float(k)
        if dict_class == "MatryoshkaBatchTopKSAE":
            W_enc = take(state, "W_enc", (d_in, d_sae), file).T
            b_enc = take(state, "b_enc", (d_sae,), file)
            W_dec = take(state, "W_dec", (d_sae, d_in), file)
            groups = state.get("group_sizes")
            if groups is None or int(groups.sum()) != d_sae:
                raise LayoutError(f"{file}: group_sizes {None if groups is None else groups.tolist()} does not sum "
                                  f"to dict_size={d_sae}: the file is incomplete or from another SAE.")
            facts["group_sizes"] = [int(g) for g in groups.tolist()]
        else:
            W_enc = take(state, "encoder.weight", (d_sae, d_in), file)
            b_enc = take(state, "encoder.bias", (d_sae,), file)
            W_dec = take(state, "decoder.weight", (d_in, d_sae), file).T
        b_dec = take(state, "b_dec", (d_in,), file)
        fields["k"] = k
        thresholded = dict_class != "AutoEncoderTopK" or use_threshold
        if thresholded:
            ours = "batchtopk"
            threshold = scalar_threshold(state, file)
            extra = {"threshold": threshold if threshold >= 0 else torch.tensor(-1.0).double()}
            facts["threshold_calibrated"] = bool(threshold >= 0)
        else:
            ours = "topk"
    sae = build(ours, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, extra=extra, dtype="float64",
                apply_b_dec_to_input=apply_b_dec, **fields)
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    lm = trainer.get("lm_name")
    return record_source(sae, NAME, path, hook=stated_hook(trainer, folder), model=str(lm) if lm else None, l0=l0,
                         **facts)
