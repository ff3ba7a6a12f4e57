"""Checks of lesson 10c (the GPU path), run on the test suite's fake CuPy."""
import tempfile

import numpy as np

from lessonkit.exercise import exercise
from lessonkit.fakegpu import counting, fake_gpu
from minillm import backend
from minillm.nn.dropout_rng import mix32 as reference_mix32


def _broken_mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    return h * 0x846CA68B                      # the last xor-shift is missing


@exercise("10c.mix32", broken=_broken_mix32)
def check_mix32(mix32):
    """The learner's lowbias32 on a device array against the library's, value by value."""
    values = np.concatenate([[0, 1, 2, 0xFFFFFFFF, 0x80000000],
                             np.random.default_rng(0).integers(0, 2 ** 32, 200)]).astype(np.uint32)
    with fake_gpu():
        out = mix32(backend.asarray(values))
        assert backend.is_array(out), f"return a device array (got {type(out).__name__})"
        assert out.dtype == np.uint32, f"the result must stay uint32 (got {out.dtype})"
        got = backend.to_numpy(out)
    for v, g in zip(values.tolist(), got.tolist()):
        want = reference_mix32(v)
        assert g == want, (f"mix32({v:#010x}) = {g:#010x}, expected {want:#010x}. Hint: three "
                           "xor-shifts (16, 15, 16) around two multiplies, all in uint32")


def _broken_staged(a, host, allreduce):
    a.get(out=host)
    allreduce(host)
    return a                                   # the result never comes back to the device


@exercise("10c.staged_allreduce", broken=_broken_staged)
def check_staged_allreduce(staged_allreduce):
    """Through a pinned host buffer: one copy each way, the reduced values back in the device array."""
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    host = np.empty_like(data)                 # stands for the reused pinned buffer

    def allreduce(buf):                        # stands for MPI over 3 ranks holding the same data
        assert isinstance(buf, np.ndarray), "MPI gets the host buffer, not the device array"
        buf *= 3

    with fake_gpu() as cp:
        a = backend.asarray(data)
        with counting(cp) as n:
            out = staged_allreduce(a, host, allreduce)
        assert out is a, "reduce in place: return the same device array"
        got = backend.to_numpy(a)
    assert np.array_equal(got, 3 * data), ("the device array does not hold the reduced values: "
                                           "copy the host buffer back with a.set(host)")
    assert n.kinds.get("get", 0) == 1, f"copy to the host once, with a.get(out=host) (counted {n.kinds})"


_DATA = {}


def _tiny_trainer(out_dir):
    from minillm.config import load_config
    from minillm.data import prepare_dataset
    from minillm.train.trainer import Trainer
    if "dir" not in _DATA:
        _DATA["dir"] = tempfile.mkdtemp(prefix="l10c_data_")
        prepare_dataset("pydocs", _DATA["dir"], "char")
    cfg = load_config(None, ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16",
                             "--model.block_size=8", "--train.batch_size=2", "--train.device=gpu",
                             f"--data.dir={_DATA['dir']}", f"--train.out_dir={out_dir}",
                             "--train.sample_tokens=0", "--train.warmup_steps=2"])
    return Trainer(cfg, log=lambda msg: None)


def _broken_loop(trainer, steps, log_interval):
    logged = []
    for _ in range(steps):
        loss, _, _, _ = trainer.train_step()   # reads the loss and the norm every step
        trainer.step += 1
        if trainer.step % log_interval == 0:
            logged.append((trainer.step, loss))
    return logged


@exercise("10c.train_loop", broken=_broken_loop)
def check_train_loop(train_loop):
    """Six steps, a log every third: the same losses as the trainer's, and one host read per log."""
    import contextlib
    import io
    with tempfile.TemporaryDirectory() as tmp, fake_gpu() as cp, contextlib.redirect_stdout(io.StringIO()):
        reference = _tiny_trainer(f"{tmp}/ref")
        want = []
        for _ in range(6):
            loss, _, _, _ = reference.step_on_device()
            reference.step += 1
            if reference.step % 3 == 0:
                want.append((reference.step, backend.fetch(loss)[0]))
        trainer = _tiny_trainer(f"{tmp}/yours")
        with counting(cp) as n:
            got = train_loop(trainer, 6, 3)
    assert [s for s, _ in got] == [3, 6], f"log steps 3 and 6 (got steps {[s for s, _ in got]})"
    assert [loss for _, loss in got] == [loss for _, loss in want], \
        f"losses {got} differ from the trainer's {want}"
    assert n.syncs == 2, (f"{n.syncs} host reads in 6 steps ({n.kinds}); read only on the 2 logged "
                          "steps, with backend.fetch")
