"""Cross-library check with EleutherAI sparsify, both directions:
(a) sparsify writes SAEs with its own API (SparseCoder with random or briefly trained weights, `save_to_disk`) and
    saes.load_sae runs them with sparsify's codes and reconstructions (its `encode`/`decode`, run in its venv);
(b) folders written by `export_sae(..., "sparsify")` load in sparsify (`SparseCoder.load_from_disk`) with ours.

sparsify lives in its own venv at ~/.cache/saewb/sparsify-venv (torch pinned to ours, then eai-sparsify; about two
minutes the first time, needs PyPI), built by the helper the SAELens check uses; the test skips, saying why, when
that fails. SAEWB_SKIP_SPARSIFY=1 skips it outright. The two sides exchange safetensors files.
"""
import json
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.saes.test_saelens_compat import trained, venv_python

SPARSIFY = "eai-sparsify==1.3.3"  # the version whose sparse_coder.py saes/formats/sparsify.py follows
D_IN, N = 16, 64

SCRIPT = textwrap.dedent('''
    import json, sys, traceback
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig

    root = Path(sys.argv[1])
    x = load_file(str(root / "inputs.safetensors"))["x"]
    (root / "version.txt").write_text(sparsify.__version__)

    def outputs(sae, name):
        """sparsify's own encode and decode, and the dense codes they stand for."""
        with torch.no_grad():
            xs = x.to(sae.dtype)
            top_acts, top_indices, _ = sae.encode(xs)
            recon = sae.decode(top_acts, top_indices)
            codes = torch.zeros(xs.shape[0], sae.num_latents, dtype=top_acts.dtype).scatter(-1, top_indices, top_acts)
            forward = sae(xs).sae_out
        save_file({"codes": codes.contiguous(), "recon": recon.contiguous(), "forward": forward.contiguous()},
                  str(root / f"{name}.safetensors"))

    def randomize(sae, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.encoder.weight.copy_(torch.randn(sae.encoder.weight.shape, generator=g) / sae.d_in ** 0.5)
            sae.encoder.bias.copy_(torch.randn(sae.encoder.bias.shape, generator=g) * 0.2)
            sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) * 0.3)
            sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.5)
        return sae

    def train(sae, seed, steps=30):
        """A few Adam steps on sparsify's own forward (FVU), so the weights are not a random draw."""
        g = torch.Generator().manual_seed(seed)
        data = torch.randn(512, sae.d_in, generator=g) * 2 + 0.3
        optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for step in range(steps):
            batch = data[(step * 64) % 512:][:64]
            out = sae(batch)
            optimizer.zero_grad()
            out.fvu.backward()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()
        return sae

    specs = json.loads((root / "specs.json").read_text())
    for name, spec in specs.items():
        try:
            torch.manual_seed(spec["seed"])
            dtype = getattr(torch, spec.get("dtype", "float32"))
            sae = SparseCoder(spec["d_in"], SparseCoderConfig(**spec["cfg"]), dtype=dtype)
            sae = train(sae, spec["seed"]) if spec.get("train") else randomize(sae, spec["seed"])
            sae.save_to_disk(root / "theirs" / spec["run"] / spec["hookpoint"])
            outputs(SparseCoder.load_from_disk(root / "theirs" / spec["run"] / spec["hookpoint"]), f"theirs_{name}")
        except Exception:
            (root / f"theirs_{name}.error").write_text(traceback.format_exc())
    for folder in sorted(p for p in (root / "ours").rglob("cfg.json")):
        name = folder.parent.relative_to(root / "ours").parts[0]
        try:
            outputs(SparseCoder.load_from_disk(folder.parent), f"ours_{name}")
        except Exception:
            (root / f"ours_{name}.error").write_text(traceback.format_exc())
''')

