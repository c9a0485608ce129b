"""Layout 'saelens': a SAELens folder, `cfg.json` + `sae_weights.safetensors` (+ optional `sparsity.safetensors`).

SAELens stores W_enc as [d_in, d_sae] and W_dec as [d_sae, d_in]. Its inference rule for each architecture, and
every cfg.json key that changes the codes, is honoured here exactly or refused by name:
- `apply_b_dec_to_input` (default true): false means u = W_enc x + b_enc (folded, see common.build).
- `normalize_activations`: 'none'; 'layer_norm' and 'constant_norm_rescale' per token (SAEConfig.token_norm);
  'expected_average_only_in' needs the dataset scale the folder does not hold (pass input_scale=); others refused.
- `rescale_acts_by_decoder_norm` (TopK family): codes computed on u * ||d_i|| and decoded with d_i / ||d_i||;
  folded into W_enc, b_enc and unit-norm W_dec rows, which gives the same codes and reconstruction.
- `finetuning_scaling_factor` with a `scaling_factor` tensor: codes are multiplied by it before decoding (folded
  into W_dec rows); without the tensor SAELens turns the flag off, and so does this loader.
  `hook_head_index` (top level before SAELens 6, under metadata since), skip transcoders, `activation_fn` other than
  relu/topk, a threshold of another shape than [d_sae] or one value: refused.
- `reshape_activations: hook_z` is accepted: SAEs read [.., n_heads * d_head], as the workbench's caches do.
Configs written before SAELens 6 (no `sae_lens_version` >= 6) are converted first, as SAELens does: `hook_point` ->
`hook_name`, `activation_fn_str` -> `activation_fn`, a topk activation with `activation_fn_kwargs.k` -> 'topk',
boolean `normalize_activations`. BatchTopK and Matryoshka BatchTopK SAEs are saved by SAELens as 'jumprelu'
(their global threshold repeated per latent) and load as JumpReLU. Transcoders (hook in != hook out, d_in ==
d_out) load for analysis with their output hook in the source facts; one with `normalize_activations` is refused
(SAELens normalises its input but not its output).
"""
import json
from pathlib import Path

import torch

from saes.base import SAE
from saes.formats.common import LayoutError, build, read_safetensors, record_source, take

NAME = "saelens"
DESCRIPTION = "cfg.json + sae_weights.safetensors (SAELens, v6 and older)"
CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"

ARCHITECTURES = {  # SAELens name -> ours
    "standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "abstopk": "abstopk",
    "batchtopk": "batchtopk", "matryoshka_batchtopk": "batchtopk",
    "transcoder": "relu_l1", "jumprelu_transcoder": "jumprelu",
}
REFUSED = {
    "skip_transcoder": "a skip transcoder adds x @ W_skip to its output, which this workbench's SAEs cannot express",
    "jumprelu_skip_transcoder": "a skip transcoder adds x @ W_skip to its output, which this workbench's SAEs "
                                "cannot express",
    "matching_pursuit": "SAELens's matching pursuit stops on a residual threshold and on repeated support, unlike "
                        "this workbench's MP-SAE; train one here with --architectures matching_pursuit",
}
TOKEN_NORMS = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}
LLM_KEYS = ("model_name", "hook_name", "hook_name_out", "model_class_name", "hook_layer", "context_size",
            "prepend_bos", "dataset_path", "neuronpedia_id", "sae_lens_version", "sae_lens_training_version")


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def is_pre_6(raw: dict) -> bool:
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def normalise_cfg(raw: dict) -> dict:
    """A SAELens cfg.json in the v6 shape: pre-6 keys renamed and defaulted as SAELens's own loader does."""
    cfg = dict(raw)
    metadata = dict(cfg.pop("metadata", None) or {})
    if is_pre_6(raw):
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                         ("activation_fn_str", "activation_fn")):
            if old in cfg:
                cfg[new] = cfg.pop(old)
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if cfg.get("activation_fn") == "topk" and k is not None:
            cfg["architecture"], cfg["k"] = "topk", k
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    for key in LLM_KEYS:  # v6 keeps these under metadata; pre-6 at the top level
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    cfg["metadata"] = metadata
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    return cfg


def refuse(path: Path, key: str, value, why: str) -> None:
    raise LayoutError(f"{path / CFG}: {key}={value!r} is not supported ({why}); the SAE would load with different "
                      "codes, so it is refused.")


def token_norm_of(cfg: dict, path: Path, input_scale: float | None) -> tuple[str, float]:
    mode = cfg.get("normalize_activations", "none")
    if mode == "expected_average_only_in":
        if input_scale is None:
            raise LayoutError(f"{path / CFG}: normalize_activations='expected_average_only_in' means the SAE reads "
                              "x * s for a dataset scale s that the folder does not hold: pass it (--input-scale S, "
                              "e.g. sqrt(d_in) / the mean activation norm of its training data).")
        return "none", float(input_scale)
    if mode not in TOKEN_NORMS:
        refuse(path, "normalize_activations", mode, "only none, layer_norm, constant_norm_rescale and "
                                                    "expected_average_only_in have a fixed inference rule here")
    return TOKEN_NORMS[mode], 1.0 if input_scale is None else float(input_scale)


