"""Run metrics: always to `metrics.jsonl` in each SAE's run folder (the source of truth the app reads), and
mirrored to Weights & Biases when it is on (offline by default; wandb is imported only here, lazily).
"""
import json
import os
from pathlib import Path

import torch

WANDB_MODES = ("offline", "online", "off")


class RunLogger:
    """One JSONL file per SAE and one W&B run per job (metric keys prefixed with the SAE name when several)."""

    def __init__(self, folders: dict[str, Path], config: dict, *, wandb_mode: str = "offline", project: str = "saewb",
                 run_name: str = "run", wandb_dir: Path | None = None, resume_id: str | None = None,
                 resume_step: int | None = None):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}.")
        self.files = {}
        for name, folder in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "metrics.jsonl"
            kept = []
            if resume_step is not None and path.is_file():  # drop lines logged after the checkpoint we resume from
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < resume_step]
            self.files[name] = open(path, "w")
            self.files[name].writelines(line + "\n" for line in kept)
        self.prefix = len(folders) > 1
        self.run = None
        if wandb_mode != "off":
            os.environ["WANDB_MODE"] = wandb_mode  # the env var (not only init's mode=) also silences analytics
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run = wandb.init(project=project, name=run_name, config=config, dir=str(wandb_dir or "."),
                                  id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous")

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def key(self, name: str, metric: str) -> str:
        return f"{name}/{metric}" if self.prefix else metric

    def log(self, records: dict[str, dict], step: int, extra: dict | None = None, to_wandb: bool = True) -> None:
        """records: {sae name: {metric: float}} for one step; `extra` (throughput) goes to every file."""
        payload = {}
        for name, record in records.items():
            line = {k: v for k, v in record.items() if not k.startswith("_")} | (extra or {})
            self.files[name].write(json.dumps(line) + "\n")
            payload.update({self.key(name, k): v for k, v in line.items() if k != "step"})
        if self.run is not None and to_wandb:
            self.run.log(payload, step=step)

    def log_histograms(self, name: str, per_token_l0: torch.Tensor, log10_density: torch.Tensor, step: int) -> None:
        """Per-token L0 (variable-sparsity variants) and feature density histograms, to W&B only."""
        if self.run is None:
            return
        import wandb

        self.run.log({self.key(name, "per_token_l0"): wandb.Histogram(per_token_l0.float().numpy()),
                      self.key(name, "log10_feature_density"): wandb.Histogram(log10_density.float().numpy())},
                     step=step)

    def log_artifact(self, name: str, folder: Path) -> None:
        """The final SAE folder as a W&B model artifact."""
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=f"sae-{self.run.id}-{name}", type="model")
        for file in ("cfg.json", "sae_weights.safetensors"):
            artifact.add_file(str(folder / file))
        self.run.log_artifact(artifact)

    def flush(self) -> None:
        for handle in self.files.values():
            handle.flush()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
