"""The notebooks in notebooks/ run end to end, fast, against the moelb under test, and are committed
with their outputs stripped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import moelb
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
MAX_SECONDS = 60.0  # STYLE.md: each notebook runs in under a minute
CELL_TIMEOUT = 120  # seconds per cell; a hung cell fails the test instead of the suite

# Appended to the executed copy: which moelb the kernel imported.
_WHICH_MOELB = "import moelb as _m\nprint(_m.__file__)"


def _kernel_env() -> dict[str, str]:
    """The environment of the kernel: no display (Agg) and an import path that resolves ``moelb``
    to the package this test process imported (a build tree on PYTHONPATH or the installed
    package), whatever the kernel's own site configuration."""
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    package_root = str(Path(moelb.__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"no notebook in {NOTEBOOKS_DIR}"
    for path in NOTEBOOKS:
        assert path.name[:3].rstrip("_").isdigit(), f"{path.name} is not named NN_topic.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_are_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cell"
    for index, cell in enumerate(code_cells):
        assert cell.get("outputs") == [], f"{path.name}: code cell {index} has outputs"
        assert cell.get("execution_count") is None, (
            f"{path.name}: code cell {index} has execution_count {cell.get('execution_count')}"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(_WHICH_MOELB))
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}")
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"{path.name} took {elapsed:.1f} s (limit {MAX_SECONDS:.0f} s)"

    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{path.name}: cell {index} raised"
    printed = "".join(
        output.get("text", "")
        for output in notebook.cells[-1].outputs
        if output.output_type == "stream"
    ).strip()
    assert Path(printed).resolve() == Path(moelb.__file__).resolve(), (
        f"the kernel imported moelb from {printed}, the tests from {moelb.__file__}"
    )
