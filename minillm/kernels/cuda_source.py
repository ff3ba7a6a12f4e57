"""The CUDA C of minillm's fused kernels (launched from ``kernels/cuda.py``), as text.

Every kernel is written once against the names ``T`` (how x is stored), ``acc_t`` (what it
computes in: float, or double for float64 test inputs) and ``LOAD(p, i)`` / ``STORE(p, i, v)``;
``source(dtype)`` prefixes the definitions for one dtype. 16-bit values are stored as
``unsigned short`` and converted with inline PTX (float16) or bit shifts (bfloat16), so no CUDA
header is needed at compile time; the ``#else`` branch is the same conversion in plain C for the
tests' CPU emulator. Reductions inside a block go through ``block_sum`` / ``block_max`` (warp
shuffles, then one warp over the warps' partials): a fixed order, so results are deterministic.
"""

_TYPES = {  # dtype -> (storage type, compute type, LOAD, STORE)
    "float64": ("double", "double", "(p)[i]", "(p)[i] = (v)"),
    "float32": ("float", "float", "(p)[i]", "(p)[i] = (v)"),
    "float16": ("unsigned short", "float", "h2f((p)[i])", "(p)[i] = f2h(v)"),
    "bfloat16": ("unsigned short", "float", "bf2f((p)[i])", "(p)[i] = f2bf(v)"),
}

_PRELUDE = r"""
typedef __TYPE__ T;
typedef __ACC__ acc_t;
#define LOAD(p, i) (acc_t)(__LOAD__)
#define STORE(p, i, v) __STORE__
#define NEG_INF ((acc_t)(-__int_as_float(0x7f800000)))

// 16-bit conversions without headers: float16 via PTX cvt on the GPU (bit arithmetic when the
// source is compiled for a CPU emulator, as the tests' fake CuPy does), bfloat16 = the top 16
// bits of a float
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#else
__device__ __forceinline__ float h2f(unsigned short h) {
    unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));         // inf, nan
    if (e == 0) return __uint_as_float(sign) + (sign ? -1.0f : 1.0f) * (float)m * 5.9604645e-8f;  // subnormal
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13)); }
__device__ __forceinline__ unsigned short f2h(float f) {               // round to nearest even
    unsigned int x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (unsigned short)(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);             // >= 65520: inf
    if (a < 0x38800000u) return (unsigned short)(sign | (unsigned int)rintf(__uint_as_float(a) * 16777216.0f));
    a += 0xfffu + ((a >> 13) & 1u);
    return (unsigned short)(sign | ((a - 0x38000000u) >> 13)); }
#endif
__device__ __forceinline__ float bf2f(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short f2bf(float f) {      // round to nearest even
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);   // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16); }

__device__ __forceinline__ acc_t warp_sum(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v; }
__device__ __forceinline__ acc_t warp_max(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v; }

// Sum (or max) of v over the block, returned to every thread. `shared` holds 32 values.
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();                       // the previous call's readers of shared[0] are done
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? shared[lane] : (acc_t)0;
        v = warp_sum(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0]; }
__device__ acc_t block_max(acc_t v, acc_t* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? shared[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0]; }
"""

