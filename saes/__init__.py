"""The SAE family: pure torch modules, one per file, registered by name in ARCHITECTURES.

    sae = build_sae("topk", d_in=576, d_sae=2304, k=32)
    save_sae(sae, "runs/demo")            # SAELens layout: cfg.json + sae_weights.safetensors
    sae = load_sae("runs/demo")
"""
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
from saes.gradient import GradientTopKConfig, GradientTopKSAE
from saes.mp import MPConfig, MPSAE, SignedMPConfig, SignedMPSAE
from saes.topk import TopKConfig, TopKSAE
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
}


def sae_class(architecture: str) -> type[SAE]:
    """The registered class for a name, or a ValueError that lists the registered names."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"Unknown SAE architecture {architecture!r}; registered architectures: {known}.") from None


def build_sae(architecture: str, seed: int | None = 0, **fields) -> SAE:
    """A freshly initialised SAE of the named architecture; `fields` fill its config dataclass."""
    cls = sae_class(architecture)
    return cls(cls.config_cls(**fields), seed=seed)


def load_sae(path: str | Path, architecture: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by `save_sae`. Pass `architecture` to insist on one."""
    raw = read_cfg(path)
    name = architecture_of(raw)
    if architecture is not None and name != architecture:
        raise ValueError(
            f"{path} holds a {name!r} SAE, not {architecture!r}: load it with architecture={name!r} "
            "or point at a checkpoint of the architecture you want."
        )
    cls = sae_class(name)
    fields = raw.get("saewb", {}).get("config") or {k: v for k, v in raw.items() if k != "metadata"}
    cfg = cls.config_cls.from_dict(fields)
    sae = cls(cfg, seed=None)
    return load_state(sae, path, device)


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "ThresholdCalibrator", "TopKConfig", "TopKSAE",
           "build_sae", "calibrate_thresholds", "load_sae", "sae_class", "save_sae"]
