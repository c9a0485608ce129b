"""Run metrics: always to `metrics.jsonl` in each SAE's run folder (the source of truth the app reads), and
mirrored to Weights & Biases when it is on (offline by default; wandb is imported only here, lazily).

Records arrive every step with their losses and metrics still on the device (training.trainer.StepRecord); they are
buffered and read back in one transfer at each W&B step (`to_wandb`), at `flush` and at `close`, so logging every
step to metrics.jsonl costs no device sync per step.
"""
import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path

import torch

from training.activation_store import write_error

WANDB_MODES = ("offline", "online", "off")
MAX_PENDING = 1000
"""Buffered lines written out even between W&B steps (a long --log-every does not hold records without bound)."""


class RunLogger:
    """One JSONL file per SAE and one W&B run per job (metric keys prefixed with the SAE name when several)."""

    def __init__(self, folders: dict[str, Path], config: dict, *, wandb_mode: str = "offline", project: str = "saewb",
                 run_name: str = "run", wandb_dir: Path | None = None, resume_id: str | None = None,
                 resume_step: int | None = None, wandb_resume_step: int | None = None):
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
        self.run, self.earlier = None, []
        if wandb_mode != "off":  # resume_id continues that run, from wandb_resume_step (default resume_step) on
            self.run, self.earlier = wandb_init(
                wandb_mode, project=project, name=run_name, config=config, wandb_dir=wandb_dir or Path("."),
                resume_id=resume_id, resume_step=resume_step if wandb_resume_step is None else wandb_resume_step)

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
                with self.writing(name):
                    self.files[name].write(json.dumps(line) + "\n")
        return lines

    @contextlib.contextmanager
    def writing(self, name: str):
        """A failed metrics write (a full disk) as one sentence naming the file, not a bare errno."""
        try:
            yield
        except OSError as error:
            path = Path(self.files[name].name)
            raise write_error(error, path, f"the last checkpoint is kept; free space in {path.parent} and run the "
                                           "same command again to resume from it") from None

    def log_histograms(self, name: str, per_token_l0: torch.Tensor, log10_density: torch.Tensor, step: int,
                       silent: int | None = None) -> None:
        """Per-token L0 (variable-sparsity variants) and feature density histograms, to W&B only; `silent`, the
        latents that never fired over the window (left out of the log10 density), as silent_latents."""
        if self.run is None:
            return
        import wandb

        payload = {self.key(name, "per_token_l0"): wandb.Histogram(per_token_l0.float().cpu().numpy())}
        if log10_density.numel():  # no latent fired over the window: nothing to bin
            payload[self.key(name, "log10_feature_density")] = wandb.Histogram(log10_density.float().cpu().numpy())
        if silent is not None:
            payload[self.key(name, "silent_latents")] = silent
        self.run.log(payload, step=step)

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
        for name, handle in self.files.items():
            with self.writing(name):
                handle.flush()

    def close(self) -> None:
        try:
            self._write_pending()
        finally:
            for name, handle in self.files.items():
                with self.writing(name):
                    handle.close()
        if self.run is not None:
            finish_wandb(self.run, self.earlier)
            self.run = None


# ---- one W&B run per job, also offline -------------------------------------------------------------------------
def read_wandb_id(run_dir: Path) -> str | None:
    """The job's W&B run id (run_dir/wandb_id.txt, written when its W&B run starts), or None."""
    path = Path(run_dir) / "wandb_id.txt"
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def offline_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline folders of run `run_id` under wandb_dir/wandb, oldest first. wandb names them
    offline-run-<YYYYmmdd_HHMMSS>-<id>, and appends -1, -2, ... when a run of that id started in the same second."""
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for path in Path(wandb_dir, "wandb").glob(f"offline-run-*-{glob.escape(run_id)}*"):
        match = pattern.fullmatch(path.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def wandb_init(mode: str, *, project: str, name: str, config: dict | None, wandb_dir: Path,
               resume_id: str | None = None, resume_step: int | None = None, job_type: str | None = None):
    """(run, earlier folders): wandb.init, continuing run `resume_id` when given (resume='allow').

    Online, W&B continues that run. Offline, wandb cannot resume: it starts a new folder with the same id, and
    `wandb sync` of the two keeps only one of them. So the newest earlier folder of that id that reads back is
    replayed into the new run (history rows up to W&B step `resume_step`, the trainer's step at the checkpoint,
    or all when None; scalars, histograms, tables, HTML and plotly media; its config under the new one), and
    `finish_wandb` deletes the earlier folders once the new run has finished: one folder holds the whole run. A job
    killed before that keeps both; the next one replays the newest that reads back."""
    os.environ["WANDB_MODE"] = mode  # the env var (not only init's mode=) also silences analytics
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    earlier = offline_folders(wandb_dir, resume_id) if resume_id and mode == "offline" else []
    rows, old_config, source = [], {}, None
    for folder in reversed(earlier):
        try:
            from training.wandb_offline import read_history

            old_config, rows = read_history(next(folder.glob("run-*.wandb")))
            source = folder
            break
        except Exception:  # truncated by a kill, or no .wandb file: try an older one
            continue
    old_config = {k: v for k, v in old_config.items() if not k.startswith("_")}
    run = wandb.init(project=project, name=name, config=old_config | (config or {}), dir=str(wandb_dir),
                     id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous", job_type=job_type)
    current = Path(run.dir).parent
    earlier = [f for f in earlier if f.resolve() != current.resolve()]
    if source is not None:
        for row in rows:
            step = row.get("_step")
            if step is None or (resume_step is not None and step > resume_step):
                continue
            payload = {k: v for k, v in ((k, replay_value(v, source / "files")) for k, v in media_grouped(row).items()
                                         if not k.startswith("_")) if v is not None}
            if payload:
                run.log(payload, step=step)
    return run, earlier


def media_grouped(row: dict) -> dict:
    """A history row read back with media flattened ('x/_type', 'x/values', ...) with each medium as one dict again."""
    media = sorted((k[:-len("/_type")] for k in row if k.endswith("/_type")), key=len, reverse=True)
    grouped: dict = {}
    for key, value in row.items():
        prefix = next((m for m in media if key.startswith(m + "/")), None)
        if prefix is None:
            grouped[key] = value
        else:
            grouped.setdefault(prefix, {})[key[len(prefix) + 1:]] = value
    return grouped


def replay_value(value, files: Path):
    """A history value read back from an offline run, as something run.log takes again (None: not replayable)."""
    if not isinstance(value, dict) or "_type" not in value:
        return value
    import wandb

    kind = value["_type"]
    try:
        if kind == "histogram":
            return wandb.Histogram(np_histogram=(value["values"], value["bins"]))
        path = files / value["path"]
        if kind == "html-file":
            return wandb.Html(path.read_text())
        if kind == "table-file":
            data = json.loads(path.read_text())
            return wandb.Table(columns=data["columns"], data=data["data"])
        if kind == "plotly-file":
            import plotly.io

            return wandb.Plotly(plotly.io.from_json(path.read_text()))
    except (KeyError, OSError, ValueError):
        return None
    return None


def finish_wandb(run, earlier: list[Path]) -> None:
    """Finish the run (offline: until its file is complete), then remove the earlier offline folders of its id
    (their history is in this one)."""
    folder = Path(run.dir).parent if getattr(run, "dir", None) else None
    offline = getattr(getattr(run, "settings", None), "mode", None) == "offline"
    run.finish()
    if offline and folder is not None:
        from training.wandb_offline import wait_until_written

        wait_until_written(folder)
    for folder in earlier:
        shutil.rmtree(folder, ignore_errors=True)
