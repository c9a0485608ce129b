"""notebooks/steering.ipynb runs headless on the tiny model and leaves its sweep in the run folder."""
import json

from app.cli import main
from tests.notebook_runner import outputs_text, run_notebook


def test_steering_notebook_on_tiny_model(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run_dir)]) == 0
    notebook = run_notebook("steering.ipynb", {"MODEL": "tiny", "RUN_DIR": str(run_dir), "CONCEPT": " the",
                                               "MAX_NEW_TOKENS": 4, "ALPHAS": [0.0, 1.0, 4.0]})
    text = outputs_text(notebook)
    assert "gradient steering objective" in text and "unsteered:" in text
    rows = json.loads((run_dir / "steering" / "rows.json").read_text())
    assert len(rows) == 4 * 3
    assert {r["method"] for r in rows} == {"SAE additive", "SAE clamp", "difference in means", "gradient descent"}
    for method in {r["method"] for r in rows} - {"SAE clamp"}:  # clamping to 0 is ablation, not a no-op
        zero = next(r for r in rows if r["method"] == method and r["alpha"] == 0.0)
        assert abs(zero["kl"]) < 1e-6  # adding alpha = 0 changes nothing
    assert (run_dir / "steering" / "tradeoff.html").is_file()
