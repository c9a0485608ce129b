"""`saewb`: the workbench's command line. Thin: parse a typed config (tyro), call the library.

    saewb cache --model tiny --hooks blocks.1.hook_resid_post --tokens 20000
    saewb train --cache.model tiny --cache.hooks blocks.1.hook_resid_post --run-dir runs/tiny
    saewb demo
    saewb eval runs/demo;  saewb features runs/demo;  saewb app runs;  saewb circuits --run-dir runs/demo
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Union

import tyro

from analysis.circuit_graph import CircuitsConfig
from analysis.eval_compare import EvalConfig
from analysis.features import FeaturesConfig, run_features
from training.caching import CacheConfig
from training.importing import ImportConfig
from training.run import TrainConfig


@dataclass
class DemoConfig:
    """Cache ~200k tokens of the embedded model at a middle layer, train a TopK SAE (4x width, k=32), print its
    report card, build its feature store and the command that opens the app. A second run reuses everything."""

    model: str = "smollm2"
    """Model to cache ('smollm2' embedded, 'tiny' for a seconds-long trial)."""
    hook: str | None = None
    """Hook; default the residual stream after the middle block."""
    tokens: int = 204_800
    """Tokens to cache (10 shards of 20,480; the last shard is held out for evaluation)."""
    dtype: str = "auto"
    """Dtype the model runs in while caching: 'auto' is bfloat16 where the hardware has it (a GPU, or a CPU with
    AVX512-BF16/AMX: ~3x faster) and float32 elsewhere (bf16 is ~20x slower on an AVX2-only CPU); or name one."""
    run_dir: Path = Path("runs/demo")
    """Run folder to write."""

    def train_config(self, n_layers: int) -> TrainConfig:
        from training.caching import default_hook

        hook = self.hook or default_hook(n_layers)
        dtype = fast_dtype() if self.dtype == "auto" else self.dtype
        cache = CacheConfig(model=self.model, hooks=[hook], tokens=self.tokens, dtype=dtype,  # type: ignore[arg-type]
                            shard_tokens=20_480)
        return TrainConfig(cache=cache, architectures=["topk"], k=[32], expansion=4, batch_size=1024, epochs=4,
                           checkpoint_every=0, run_dir=self.run_dir)


def fast_dtype(device: str = "cpu") -> str:
    """bfloat16 where matmuls run natively in it (CUDA; CPUs with AVX512-BF16 or AMX), else float32."""
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def n_layers_of(model_name: str) -> int:
    from training.caching import model_layers

    return model_layers(model_name)


def run_cache(cfg: CacheConfig) -> None:
    from training.caching import cache_activations

    folder = cache_activations(cfg, verify=True)  # "ready" means every shard matches its checksum
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"Cache ready: {folder}")
    for hook, stats in manifest["stats"].items():
        print(f"  {hook}: {stats['n_tokens']} tokens, {stats['n_kept']} kept for training "
              f"({stats['n_special']} special, {stats['n_outliers']} outliers), median norm {stats['median_norm']:.3g}")


def run_train(cfg: TrainConfig) -> None:
    from training.run import train

    from training.run import sae_folders

    summaries = train(cfg)
    folders = sae_folders(cfg)
    for name, summary in summaries.items():
        done = "Already trained; " if summary.get("skipped") else ""
        print(f"{done}SAE {summary['architecture']} saved in {folders[name]} (SAELens layout: cfg.json + "
              "sae_weights.safetensors)")
        rate = summary["train_tokens"] / max(summary["this_sae_seconds"], 1e-9)
        if "fvu" in summary:
            print(f"  FVU {summary['fvu']:.4f} on {summary['eval_split']}, L0 {summary['l0']:.2f}, never-fired "
                  f"latents {100 * summary['never_fired_frac']:.1f}% over {summary['eval_tokens']} tokens; "
                  f"trained {summary['train_tokens']} tokens ({rate:.0f} tok/s in SAE steps)")


def run_eval(cfg: EvalConfig) -> None:
    from analysis.eval_compare import run_eval as evaluate_runs

    evaluate_runs(cfg)


@dataclass
class AppConfig:
    """Start the workbench app (Streamlit) on a folder of runs; open the printed address in a browser."""

    runs_dir: tyro.conf.Positional[Path] = Path("runs")
    """Folder searched for run folders (cfg.json + sae_weights.safetensors)."""
    port: int = 8501
    """Port to listen on (127.0.0.1 only)."""


def app_command(cfg: AppConfig) -> list[str]:
    script = Path(__file__).resolve().parent / "streamlit_app.py"
    return [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
            "--server.address", "127.0.0.1", "--server.port", str(cfg.port), "--browser.gatherUsageStats", "false",
            "--", str(cfg.runs_dir)]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (nothing else listens there)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def run_app(cfg: AppConfig) -> None:
    import subprocess

    from analysis.store import list_runs

    if not cfg.runs_dir.exists():
        raise ValueError(f"{cfg.runs_dir} is missing: pass the folder holding your runs (e.g. runs).")
    if not cfg.runs_dir.is_dir():
        raise ValueError(f"{cfg.runs_dir} is not a folder: pass the folder holding your runs (e.g. runs).")
    if not list_runs(cfg.runs_dir):
        raise ValueError(f"No runs under {cfg.runs_dir} (no folder with cfg.json + sae_weights.safetensors): train one "
                         "with `saewb demo` or `saewb train`, or pass the folder holding your runs.")
    if not 0 < cfg.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {cfg.port}.")
    if not port_free(cfg.port):
        raise OSError(f"Port {cfg.port} is in use on 127.0.0.1 (another saewb app or server?): pass another --port, "
                      "or stop the one using it.")
    print(f"saewb app on http://127.0.0.1:{cfg.port} for runs under {cfg.runs_dir} (Ctrl-C to stop)")
    env = os.environ | {"SAEWB_RUNS_DIR": str(cfg.runs_dir.resolve())}
    result = subprocess.run(app_command(cfg), check=False, env=env)
    if result.returncode not in (0, -2, 130):  # -2 / 130: stopped with Ctrl-C
        raise RuntimeError(f"streamlit stopped with exit status {result.returncode} (its messages are above).")


def run_circuits(cfg: CircuitsConfig) -> None:
    from analysis.circuit_graph import run_circuits as find_circuit

    find_circuit(cfg)


def newer_than_weights(path: Path, run_dir: Path) -> bool:
    """True when `path` exists and was written after the run's SAE (so a rerun can reuse it)."""
    weights = run_dir / "sae_weights.safetensors"
    return path.is_file() and path.stat().st_mtime >= weights.stat().st_mtime


