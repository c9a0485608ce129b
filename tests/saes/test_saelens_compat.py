"""Cross-library check: folders written by `save_sae` load in SAELens (`SAE.load_from_disk`) and give our codes
and reconstructions.

SAELens pins transformer-lens < 4, so it cannot live in our venv: the test builds a separate one at
~/.cache/saewb/saelens-venv (torch pinned to ours, then `sae-lens`; a few minutes the first time, needs PyPI)
and skips, saying why, when that fails. SAEWB_SKIP_SAELENS=1 skips it outright.
"""
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saes import build_sae, save_sae
from training.trainer import LoopConfig, train_sae

VENV = Path(os.environ.get("SAEWB_CACHE", Path.home() / ".cache" / "saewb")) / "saelens-venv"
READY = VENV / "saewb-ready"  # written once the install finished, so a half-built venv is rebuilt
D_IN, D_SAE = 16, 64

SCRIPT = textwrap.dedent("""
    import sys, traceback
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE
    root = Path(sys.argv[1])
    x = load_file(str(root / "inputs.safetensors"))["x"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            sae = SAE.load_from_disk(str(folder))
            with torch.no_grad():
                codes = sae.encode(x)
                save_file({"codes": codes.contiguous(), "recon": sae.decode(codes).contiguous()},
                          str(root / f"{folder.name}.safetensors"))
            (root / f"{folder.name}.class").write_text(type(sae).__name__)
        except Exception:
            (root / f"{folder.name}.error").write_text(traceback.format_exc())
""")


def saelens_python() -> Path:
    """The SAELens venv's interpreter, building the venv if needed; pytest.skip with the reason if it cannot."""
    if os.environ.get("SAEWB_SKIP_SAELENS"):
        pytest.skip("SAEWB_SKIP_SAELENS is set")
    python = VENV / "bin" / "python"
    if READY.exists() and python.exists():
        return python
    torch_version = torch.__version__.split("+")[0]
    pin = VENV.parent / "saelens-torch-constraint.txt"
    steps = [
        ["python3", "-m", "venv", "--clear", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}"],
        [str(python), "-m", "pip", "install", "-q", "-c", str(pin), "sae-lens"],
    ]
    VENV.parent.mkdir(parents=True, exist_ok=True)
    pin.write_text(f"torch=={torch_version}\n")
    for step in steps:
        try:
            result = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot build the SAELens venv at {VENV}: {error}")
        if result.returncode != 0:
            pytest.skip(f"cannot build the SAELens venv at {VENV} ({' '.join(step[-2:])}): {result.stderr[-500:]}")
    READY.write_text(f"torch=={torch_version}\n")
    return python


def trained(name: str, **fields):
    """A slightly trained SAE with non-trivial biases and an unfolded input scale, so export has work to do."""
    sae = build_sae(name, d_in=D_IN, d_sae=D_SAE, input_scale=1.7, **fields)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3, generator=generator)
        if not sae.tied:  # matching pursuit has no encoder of its own
            sae.b_enc.normal_(0, 0.1, generator=generator)
    batches = [torch.randn(128, D_IN, generator=generator) + 0.3 for _ in range(5)]  # re-iterable: calibration
    train_sae(sae, batches, 5, LoopConfig(lr=1e-3, warmup_steps=1, dead_tokens=128), progress=False)
    return sae


def compatible_saes() -> dict:
    """Folder name -> the SAE whose encode/decode SAELens must reproduce."""
    batchtopk = trained("batchtopk", k=4)
    assert batchtopk.threshold > 0
    return {
        "topk": trained("topk", k=4),
        "batchtopk_as_jumprelu": batchtopk.to_jumprelu(),
        "jumprelu": trained("jumprelu", threshold_init=0.05, bandwidth=0.05),
        "jumprelu_b_dec_in": trained("jumprelu", threshold_init=0.05, bandwidth=0.05, apply_b_dec_to_input=True),
        "relu_l1_as_standard": trained("relu_l1"),
        "relu_l1_b_dec_in": trained("relu_l1", apply_b_dec_to_input=True),
        "abstopk_per_token": trained("abstopk", k=4, selection="per_token"),
        "matching_pursuit": trained("matching_pursuit", k=4),
    }


def test_saelens_loads_our_folders_with_identical_outputs(tmp_path):
    python = saelens_python()
    ours = compatible_saes()
    # Folders SAELens must refuse rather than silently run differently (no batch-mode AbsTopK there).
    refused = {"abstopk_batch": trained("abstopk", k=4, selection="batch")}
    x = torch.randn(48, D_IN) * 2 + 0.3
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    for name, sae in {**ours, **refused}.items():
        save_sae(sae, tmp_path / name)
    script = tmp_path / "run_saelens.py"
    script.write_text(SCRIPT)
    result = subprocess.run([str(python), str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, sae in ours.items():
        error = tmp_path / f"{name}.error"
        if error.exists():
            pytest.fail(f"SAELens could not load {name}:\n{error.read_text()[-1500:]}")
        theirs = load_file(str(tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            sae = sae.export_inference()  # what was saved (for MP, codes in raw units: input scale folded)
            codes = sae.encode(x)
            torch.testing.assert_close(theirs["codes"], codes, atol=1e-5, rtol=1e-5, msg=f"{name} codes")
            torch.testing.assert_close(theirs["recon"], sae.decode(codes), atol=1e-5, rtol=1e-5, msg=f"{name} recon")
    for name in refused:
        assert (tmp_path / f"{name}.error").exists(), f"SAELens loaded {name}, which it cannot run faithfully"
