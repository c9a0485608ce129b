"""What every layout loader shares: safe file reading, shape checks, building an SAE of the family from tensors
in our orientation, and recording what the source states about itself (hook, model, L0) for the import check."""
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from saes.base import SAE


class LayoutError(ValueError):
    """A file or folder that does not hold what its layout promises; the message names the file and the fix."""


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise LayoutError(f"{path} is not a readable safetensors file ({str(error)[:80]}): it may be truncated or "
                          "corrupt; download or copy it again.") from None


def read_torch_state(path: Path) -> dict[str, Tensor]:
    """A `torch.save`d state dict, loaded with weights_only=True: a pickle that holds code is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LayoutError(f"{path} holds pickled objects other than tensors, which could run code: refusing to load "
                          "it. Re-save its state dict (torch.save(module.state_dict(), path)) and import that.") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as error:
        raise LayoutError(f"{path} is not a readable torch file ({str(error)[:80]}): it may be truncated or "
                          "corrupt; download or copy it again.") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LayoutError(f"{path} does not hold a state dict of tensors: save `module.state_dict()` and import that.")
    return state


def take(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], path: Path) -> Tensor:
    """tensors[name] with the expected shape, or one sentence naming the file, the tensor and both shapes."""
    if name not in tensors:
        raise LayoutError(f"{path} has no tensor {name!r} (it has {', '.join(sorted(tensors))}): is the layout right? "
                          "Pass --layout to choose another.")
    tensor = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise LayoutError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} for "
                          "this layout: the file or its config is from another SAE, or the layout is wrong.")
    return tensor


def build(architecture: str, *, W_enc: Tensor | None, b_enc: Tensor | None, W_dec: Tensor, b_dec: Tensor,
          extra: dict[str, Tensor] | None = None, apply_b_dec_to_input: bool = True, **fields) -> SAE:
    """An SAE of the family holding these tensors, in our orientation: W_enc, W_dec [d_sae, d_in]; b_enc [d_sae];
    b_dec [d_in]. `apply_b_dec_to_input=False` (an encoder that reads x, not x - b_dec) is honoured exactly:
    through the variant's own flag where it has one, else by folding b_dec into the encoder bias."""
    from saes import sae_class

    cls = sae_class(architecture)
    d_sae, d_in = W_dec.shape
    dtype = fields.pop("dtype", "float32")
    cfg_fields = {"d_in": d_in, "d_sae": d_sae, "dtype": dtype, **fields}
    has_flag = "apply_b_dec_to_input" in cls.config_cls.__dataclass_fields__
    if has_flag:
        cfg_fields["apply_b_dec_to_input"] = apply_b_dec_to_input
    sae = cls(cls.config_cls(**cfg_fields), seed=None)
    with torch.no_grad():
        if not sae.tied:
            if W_enc is None or b_enc is None:
                raise LayoutError(f"A {architecture} SAE needs encoder weights and biases; the source has none.")
            sae.W_enc.copy_(W_enc)
            sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    sae.load_extra_tensors(extra or {})
    if not apply_b_dec_to_input and not has_flag:
        sae.fold_b_dec_into_encoder()
    return sae


def record_source(sae: SAE, layout: str, path: Path | str, *, hook: str | None = None, model: str | None = None,
                  l0: float | None = None, **facts) -> SAE:
    """Store what the source says about itself in cfg.metadata["source"] (checked by `saewb import`)."""
    sae.cfg.metadata["source"] = {"layout": layout, "path": str(path), "hook": hook, "model": model, "l0": l0,
                                  **facts}
    if hook and not sae.cfg.hook_name:
        sae.cfg.hook_name = hook
    if model and not sae.cfg.model_name:
        sae.cfg.model_name = model
    return sae
