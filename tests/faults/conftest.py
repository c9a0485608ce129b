"""Fault injection on real `saewb` processes (tiny model): SIGKILL at chosen points, corrupted files, a full disk
(RLIMIT_FSIZE in the child), two jobs at once. Every kill point is chosen by a fixed seed and observed through files
or failpoints ($SAEWB_FAILPOINT, training.activation_store.failpoint), never through wall-clock time.

The uninterrupted references run in this process through `app.cli.main` (the same code path as the command, one
torch thread like the children), once per session; every faulted job is compared with them.
"""
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.activation_store import file_sha256

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
SEED = 20240611  # kill points are drawn from it, per named point, so selecting tests with -k changes none
CHILD_TIMEOUT = 600  # a safety net against a hung child, never an assertion
CACHE_ARGS = ["--model", "tiny", "--hooks", HOOK, "--tokens", "16384", "--context-length", "64",
              "--shard-tokens", "512"]  # 32 shards of 8 contexts
N_SHARDS = 32
CHECKPOINT_EVERY_STEPS = 4  # --checkpoint-every 1024 tokens at --batch-size 256
TIMING = ("tokens_per_s", "data_s", "sae_s", "sae_seconds", "data_seconds", "this_sae_seconds")


def kill_point(name: str, low: int, high: int) -> int:
    """The seeded kill point `name`, in [low, high]."""
    return random.Random(f"{SEED}:{name}").randint(low, high)


def cache_argv(out: Path) -> list[str]:
    return ["cache", *CACHE_ARGS, "--out", str(out)]


def train_argv(cache: Path, run_dir: Path) -> list[str]:
    cache_part = [("--cache." + a[2:]) if a.startswith("--") else a for a in CACHE_ARGS]
    return ["train", *cache_part, "--cache.out", str(cache), "--k", "8", "--expansion", "2", "--batch-size", "256",
            "--checkpoint-every", "1024", "--wandb", "off", "--loop.lr", "1e-3", "--loop.warmup-steps", "5",
            "--run-dir", str(run_dir)]


def eval_argv(run_dir: Path, out: Path) -> list[str]:
    return ["eval", str(run_dir), "--out", str(out), "--max-contexts", "4", "--bootstrap", "50"]


def features_argv(run_dir: Path) -> list[str]:
    return ["features", str(run_dir), "--no-progress"]


# ---- child processes -------------------------------------------------------------------------------------------
def child_env(failpoint: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SAEWB_FAILPOINT"}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if failpoint:
        env["SAEWB_FAILPOINT"] = failpoint
    return env


def file_size_limit(limit: int):
    """preexec_fn: files the child writes may not grow past `limit` bytes (EFBIG, as a full disk gives ENOSPC)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing write()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        """The last line of stderr (progress bars' carriage returns count as line ends)."""
        lines = [line for line in self.err.replace("\r", "\n").splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def errors(self) -> list[str]:
        """Lines the command wrote as `saewb: ...` (errors and notes)."""
        return [line for line in self.err.replace("\r", "\n").splitlines() if line.startswith("saewb:")]


def start(argv: list[str], logs: Path, *, failpoint: str | None = None, fsize: int | None = None):
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    out, err = open(logs / f"{n}.out", "w"), open(logs / f"{n}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], cwd=ROOT, env=child_env(failpoint),
                            stdout=out, stderr=err, preexec_fn=file_size_limit(fsize) if fsize else None)
    proc.logs = (logs / f"{n}.out", logs / f"{n}.err", out, err)
    return proc


def finish(proc) -> Result:
    proc.wait(timeout=CHILD_TIMEOUT)
    out_path, err_path, out, err = proc.logs
    out.close(), err.close()
    return Result(proc.returncode, out_path.read_text(), err_path.read_text())


def saewb(argv: list[str], logs: Path, **kwargs) -> Result:
    """Run `python -m app.cli ARGV` to the end (or to its failpoint)."""
    return finish(start(argv, logs, **kwargs))


def kill_when(argv: list[str], logs: Path, ready) -> Result:
    """Start the command and SIGKILL it as soon as `ready()` (a look at its files) is true."""
    import time

    proc = start(argv, logs)
    while proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)  # polling interval only; nothing is asserted about time
    return finish(proc)


# ---- comparisons -----------------------------------------------------------------------------------------------
def shard_digests(folder: Path) -> list[tuple[str, str]]:
    """(file, sha256) of every shard file on disk, recomputed, in name order."""
    return [(p.name, file_sha256(p)) for p in sorted(Path(folder).glob("shard_*.safetensors"))]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb), f"{a} and {b} hold different tensors"
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].nan_to_num(-12345.0), tb[name].nan_to_num(-12345.0)), f"{name} differs"


def assert_same_state(a, b, where: str = "") -> None:
    """Nested trainer states (tensors, numbers, containers) exactly equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def normalised(obj, old: str, new: str):
    """JSON data with every occurrence of the path `old` replaced by `new` (runs living in different folders)."""
    return json.loads(json.dumps(obj).replace(old, new))


def copy_run(run_dir: Path, target: Path) -> Path:
    """A trained run folder without its checkpoints, feature store or evaluation."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "features", "eval", ".lock"))
    return target


@contextlib.contextmanager
def like_a_child():
    """One torch thread, as the children run (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_process(argv: list[str]) -> None:
    from app.cli import main

    with like_a_child():
        assert main(argv) == 0, f"reference run failed: saewb {' '.join(argv)}"


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`saewb ARGV` in this process: its exit code and the `saewb:` lines of its stderr."""
    from app.cli import main

    capsys.readouterr()
    with like_a_child():
        rc = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    return rc, [line for line in err.splitlines() if line.startswith("saewb:")]


# ---- the uninterrupted references ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """Folders of one uninterrupted run of each command: cache, train (from that cache), features, eval."""
    root = tmp_path_factory.mktemp("reference")
    paths = {"root": root, "cache": root / "cache", "run": root / "runs" / "run", "eval_out": root / "comparison"}
    in_process(cache_argv(paths["cache"]))
    in_process(train_argv(paths["cache"], paths["run"]))
    return paths


@pytest.fixture(scope="session")
def ref_features(ref):
    in_process(features_argv(ref["run"]))
    return ref["run"] / "features"


@pytest.fixture(scope="session")
def ref_eval(ref):
    in_process(eval_argv(ref["run"], ref["eval_out"]))
    return ref["run"] / "eval"
