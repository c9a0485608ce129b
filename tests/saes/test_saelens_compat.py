"""Cross-library check with SAELens, both ways: folders written by `save_sae` and by `export_sae(..., "saelens")`
load in SAELens (`SAE.load_from_disk`) and give our codes and reconstructions, and folders SAELens's own classes
write (`save_model`, `save_inference_model`) load with `saes.load_sae` and give SAELens's.

SAELens pins transformer-lens < 4, so it cannot live in our venv: the test builds a separate one at
~/.cache/saewb/saelens-venv (torch pinned to ours, then `sae-lens`; a few minutes the first time, needs PyPI)
and skips, saying why, when that fails. SAEWB_SKIP_SAELENS=1 skips it outright.
"""
import fcntl
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saes import build_sae, save_sae
from training.trainer import LoopConfig, train_sae

CACHE = Path(os.environ.get("SAEWB_CACHE", Path.home() / ".cache" / "saewb"))
VENV = CACHE / "saelens-venv"
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


def venv_python(name: str, requirement: str, skip_env: str) -> Path:
    """The interpreter of the venv CACHE/<name>-venv holding `requirement` (torch pinned to ours), built if needed;
    pytest.skip with the reason if it cannot be built, or when `skip_env` is set."""
    if os.environ.get(skip_env):
        pytest.skip(f"{skip_env} is set")
    venv = CACHE / f"{name}-venv"
    ready = venv / "saewb-ready"  # written once the install finished, so a half-built venv is rebuilt
    python = venv / "bin" / "python"
    if ready.exists() and python.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process building the same venv: wait, then use it
        if ready.exists() and python.exists():
            return python
        torch_version = torch.__version__.split("+")[0]
        pin = CACHE / f"{name}-torch-constraint.txt"
        steps = [
            ["python3", "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}"],
            [str(python), "-m", "pip", "install", "-q", "-c", str(pin), requirement],
        ]
        pin.write_text(f"torch=={torch_version}\n")
        for step in steps:
            try:
                result = subprocess.run(step, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as error:
                pytest.skip(f"cannot build the {name} venv at {venv}: {error}")
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: Location")]
                pytest.skip(f"cannot build the {name} venv at {venv} ({' '.join(step[-2:])}): "
                            f"{' '.join(errors)[-500:]}")
        ready.write_text(f"torch=={torch_version}\n{requirement}\n")
    return python


def saelens_python() -> Path:
    """The SAELens venv's interpreter, building the venv if needed; pytest.skip with the reason if it cannot."""
    return venv_python("saelens", "sae-lens", "SAEWB_SKIP_SAELENS")


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
        "matryoshka_as_jumprelu": trained("matryoshka_batchtopk", k=4).to_jumprelu(),
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


# ---- both directions through the folders each library writes ----------------------------------------------------
BOTH_SCRIPT = textwrap.dedent('''
    import sys, traceback
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes import (AbsTopKSAE, AbsTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
                               GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                               StandardSAEConfig, TopKSAE, TopKSAEConfig, Transcoder, TranscoderConfig)
    from sae_lens.saes.sae import SAEMetadata

    root = Path(sys.argv[1])
    d_sae = int(sys.argv[2])
    x = load_file(str(root / "inputs.safetensors"))["x"]
    d_in = x.shape[-1]
    (root / "version.txt").write_text(sae_lens.__version__)

    def outputs(folder, name):
        """What SAELens computes from the folder: SAE.load_from_disk, encode, decode."""
        try:
            sae = SAE.load_from_disk(str(folder))
            with torch.no_grad():
                codes = sae.encode(x)
                recon = sae.decode(codes)
            save_file({"codes": codes.contiguous(), "recon": recon.contiguous()}, str(root / f"{name}.safetensors"))
            (root / f"{name}.class").write_text(type(sae).__name__)
        except Exception:
            (root / f"{name}.error").write_text(traceback.format_exc())

    def randomize(sae, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in sae.named_parameters():
                if pname == "threshold":
                    p.copy_(torch.rand(p.shape, generator=g) * 0.3)
                elif pname == "W_dec":  # rows of varied norm
                    p.copy_(torch.randn(p.shape, generator=g) * (0.2 + torch.rand(p.shape[0], 1, generator=g)))
                elif pname == "W_enc":
                    p.copy_(torch.randn(p.shape, generator=g) / d_in ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return sae

    def meta(**extra):
        return SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_resid_post", **extra)

    common = dict(d_in=d_in, d_sae=d_sae)
    makers = {
        "standard": lambda: StandardSAE(StandardSAEConfig(**common, metadata=meta())),
        "standard_no_b_dec_in": lambda: StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False,
                                                                      metadata=meta())),
        "standard_layer_norm": lambda: StandardSAE(StandardSAEConfig(**common, normalize_activations="layer_norm",
                                                                     metadata=meta())),
        "topk": lambda: TopKSAE(TopKSAEConfig(**common, k=4, metadata=meta())),
        "topk_rescaled_no_b_dec_in": lambda: TopKSAE(TopKSAEConfig(**common, k=4, rescale_acts_by_decoder_norm=True,
                                                                   apply_b_dec_to_input=False, metadata=meta())),
        "topk_constant_norm": lambda: TopKSAE(TopKSAEConfig(**common, k=4, metadata=meta(),
                                                            normalize_activations="constant_norm_rescale")),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common, metadata=meta())),
        "jumprelu_no_b_dec_in": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common, apply_b_dec_to_input=False,
                                                                      metadata=meta())),
        "gated": lambda: GatedSAE(GatedSAEConfig(**common, metadata=meta())),
        "gated_no_b_dec_in": lambda: GatedSAE(GatedSAEConfig(**common, apply_b_dec_to_input=False, metadata=meta())),
        "abstopk": lambda: AbsTopKSAE(AbsTopKSAEConfig(**common, k=4, metadata=meta())),
        "transcoder": lambda: Transcoder(TranscoderConfig(**common, d_out=d_in, apply_b_dec_to_input=False,
                                                          metadata=meta(hook_name_out="blocks.1.hook_mlp_out"))),
    }
    for seed, (name, make) in enumerate(makers.items()):
        try:
            folder = root / "theirs" / name
            randomize(make(), seed).save_model(str(folder))
            outputs(folder, f"theirs_{name}")
        except Exception:
            (root / f"theirs_{name}.error").write_text(traceback.format_exc())
    try:  # BatchTopK as SAELens's trainer leaves it: save_inference_model writes a jumprelu folder
        sae = randomize(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=4, metadata=meta())), 99)
        sae.topk_threshold.fill_(0.2)
        sae.save_inference_model(str(root / "theirs" / "batchtopk_inference"))
        outputs(root / "theirs" / "batchtopk_inference", "theirs_batchtopk_inference")
    except Exception:
        (root / "theirs_batchtopk_inference.error").write_text(traceback.format_exc())
    for folder in sorted((root / "ours").iterdir()):
        outputs(folder, f"ours_{folder.name}")
''')


def exported_saes() -> dict:
    """Folder name -> an SAE whose export_sae(..., 'saelens') folder SAELens must run with our outputs."""
    gated = build_sae("gated", d_in=D_IN, d_sae=D_SAE, input_scale=1.3)
    layer_norm = build_sae("topk", d_in=D_IN, d_sae=D_SAE, k=4, token_norm="layer_norm")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for sae in (gated, layer_norm):
            sae.b_dec.normal_(0, 0.3, generator=generator)
            sae.b_enc.normal_(0, 0.2, generator=generator)
        gated.r_mag.normal_(0, 0.3, generator=generator)
        gated.b_mag.normal_(0, 0.2, generator=generator)
    return {
        "topk": trained("topk", k=4),
        "hierarchical_topk": trained("hierarchical_topk", k_max=6, budgets="pow2"),
        "batchtopk": trained("batchtopk", k=4),
        "feature_choice": trained("feature_choice", k=4),
        "jumprelu": trained("jumprelu", threshold_init=0.05, bandwidth=0.05),
        "jumprelu_b_dec_in": trained("jumprelu", threshold_init=0.05, bandwidth=0.05, apply_b_dec_to_input=True),
        "relu_l1": trained("relu_l1"),
        "abstopk_per_token": trained("abstopk", k=4, selection="per_token"),
        "matching_pursuit": trained("matching_pursuit", k=4),
        "gated": gated,
        "topk_layer_norm": layer_norm,
    }


def test_folders_each_library_writes_load_in_the_other_with_identical_outputs(tmp_path):
    """(c) SAELens's own classes write folders (save_model, save_inference_model) that saes.load_sae runs with
    SAELens's codes and reconstructions; (d) export_sae(..., 'saelens') folders run in SAELens with ours."""
    from saes import load_sae
    from saes.formats.export import export_sae

    python = saelens_python()
    x = torch.randn(48, D_IN) * 2 + 0.3
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    ours = exported_saes()
    for name, sae in ours.items():
        export_sae(sae, tmp_path / "ours" / name, "saelens")
    script = tmp_path / "both_ways.py"
    script.write_text(BOTH_SCRIPT)
    result = subprocess.run([str(python), str(script), str(tmp_path), str(D_SAE)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = {p.stem: p.read_text()[-1500:] for p in tmp_path.glob("*.error")}
    assert not errors, f"SAELens failed on: {', '.join(errors)}\n{next(iter(errors.values()), '')}"
    theirs = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert len(theirs) == 13, theirs
    for name in theirs:  # (c)
        out = load_file(str(tmp_path / f"theirs_{name}.safetensors"))
        sae = load_sae(tmp_path / "theirs" / name)
        with torch.no_grad():
            codes = sae.encode(x)
            torch.testing.assert_close(codes, out["codes"], atol=1e-5, rtol=1e-5, msg=f"SAELens {name} codes")
            torch.testing.assert_close(sae.decode(codes), out["recon"], atol=1e-5, rtol=1e-5,
                                       msg=f"SAELens {name} recon")
    for name, sae in ours.items():  # (d)
        out = load_file(str(tmp_path / f"ours_{name}.safetensors"))
        with torch.no_grad():
            sae = sae.export_inference()
            codes = sae.encode(x)
            torch.testing.assert_close(out["codes"], codes, atol=1e-5, rtol=1e-5, msg=f"export {name} codes")
            torch.testing.assert_close(out["recon"], sae.decode(codes), atol=1e-5, rtol=1e-5,
                                       msg=f"export {name} recon")
    assert (tmp_path / "ours_batchtopk.class").read_text() == "JumpReLUSAE"
    print(f"SAELens {(tmp_path / 'version.txt').read_text()}")
