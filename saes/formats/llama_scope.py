"""Layout 'llama_scope': OpenMOSS Llama Scope SAEs (fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8,32}x), written by
OpenMOSS's lm_saes as `hyperparams.json` + `checkpoints/final.safetensors`.

Tensors (nn.Linear orientation): encoder.weight [d_sae, d_model], encoder.bias [d_sae], decoder.weight
[d_model, d_sae], decoder.bias [d_model] (when use_decoder_bias). Training (norm_activation 'dataset-wise')
reads s_in * x with s_in = sqrt(d_model) / dataset_average_activation_norm['in'] and predicts s_out * y
(s_out from ['out']).

The rule reproduced is the one lm_saes itself uses to load a released SAE, and in which the released
jump_relu_threshold was measured (lm_saes at the Llama Scope release, commit 4ec6f0aa: sae.py
`SparseAutoEncoder.from_config`, and post_processing.py `post_process_topk_to_jumprelu_for_inference`, which sets
the threshold on an SAE loaded by from_config):
1. dataset-wise scaling folded into the weights (`standardize_parameters_of_dataset_activation_scaling`):
   encoder.bias /= s_in, decoder.bias /= s_out, decoder.weight *= s_in / s_out; the SAE then reads raw x.
   encoder.weight is not rescaled, so pre-activations, codes and the threshold are in raw-activation units.
2. with sparsity_include_decoder_norm (default true), unit-norm decoder columns
   (`transform_to_unit_decoder_norm`): n_i = ||decoder[:, i]||, decoder[:, i] /= n_i, encoder row i and bias *= n_i.
3. u = encoder(x - decoder.bias if apply_decoder_bias_to_pre_encoder else x); act_fn 'jumprelu' (or 'topk' with
   jump_relu_threshold > 0, which lm_saes turns into jumprelu): z = u * [u > θ], one scalar θ for every latent;
   'topk': the top_k largest relu(u); 'relu': relu(u).   x_hat = decoder(z) (with its bias).
So the threshold is NOT compared with the pre-activation of s_in * x: it is compared with n_i * (W_i x + b_i / s_in)
(SAELens's loader, which multiplies the threshold by s_in, agrees on the s_in part; it skips step 2). Everything is
folded into the tensors, so the loaded SAE has input_scale 1 and reads raw activations. norm_activation
'token-wise' (x * sqrt(d_model) / ||x||, reconstruction rescaled back) is token_norm='constant_norm_rescale';
'inference' and 'none' read x as is. Missing keys take lm_saes's SAEConfig defaults (apply_decoder_bias_to_pre_encoder
true, norm_activation 'token-wise', act_fn 'relu', sparsity_include_decoder_norm true).

Refused, naming the key: norm_activation 'batch-wise' (depends on the batch), use_glu_encoder, dataset-wise without
dataset_average_activation_norm, an unknown act_fn, an output width other than d_model.
Stated facts: hook = hook_point_in (lm_saes uses TransformerLens names, as this workbench does; else from a
`L{N}R|A|M` folder name), hook_out = hook_point_out for a transcoder, model = model_name or meta-llama/Llama-3.1-8B
for Llama3_1-8B folders, l0 = top_k only when the SAE selects by top-k (the threshold's L0 is measured, not stated).
"""
import json
import math
import re
from pathlib import Path

import torch

from saes.base import SAE
from saes.formats.common import LayoutError, build, read_safetensors, record_source, take

NAME = "llama_scope"
DESCRIPTION = "hyperparams.json + checkpoints/final.safetensors (OpenMOSS Llama Scope / lm_saes)"
HYPERPARAMS = "hyperparams.json"
WEIGHTS = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
"""lm_saes's own search order for the weights of a pretrained folder."""
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULTS = {"use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": True, "act_fn": "relu",
            "jump_relu_threshold": 0.0, "norm_activation": "token-wise", "sparsity_include_decoder_norm": True,
            "use_glu_encoder": False, "top_k": 50}
"""lm_saes SAEConfig defaults (config.py at 4ec6f0aa) for keys a hyperparams.json leaves out."""
SITES = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}


def weights_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)


def detect(path: Path) -> bool:
    return path.is_dir() and (path / HYPERPARAMS).is_file() and weights_file(path) is not None


def refuse(path: Path, key: str, value, why: str) -> None:
    raise LayoutError(f"{path / HYPERPARAMS}: {key}={value!r} is not supported ({why}); the SAE would load with "
                      "different codes, so it is refused.")


def stated_hook(hp: dict, path: Path) -> str | None:
    if hp.get("hook_point_in"):
        return str(hp["hook_point_in"])
    match = re.search(r"L(\d+)([RAM])(?:-|$)", path.name)
    return f"blocks.{int(match.group(1))}.{SITES[match.group(2)]}" if match else None


def stated_model(hp: dict, path: Path) -> str | None:
    if hp.get("model_name"):
        return str(hp["model_name"])
    return "meta-llama/Llama-3.1-8B" if "Llama3_1-8B" in path.resolve().as_posix() else None