def run_demo(cfg: DemoConfig) -> None:
    from analysis.evals import format_report, report_card
    from analysis.features import build_features

    train_cfg = cfg.train_config(n_layers_of(cfg.model))
    print(f"Demo: {cfg.model}, hook {train_cfg.cache.hooks[0]}, {cfg.tokens} tokens, TopK SAE 4x k=32 -> {cfg.run_dir}")
    run_train(train_cfg)
    run_dir = Path(cfg.run_dir)
    card_path = run_dir / "eval" / "metrics.json"
    card = json.loads(card_path.read_text()) if newer_than_weights(card_path, run_dir) else {}
    fresh = "convention" not in card.get("eval", {})  # missing, stale, or written before the conventions: redo it
    if fresh:
        card = report_card(run_dir, max_contexts=16)  # 16 contexts keep the downstream passes to about a minute
    print("\nReport card (held-out tokens):\n" + format_report(card))
    if fresh and train_cfg.wandb != "off":
        from analysis.eval_compare import log_card_wandb

        if log_card_wandb(run_dir, card, train_cfg.wandb, train_cfg.wandb_project):
            print(f"Report card logged to the run's W&B run ({train_cfg.wandb}; folder {run_dir / 'wandb'}).")
    if not newer_than_weights(run_dir / "features" / "index.json", run_dir):
        build_features(FeaturesConfig(run_dir=run_dir))
    print(f"\nFeature store ready in {run_dir / 'features'}. Browse the features with:\n"
          f"    saewb app {run_dir.parent}        (or: make app)")


def run_import(cfg: ImportConfig) -> None:
    from training.importing import import_sae

    folder = import_sae(cfg)
    print(f"Imported into {folder}: use it like a trained run, e.g. `saewb eval {folder}`, `saewb features {folder}`, "
          f"`saewb app {folder.parent}`.")


