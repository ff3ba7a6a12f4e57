"""Tests of minillm.backend (the default array module, device switching errors, host copies, the
cupy/numpy mixing check, synchronize) and of erf (autograd/special.py)."""
import importlib.util
import math
import os

import numpy as np
import pytest

from minillm import backend
from minillm.autograd.special import erf
from minillm.backend import xp
from minillm.errors import UserError

HAS_CUPY = importlib.util.find_spec("cupy") is not None
ON_CPU = os.environ.get("MINILLM_DEVICE", "cpu").strip().lower() in ("", "cpu")


@pytest.mark.skipif(not ON_CPU, reason="MINILLM_DEVICE selects another device")
def test_xp_is_numpy_by_default():
    assert backend.device() == "cpu" and not backend.is_gpu()
    assert backend.array_module() is np
    assert xp.zeros is np.zeros and xp.float32 is np.float32
    assert isinstance(xp.ones(3), np.ndarray) and backend.is_array(np.ones(2))


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed: nothing to report as missing")
def test_gpu_without_cupy_is_a_user_error_and_keeps_the_cpu():
    before = backend.device()
    with pytest.raises(UserError) as e:
        backend.set_device("gpu")
    msg = str(e.value)
    assert "CuPy" in msg and "cupy-cuda12x" in msg and "--train.device=cpu" in msg and "\n" not in msg
    assert backend.device() == before and backend.array_module() is np and xp.ones is np.ones


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match="unknown device 'tpu'.*'cpu' or 'gpu'"):
        backend.set_device("tpu")


def test_set_device_cpu_is_seen_through_xp():
    if not ON_CPU:
        pytest.skip("would switch a GPU run to the CPU")
    assert backend.set_device("cpu") is np
    assert xp.arange is np.arange and backend.device() == "cpu"


def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-7, 7, 2001), [0.0, 1e-12, -1e-12, 2.999999, 3.0, 3.000001, 30.0, -30.0]])
    got = backend.to_numpy(erf(backend.asarray(x)))
    ref = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=2e-16)
    assert got.dtype == np.float64


def test_erf_dtypes_and_shapes():
    x32 = backend.asarray(np.array([[-1.0, 0.5], [2.0, 4.0]], np.float32))
    y = erf(x32)
    assert y.dtype == np.float32 and y.shape == (2, 2)
    np.testing.assert_allclose(backend.to_numpy(y), [[math.erf(v) for v in r] for r in [[-1, 0.5], [2, 4]]],
                               rtol=1e-6)
    yi = erf(backend.asarray(np.array([0, 1, -2])))
    assert yi.dtype == np.float64
    np.testing.assert_allclose(backend.to_numpy(yi), [0.0, math.erf(1), math.erf(-2)], rtol=1e-14)


def test_to_numpy_and_asarray():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_numpy(a) is a
    assert backend.to_numpy(3.5) == 3.5 and isinstance(backend.to_numpy(3.5), np.ndarray)
    d = backend.asarray([[1, 2], [3, 4]], dtype=xp.float32)
    assert backend.is_array(d) and d.dtype == np.float32
    back = backend.to_numpy(d)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, [[1, 2], [3, 4]])


class FakeCupyArray:
    """Looks like a cupy.ndarray to the check, which only reads the type's module."""


FakeCupyArray.__module__ = "cupy._core.core"


@pytest.mark.skipif(not ON_CPU, reason="simulates a cupy array reaching the CPU backend")
def test_check_array_explains_mixing_devices():
    a = np.ones(2)
    assert backend.check_array(a) is a
    with pytest.raises(TypeError, match=r"weights is a cupy array but the active device is 'cpu'.*mixing"):
        backend.check_array(FakeCupyArray(), "weights")
    with pytest.raises(TypeError, match="must be an array, got list"):
        backend.check_array([1, 2], "grad")


def test_synchronize_is_a_noop_on_cpu():
    if backend.is_gpu():
        pytest.skip("on the GPU synchronize waits for the stream")
    assert backend.synchronize() is None
