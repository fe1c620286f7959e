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