@dataclass
class ExportConfig:
    """Write a run's SAE in another library's layout: 'saelens' (SAE.load_from_disk) or 'sparsify'
    (SparseCoder.load_from_disk; TopK family only)."""

    run_dir: tyro.conf.Positional[Path]
    """Run folder (cfg.json + sae_weights.safetensors)."""
    format: str = "saelens"
    """'saelens' or 'sparsify'."""
    out: Path | None = None
    """Folder to write; default RUN_DIR/export-FORMAT."""


def run_export(cfg: ExportConfig) -> None:
    from saes.formats.export import export_run

    folder = export_run(cfg.run_dir, cfg.format, cfg.out)
    print(f"Exported {cfg.run_dir} as {cfg.format} into {folder}")


# name -> (typed config, handler, one-line description). Adding a command is one entry here.
COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "cache": (CacheConfig, run_cache, "Cache activations of a model at one or more hooks (content-addressed, resumable)."),
    "train": (TrainConfig, run_train, "Train SAEs on cached activations (caching them first when missing); several "
                                      "architectures, k values and hooks train on the same batches."),
    "eval": (EvalConfig, run_eval, "Evaluate trained SAEs (FVU with and without outlier tokens, L0, dead latents, CE "
                                   "loss recovered, KL score, delta LM loss under SAEBench's and the special-masked "
                                   "convention, budget curves; 95% bootstrap intervals) and compare runs in a table "
                                   "and plots."),
    "demo": (DemoConfig, run_demo,
             "The whole slice on the embedded model: cache, train a TopK SAE, report card, feature store."),
    "features": (FeaturesConfig, run_features, "Build a run's feature store (top contexts, quantile samples, "
                                               "histograms, density, logit lens, neighbours) in RUN_DIR/features."),
    "circuits": (CircuitsConfig, run_circuits, "Find a sparse feature circuit for a task (ioi, "
                 "greater_than, sva) with a run's SAE on discovery prompts and score its faithfulness and "
                 "completeness on held-out ones: RUN_DIR/circuits/graph.json + a layered figure."),
    "import": (ImportConfig, run_import, "Import a published SAE (SAELens, sparsify, Gemma Scope, Llama Scope, "
               "dictionary_learning, OpenAI; a path or hf:ORG/REPO/PATH), check its FVU and L0 on the model, and "
               "write a run folder every command and app page uses."),
    "export": (ExportConfig, run_export, "Write a run's SAE in SAELens's or sparsify's layout."),
    "app": (AppConfig, run_app,
            "Start the Streamlit workbench (runs, feature browser, live text, steering, circuits) on RUNS_DIR."),
}


READ_FOLDERS = {"eval": "runs", "features": "run_dir", "circuits": "run_dir", "export": "run_dir"}
"""Commands that read a folder that must exist already (the others create theirs)."""


def check_folders(name: str, cfg) -> None:
    """A folder a command reads that does not exist is called missing (not 'holds no SAE')."""
    field = READ_FOLDERS.get(name)
    values = getattr(cfg, field, None) if field else None
    for path in values if isinstance(values, list) else [values] if values is not None else []:
        if not Path(path).exists():
            raise ValueError(f"{path} is missing: pass a run folder written by `saewb train` (cfg.json + "
                             "sae_weights.safetensors).")


def model_of(cfg) -> str | None:
    """The model a command will load, if any (to keep local models off the hub)."""
    if hasattr(cfg, "cache") and isinstance(cfg.cache, CacheConfig):
        return cfg.cache.model
    return getattr(cfg, "model", None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    subcommands = [Annotated[config, tyro.conf.subcommand(name, description=text)]
                   for name, (config, _, text) in COMMANDS.items()]
    cfg = tyro.cli(
        Union[tuple(subcommands)],  # type: ignore[valid-type]
        args=args, prog="saewb",
        description="SAE workbench: cache activations, train SAEs, evaluate them, build feature stores, browse "
                    "and steer in the app, find circuits.",
    )
    from training.model import is_local

    model = model_of(cfg)
    if model is not None and is_local(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    name, handler = next((name, handler) for name, (config, handler, _) in COMMANDS.items() if type(cfg) is config)
    try:
        check_folders(name, cfg)
        handler(cfg)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as error:  # user-fixable: one sentence
        print(f"saewb: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("saewb: interrupted; finished shards and checkpoints are kept, run the same command to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
