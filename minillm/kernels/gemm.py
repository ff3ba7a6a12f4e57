"""16-bit matrix products with a float32 (or 16-bit) result, straight from cuBLAS.

Tensor cores multiply float16/bfloat16 inputs with a float32 accumulator. CuPy's ``a @ b`` then
rounds the result to the inputs' dtype; attention scores need it unrounded (float16 overflows
above 65504, and the softmax wants every bit), so this calls ``cublasGemmEx`` /
``cublasGemmStridedBatchedEx`` itself with the output type chosen separately (``CUDA_R_32F``) and
the compute type ``CUBLAS_COMPUTE_32F``.

cuBLAS is column-major. A row-major (M, N) result is, read column-major, its transpose, so we
ask for C^T (N, M) = B^T (N, K) . A^T (K, M): the operands swap places. Each operand is either
row-major per matrix (C-contiguous: no transpose, leading dimension = its columns) or
column-major per matrix (a transposed view such as ``w.T``: transpose, leading dimension = its
rows); anything else is copied to C order first. Batches must have the same shape on both sides
(a 2-D right operand, a Linear weight, is folded into the rows instead).
"""
import numpy

from minillm import backend

# cudaDataType / cublasComputeType_t / cublasOperation_t / cublasGemmAlgo_t values (cuBLAS headers)
_CUDA_TYPE = {"float32": 0, "float16": 2, "bfloat16": 14}
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68
_ALGO = 99  # CUBLAS_GEMM_DEFAULT_TENSOR_OP (CuPy uses it too): let cuBLAS pick tensor-core kernels


def _layout(x):
    """(array, per-matrix order 'C' or 'F', leading dimension) for cuBLAS."""
    rows, cols = x.shape[-2:]
    if x.flags.c_contiguous:
        return x, "C", cols
    if x.swapaxes(-1, -2).flags.c_contiguous:   # a transposed view of a C-contiguous array
        return x, "F", rows
    x = backend.array_module().ascontiguousarray(x)
    return x, "C", cols


def matmul(a, b, out_dtype):
    """``a @ b`` for 16-bit ``a`` and ``b`` of one dtype, accumulated in float32, stored as
    ``out_dtype`` (float32, or the inputs' dtype: rounded once)."""
    cp = backend.array_module()
    out_dtype = numpy.dtype(out_dtype)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not line up")
    if b.ndim == 2 and a.ndim > 2:  # (..., M, K) @ (K, N): one GEMM over all the rows
        a2 = cp.ascontiguousarray(a).reshape(-1, a.shape[-1])                  # (B*M, K)
        return matmul(a2, b, out_dtype).reshape(a.shape[:-1] + (b.shape[-1],))  # (..., M, N)
    if a.shape[:-2] != b.shape[:-2]:  # other broadcasts: the plain float32 product
        return (a.astype(cp.float32) @ b.astype(cp.float32)).astype(out_dtype, copy=False)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    batch = int(numpy.prod(a.shape[:-2], dtype=numpy.int64))
    c = cp.empty(a.shape[:-2] + (M, N), dtype=out_dtype)
    if c.size == 0 or K == 0:
        c.fill(0)
        return c
    a, order_a, lda = _layout(a)
    b, order_b, ldb = _layout(b)
    op_b = _OP_N if order_b == "C" else _OP_T   # b goes first: its (N, K) view is B^T
    op_a = _OP_N if order_a == "C" else _OP_T   # then a: its (K, M) view is A^T
    in_type, out_type = _CUDA_TYPE[str(a.dtype)], _CUDA_TYPE[str(out_dtype)]
    alpha, beta = numpy.ones((), numpy.float32), numpy.zeros((), numpy.float32)  # host scalars
    handle = cp.cuda.device.get_cublas_handle()
    cublas = cp.cuda.cublas  # the handle is bound to the current stream by CuPy's wrapper
    if batch == 1:
        cublas.gemmEx(handle, op_b, op_a, N, M, K, alpha.ctypes.data,
                      b.data.ptr, in_type, ldb, a.data.ptr, in_type, lda,
                      beta.ctypes.data, c.data.ptr, out_type, N, _COMPUTE_32F, _ALGO)
    else:
        cublas.gemmStridedBatchedEx(handle, op_b, op_a, N, M, K, alpha.ctypes.data,
                                    b.data.ptr, in_type, ldb, K * N, a.data.ptr, in_type, lda, M * K,
                                    beta.ctypes.data, c.data.ptr, out_type, N, M * N,
                                    batch, _COMPUTE_32F, _ALGO)
    return c
