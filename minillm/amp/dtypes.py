"""The dtype policy: which array dtype each ``train.dtype`` name computes in, and what it can hold.

float16 and bfloat16 both store a number in 16 bits but split them differently:

    float32   1 sign | 8 exponent | 23 mantissa   range ~1e-38 .. 3e38, ~7 decimal digits
    float16   1 sign | 5 exponent | 10 mantissa   range ~6e-8 .. 65504, ~3 digits
    bfloat16  1 sign | 8 exponent |  7 mantissa   float32's range, ~2 digits

float16 is precise but its range is narrow, so small gradients round to zero (underflow) unless
the loss is scaled up first; bfloat16 has float32's range, so it needs no loss scaling, but
every value carries only 8 significant bits. NumPy has no bfloat16: it comes from ``ml_dtypes``
(the package JAX uses), whose arrays NumPy computes with like any other.
"""
from dataclasses import dataclass

import numpy

from minillm import backend
from minillm.choices import DTYPES as DTYPE_NAMES
from minillm.choices import HALF_DTYPES  # noqa: F401  (re-exported)
from minillm.errors import UserError


def _bfloat16():
    import ml_dtypes  # a dependency of minillm; imported here so `import minillm` stays light
    return numpy.dtype(ml_dtypes.bfloat16)


def _require_bfloat16_on_gpu():
    """CuPy computes with bfloat16 (as ml_dtypes.bfloat16) from version 14 on."""
    version = backend.cupy_version()
    if backend.is_gpu() and int(version.split(".")[0]) < 14:
        raise UserError(f"train.dtype='bfloat16' needs CuPy >= 14 (bfloat16 through ml_dtypes) but this "
                        f"is CuPy {version}; pip install -U 'cupy-cuda12x>=14' (cupy-cuda13x for CUDA 13), "
                        "or use --train.dtype=float16 (with loss scaling) or --train.dtype=float32")


def compute_dtype(name: str):
    """The array dtype that ``train.dtype = name`` computes in, on the active device.

    An unknown name, or bfloat16 on a CuPy without it (before 14), is a UserError naming the
    version and the alternatives.
    """
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(map(repr, DTYPE_NAMES))}")
    if name != "bfloat16":
        return numpy.dtype(name)
    _require_bfloat16_on_gpu()
    return _bfloat16()


def is_half(dtype) -> bool:
    """True for the 16-bit float formats (float16, bfloat16)."""
    return numpy.dtype(dtype).itemsize == 2


@dataclass(frozen=True)
class FormatInfo:
    """What a floating-point format can represent (all values as Python floats)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float                # largest finite value: anything above overflows to inf
    smallest_normal: float    # below this, values lose precision (subnormals) ...
    smallest_subnormal: float  # ... and below half of this they round to zero (underflow)
    eps: float                # spacing of values just above 1.0: the relative rounding step

    def spacing(self, x):
        """Gap between |x| and the next larger representable value (float64 NumPy array): a
        value is stored with a relative error of up to half of spacing(x) / x."""
        x = numpy.abs(numpy.asarray(x, dtype=numpy.float64))
        exponent = numpy.floor(numpy.log2(numpy.maximum(x, self.smallest_normal)))
        return numpy.exp2(exponent - self.mantissa_bits)  # subnormals: a fixed step


def format_info(name: str) -> FormatInfo:
    """Range and precision of ``float32`` / ``float16`` / ``bfloat16`` (host-side facts)."""
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(map(repr, DTYPE_NAMES))}")
    if name == "bfloat16":
        import ml_dtypes
        fi = ml_dtypes.finfo(ml_dtypes.bfloat16)
    else:
        fi = numpy.finfo(numpy.dtype(name))
    return FormatInfo(name=name, exponent_bits=int(fi.nexp), mantissa_bits=int(fi.nmant),
                      max=float(fi.max), smallest_normal=float(fi.smallest_normal),
                      smallest_subnormal=float(fi.smallest_subnormal), eps=float(fi.eps))