def load(path: Path, *, input_scale: float | None = None, dtype: str = "float32", **options) -> SAE:
    """The Llama Scope folder at `path` as an SAE of the family with lm_saes's inference codes and
    reconstructions. Options: dtype (default float32)."""
    if options:
        raise LayoutError(f"The {NAME} layout has no option(s) {', '.join(sorted(options))}; it takes dtype= only.")
    if input_scale is not None:
        raise LayoutError(f"{path / HYPERPARAMS} states its own input scale (dataset_average_activation_norm), so "
                          "input_scale does not apply; drop --input-scale.")
    if dtype not in DTYPES:
        raise LayoutError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    try:
        raw = json.loads((path / HYPERPARAMS).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LayoutError(f"{path / HYPERPARAMS} is not readable JSON ({error}): fix or re-download it.") from None
    hp = {**DEFAULTS, **raw}
    if "d_model" not in hp:
        raise LayoutError(f"{path / HYPERPARAMS} has no d_model: it is not an lm_saes hyperparams file.")
    d_in = int(hp["d_model"])
    d_sae = int(hp.get("d_sae") or d_in * int(hp.get("expansion_factor", 0)))
    if d_sae <= 0:
        raise LayoutError(f"{path / HYPERPARAMS} states neither d_sae nor expansion_factor: add the SAE's width.")
    if hp["use_glu_encoder"]:
        refuse(path, "use_glu_encoder", True, "a gated-linear encoder has no counterpart here")
    mode = hp["norm_activation"]
    if mode == "batch-wise":
        refuse(path, "norm_activation", mode, "the scale depends on the other tokens of the batch")
    if mode not in ("dataset-wise", "token-wise", "inference", "none"):
        refuse(path, "norm_activation", mode, "known modes are dataset-wise, token-wise, inference and none")
    act_fn = str(hp["act_fn"]).lower()
    threshold = float(hp["jump_relu_threshold"])
    if act_fn == "topk" and threshold > 0:
        act_fn = "jumprelu"  # what lm_saes's from_config does for inference
    if act_fn not in ("jumprelu", "topk", "relu"):
        refuse(path, "act_fn", hp["act_fn"], "known activations are jumprelu, topk and relu")
    if act_fn == "jumprelu" and threshold < 0:
        refuse(path, "jump_relu_threshold", threshold, "a negative threshold lets negative pre-activations through")

    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out") or hp.get("hook_point_in")
    if mode == "token-wise" and hook_in != hook_out:
        refuse(path, "norm_activation", mode, "a transcoder's output is rescaled by its target's norm, which "
                                              "inference does not know")
    file = weights_file(path)
    tensors = {k: v.double() for k, v in read_safetensors(file).items()}
    E = take(tensors, "encoder.weight", (d_sae, d_in), file)
    b_E = take(tensors, "encoder.bias", (d_sae,), file)
    if "decoder.weight" in tensors and tensors["decoder.weight"].dim() == 2 \
            and tensors["decoder.weight"].shape[1] == d_sae and tensors["decoder.weight"].shape[0] != d_in:
        refuse(path, "hook_point_out", hp.get("hook_point_out"),
               f"its output width {tensors['decoder.weight'].shape[0]} differs from d_model={d_in}")
    D = take(tensors, "decoder.weight", (d_in, d_sae), file)
    b_D = take(tensors, "decoder.bias", (d_in,), file) if hp["use_decoder_bias"] else torch.zeros(d_in).double()

    if mode == "dataset-wise":
        norms = hp.get("dataset_average_activation_norm")
        if not isinstance(norms, dict) or "in" not in norms:
            refuse(path, "dataset_average_activation_norm", norms,
                   "norm_activation='dataset-wise' needs the dataset's average norms {'in': .., 'out': ..}")
        s_in = math.sqrt(d_in) / float(norms["in"])
        s_out = math.sqrt(d_in) / float(norms.get("out", norms["in"]))
        b_E, b_D, D = b_E / s_in, b_D / s_out, D * (s_in / s_out)
    if hp["sparsity_include_decoder_norm"]:
        n = D.norm(dim=0)  # [d_sae]
        D, E, b_E = D / n, E * n[:, None], b_E * n

    fields: dict = {}
    extra: dict = {}
    if act_fn == "jumprelu":
        ours = "jumprelu"
        extra["threshold"] = torch.full((d_sae,), threshold, dtype=torch.float64)
    elif act_fn == "topk":
        ours, fields["k"] = "topk", int(hp["top_k"])
    else:
        ours = "relu_l1"
    apply_b_dec = bool(hp["use_decoder_bias"] and hp["apply_decoder_bias_to_pre_encoder"])
    sae = build(ours, W_enc=E, b_enc=b_E, W_dec=D.T, b_dec=b_D, extra=extra, dtype="float64",
                apply_b_dec_to_input=apply_b_dec,
                token_norm="constant_norm_rescale" if mode == "token-wise" else "none", **fields)
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    hook = stated_hook(hp, path)
    hook_out = str(hp.get("hook_point_out") or hook or "") or None
    transcoder = hook is not None and hook_out != hook
    return record_source(sae, NAME, path, hook=hook, model=stated_model(hp, path),
                         l0=float(hp["top_k"]) if act_fn == "topk" else None,
                         hook_out=hook_out if transcoder else None, transcoder=transcoder, act_fn=act_fn,
                         jump_relu_threshold=threshold if act_fn == "jumprelu" else None,
                         train_top_k=int(hp["top_k"]), norm_activation=mode,
                         dataset_average_activation_norm=hp.get("dataset_average_activation_norm"))
