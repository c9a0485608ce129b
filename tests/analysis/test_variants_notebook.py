"""notebooks/variants.ipynb runs headless on the tiny model: every variant trains on one cache and gets a card."""
from tests.notebook_runner import outputs_text, run_notebook


def test_variants_notebook_on_tiny_model(tmp_path):
    notebook = run_notebook("variants.ipynb", {
        "MODEL": "tiny", "HOOK": "blocks.1.hook_resid_post", "TOKENS": 16_384, "K": 8, "KS": [4, 8, 16],
        "BATCH": 256, "EPOCHS": 1, "RUNS_DIR": str(tmp_path / "variants"), "MAX_CONTEXTS": 4})
    text = outputs_text(notebook)
    for name in ("topk-k8", "batchtopk-k8", "mutual_choice-k8", "feature_choice-k8", "matching_pursuit-k8",
                 "gradient_topk-k8", "hierarchical_topk-k8", "topk-k4", "topk-k16", "abstopk-k8"):
        assert name in text, name
    assert "negative codes:" in text
    figures = [o for c in notebook.cells for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in
               o.get("data", {})]
    assert len(figures) == 5
