"""The course notebooks run top to bottom (in quick mode, ASYNCTHINK_QUICK=1) in a fresh python3
kernel started in notebooks/, and the committed .ipynb files are what notebooks/build.py writes.
Their own asserts (hand calculations against the code) run with them. Any temporary run folder
they make goes under pytest's tmp_path (TMPDIR), never into the repository."""

import importlib.util
import os
import pathlib

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["1_protocol", "2_executor", "3_training", "4_experiments", "5_beyond"]


def load_build():
    spec = importlib.util.spec_from_file_location("course_build", NOTEBOOKS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_committed_notebooks_match_their_generator():
    build = load_build()
    assert list(build.NOTEBOOKS) == NAMES
    for name in NAMES:
        committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        fresh = build.build(name)
        assert [(c.cell_type, c.source) for c in committed.cells] == \
               [(c.cell_type, c.source) for c in fresh.cells], f"{name}: rerun python notebooks/build.py --execute {name[0]}"
        assert committed.cells[-1].cell_type == "markdown" and "## Exercises" in committed.cells[-1].source
        # committed with outputs, from a normal (not quick) run
        outputs = [o for c in committed.cells if c.cell_type == "code" for o in c.outputs]
        assert outputs and not any(o.output_type == "error" for o in outputs)
        assert "normal mode" in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCTHINK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))        # the notebooks' run folders
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no notebooks/__pycache__ from the kernel
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # tiny models: one thread is faster
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    load_build().execute(nb, cwd=str(NOTEBOOKS), timeout=300)  # raises at the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert "quick mode" in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1  # the figures were drawn