def load(path: Path, input_scale: float | None = None, **_) -> SAE:
    """The SAELens folder at `path` as an SAE of the family with SAELens's codes and reconstructions."""
    try:
        raw = json.loads((path / CFG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LayoutError(f"{path / CFG} is not readable JSON ({error}): fix or re-download it.") from None
    cfg = normalise_cfg(raw)
    arch = cfg.get("architecture", "standard")
    if arch in REFUSED:
        refuse(path, "architecture", arch, REFUSED[arch])
    if arch not in ARCHITECTURES:
        raise LayoutError(f"{path / CFG}: SAELens architecture {arch!r} is unknown here; known: "
                          f"{', '.join(sorted(ARCHITECTURES))}.")
    head = next((v for v in (cfg.get("hook_head_index"), cfg["metadata"].get("hook_head_index")) if v is not None),
                None)  # pre-6: top level; v6: under metadata
    if head is not None:
        refuse(path, "hook_head_index", head, "an SAE on one attention head's slice of hook_z")
    activation = cfg.get("activation_fn")
    if activation not in (None, "relu", "topk"):
        refuse(path, "activation_fn", activation, "only relu and topk activations are known")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        refuse(path, "reshape_activations", cfg["reshape_activations"], "only none and hook_z are known")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    transcoder = "transcoder" in arch
    if transcoder and int(cfg.get("d_out", d_in)) != d_in:
        refuse(path, "d_out", cfg["d_out"], f"a transcoder whose output width differs from d_in={d_in}")
    token_norm, scale = token_norm_of(cfg, path, input_scale)
    if transcoder and token_norm != "none":  # Transcoder.decode skips run_time_activation_norm_fn_out
        refuse(path, "normalize_activations", cfg["normalize_activations"], "SAELens normalises a transcoder's input "
               "but not its output, which this workbench's per-token normalisation cannot express")

    tensors = read_safetensors(path / WEIGHTS)
    W_dec = take(tensors, "W_dec", (d_sae, d_in), path / WEIGHTS).double()
    b_dec = take(tensors, "b_dec", (d_in,), path / WEIGHTS).double()
    W_enc = take(tensors, "W_enc", (d_in, d_sae), path / WEIGHTS).T.double()  # ours: [d_sae, d_in]
    bias_name = "b_gate" if arch == "gated" else "b_enc"
    b_enc = take(tensors, bias_name, (d_sae,), path / WEIGHTS).double()
    if "scaling_factor" in tensors:  # without the tensor SAELens turns finetuning_scaling_factor off
        factor = take(tensors, "scaling_factor", (d_sae,), path / WEIGHTS).double()
        if cfg.get("finetuning_scaling_factor") or not torch.equal(factor, torch.ones_like(factor)):
            W_dec = W_dec * factor[:, None]  # decode(z) = (z * factor) @ W_dec
    ours = ARCHITECTURES[arch]
    extra: dict[str, torch.Tensor] = {}
    fields: dict = {}
    if ours in ("topk", "abstopk"):
        if "k" not in cfg:
            raise LayoutError(f"{path / CFG} is a SAELens {arch} SAE without 'k': add the k it was trained with.")
        fields["k"] = int(cfg["k"])
        if ours == "abstopk":
            fields["selection"] = "per_token"
            extra["threshold"] = torch.full((d_sae,), -1.0)  # unused by per-token selection
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=-1)  # [d_sae]: codes on u * ||d_i||, decoded with unit rows
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    elif ours == "batchtopk":  # a training-time checkpoint; SAELens's trainer exports these as jumprelu
        threshold = tensors.get("topk_threshold", tensors.get("threshold"))
        if threshold is None:
            raise LayoutError(f"{path / WEIGHTS} is a SAELens {arch} checkpoint without its threshold "
                              "(topk_threshold): export it from SAELens (it saves BatchTopK as jumprelu) and import that.")
        ours, fields = "jumprelu", {}
        extra["threshold"] = threshold.double().expand(d_sae).clone()
    if ours == "jumprelu":
        threshold = extra.get("threshold", tensors.get("threshold"))
        if threshold is None:
            threshold = take(tensors, "threshold", (d_sae,), path / WEIGHTS)
        if threshold.numel() not in (1, d_sae):
            raise LayoutError(f"{path / WEIGHTS}: tensor 'threshold' has shape {tuple(threshold.shape)}, expected "
                              f"({d_sae},) or a single value: the file or its config is from another SAE.")
        threshold = threshold.double().reshape(-1).expand(d_sae).clone()
        if bool((threshold < 0).any()):
            raise LayoutError(f"{path / WEIGHTS}: a JumpReLU threshold is negative, so SAELens's relu(u) * (u > θ) "
                              "and u * (u > θ) differ; this SAE cannot load exactly.")
        extra["threshold"] = threshold
    if ours == "gated":
        extra["r_mag"] = take(tensors, "r_mag", (d_sae,), path / WEIGHTS).double()
        extra["b_mag"] = take(tensors, "b_mag", (d_sae,), path / WEIGHTS).double()
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder  # a transcoder's b_dec is output
    metadata = cfg["metadata"]
    sae = build(ours, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, extra=extra, dtype="float64", **fields,
                apply_b_dec_to_input=apply_b_dec, token_norm=token_norm, input_scale=scale,
                hook_name=metadata.get("hook_name") or "", model_name=metadata.get("model_name") or "")
    sae = sae.to(getattr(torch, str(cfg.get("dtype", "float32")).replace("torch.", ""), torch.float32))
    sae.cfg.dtype = str(sae.W_dec.dtype).replace("torch.", "")
    facts = {"architecture": arch, "hook_out": metadata.get("hook_name_out") if transcoder else None,
             "transcoder": transcoder}
    if (path / SPARSITY).is_file():  # log10 feature densities; `saewb import` copies them for the browser
        facts["sparsity_file"] = str(path / SPARSITY)
    l0 = fields.get("k") if ours in ("topk", "abstopk") else raw.get("k")
    return record_source(sae, NAME, path, hook=metadata.get("hook_name"), model=metadata.get("model_name"),
                         l0=l0, **facts)
