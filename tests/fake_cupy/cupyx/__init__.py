"""The fake CuPy's ``cupyx``: pinned host buffers (plain NumPy arrays here) and scatter helpers."""
import numpy

import cupy


def empty_pinned(shape, dtype=float, order="C"):
    return numpy.empty(shape, dtype=dtype, order=order)


def zeros_pinned(shape, dtype=float, order="C"):
    return numpy.zeros(shape, dtype=dtype, order=order)


def empty_like_pinned(a, dtype=None, order="K", subok=None, shape=None):
    return numpy.empty(a.shape if shape is None else shape, dtype=dtype or a.dtype)


def scatter_add(a, slices, value):
    cupy.add.at(a, slices, value)
