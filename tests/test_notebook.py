"""The quickstart notebook runs end to end (tiny configuration) so it can never rot."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DETECTOR_NOTEBOOK_OUT", str(tmp_path / "nb"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit with outputs cleared"
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert (tmp_path / "nb" / "model.onnx").exists()
    assert (tmp_path / "nb" / "report" / "report.html").exists()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "RELEASE" in printed or "INSPECT" in printed
    assert "AUROC" in printed
