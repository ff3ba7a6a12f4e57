"""Weight-only quantization formats: symmetric per-output-channel int8 and group-wise int4.

A weight W (out, in) becomes small integer codes plus float scales, W ~= codes * scale:

- int8: one scale per output row, s_o = max_i |W_oi| / 127, codes round(W / s) in [-127, 127].
  Rounding error per weight is at most s_o / 2, i.e. 1/254 of the row's largest weight.
- int4: one scale per group of ``group_size`` consecutive inputs of a row (float16, as llama.cpp
  and GPTQ store them), s_og = max |W_o,g| / 7, codes in [-7, 7] stored as code + 8 in a nibble,
  two per byte (even input index in the low nibble). Groups bound the damage one large weight
  does to its neighbours' precision; with 16 levels a whole-row scale would be too coarse.

Each format is a small class holding its arrays, with ``quantize`` (from a float matrix),
``dequantize`` (back to floats, on whatever device the arrays live), ``arrays`` / ``from_arrays``
(for the file) and ``matmul_t(x)`` = x @ W^T, the one method a GPU kernel that reads the packed
bytes directly (a CuPy RawKernel dequantizing in registers) would override.
"""
from minillm.autograd.ops import upcast
from minillm.backend import xp
from minillm.errors import UserError

INT8_MAX = 127
INT4_MAX = 7          # symmetric grid -7..7; the 16th nibble value (-8) is never produced


def pack_int4(codes):
    """int codes in [-8, 7], shape (..., n) with n even -> uint8 (..., n/2), two codes per byte."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last axis has odd length {codes.shape[-1]}")
    u = (codes.astype(xp.int16) + 8).astype(xp.uint8)          # 0..15
    return u[..., 0::2] | (u[..., 1::2] << 4)                   # (..., n/2)


def unpack_int4(packed):
    """Inverse of pack_int4: uint8 (..., n/2) -> int8 codes (..., n)."""
    lo = (packed & 0x0F).astype(xp.int8) - 8
    hi = (packed >> 4).astype(xp.int8) - 8
    return xp.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _safe(amax, qmax):
    """Scale amax / qmax, with 1 for all-zero rows or groups (their codes are 0 either way)."""
    return xp.where(amax > 0, amax / qmax, 1.0)


class Int8Weight:
    """Per-output-channel symmetric int8: codes (out, in) int8, scale (out,) float32."""

    bits, group_size = 8, None

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale
        self.shape = tuple(codes.shape)

    @classmethod
    def quantize(cls, w):
        w = w.astype(xp.float32)
        scale = _safe(xp.abs(w).max(axis=1), INT8_MAX).astype(xp.float32)          # (out,)
        codes = xp.clip(xp.rint(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(xp.int8)
        return cls(codes, scale)

    def dequantize(self, dtype=xp.float32):
        return (self.codes.astype(xp.float32) * self.scale[:, None]).astype(dtype, copy=False)

    def matmul_t(self, x2):
        """x2 (N, in) @ W^T -> (N, out); scaling the product's columns equals scaling W's rows."""
        y = x2 @ self.codes.astype(x2.dtype).T                                      # (N, out)
        y *= self.scale.astype(x2.dtype)
        return y

    def arrays(self):
        return {"codes": self.codes, "scale": self.scale}

    @classmethod
    def from_arrays(cls, a, group_size=None):
        return cls(a["codes"], a["scale"])

    @property
    def nbytes(self):
        return int(self.codes.nbytes + self.scale.nbytes)


class Int4Weight:
    """Group-wise symmetric int4: packed (out, in/2) uint8, scale (out, in/group_size) float16."""

    bits = 4

    def __init__(self, packed, scale, group_size):
        self.packed, self.scale, self.group_size = packed, scale, int(group_size)
        self.shape = (packed.shape[0], 2 * packed.shape[1])

    @classmethod
    def quantize(cls, w, group_size):
        out, n_in = w.shape
        check_group_size(group_size, n_in, "the weight")
        g = w.astype(xp.float32).reshape(out, n_in // group_size, group_size)      # (out, G, gs)
        scale = _safe(xp.abs(g).max(axis=2), INT4_MAX).astype(xp.float16)          # (out, G)
        s = upcast(scale)[..., None]            # quantize against the stored (rounded) scale
        codes = xp.clip(xp.rint(g / s), -INT4_MAX, INT4_MAX).astype(xp.int8)
        return cls(pack_int4(codes.reshape(out, n_in)), scale, group_size)

    def dequantize(self, dtype=xp.float32):
        out, n_in = self.shape
        codes = unpack_int4(self.packed).reshape(out, n_in // self.group_size, self.group_size)
        w = codes.astype(xp.float32) * upcast(self.scale)[..., None]                # (out, G, gs)
        return w.reshape(out, n_in).astype(dtype, copy=False)                       # (out, in)

    def matmul_t(self, x2):
        return x2 @ self.dequantize(x2.dtype).T                                     # (N, out)

    def arrays(self):
        return {"packed": self.packed, "scale": self.scale}

    @classmethod
    def from_arrays(cls, a, group_size):
        return cls(a["packed"], a["scale"], group_size)

    @property
    def nbytes(self):
        return int(self.packed.nbytes + self.scale.nbytes)


def check_group_size(group_size, width=None, what=""):
    """A UserError unless group_size is an even positive number (that divides ``width``)."""
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise UserError(f"--group-size={group_size} must be an even integer >= 2 (e.g. 32, 64, 128)")
    if width is not None and width % group_size:
        raise UserError(f"--group-size={group_size} does not divide the width {width} of {what}; "
                        f"pick a divisor of {width} (e.g. "
                        f"{', '.join(str(g) for g in (32, 64, 128, 16, 8) if width % g == 0) or 2})")


def check_bits(bits):
    if bits not in (4, 8):
        raise UserError(f"--bits={bits} is not supported; use 8 (int8 per channel) or 4 (int4 groups)")


def quantize_weight(w, bits, group_size=None):
    """An Int8Weight or Int4Weight for the float matrix w (out, in)."""
    check_bits(bits)
    return Int8Weight.quantize(w) if bits == 8 else Int4Weight.quantize(w, group_size)


def weight_from_arrays(arrays, bits, group_size=None):
    check_bits(bits)
    return (Int8Weight if bits == 8 else Int4Weight).from_arrays(arrays, group_size)
