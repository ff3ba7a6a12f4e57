"""Running CUDA C on the CPU, for the fake CuPy's RawModule (when g++ is there), and cuBLAS GEMMs.

A kernel's source is compiled with g++ after a small shim: ``__global__`` functions become plain
functions; the threads of a block are fibers (ucontext) that one OS thread runs in turn, each
until it waits at ``__syncthreads()`` or inside a warp's ``__shfl_xor_sync`` (values exchanged
through a buffer between two warp barriers); ``__shared__`` variables are function statics
(blocks run one after another). Slow, but exact in what it computes, and it uses one core:
enough to test the kernels' indexing, reductions and formulas, and their Python launch code,
without a GPU.
What it cannot show: speed, races that only real concurrency across blocks would expose, and
the PTX path of the float16 conversions (the source has a portable branch for this compiler).

``gemm_strided_batched`` does what cublasGemmStridedBatchedEx does (column-major, op N/T,
leading dimensions, batch strides) with NumPy on raw addresses.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy

SHIM = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <ucontext.h>
#include <vector>
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

// The threads of a block are fibers (ucontext) run by one OS thread: a thread runs until it
// waits at a barrier; a barrier opens when every live thread of the block (__syncthreads) or of
// the warp (the two waits of a shuffle) has reached it.
enum { RUNNING = 0, AT_BLOCK = 1, AT_WARP = 2 };
struct Fiber { ucontext_t ctx; std::vector<char> stack; int wait = RUNNING; bool done = false; };
static std::vector<Fiber> g_fibers;
static ucontext_t g_scheduler;
static unsigned int g_current;
static std::function<void()>* g_body;
static double g_lanes[32][32];

static void fiber_main() { (*g_body)(); g_fibers[g_current].done = true; }
static void wait_at(int kind) {
    g_fibers[g_current].wait = kind;
    swapcontext(&g_fibers[g_current].ctx, &g_scheduler);
}
static inline void __syncthreads() { wait_at(AT_BLOCK); }
template <class V> static V __shfl_xor_sync(unsigned int, V v, int offset) {
    unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    g_lanes[warp][lane] = (double)v;
    wait_at(AT_WARP);
    V out = (V)g_lanes[warp][lane ^ offset];
    wait_at(AT_WARP);
    return out;
}
static bool release_a_barrier(unsigned int n) {
    for (unsigned int w = 0; w * 32 < n; w++) {          // a warp whose live threads all wait
        bool any = false, all = true;
        for (unsigned int t = w * 32; t < n && t < w * 32 + 32; t++) {
            if (g_fibers[t].done) continue;
            any = true;
            all = all && g_fibers[t].wait == AT_WARP;
        }
        if (any && all) {
            for (unsigned int t = w * 32; t < n && t < w * 32 + 32; t++) g_fibers[t].wait = RUNNING;
            return true;
        }
    }
    for (unsigned int t = 0; t < n; t++)
        if (!g_fibers[t].done && g_fibers[t].wait != AT_BLOCK) return false;
    for (unsigned int t = 0; t < n; t++) g_fibers[t].wait = RUNNING;
    return true;
}
static void emu_launch(unsigned int gx, unsigned int gy, unsigned int bx, std::function<void()> body) {
    gridDim = dim3{gx, gy, 1};
    blockDim = dim3{bx, 1, 1};
    g_body = &body;
    if (g_fibers.size() < bx) g_fibers.resize(bx);
    for (unsigned int y = 0; y < gy; y++) for (unsigned int x = 0; x < gx; x++) {
        blockIdx = dim3{x, y, 0};
        for (unsigned int t = 0; t < bx; t++) {
            Fiber& f = g_fibers[t];
            f.stack.resize(1 << 16);
            f.wait = RUNNING;
            f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = &g_scheduler;
            makecontext(&f.ctx, fiber_main, 0);
        }
        for (;;) {
            bool ran = false, all_done = true;
            for (unsigned int t = 0; t < bx; t++) {
                if (g_fibers[t].done) continue;
                all_done = false;
                if (g_fibers[t].wait != RUNNING) continue;
                g_current = t;
                threadIdx = dim3{t, 0, 0};
                ran = true;
                swapcontext(&g_scheduler, &g_fibers[t].ctx);
            }
            if (all_done) break;
            if (!ran && !release_a_barrier(bx)) {
                std::fprintf(stderr, "emulator: threads wait at different barriers (divergent __syncthreads)\n");
                std::abort();
            }
        }
    }
}
"""

_SCALARS = {"int": ctypes.c_int, "unsigned int": ctypes.c_uint, "long long": ctypes.c_longlong,
            "float": ctypes.c_float, "double": ctypes.c_double}
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


def available() -> bool:
    return shutil.which("g++") is not None


