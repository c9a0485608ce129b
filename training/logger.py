"""Run metrics: always to `metrics.jsonl` in each SAE's run folder (the source of truth the app reads), and
mirrored to Weights & Biases when it is on (offline by default; wandb is imported only here, lazily).

Records arrive every step with their losses and metrics still on the device (training.trainer.StepRecord); they are
buffered and read back in one transfer at each W&B step (`to_wandb`), at `flush` and at `close`, so logging every
step to metrics.jsonl costs no device sync per step.
"""
import json
import os
from pathlib import Path

import torch

WANDB_MODES = ("offline", "online", "off")
MAX_PENDING = 1000
"""Buffered lines written out even between W&B steps (a long --log-every does not hold records without bound)."""


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
        self.pending: list[tuple[str, dict]] = []  # (SAE name, line) not yet read back and written
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
        """records: {sae name: {metric: number or 0-dim tensor}} for one step; `extra` (throughput) goes to every
        file. Buffered; written (and this step sent to W&B) when `to_wandb`, or at flush/close."""
        for name, record in records.items():
            self.pending.append((name, {k: v for k, v in record.items() if not k.startswith("_")} | (extra or {})))
        if to_wandb or len(self.pending) >= MAX_PENDING:
            lines = self._write_pending()
            if self.run is not None and to_wandb:
                payload = {}
                for name, line in lines[-len(records):] if records else []:
                    payload.update({self.key(name, k): v for k, v in line.items() if k != "step"})
                self.run.log(payload, step=step)

    def _write_pending(self) -> list[tuple[str, dict]]:
        """Read the buffered lines back in one transfer and append them to their files; returns them."""
        from training.trainer import to_host

        pending, self.pending = self.pending, []
        lines = list(zip([name for name, _ in pending], to_host([line for _, line in pending])))
        for name, line in lines:
            if name in self.files:
                self.files[name].write(json.dumps(line) + "\n")
        return lines

    def log_histograms(self, name: str, per_token_l0: torch.Tensor, log10_density: torch.Tensor, step: int) -> None:
        """Per-token L0 (variable-sparsity variants) and feature density histograms, to W&B only."""
        if self.run is None:
            return
        import wandb

        self.run.log({self.key(name, "per_token_l0"): wandb.Histogram(per_token_l0.float().cpu().numpy()),
                      self.key(name, "log10_feature_density"): wandb.Histogram(log10_density.float().cpu().numpy())},
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
        self._write_pending()
        for handle in self.files.values():
            handle.flush()

    def close(self) -> None:
        try:
            self._write_pending()
        finally:
            for handle in self.files.values():
                handle.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
