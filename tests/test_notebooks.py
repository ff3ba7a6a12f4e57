"""Execute every lesson notebook top to bottom (lessons/*.ipynb, sorted) the way a reader would:
a python3 kernel started in lessons/, each cell in order. A failing cell fails the test and its
error (cell source and traceback) is shown."""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import CellExecutionError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))
TIKTOKEN_CACHE = REPO.parent / "shared" / "data" / "tiktoken_cache"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in kernel tracebacks


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # The kernel inherits this process's environment: one BLAS thread (other tests and notebooks
    # run alongside), a non-interactive matplotlib, and offline GPT-2 encodings when available.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if TIKTOKEN_CACHE.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as e:  # its text holds the cell's source and the traceback
        failure = ANSI.sub("", str(e))
    if failure is not None:  # failing outside the except block shows the error once, not chained
        pytest.fail(f"{path.name}: a cell failed\n{failure}", pytrace=False)
