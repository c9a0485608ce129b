"""Layout 'openai': one `.pt` file of openai/sparse_autoencoder (the GPT-2 small SAEs, e.g.
gpt2-small/resid_post_mlp_v5_32k/autoencoders/6.pt): `Autoencoder.state_dict()`, read with weights_only=True.

Tensors (sparse_autoencoder/model.py, class Autoencoder): pre_bias [d_in], encoder.weight [d_sae, d_in] (nn.Linear,
no bias), latent_bias [d_sae], decoder.weight [d_in, d_sae] (nn.Linear, no bias), and the statistics buffers
stats_last_nonzero, latents_activation_frequency, latents_mean_square (ignored). `state_dict()` adds two entries
that are not tensors: "activation" (the class name, 'TopK' or 'ReLU') and "activation_state_dict" ({'k': K,
'postact_fn': 'ReLU'} for TopK).

Rule (Autoencoder.encode/decode; `from_state_dict` turns LayerNorm on exactly when the activation is TopK):
    x' = LN(x) = (x - mean) / (std + 1e-5)   per token, std with Bessel's correction (torch.std), mean and std kept
    z  = TopK_k(encoder(x' - pre_bias) + latent_bias)    TopK: the k largest pre-activations, then ReLU on them
    x_hat = (decoder(z) + pre_bias) * std + mean
-> topk with token_norm='layer_norm' (whose (mean, std + 1e-5, std) statistics are exactly model.py's LN),
b_dec = pre_bias (subtracted before encoding), b_enc = latent_bias. A 'ReLU' autoencoder (the v1/v4 releases) has no
LayerNorm: z = relu(encoder(x - pre_bias) + latent_bias) -> relu_l1 with b_dec subtracted.
k: the file's activation_state_dict, else `k=` (an option), else a `k<N>` / `k_<N>` in the file name; a file with
neither an activation nor a k is refused with one sentence asking for k=.
Stated facts: hook from the release path (mlp_post_act -> blocks.N.mlp.hook_post, resid_delta_attn ->
blocks.N.hook_attn_out, resid_post_attn -> blocks.N.hook_resid_mid, resid_delta_mlp -> blocks.N.hook_mlp_out,
resid_post_mlp -> blocks.N.hook_resid_post; N the file's stem), model 'gpt2' when the path names gpt2-small,
l0 = k.
"""
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from saes.base import SAE
from saes.formats.common import LayoutError, build, record_source, take

NAME = "openai"
DESCRIPTION = "a single .pt state dict (openai/sparse_autoencoder)"
SUFFIXES = (".pt", ".pth")
DTYPES = ("float32", "float64", "bfloat16", "float16")
LOCATIONS = {"mlp_post_act": "mlp.hook_post", "resid_delta_attn": "hook_attn_out",
             "resid_post_attn": "hook_resid_mid", "resid_delta_mlp": "hook_mlp_out",
             "resid_post_mlp": "hook_resid_post"}
"""model.py's README: OpenAI location -> TransformerLens hook of layer N (this workbench's names)."""


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix in SUFFIXES):
        return False
    return not (path.name == "ae.pt" and (path.parent / "config.json").is_file())  # dictionary_learning's


def read_state(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, the non-tensor entries) of a torch.save'd state dict, loaded with weights_only=True: a pickle
    holding code is refused. (common.read_torch_state refuses the str/dict entries OpenAI's state_dict adds.)"""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LayoutError(f"{path} holds pickled objects other than tensors, which could run code: refusing to "
                          "load it. Re-save its state dict (torch.save(module.state_dict(), path)) and import "
                          "that.") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as error:
        raise LayoutError(f"{path} is not a readable torch file ({str(error)[:80]}): it may be truncated or "
                          "corrupt; download or copy it again.") from None
    if not isinstance(state, dict):
        raise LayoutError(f"{path} does not hold a state dict: save `autoencoder.state_dict()` and import that.")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, Tensor)}


def k_from_name(path: Path) -> int | None:
    match = re.search(r"(?:^|[^a-z0-9])k_?(\d+)(?:[^0-9]|$)", path.stem, flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def stated_hook(path: Path) -> str | None:
    if not path.stem.isdigit():
        return None
    for part in reversed(path.parent.parts):
        for location, hook in LOCATIONS.items():
            if part == location or part.startswith(location + "_v"):
                return f"blocks.{int(path.stem)}.{hook}"
    return None


def load(path: Path, *, input_scale: float | None = None, dtype: str = "float32", k: int | None = None,
         **options) -> SAE:
    """The OpenAI autoencoder file at `path` as an SAE of the family with model.py's codes and reconstructions.
    Options: dtype (default float32), k (when the file does not state it)."""
    if options:
        raise LayoutError(f"The {NAME} layout has no option(s) {', '.join(sorted(options))}; it takes dtype= and k=.")
    if input_scale is not None:
        raise LayoutError(f"{path}: an OpenAI autoencoder normalises each token itself (LayerNorm), so input_scale "
                          "does not apply; drop --input-scale.")
    if dtype not in DTYPES:
        raise LayoutError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    tensors, meta = read_state(path)
    tensors = {name: t.double() if t.is_floating_point() else t for name, t in tensors.items()}
    activation = meta.get("activation")
    act_state = meta.get("activation_state_dict") or {}
    if activation is not None and activation not in ("TopK", "ReLU"):
        raise LayoutError(f"{path}: activation {activation!r} is not supported (known: TopK, ReLU); it is refused.")
    if activation == "TopK" and act_state.get("postact_fn", "ReLU") != "ReLU":
        raise LayoutError(f"{path}: a TopK with postact_fn {act_state['postact_fn']!r} (not ReLU) keeps negative "
                          "codes, which this workbench's topk does not; it is refused.")
    stated_k = act_state.get("k") if activation == "TopK" else None
    if stated_k is not None and k is not None and int(k) != int(stated_k):
        raise LayoutError(f"{path} states k={stated_k} but k={k} was passed: drop k= or pass the file's k.")
    if activation is None and k is None:
        k = k_from_name(path)
    topk = activation == "TopK" or (activation is None and k is not None)
    if activation is None and k is None:
        raise LayoutError(f"{path} does not state its activation or k: pass k=K (its TopK k, e.g. 32 for the v5 "
                          "releases) to load it.")
    k = int(stated_k if stated_k is not None else k) if topk else None

    if "encoder.weight" not in tensors:
        take(tensors, "encoder.weight", (), path)  # one sentence naming the missing tensor
    if tensors["encoder.weight"].dim() != 2:
        raise LayoutError(f"{path}: tensor 'encoder.weight' has shape {tuple(tensors['encoder.weight'].shape)}, "
                          "expected a matrix [d_sae, d_in]: the file is not an OpenAI autoencoder.")
    d_sae, d_in = tensors["encoder.weight"].shape
    W_enc = take(tensors, "encoder.weight", (d_sae, d_in), path)
    b_dec = take(tensors, "pre_bias", (d_in,), path)
    b_enc = take(tensors, "latent_bias", (d_sae,), path)
    W_dec = take(tensors, "decoder.weight", (d_in, d_sae), path).T
    if topk:
        sae = build("topk", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, dtype="float64", k=k,
                    token_norm="layer_norm")
    else:
        sae = build("relu_l1", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, dtype="float64",
                    apply_b_dec_to_input=True)
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    parts = {p.lower() for p in path.resolve().parts}
    model = "gpt2" if parts & {"gpt2-small", "gpt2"} else None
    return record_source(sae, NAME, path, hook=stated_hook(path.resolve()), model=model,
                         l0=float(k) if topk else None, activation=activation or ("TopK" if topk else None))
