"""Execute a notebook headless with some parameters replaced (the cell tagged "parameters"), like papermill."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def run_notebook(name: str, parameters: dict, timeout: int = 600) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    cell.source += "\n# injected by the tests\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """All stream output of the executed notebook."""
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
