"""The SAE family: pure torch modules, one per file, registered by name in ARCHITECTURES.

    sae = build_sae("topk", d_in=576, d_sae=2304, k=32)
    save_sae(sae, "runs/demo")            # SAELens layout: cfg.json + sae_weights.safetensors
    sae = load_sae("runs/demo")
"""
import json
from pathlib import Path

import torch

from saes.base import SAE, SAEConfig, SAEOutput
from saes.io import architecture_of, load_state, read_cfg, save_sae
from saes.abstopk import AbsTopKConfig, AbsTopKSAE
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saes.relu_l1 import ReLUL1Config, ReLUL1SAE
from saes.hierarchical_topk import HierarchicalTopKConfig, HierarchicalTopKSAE
from saes.choice import FeatureChoiceConfig, FeatureChoiceSAE, MutualChoiceConfig, MutualChoiceSAE
from saes.gated import GatedConfig, GatedSAE
from saes.gradient import GradientTopKConfig, GradientTopKSAE
from saes.mp import MPConfig, MPSAE, SignedMPConfig, SignedMPSAE
from saes.topk import TopKConfig, TopKSAE
from saes.matryoshka import MatryoshkaBatchTopKConfig, MatryoshkaBatchTopKSAE
from saes.top_afa import TopAFAConfig, TopAFASAE
from saes.gba import GBAConfig, GBASAE
from saes.thresholds import ThresholdCalibrator, calibrate_thresholds

ARCHITECTURES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "relu_l1": ReLUL1SAE,
    "abstopk": AbsTopKSAE,
    "matching_pursuit": MPSAE,
    "matching_pursuit_signed": SignedMPSAE,
    "gradient_topk": GradientTopKSAE,
    "hierarchical_topk": HierarchicalTopKSAE,
    "mutual_choice": MutualChoiceSAE,
    "feature_choice": FeatureChoiceSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "top_afa": TopAFASAE,
    "gba": GBASAE,
}
"""The trainable family."""

INFERENCE_ONLY: dict[str, type[SAE]] = {"gated": GatedSAE}
"""Classes that exist to load other libraries' SAEs (SAELens and dictionary_learning gated); the trainer refuses them."""


def sae_class(architecture: str) -> type[SAE]:
    """The registered class for a name, or a ValueError that lists the registered names."""
    try:
        return ARCHITECTURES.get(architecture) or INFERENCE_ONLY[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES | INFERENCE_ONLY))
        raise ValueError(f"Unknown SAE architecture {architecture!r}; registered architectures: {known}.") from None


def build_sae(architecture: str, seed: int | None = 0, **fields) -> SAE:
    """A freshly initialised SAE of the named architecture; `fields` fill its config dataclass."""
    cls = sae_class(architecture)
    return cls(cls.config_cls(**fields), seed=seed)


def load_sae(source: str | Path, architecture: str | None = None, device: str | torch.device = "cpu",
             layout: str | None = None, **options) -> SAE:
    """Load an SAE: a folder written by `save_sae`, or any layout of saes.formats (SAELens, sparsify, Gemma Scope,
    Llama Scope, dictionary_learning, OpenAI), local or `hf:ORG/REPO/PATH`. Pass `architecture` to insist on one,
    `layout` to skip detection; `options` reach the layout loader (e.g. input_scale=)."""
    from saes.formats import hub, load_layout

    path = hub.download(source) if hub.is_hub(source) else Path(source).expanduser()
    if layout is None and is_native(path):
        raw = read_cfg(path)
        name = architecture_of(raw)
        cls = sae_class(name)
        cfg = cls.config_cls.from_dict(raw["saewb"]["config"])
        sae = load_state(cls(cfg, seed=None), path, device)
    else:
        sae = load_layout(path, layout, **options).to(device)
    if architecture is not None and sae.architecture != architecture:
        raise ValueError(
            f"{source} holds a {sae.architecture!r} SAE, not {architecture!r}: load it with "
            f"architecture={sae.architecture!r} or point at a checkpoint of the architecture you want."
        )
    return sae


def is_native(path: Path) -> bool:
    """A folder written by this workbench (`save_sae`): its cfg.json has a "saewb" section with our config."""
    cfg = path / "cfg.json"
    try:
        return path.is_dir() and cfg.is_file() and "config" in json.loads(cfg.read_text()).get("saewb", {})
    except (OSError, ValueError):
        return False


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "ThresholdCalibrator", "TopKConfig", "TopKSAE",
           "build_sae", "calibrate_thresholds", "load_sae", "sae_class", "save_sae"]
