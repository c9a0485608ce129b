"""Untrusted files and requests: no torch.load that can unpickle code anywhere in the repository; the app serves only
the runs folder it was given (a crafted ?run= or a symlink pointing elsewhere is refused) and listens on 127.0.0.1."""
import ast
import json
import os
from pathlib import Path

import pytest

from tests.faults.conftest import ROOT, copy_run

SKIP = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "wandb", "node_modules"}


def python_sources():
    """(path, source) of every Python file in the repository and every code cell of its notebooks."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if name.endswith(".py"):
                yield path, path.read_text(errors="replace")
            elif name.endswith(".ipynb"):
                cells = json.loads(path.read_text()).get("cells", [])
                code = "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
                yield path, "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))


def unsafe_loads(source: str) -> list[int]:
    """Lines of torch.load calls that do not pass weights_only=True (a literal True)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            is_load = (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                       and func.value.id == "torch")
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if is_load and not safe:
                lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            lines.append(node.lineno)  # `from torch import load` would hide calls from this check
    return lines


def test_the_checker_finds_unsafe_loads():
    assert unsafe_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n") == [2, 3]
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\n# torch.load(p)\n") == []
    assert unsafe_loads("from torch import load\n") == [1]


def test_no_torch_load_without_weights_only_anywhere():
    sources = list(python_sources())
    assert any(path.name == "checkpoint.py" for path, _ in sources)  # the walk reaches the package sources
    found = [f"{path.relative_to(ROOT)}:{line}" for path, source in sources for line in unsafe_loads(source)]
    assert not found, f"torch.load without weights_only=True (it can run pickled code): {found}"


# ---- the app -----------------------------------------------------------------------------------------------
@pytest.fixture
def runs_with_a_way_out(ref, tmp_path):
    """runs/good (a run), runs/evil -> a run folder outside runs/."""
    runs = tmp_path / "runs"
    copy_run(ref["run"], runs / "good")
    copy_run(ref["run"], tmp_path / "outside" / "secret")
    (runs / "evil").symlink_to(tmp_path / "outside" / "secret", target_is_directory=True)
    return runs


def test_runs_outside_the_folder_are_not_served(runs_with_a_way_out):
    from analysis.store import list_runs
    from app.common import served_runs

    runs = runs_with_a_way_out
    assert runs / "evil" in list_runs(runs)  # the symlink is found by the plain walk...
    assert served_runs(runs) == [str(runs / "good")]  # ...but never served


@pytest.mark.parametrize("wanted", ["../../etc", "evil"])
def test_a_crafted_run_parameter_is_refused(runs_with_a_way_out, monkeypatch, wanted):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAEWB_RUNS_DIR", str(runs_with_a_way_out))
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
    at.query_params["run"] = wanted
    at.run()
    assert not at.exception
    assert at.sidebar.selectbox[0].options == ["good"] and at.sidebar.selectbox[0].value == "good"
    assert any("(?run=) is not one under the runs folder" in w.value for w in at.sidebar.warning)
    assert at.session_state["run_path"] == str(runs_with_a_way_out / "good")


def test_the_app_listens_on_localhost_only(tmp_path):
    from app.cli import AppConfig, app_command

    command = app_command(AppConfig(runs_dir=tmp_path, port=8765))
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in command and command[command.index("--server.port") + 1] == "8765"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[-2:] == ["--", str(tmp_path)]