SPECS = {  # name -> how sparsify builds it; "run"/"hookpoint": where save_to_disk writes it
    "topk": {"cfg": {"num_latents": N, "k": 4}, "seed": 0, "run": "topk", "hookpoint": "layers.1"},
    "topk_trained": {"cfg": {"expansion_factor": N // D_IN, "k": 3, "multi_topk": True}, "seed": 1, "train": True,
                     "run": "topk_trained", "hookpoint": "layers.0"},
    "k1": {"cfg": {"num_latents": N, "k": 1, "normalize_decoder": False}, "seed": 2, "run": "k1",
           "hookpoint": "layers.2.mlp"},
    "transcoder": {"cfg": {"num_latents": N, "k": 4, "transcode": True}, "seed": 3, "run": "transcoder",
                   "hookpoint": "layers.1.mlp"},
    "transcoder_trained": {"cfg": {"num_latents": N, "k": 4, "transcode": True}, "seed": 4, "train": True,
                           "run": "transcoder_trained", "hookpoint": "layers.0"},
    "float64": {"cfg": {"num_latents": N, "k": 5}, "seed": 5, "dtype": "float64", "run": "float64",
                "hookpoint": "layers.3"},
    "two_a": {"cfg": {"num_latents": N, "k": 4}, "seed": 6, "run": "two", "hookpoint": "layers.0"},
    "two_b": {"cfg": {"num_latents": N, "k": 2}, "seed": 7, "run": "two", "hookpoint": "layers.1"},
    "groupmax": {"cfg": {"num_latents": N, "k": 4, "activation": "groupmax"}, "seed": 8, "run": "groupmax",
                 "hookpoint": "layers.1"},
    "skip": {"cfg": {"num_latents": N, "k": 4, "skip_connection": True}, "seed": 9, "run": "skip",
             "hookpoint": "layers.1"},
}
SPECS = {name: {**spec, "d_in": D_IN} for name, spec in SPECS.items()}
REFUSED = {"groupmax": "groupmax", "skip": "skip_connection"}


def sparsify_python():
    return venv_python("sparsify", SPARSIFY, "SAEWB_SKIP_SPARSIFY")


def exported() -> dict:
    """Folder name -> an SAE of ours exported to sparsify: the TopK family, trained briefly, input scale unfolded."""
    return {
        "topk": trained("topk", k=4),
        "topk_multi": trained("topk", k=3, multi_topk=True),
        "hierarchical_topk": trained("hierarchical_topk", k_max=6, budgets="pow2"),
        "hierarchical_topk_k2": trained("hierarchical_topk", k_max=6, k=2),
    }


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    """Run sparsify once on both kinds of folders; (root, x, our exported SAEs)."""
    from saes.formats.export import export_sae

    python = sparsify_python()
    root = tmp_path_factory.mktemp("sparsify")
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(11)) * 2 + 0.3
    save_file({"x": x}, str(root / "inputs.safetensors"))
    (root / "specs.json").write_text(json.dumps(SPECS))
    ours = exported()
    for name, sae in ours.items():
        sae.cfg.hook_name = "blocks.1.hook_resid_post"
        export_sae(sae, root / "ours" / name, "sparsify")
    script = root / "run_sparsify.py"
    script.write_text(SCRIPT)
    result = subprocess.run([str(python), str(script), str(root)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return root, x, ours


def test_sparsify_written_saes_load_with_identical_outputs(exchanged):
    """(a): sparsify's own folders, loaded by saes.load_sae, give sparsify's codes and reconstructions."""
    import saes
    from saes.formats import LayoutError

    root, x, _ = exchanged
    errors = {p.stem: p.read_text()[-1500:] for p in root.glob("theirs_*.error")}
    assert not errors, f"sparsify failed on {', '.join(errors)}:\n{next(iter(errors.values()), '')}"
    for name, spec in SPECS.items():
        folder = root / "theirs" / spec["run"] / spec["hookpoint"]
        if name in REFUSED:
            with pytest.raises(LayoutError, match=REFUSED[name]):
                saes.load_sae(folder)
            continue
        out = load_file(str(root / f"theirs_{name}.safetensors"))
        sae = saes.load_sae(folder) if spec["run"] != "two" else saes.load_sae(root / "theirs" / "two",
                                                                               hookpoint=spec["hookpoint"])
        assert sae.cfg.dtype == spec.get("dtype", "float32")
        with torch.no_grad():
            codes = sae.encode(x.to(sae.W_enc.dtype))
            torch.testing.assert_close(codes, out["codes"], atol=1e-5, rtol=1e-5, msg=f"{name} codes")
            torch.testing.assert_close(sae.decode(codes), out["recon"], atol=1e-5, rtol=1e-5, msg=f"{name} recon")
            if not spec["cfg"].get("multi_topk"):  # forward's sae_out is then the 4k reconstruction
                torch.testing.assert_close(sae.decode(codes), out["forward"], atol=1e-5, rtol=1e-5, msg=f"{name} fwd")
        source = sae.cfg.metadata["source"]
        assert source["l0"] == spec["cfg"]["k"] and source["transcoder"] is spec["cfg"].get("transcode", False)
    with pytest.raises(LayoutError, match="layers.0.*layers.1"):  # a run with two hookpoints names both
        saes.load_sae(root / "theirs" / "two")
    assert saes.load_sae(root / "theirs" / "transcoder" / "layers.1.mlp").cfg.metadata["source"]["hook_out"] == \
        "blocks.1.hook_mlp_out"


def test_our_sparsify_exports_load_in_sparsify_with_identical_outputs(exchanged):
    """(b): export_sae(..., 'sparsify') folders, run by SparseCoder.load_from_disk, give our codes."""
    root, x, ours = exchanged
    errors = {p.stem: p.read_text()[-1500:] for p in root.glob("ours_*.error")}
    assert not errors, f"sparsify could not load {', '.join(errors)}:\n{next(iter(errors.values()), '')}"
    for name, sae in ours.items():
        out = load_file(str(root / f"ours_{name}.safetensors"))
        with torch.no_grad():
            ref = sae.export_inference()
            codes = ref.encode(x)
            torch.testing.assert_close(out["codes"], codes, atol=1e-5, rtol=1e-5, msg=f"{name} codes")
            torch.testing.assert_close(out["recon"], ref.decode(codes), atol=1e-5, rtol=1e-5, msg=f"{name} recon")
    print(f"sparsify {(root / 'version.txt').read_text()}")
