"""notebooks/quickstart.ipynb runs top to bottom (offline, toy VLM) without any cell raising."""

import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(monkeypatch):
    import nbclient
    import nbformat
    from sparse_cache.toy import TOY_VLM_PATH

    assert os.path.isfile(os.path.join(TOY_VLM_PATH, "config.json")), "the toy VLM checkpoint must ship"
    # the kernel is a fresh process: it must import this checkout and plot without a display
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    elapsed = time.perf_counter() - start
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    print(f"quickstart.ipynb executed in {elapsed:.1f} s")


def _committed_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return notebook, [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_committed_notebook_shows_its_figures():
    """The committed notebook was executed with an inline backend: its figures are there as PNG outputs, every code
    cell ran, in order, without errors."""
    notebook, outputs = _committed_outputs()
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1)), "execute it top to bottom"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the overlay, the depth comparison and the sweep figures"
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if "Figure size" in str(o.get("data", {}).get("text/plain", ""))
                and "image/png" not in o.get("data", {})], "a figure without its picture: non-interactive backend"


def test_committed_notebook_outputs_hold_no_machine_paths():
    import re

    _, outputs = _committed_outputs()
    text = "\n".join(
        "".join(o.get("text", "")) + "".join(str(v) for k, v in o.get("data", {}).items() if k != "image/png")
        for o in outputs
    )
    machine_paths = re.findall(r"(?:/(?:home|work|tmp|root|Users|usr|opt|private|var)/\S+|[A-Za-z]:\\\S+)", text)
    assert not machine_paths
    assert "Warning" not in text, "warnings in the outputs (they carry file paths and distract)"


def test_notebook_says_how_to_run_it_and_the_extra_installs_it():
    import configparser

    notebook, _ = _committed_outputs()
    first = notebook.cells[0].source
    assert 'pip install -e ".[notebook]"' in first and "jupyter nbconvert --to notebook --execute" in first
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    extra = config["options.extras_require"]["notebook"]
    for package in ("jupyterlab", "nbconvert", "ipykernel", "matplotlib"):
        assert package in extra
