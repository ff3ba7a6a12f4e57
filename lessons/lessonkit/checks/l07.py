"""Checks of lesson 07 (checkpointing): against minillm's fletcher32 and HDF5's own filter,
save_checkpoint / find_latest_checkpoint, and a real Trainer resumed by the learner's code."""
import atexit
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from lessonkit.exercise import exercise
from minillm.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from minillm.checkpoint.chunks import fletcher32 as library_fletcher32


def _little_endian(data):   # a plausible slip: the machine's own byte order, not HDF5's big-endian words
    data = bytes(data) + b"\0" * (len(data) % 2)
    s1 = s2 = 0
    for i in range(0, len(data), 2):
        s1 += data[i] | data[i + 1] << 8
        s2 += s1
    fold = lambda s: (s - 1) % 65535 + 1 if s else 0  # noqa: E731
    return fold(s2) << 16 | fold(s1)


def _stored_by_hdf5(data: bytes) -> int:
    """The checksum HDF5's own fletcher32 filter stores after one chunk of ``data``."""
    with h5py.File(tempfile.SpooledTemporaryFile(), "w") as f:
        ds = f.create_dataset("x", data=np.frombuffer(data, np.uint8), chunks=(len(data),),
                              fletcher32=True)
        f.flush()
        _, raw = ds.id.read_direct_chunk((0,))
    return int.from_bytes(raw[-4:], "little")


@exercise("07.fletcher32", broken=_little_endian)
def check_fletcher32(fletcher32):
    rng = np.random.default_rng(0)
    cases = {"b'abcde' (odd length)": b"abcde", "b'\\x00' * 8 (all zero)": bytes(8),
             "b'\\xff\\xff' (one word 65535)": b"\xff\xff",
             "1,000 random bytes": rng.integers(0, 256, 1000, dtype=np.uint8).tobytes(),
             "4,097 random bytes": rng.integers(0, 256, 4097, dtype=np.uint8).tobytes()}
    for what, data in cases.items():
        want = library_fletcher32(np.frombuffer(data, np.uint8))
        got = fletcher32(data)
        if got != want:
            raise AssertionError(
                f"fletcher32 of {what}: {got!r} ({'0x%08x' % got if isinstance(got, int) else '?'}), "
                f"minillm's is 0x{want:08x}. Hint: HDF5 sums big-endian 16-bit words "
                "(data[i] << 8 | data[i+1]; a last odd byte is the high half of a word), s2 adds up "
                "the running s1, and each sum is folded mod 65535 into 1..65535 (0 only when it is 0); "
                "the result is s2 << 16 | s1")
    data = cases["1,000 random bytes"]
    assert fletcher32(data) == _stored_by_hdf5(data), "the library agrees with you but not HDF5?!"


def _in_place(path, write):   # a plausible slip: overwrite the target directly
    with open(path, "wb") as f:
        write(f)


@contextlib.contextmanager
def _recording_os_calls(log):
    """Record os.fsync and os.replace / os.rename calls (in order) while the block runs."""
    originals = {name: getattr(os, name) for name in ("fsync", "replace", "rename")}

    def wrap(name):
        def call(*args, **kwargs):
            log.append((name, args))
            return originals[name](*args, **kwargs)
        return call
    try:
        for name in originals:
            setattr(os, name, wrap(name))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)


