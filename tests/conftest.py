"""Shared pytest fixtures for the whole suite (kept small; other test files may add theirs here).

- ``rng``: a seeded NumPy Generator, fresh for each test, so test data is reproducible.
- ``shared_data``: the folder of real data next to the repository (``../shared/data``), which the
  tests (never the package) may read; a test that asks for it is skipped when it is absent.
- ``shakespeare``: the text of Tiny Shakespeare from that folder (skipped when absent).
"""
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare():
    """The text of Tiny Shakespeare from the shared data folder (skipped when absent)."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path.read_text(encoding="utf-8")



# ---------------------------------------------------------------- end-to-end runs (train / cli / resume)
# Used by test_train.py, test_cli.py and test_resume.py: one prepared dataset for the whole session
# and a runner for the real `python -m minillm` command (one BLAS thread, output captured).

@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """The embedded pydocs text prepared once with the char tokenizer (a data.dir for configs)."""
    from minillm.data import prepare_dataset
    out = tmp_path_factory.mktemp("pydocs_char")
    prepare_dataset("pydocs", out, "char")
    return out


def minillm_env() -> dict:
    """Environment for a `python -m minillm` child: this checkout importable, one BLAS thread."""
    import os
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def minillm_cli():
    """``minillm_cli("train", CONFIG, "--a.b=c", cwd=DIR)`` runs the real CLI -> CompletedProcess.
    ``minillm_cli.popen(...)`` starts it without waiting (for tests that signal or kill it)."""
    import subprocess
    import sys

    def argv(args):
        return [sys.executable, "-m", "minillm", *map(str, args)]

    def run(*args, cwd, timeout=120):
        return subprocess.run(argv(args), cwd=cwd, env=minillm_env(), capture_output=True,
                              text=True, timeout=timeout)

    def popen(*args, cwd):
        return subprocess.Popen(argv(args), cwd=cwd, env=minillm_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    run.popen = popen
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, char_data, minillm_cli):
    """A finished 20-step run of configs/tiny.toml (its directory): a real checkpoint and tokenizer
    for the inference tests (quantize, generate, serve, the chat page)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    r = minillm_cli("train", REPO / "configs" / "tiny.toml", f"--data.dir={char_data}",
                    "--train.out_dir=run", "--train.max_steps=20", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "run"
