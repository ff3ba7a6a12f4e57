"""Shared pytest fixtures for the whole suite (kept small; other test files may add theirs here).

With ``MINILLM_FAKE_CUPY=1`` the strict fake CuPy (``tests/fake_cupy``, NumPy underneath) is put
first on ``sys.path`` and on ``PYTHONPATH`` (so CLI subprocesses and mpirun ranks import it too),
before minillm is imported: ``MINILLM_DEVICE=gpu`` then runs the GPU code path on the CPU. The fake
cannot compile CUDA, so the fused kernels stay off there (``MINILLM_KERNELS=0``).

- ``rng``: a seeded NumPy Generator, fresh for each test, so test data is reproducible.
- ``shared_data``: the folder of real data next to the repository (``../shared/data``), which the
  tests (never the package) may read; a test that asks for it is skipped when it is absent.
- ``shakespeare``: the text of Tiny Shakespeare from that folder (skipped when absent).
- ``fake_gpu``: the fake CuPy as this process's device for one test (the fused kernels off);
  in the fake pass, where it already is, the fake module as it is.
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAKE_CUPY = Path(__file__).resolve().parent / "fake_cupy"

if os.environ.get("MINILLM_FAKE_CUPY", "") == "1" and str(FAKE_CUPY) not in sys.path:
    sys.path.insert(0, str(FAKE_CUPY))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_CUPY), os.environ.get("PYTHONPATH")]))
    os.environ["MINILLM_KERNELS"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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


# ---------------------------------------------------------------- the fake GPU in this process
@pytest.fixture
def fake_gpu():
    """The fake CuPy (``tests/fake_cupy``) as the active device during one test (the fused
    kernels off); yields it with its counters reset."""
    sys.path.insert(0, str(FAKE_CUPY))
    try:
        import fake_cupy_loader
    finally:
        sys.path.remove(str(FAKE_CUPY))
    with fake_cupy_loader.active() as cupy:
        if not hasattr(cupy, "_fake"):
            pytest.skip("needs the fake CuPy (this process runs on a real GPU)")
        cupy._fake.reset()
        yield cupy


# ---------------------------------------------------------------- the fake-GPU CI pass
# The second CI pass (.ci/run: MINILLM_FAKE_CUPY=1 MINILLM_DEVICE=gpu, notebooks excluded) runs
# the suite on the fake GPU, except what never reaches device code (config parsing, CLI argument
# errors, tokenizers, data files, lesson checks, MPI abort and signal handling) or repeats a long
# run whose device code shorter tests cover. Everything here runs in the normal pass; the list
# keeps the fake pass within ~4 minutes on an idle 2-core machine.
_FAKE_PASS_SKIPS = {
    "test_config.py": "host only (config parsing)",
    "test_data.py": "host only (data preparation)",
    "test_tokenizers.py": "host only (tokenizers)",
    "test_bpe_train.py": "host only (BPE trainer, encode_iterable)",
    "test_data_quality.py": "host only (cleaning, quality rules, MinHash/LSH dedup)",
    "test_data_pipeline.py": "host only (sharded preparation, resume, memory); training kept",
    "test_exercises.py": "lesson checks (they switch to the fake themselves)",
    "test_cli.py": "host only (arguments and config errors)",
    "test_memory.py::test_prediction_within_5_percent_of_the_measured_peak": "tracemalloc's host peak "
        "(the fake CuPy has no memory pool to hook; the ledger's device graph is checked here)",
    "test_memory.py::test_prediction_within_5_percent_under_zero3_on_two_ranks": "tracemalloc's host peak",
    "test_memory.py::test_prediction_within_5_percent_on_each_pipeline_stage": "tracemalloc's host peak",
    "test_memory.py::test_tensor_parallel_ledger_holds_the_parameters_and_the_peak": "tracemalloc's host peak",
    "test_amp.py::test_half_precision_recipe_ends_within_2_percent_of_float32": "3 x 300-step recipe",
    "test_comm.py::test_run_mpi_kills_hung_job": "host only (MPI job control)",
    "test_comm.py::test_exception_on_one_rank_aborts_job": "host only (MPI abort)",
    "test_comm.py::test_user_error_on_one_rank_exits_2": "host only (MPI abort)",
    "test_comm.py::test_bench_allreduce_script": "host only (NumPy buffers)",
    "test_comm.py::test_collectives_and_ring_four_ranks": "the two-rank ring covers device arrays",
    "test_dp_train.py::test_bench_dp_script_on_a_short_run": "a benchmark script",
    "test_dp_train.py::test_exception_on_rank_1_mid_training_ends_the_job": "host only (MPI abort)",
    "test_dp_train.py::test_checkpoint_failure_on_rank_0_ends_the_job": "host only (MPI abort)",
    "test_resume.py::test_preemption_signal_saves_and_exits_cleanly": "host only (signals)",
    "test_resume.py::test_kill_during_save_never_leaves_a_checkpoint_that_gets_picked": "host only (files)",
    "test_resume.py::test_resume_auto_skips_a_corrupt_newest_checkpoint": "host only (files)",
    "test_bench.py::test_bench_threads_runs_a_pinned_child": "host only (BLAS threads)",
    "test_bench.py::test_allocator_tuning_stops_page_faults_on_reused_memory": "host only (malloc)",
}
_FAKE_PASS_KEEPS = ("test_cli.py::test_sample_is_deterministic_for_a_seed",   # sampling on the device
                    "test_cli.py::test_eval_prints_loss_and_perplexity",
                    "test_data_pipeline.py::test_training_on_shards_equals_training_on_one_file")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MINILLM_FAKE_CUPY", "") != "1":
        return
    for item in items:
        test = item.nodeid.rsplit("/", 1)[-1].split("[")[0]           # "test_x.py::name"
        reason = _FAKE_PASS_SKIPS.get(test) or _FAKE_PASS_SKIPS.get(test.split("::")[0])
        if reason and test not in _FAKE_PASS_KEEPS:
            item.add_marker(pytest.mark.skip(reason=f"not in the fake-GPU pass: {reason}"))
