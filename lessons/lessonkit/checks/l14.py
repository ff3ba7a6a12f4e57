"""Checks of lesson 14 (inference): int4 packing, the per-channel int8 scale, top-p filtering."""
import numpy as np

from lessonkit.exercise import exercise
from minillm import backend
from minillm.model.sampling import top_p_filter
from minillm.quant import Int8Weight, unpack_int4


def _pack_int4_swapped(codes):
    """A plausible mistake: the even input in the HIGH nibble."""
    return ((codes[:, 0::2] + 8) << 4 | (codes[:, 1::2] + 8)).astype(np.uint8)


@exercise("14.pack_int4", broken=_pack_int4_swapped)
def check_pack_int4(pack_int4):
    """The learner's bytes, unpacked by the library's own unpack_int4, give the codes back."""
    codes = np.random.default_rng(0).integers(-8, 8, size=(5, 32)).astype(np.int8)
    codes[0, :16] = np.arange(-8, 8)
    packed = np.asarray(pack_int4(codes.copy()))
    assert packed.shape == (5, 16), f"two codes per byte: expected shape (5, 16), got {packed.shape}"
    assert packed.dtype == np.uint8, f"expected uint8 bytes, got {packed.dtype}"
    back = backend.to_numpy(unpack_int4(backend.asarray(packed)))
    bad = np.argwhere(back != codes)
    assert not len(bad), (f"unpacking your bytes gives {back[tuple(bad[0])]} at {tuple(bad[0])} instead "
                          f"of {codes[tuple(bad[0])]}. Hint: the even input goes in the LOW nibble, "
                          f"each code stored as code + 8")


@exercise("14.int8_scales", broken=lambda w: np.full(w.shape[0], np.abs(w).max() / 127, np.float32))
def check_int8_scales(int8_scales):
    """One scale per output row, equal to the library's (max |row| / 127)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 24)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    got = np.asarray(int8_scales(w.copy()), dtype=np.float64)
    want = backend.to_numpy(Int8Weight.quantize(backend.asarray(w)).scale)
    assert got.shape == want.shape, f"one scale per output row: expected shape {want.shape}, got {got.shape}"
    row = int(np.argmax(np.abs(got - want) / want))
    assert np.allclose(got, want, rtol=1e-5), (
        f"row {row}: your scale {got[row]:.5g}, expected {want[row]:.5g} (max |w| of that row / 127)")


def _top_p_drops_the_crossing_token(probs, p):
    """A plausible mistake: keep tokens while the mass *including* them stays <= p."""
    order = np.argsort(-probs, axis=1)
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    keep = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(keep, order, cum <= p, axis=1)
    out = np.where(keep, probs, 0.0)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-300)


@exercise("14.top_p", broken=_top_p_drops_the_crossing_token)
def check_top_p(top_p):
    """Against the library's top_p_filter on random distributions and an exact case."""
    probs = np.array([[0.15, 0.5, 0.05, 0.3]])
    got = np.asarray(top_p(probs.copy(), 0.7))
    assert np.allclose(got, [[0, 0.625, 0, 0.375]]), (
        f"p = 0.7 on {probs[0].tolist()}: expected [0, 0.625, 0, 0.375] (0.5 alone is < 0.7, so 0.3 "
        f"joins, then renormalise), got {np.round(got, 4).tolist()}")
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(12) * 0.5, size=6)
    for p in (0.1, 0.5, 0.9, 1.0):
        got, want = np.asarray(top_p(probs.copy(), p)), top_p_filter(probs, p)
        assert np.allclose(got, want, atol=1e-9), f"top_p = {p}: rows differ from the reference"