def _params(text, typedefs):
    """[(ctypes type, or the C type text of a pointer, name)] of a kernel's parameter list."""
    out = []
    for p in " ".join(text.split()).split(","):
        p = p.strip()
        name = re.findall(r"\w+", p)[-1]
        typ = p[: p.rindex(name)].strip()
        out.append((typ if "*" in typ else _SCALARS[typedefs.get(typ.replace("const", "").strip(),
                                                                 typ.replace("const", "").strip())], name))
    return out


class Module:
    """The kernels of one CUDA source, compiled for the CPU."""

    def __init__(self, code):
        typedefs = dict((b, a.strip()) for a, b in re.findall(r"typedef\s+([\w ]+?)\s+(\w+)\s*;", code))
        self.kernels = {m.group(1): _params(m.group(2), typedefs) for m in _KERNEL.finditer(code)}
        wrappers = []
        for name, params in self.kernels.items():  # a C entry point per kernel that launches it
            decl = "".join(f", {'void*' if isinstance(t, str) else _ctype_name(t)} {n}" for t, n in params)
            args = ", ".join(f"({t}){n}" if isinstance(t, str) else n for t, n in params)
            wrappers.append(f'extern "C" void launch_{name}(unsigned int gx, unsigned int gy, unsigned int bx{decl}) '
                            f'{{ emu_launch(gx, gy, bx, [=] {{ {name}({args}); }}); }}')
        self.lib = ctypes.CDLL(_build(SHIM + code + "\n" + "\n".join(wrappers)))

    def get_function(self, name):
        return Kernel(self.lib, name, self.kernels[name])


def _ctype_name(t):
    return {ctypes.c_int: "int", ctypes.c_uint: "unsigned int", ctypes.c_longlong: "long long",
            ctypes.c_float: "float", ctypes.c_double: "double"}[t]


def _build(source) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"minillm-fake-cuda-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, f"k{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(folder, f"k{digest}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", src, "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return lib


class Kernel:
    def __init__(self, lib, name, params):
        self.fn = getattr(lib, f"launch_{name}")
        self.name, self.params = name, params

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        grid, block = tuple(grid) + (1, 1), tuple(block)
        cargs = []
        for (ctype, name), a in zip(self.params, args):
            if isinstance(ctype, str):
                if not hasattr(a, "_a"):
                    raise TypeError(f"{self.name}: argument {name} must be a device array, got {type(a)}")
                if not a._a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {name} is not contiguous")
                cargs.append(ctypes.c_void_p(a._a.ctypes.data))
            else:
                if not isinstance(a, numpy.generic):  # CuPy wants NumPy scalars of the exact type
                    raise TypeError(f"{self.name}: argument {name} must be a NumPy scalar, got {type(a)}")
                cargs.append(ctype(a.item()))
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), *cargs)


# ------------------------------------------------------------------ cuBLAS
_CUDA_DTYPES = {0: numpy.dtype(numpy.float32), 1: numpy.dtype(numpy.float64), 2: numpy.dtype(numpy.float16)}


def _dtype(code):
    if code == 14:
        import ml_dtypes
        return numpy.dtype(ml_dtypes.bfloat16)
    return _CUDA_DTYPES[code]


def _column_major(ptr, rows, cols, ld, dtype):
    """The (rows, cols) column-major matrix at address ``ptr`` with leading dimension ``ld``."""
    nbytes = ((cols - 1) * ld + rows) * dtype.itemsize
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    return numpy.ndarray((rows, cols), dtype=dtype, buffer=buf, strides=(dtype.itemsize, ld * dtype.itemsize))


def gemm_strided_batched(transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
                         beta, C, Ctype, ldc, strideC, batch, compute_type):
    """C = alpha op(A) op(B) + beta C for each of ``batch`` matrices, column-major as in cuBLAS,
    accumulated in float32 (CUBLAS_COMPUTE_32F) or float64."""
    if compute_type not in (68, 70):
        raise ValueError(f"compute type {compute_type} is not emulated")
    acc = numpy.float32 if compute_type == 68 else numpy.float64
    a_t, b_t, c_t = _dtype(Atype), _dtype(Btype), _dtype(Ctype)
    al = ctypes.c_float.from_address(alpha).value if acc is numpy.float32 else ctypes.c_double.from_address(alpha).value
    be = ctypes.c_float.from_address(beta).value if acc is numpy.float32 else ctypes.c_double.from_address(beta).value
    for i in range(batch):
        a = _column_major(A + i * strideA * a_t.itemsize, m if transa == 0 else k, k if transa == 0 else m, lda, a_t)
        b = _column_major(B + i * strideB * b_t.itemsize, k if transb == 0 else n, n if transb == 0 else k, ldb, b_t)
        c = _column_major(C + i * strideC * c_t.itemsize, m, n, ldc, c_t)
        a = a if transa == 0 else a.T
        b = b if transb == 0 else b.T
        prod = a.astype(acc) @ b.astype(acc)
        c[...] = (acc(al) * prod + (acc(be) * c.astype(acc) if be else 0)).astype(c_t)
