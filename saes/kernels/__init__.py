"""Compiled CPU kernels of the fast training path, with torch ops as the fallback (docs/methods.md §2.1).

* `topk`: the per-token top-k selection of the TopK family. torch.topk copies every row into (value, index)
  pairs and partial-sorts them: it took about 11 % of the default TopK step here. topk.cpp finds a lower bound of
  each row's k-th largest value from two passes of block maxima and ranks only the elements above it
  (`python -m bench.cpu_kernels` times it against torch.topk). Its order is that of a stable descending sort
  (largest first; equal values: the smaller index first; NaN first; torch.topk leaves ties unspecified).
* `decode_residual`, `latent_plan` and `latent_sum` (sparse_ops.cpp), used by saes/sparse_topk.py: the sparse decode
  fused with its residual, squared error and the dots its backward needs; the entries sorted by latent by a counting
  sort; the backward's per-latent sums, with threads split by entries rather than latents.

They are compiled once per machine with torch's C++ extension builder (a C++ compiler and ninja; about a minute,
cached under ~/.cache/torch_extensions). `make install` builds them; without a compiler, or with SAEWB_KERNELS=0,
the torch ops run instead, with one warning that says why.

    python -m saes.kernels    # build (or find) the kernels and check them against their definitions
"""
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("topk.cpp", "sparse_ops.cpp", "bindings.cpp")]
_state: dict = {}  # "module": the loaded extension or None; "reason": why it is None


def _extension_name() -> str:
    """One build per source and CPU capability (the flags below depend on it)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return f"saewb_kernels_{capability}"


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":  # the per-latent sums' 16-float loop (sparse_ops.cpp)
        flags += ["-mavx512f"]
    return flags


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # honours TORCH_EXTENSIONS_DIR

    return Path(_get_build_directory(name, verbose=False))


def _clear_stale_lock(name: str, older_than_s: float = 600.0) -> None:
    """torch's builder waits forever on the lock file of a build that was killed; one older than 10 min is stale."""
    lock = _build_directory(name) / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > older_than_s:
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary may not be there (a venv not activated)."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False):
    """The compiled extension, building it on first use; None (with the reason in `unavailable_reason()`) when it
    cannot be built or SAEWB_KERNELS=0."""
    if "module" in _state:
        return _state["module"]
    _state["module"], _state["reason"] = None, None
    if os.environ.get("SAEWB_KERNELS", "1") == "0":
        _state["reason"] = "SAEWB_KERNELS=0"
        return None
    try:
        from torch.utils.cpp_extension import load as build

        _put_ninja_on_path()
        name = _extension_name()
        _clear_stale_lock(name)
        if not (_build_directory(name) / f"{name}.so").exists():
            print("saes.kernels: compiling the CPU kernels for this machine (once, about a minute)...",
                  file=sys.stderr, flush=True)
        _state["module"] = build(name, [str(source) for source in SOURCES], extra_cflags=_flags(),
                                 extra_ldflags=["-fopenmp"], verbose=verbose)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch op still works
        _state["reason"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
        warnings.warn(f"saes.kernels: the compiled CPU kernels are unavailable ({_state['reason']}); using "
                      "torch ops, which are slower. Install a C++ compiler and ninja, then run "
                      "`python -m saes.kernels`.", RuntimeWarning, stacklevel=3)
    return _state["module"]


def unavailable_reason() -> str | None:
    return _state.get("reason")


def describe() -> str:
    """Which kernels the fast path takes on CPU here, for benchmark reports."""
    if load() is not None:
        return f"compiled kernels ({_extension_name()}: top-k, fused decode, latent plan, latent sums)"
    return f"torch ops ({unavailable_reason()})"


def for_tensor(tensor: Tensor):
    """The compiled extension when `tensor` is a CPU float32/float64 tensor and it is built, else None."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64):
        return load()
    return None


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [rows, k] of the k largest scores of each row, largest first (equal scores: the smaller
    index first, NaN above +inf, as torch.sort). scores: [rows, n]; no gradient. The compiled kernel on CPU
    float32/float64, torch.topk otherwise (whose order among exactly equal scores is unspecified)."""
    if scores.dim() == 2 and 1 <= k <= scores.shape[-1] and scores.shape[0] > 0:
        module = for_tensor(scores)
        if module is not None:
            return tuple(module.topk_last_dim(scores, k))
    return tuple(scores.topk(k, dim=-1, sorted=True))


def main() -> None:
    """Build the kernels (or find them built) and check them against their definitions on random inputs."""
    import argparse

    argparse.ArgumentParser(prog="python -m saes.kernels", description=main.__doc__).parse_args()
    started = time.perf_counter()
    module = load(verbose=False)
    if module is None:
        print(f"saes.kernels: not built ({unavailable_reason()}); training uses torch ops.")
        return
    scores = torch.randn(512, 2304, generator=torch.Generator().manual_seed(0))
    reference = scores.sort(dim=-1, descending=True, stable=True).indices[:, :32]
    if not torch.equal(module.topk_last_dim(scores, 32)[1], reference):
        raise SystemExit("saes.kernels: the compiled top-k disagrees with the reference order; set SAEWB_KERNELS=0 "
                         "and report this machine's compiler.")
    W, target = torch.randn(2304, 64), torch.randn(512, 64)  # the decode: r = target - Σ z_i d_i, <r, d_i>, ||r||²
    values = torch.rand(512, 32)
    codes = torch.zeros(512, 2304).scatter(-1, reference, values)
    offsets = torch.arange(0, 512 * 32, 32)
    residual, dots, sq, _, residual_sum = module.decode_residual(values, W, reference, offsets, target)
    expected = target - codes @ W
    close = dict(atol=1e-4, rtol=1e-4)
    if not (torch.allclose(residual, expected, **close) and torch.allclose(sq, expected.pow(2).sum(-1), **close)
            and torch.allclose(dots.view(512, 32), (expected[:, None] * W[reference]).sum(-1), **close)
            and torch.allclose(residual_sum, expected.sum(0), atol=1e-3, rtol=1e-4)):
        raise SystemExit("saes.kernels: the compiled decode disagrees with its definition; set SAEWB_KERNELS=0 "
                         "and report this machine's compiler.")
    order, starts = module.latent_plan(reference, 2304)  # the per-latent sums: codes^T target, from the plan
    tokens = torch.arange(512).repeat_interleave(32).index_select(0, order)
    sums = module.latent_sum(target, tokens, starts, values.reshape(-1).index_select(0, order))
    if not torch.allclose(sums, codes.T @ target, **close):
        raise SystemExit("saes.kernels: the compiled per-latent sums disagree with their definition; set "
                         "SAEWB_KERNELS=0 and report this machine's compiler.")
    print(f"saes.kernels: kernels ready ({_extension_name()}, {time.perf_counter() - started:.0f} s).")