@exercise("07.atomic_write", broken=_in_place)
def check_atomic_write(atomic_write):
    work = Path(tempfile.mkdtemp(prefix="lesson07_check_"))
    try:
        good = save_checkpoint(work / "ckpt_0000010.h5", {"meta": {"step": 10}, "w": np.arange(5.0)})
        newer = save_checkpoint(work / "src.h5", {"meta": {"step": 20}, "w": np.arange(5.0) + 1})
        body = newer.read_bytes()
        newer.unlink()
        target = work / "ckpt_0000020.h5"
        seen = {}

        def crash(f):           # half the bytes, then the machine "dies"
            f.write(body[:len(body) // 2])
            f.flush()
            seen["file"] = Path(f.name).resolve()
            seen["target exists"] = target.exists()
            raise KeyboardInterrupt("simulated crash in the middle of the write")

        try:
            atomic_write(target, crash)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("atomic_write swallowed the exception raised while writing; let it "
                                 "propagate (the caller must know the save failed)")
        assert seen.get("file") != target.resolve() and not seen.get("target exists"), (
            "while writing, the bytes went to the target name itself: a crash at that moment leaves "
            "a half-written file under a valid name. Write to a temporary file next to it instead")
        assert seen["file"].parent == target.parent.resolve(), (
            f"the temporary file is in {seen['file'].parent}, not in the target's directory: a "
            "rename is atomic only within one file system, so create it next to the target")
        assert find_latest_checkpoint(work, warn=lambda m: None) == good, (
            "after a crash in the middle of the write, find_latest_checkpoint does not pick the "
            "older good checkpoint")
        assert sorted(p.name for p in work.iterdir()) == [good.name], (
            f"after the failed write the directory holds {sorted(p.name for p in work.iterdir())}: "
            "remove the temporary file when writing fails")

        log = []
        with _recording_os_calls(log):
            atomic_write(target, lambda f: f.write(body))
        assert target.read_bytes() == body, "after a successful write the target does not hold the bytes"
        assert find_latest_checkpoint(work, warn=lambda m: None) == target, \
            "find_latest_checkpoint does not pick the new checkpoint"
        assert load_checkpoint(target)["meta"]["step"] == 20
        assert sorted(p.name for p in work.iterdir()) == sorted([good.name, target.name]), (
            f"a temporary file was left behind: {sorted(p.name for p in work.iterdir())}")
        names = [name for name, _ in log]
        assert "replace" in names or "rename" in names, (
            "the target appeared without os.replace / os.rename: the temp file must be renamed onto it")
        renamed = next(i for i, n in enumerate(names) if n in ("replace", "rename"))
        assert "fsync" in names[:renamed], (
            "os.fsync was not called before the rename: without it a power cut can leave the new "
            "name pointing at data that never reached the disk (flush, then os.fsync(f.fileno()))")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ restoring a Trainer
_REF = {}


def _config(work, name, *extra):
    # float16 with the loss scale starting too high: the first steps overflow and are skipped, so
    # at the step-6 checkpoint the scale, the optimizer's step count and the step all differ from a
    # fresh trainer's, and forgetting any of them changes the losses that follow
    from minillm.config import load_config
    tiny = Path(__file__).resolve().parents[3] / "configs" / "tiny.toml"
    return load_config(tiny, [
        f"--data.dir={work / 'data'}", f"--train.out_dir={work / name}", "--train.max_steps=12",
        "--train.ckpt_interval=6", "--train.keep_last=0", "--train.log_interval=1",
        "--train.batch_size=4", "--train.lr=4e-3", "--train.warmup_steps=3", "--train.eval_interval=1000",
        "--train.eval_iters=1", "--train.sample_tokens=0", "--model.dropout=0.1",
        "--train.dtype=float16", "--train.loss_scale_init=1048576",
        "--train.loss_scale_growth_interval=3", *extra])


def _reference():
    """One uninterrupted 12-step run with a checkpoint at step 6 (made once per process)."""
    if not _REF:
        from minillm.train.metrics import read_metrics
        from minillm.train.trainer import train
        work = Path(tempfile.mkdtemp(prefix="lesson07_restore_"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        with np.errstate(all="ignore"), contextlib.redirect_stdout(io.StringIO()):
            train(_config(work, "reference"), log=lambda m: None)
        _REF.update(work=work, losses=[r["loss"] for r in read_metrics(work / "reference")],
                    ckpt=work / "reference" / "ckpt_0000006.h5")
    return _REF


def _without_step(trainer, state):   # a plausible slip: everything but the step counter
    trainer.engine.load_model_state(state["model"])
    trainer.engine.load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.precision.load_state_dict(state["scaler"])


@exercise("07.restore", broken=_without_step)
def check_restore(restore):
    from minillm.train.trainer import Trainer
    ref = _reference()
    state = load_checkpoint(ref["ckpt"])
    name = f"restored_{len(list(ref['work'].iterdir()))}"
    trainer = Trainer(_config(ref["work"], name), log=lambda m: None)
    restore(trainer, load_checkpoint(ref["ckpt"]))
    at = int(state["meta"]["step"])
    assert trainer.step == at, (f"trainer.step is {trainer.step}, the checkpoint was taken at step {at}: "
                                "the schedule and the batches are functions of the step")
    assert trainer.tokens_seen == state["meta"]["tokens_seen"], \
        "trainer.tokens_seen is not restored (the metrics count tokens from it)"
    for key, got in trainer.engine.model_state().items():
        assert np.array_equal(got, state["model"][key]), f"weight {key} differs from the checkpoint's"
    opt = trainer.engine.optimizer_state(trainer.optimizer)
    assert opt["step"] == state["optimizer"]["step"], (
        f"the optimizer's step count is {opt['step']}, the checkpoint's {state['optimizer']['step']}: "
        "AdamW's bias correction 1 - beta^t depends on it")
    for key, moments in state["optimizer"]["state"].items():
        for k, want in moments.items():
            assert np.array_equal(opt["state"][key][k], want), f"AdamW's {k} of {key} is not restored"
    assert trainer.precision.state_dict() == state["scaler"], (
        f"the loss scaler holds {trainer.precision.state_dict()}, the checkpoint "
        f"{state['scaler']}: restore it too (precision.load_state_dict)")
    losses = []
    with np.errstate(all="ignore"):
        for _ in range(len(ref["losses"]) - at):
            losses.append(trainer.train_step()[0])
            trainer.step += 1
    assert losses == ref["losses"][at:], (
        f"the resumed losses {np.round(losses, 4).tolist()} are not bit-identical to the "
        f"uninterrupted run's {np.round(ref['losses'][at:], 4).tolist()}")