_KERNELS = r"""
// ---------------------------------------------------------------- GELU
// y = 0.5 x (1 + t), t = tanh(k (x + 0.044715 x^3)) (exact=0) or erf(x / sqrt 2) (exact=1)
__device__ __forceinline__ acc_t gelu_t(acc_t x, int exact) {
    const acc_t k = (acc_t)0.7978845608028654;                  // sqrt(2 / pi)
    return exact ? erf(x * (acc_t)0.7071067811865476) : tanh(k * (x + (acc_t)0.044715 * x * x * x)); }

extern "C" __global__ void gelu_fwd(const T* x, T* y, long long n, int exact) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc_t v = LOAD(x, i);
        STORE(y, i, (acc_t)0.5 * v * ((acc_t)1 + gelu_t(v, exact)));
    }
}

// dx = g * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2))   (tanh)
// dx = g * (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi))   (exact)
extern "C" __global__ void gelu_bwd(const T* x, const T* g, T* dx, long long n, int exact) {
    const acc_t k = (acc_t)0.7978845608028654;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc_t v = LOAD(x, i), t = gelu_t(v, exact), d;
        if (exact) d = (acc_t)0.5 * ((acc_t)1 + t) + v * exp((acc_t)-0.5 * v * v) * (acc_t)0.3989422804014327;
        else d = (acc_t)0.5 * ((acc_t)1 + t)
                 + (acc_t)0.5 * v * ((acc_t)1 - t * t) * k * ((acc_t)1 + (acc_t)(3 * 0.044715) * v * v);
        STORE(dx, i, LOAD(g, i) * d);
    }
}

// ---------------------------------------------------------------- layer norm and RMS norm
// One block per row of C values. rms=1: no mean (RMSNorm), no bias.
extern "C" __global__ void norm_fwd(const T* x, const T* w, const T* b, T* y, acc_t* mean_out,
                                    acc_t* rstd_out, int C, acc_t eps, int rms, int has_bias) {
    __shared__ acc_t shared[32];
    long long row = blockIdx.x;
    const T* xr = x + row * C;
    acc_t mean = 0;
    if (!rms) {
        acc_t s = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) s += LOAD(xr, c);
        mean = block_sum(s, shared) / C;
    }
    acc_t ss = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { acc_t d = LOAD(xr, c) - mean; ss += d * d; }
    acc_t rstd = (acc_t)1 / sqrt(block_sum(ss, shared) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        acc_t out = (LOAD(xr, c) - mean) * rstd * LOAD(w, c);
        if (has_bias) out += LOAD(b, c);
        STORE(y, row * C + c, out);
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g w, xhat = (x - mean) rstd
// (RMSNorm: the mean(dxhat) term is absent, as the mean is)
extern "C" __global__ void norm_bwd_x(const T* x, const T* w, const T* g, const acc_t* mean_in,
                                      const acc_t* rstd_in, T* dx, int C, int rms) {
    __shared__ acc_t shared[32];
    long long row = blockIdx.x;
    const T* xr = x + row * C;
    const T* gr = g + row * C;
    acc_t mean = mean_in[row], rstd = rstd_in[row], s1 = 0, s2 = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        acc_t dxhat = LOAD(gr, c) * LOAD(w, c), xhat = (LOAD(xr, c) - mean) * rstd;
        s1 += dxhat;
        s2 += dxhat * xhat;
    }
    acc_t m1 = rms ? (acc_t)0 : block_sum(s1, shared) / C;
    acc_t m2 = block_sum(s2, shared) / C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        acc_t dxhat = LOAD(gr, c) * LOAD(w, c), xhat = (LOAD(xr, c) - mean) * rstd;
        STORE(dx, row * C + c, rstd * (dxhat - m1 - xhat * m2));
    }
}

// Partial sums over a chunk of rows, one thread per column c (neighbouring threads read
// neighbouring columns: coalesced): dw_part[chunk, c] = sum g xhat, db_part[chunk, c] = sum g.
extern "C" __global__ void norm_param_grads(const T* x, const T* g, const acc_t* mean_in,
                                            const acc_t* rstd_in, acc_t* dw_part, acc_t* db_part,
                                            long long N, int C, long long rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    long long chunk = blockIdx.y;
    if (c >= C) return;
    long long r0 = chunk * rows_per_chunk, r1 = r0 + rows_per_chunk;
    if (r1 > N) r1 = N;
    acc_t sw = 0, sb = 0;
    for (long long r = r0; r < r1; r++) {
        acc_t gv = LOAD(g, r * C + c);
        sw += gv * (LOAD(x, r * C + c) - mean_in[r]) * rstd_in[r];
        sb += gv;
    }
    dw_part[chunk * C + c] = sw;
    db_part[chunk * C + c] = sb;
}

// ---------------------------------------------------------------- softmax cross-entropy
// One block per row of V logits: lse = max + log(sum exp(x - max)); loss = lse - x[target]
// (0 for rows whose target is ignored).
extern "C" __global__ void xent_fwd(const T* logits, const long long* targets, const unsigned char* valid,
                                    acc_t* lse_out, acc_t* loss_out, int V) {
    __shared__ acc_t shared[32];
    long long row = blockIdx.x;
    const T* xr = logits + row * V;
    acc_t m = NEG_INF;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmax(m, LOAD(xr, v));
    m = block_max(m, shared);
    acc_t s = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += exp(LOAD(xr, v) - m);
    acc_t lse = m + log(block_sum(s, shared));
    if (threadIdx.x == 0) {
        lse_out[row] = lse;
        loss_out[row] = valid[row] ? lse - LOAD(xr, targets[row]) : (acc_t)0;
    }
}

// dlogits = (softmax - onehot(target)) * scale, scale = g / n for valid rows (a device scalar:
// the host never reads it), 0 for ignored rows. One thread per logit.
extern "C" __global__ void xent_bwd(const T* logits, const long long* targets, const unsigned char* valid,
                                    const acc_t* lse, const acc_t* scale, T* dlogits, long long N, int V) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < N * V;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / V;
        int v = (int)(i - row * V);
        acc_t p = exp(LOAD(logits, i) - lse[row]) - (v == targets[row] ? (acc_t)1 : (acc_t)0);
        STORE(dlogits, i, valid[row] ? p * scale[0] : (acc_t)0);
    }
}

// ---------------------------------------------------------------- embedding backward
// gw[v, c] = sum of rows[i, c] over the i with ids[i] == v, in a fixed order: the row indices
// sorted by (id, position) are `order`, and v's are order[starts[v]:starts[v + 1]]. One thread
// per (v, c); a scatter with atomics would add in whatever order the threads arrive.
extern "C" __global__ void embedding_bwd(const T* rows, const long long* order, const long long* starts,
                                         T* gw, long long V, int C) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < V * C;
         i += (long long)gridDim.x * blockDim.x) {
        long long v = i / C;
        int c = (int)(i - v * C);
        acc_t s = 0;
        for (long long j = starts[v]; j < starts[v + 1]; j++) s += LOAD(rows, order[j] * C + c);
        STORE(gw, i, s);
    }
}

// ---------------------------------------------------------------- AdamW over every parameter
// Parameter t's weight, grad, m and v start at the addresses in the four pointer tables and hold
// offsets[t + 1] - offsets[t] elements; element i of the concatenation belongs to the tensor
// found by binary search. The formula and its order are those of optim/adamw.py.
extern "C" __global__ void adamw(const unsigned long long* wp, const unsigned long long* gp,
                                 const unsigned long long* mp, const unsigned long long* vp,
                                 const long long* offsets, const unsigned char* decay, int n_tensors,
                                 acc_t lr, acc_t beta1, acc_t beta2, acc_t eps, acc_t weight_decay,
                                 acc_t step_size, acc_t bc2_sqrt) {
    long long total = offsets[n_tensors];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int lo = 0, hi = n_tensors;                 // offsets[lo] <= i < offsets[hi]
        while (hi - lo > 1) { int mid = (lo + hi) / 2; if (offsets[mid] <= i) lo = mid; else hi = mid; }
        long long j = i - offsets[lo];
        T* w = (T*)wp[lo]; const T* g = (const T*)gp[lo]; T* m = (T*)mp[lo]; T* v = (T*)vp[lo];
        acc_t wj = LOAD(w, j), gj = LOAD(g, j), mj = LOAD(m, j), vj = LOAD(v, j);
        if (decay[lo] && weight_decay != (acc_t)0) wj *= (acc_t)1 - lr * weight_decay;
        mj += (gj - mj) * ((acc_t)1 - beta1);        // m += (1 - beta1) (g - m)
        vj = vj * beta2 + gj * gj * ((acc_t)1 - beta2);
        acc_t denom = sqrt(vj) / bc2_sqrt + eps;
        wj -= (mj / denom) * step_size;
        STORE(w, j, wj); STORE(m, j, mj); STORE(v, j, vj);
    }
}
"""


def source(dtype) -> str:
    """The kernels' CUDA C for inputs of ``dtype`` (float64, float32, float16 or bfloat16)."""
    storage, acc, load, store = _TYPES[str(dtype)]
    prelude = (_PRELUDE.replace("__TYPE__", storage).replace("__ACC__", acc)
               .replace("__LOAD__", load).replace("__STORE__", store))
    return prelude + _KERNELS


def kernel_names() -> list:
    """The names of the kernels defined here."""
    import re
    return re.findall(r'extern "C" __global__ void (\w+)', _KERNELS)
