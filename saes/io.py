"""Save and load SAEs in the SAELens folder layout: `cfg.json` + `sae_weights.safetensors`.

SAELens stores `W_enc` as [d_in, d_sae]; we keep [d_sae, d_in] in memory and transpose at the boundary.
Our own fields live under `cfg.json["saewb"]`, so SAELens ignores them. Files are written under temporary
names and renamed into place, so an interrupted save never leaves a half-written file.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from saes.base import SAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
FORMAT_VERSION = 1


def saelens_cfg(sae: "SAE") -> dict:
    """The cfg.json dict: SAELens's fields at the top level, ours under "saewb"."""
    cfg = sae.cfg
    data = {
        "architecture": sae.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": cfg.model_name, "hook_name": cfg.hook_name, **cfg.metadata},
        "saewb": {"format_version": FORMAT_VERSION, "architecture": sae.architecture, "signed": sae.signed,
                  "config": cfg.to_dict()},
    }
    # A variant adds SAELens's own fields (e.g. "k") or its SAELens name (relu_l1 is "standard") here.
    data.update(sae.saelens_extra_cfg() if hasattr(sae, "saelens_extra_cfg") else {})
    return data


SAELENS_NAMES = {"standard": "relu_l1"}
"""SAELens architecture names that differ from ours, for folders written by SAELens itself."""


def architecture_of(raw: dict) -> str:
    """Our architecture name for a cfg.json: the "saewb" section's, else the SAELens name mapped to ours."""
    ours = raw.get("saewb", {}).get("architecture")
    if ours:
        return ours
    name = raw.get("architecture", "")
    return SAELENS_NAMES.get(name, name)


def replace_files(path: Path, write) -> Path:
    """Call write(tmp_dir), then move each file it wrote into `path`, weights before cfg.json.

    Other files already in `path` (a run folder's config and metrics) are left alone. A save interrupted
    before the renames leaves the previous SAE intact; the temporary folder is removed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sae.tmp-", dir=path))
    try:
        write(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: n == CFG_NAME):  # cfg.json last
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_sae(sae: "SAE", path: str | Path, *, fold: bool = True) -> Path:
    """Write the SAE folder. fold=True exports for inference (normalisation scalar folded, §1.1);
    fold=False keeps the training state as is (checkpoints that will be trained further)."""
    target = sae.export_inference() if fold else sae
    encoder = {} if target.tied else {  # a tied SAE (MP) has no encoder tensors, as in SAELens
        "W_enc": target.W_enc.detach().T.contiguous(),  # SAELens layout [d_in, d_sae]
        "b_enc": target.b_enc.detach().contiguous(),
    }
    tensors = {
        **encoder,
        "W_dec": target.W_dec.detach().contiguous(),
        "b_dec": target.b_dec.detach().contiguous(),
        **{name: t.detach().contiguous() for name, t in target.extra_tensors().items()},
    }
    cfg = saelens_cfg(target)

    def write(tmp: Path) -> None:
        save_file({name: t.cpu() for name, t in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CFG_NAME).write_text(json.dumps(cfg, indent=2))

    return replace_files(Path(path), write)


def read_cfg(path: str | Path) -> dict:
    """cfg.json of an SAE folder, with a clear error when the folder is not one."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{path} is not an SAE folder: it needs {CFG_NAME} and {WEIGHTS_NAME}. "
            "Point at a run folder written by `saewb train` (or its final/ or checkpoints/ subfolder)."
        )
    return json.loads(cfg_path.read_text())


def load_state(sae: "SAE", path: str | Path, device: str | torch.device = "cpu") -> "SAE":
    """Fill `sae` with the tensors stored at `path`."""
    tensors = load_file(str(Path(path) / WEIGHTS_NAME), device=str(device))
    with torch.no_grad():
        if not sae.tied:
            sae.W_enc.copy_(tensors.pop("W_enc").T)
            sae.b_enc.copy_(tensors.pop("b_enc"))
        sae.W_dec.copy_(tensors.pop("W_dec"))
        sae.b_dec.copy_(tensors.pop("b_dec"))
    sae.load_extra_tensors(tensors)
    return sae.to(device)
