"""The notebooks run top to bottom on the real Beijing data (quick settings), as a user would run them."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import DATA, ROOT


@pytest.mark.parametrize("name", ["quickstart.ipynb", "change_analysis.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("UVSAM_DATA", str(DATA))
    monkeypatch.setenv("UVSAM_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("UVSAM_QUICK", "1")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # it showed results
