"""hf:ORG/REPO/PATH sources go through huggingface_hub's real snapshot_download; offline, it serves a snapshot laid
out in its cache exactly as a download leaves it, which is what this test builds."""
import json

import pytest
import torch

from saes import build_sae, load_sae, save_sae
from saes.formats import hub


def test_parse_and_bad_sources():
    assert hub.parse("hf:google/gemma-scope-2b-pt-res/layer_20/width_16k") == ("google/gemma-scope-2b-pt-res",
                                                                              "layer_20/width_16k")
    assert hub.parse("hf:org/repo") == ("org/repo", "")
    with pytest.raises(ValueError, match="write hf:ORG/REPO/PATH"):
        hub.parse("hf:just-a-name")


def test_hub_source_loads_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    snapshot = tmp_path / "models--org--saes" / "snapshots" / ("a" * 40)
    sae = build_sae("topk", d_in=8, d_sae=16, k=3)
    save_sae(sae, snapshot / "layer_1")
    cfg = json.loads((snapshot / "layer_1" / "cfg.json").read_text())
    cfg.pop("saewb")  # as SAELens itself writes it
    (snapshot / "layer_1" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "models--org--saes" / "refs").mkdir()
    (tmp_path / "models--org--saes" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_sae("hf:org/saes/layer_1")
    x = torch.randn(4, 8)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-6)
    assert loaded.cfg.metadata["source"]["layout"] == "saelens"
    with pytest.raises(ValueError, match="has no file or folder 'layer_9'"):
        load_sae("hf:org/saes/layer_9")
    with pytest.raises(ValueError, match="Could not download hf:org/other"):
        load_sae("hf:org/other/layer_1")
