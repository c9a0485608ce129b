"""notebooks/circuits.ipynb runs headless on the tiny model and leaves its circuit in the run folder."""
import json

from app.cli import main
from tests.notebook_runner import outputs_text, run_notebook


def test_circuits_notebook_on_tiny_model(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["demo", "--model", "tiny", "--tokens", "8192", "--run-dir", str(run_dir)]) == 0
    notebook = run_notebook("circuits.ipynb", {"MODEL": "tiny", "RUN_DIR": str(run_dir), "TASK": "sva",
                                               "N_PROMPTS": 8, "N_EVAL_PROMPTS": 8, "IG_STEPS": 2,
                                               "NODE_THRESHOLD": 0.0})
    text = outputs_text(notebook)
    assert "circuit:" in text and "held-out" in text and "faithfulness" in text and "skipped" in text
    graph = json.loads((run_dir / "circuits" / "graph.json").read_text())
    assert graph["curve"] and graph["nodes"] and graph["split"]["evaluation"] == graph["evaluation"]["n_prompts"] > 0
