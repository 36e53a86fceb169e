// Elementwise family: binary ops with NumPy broadcasting, scalar affine maps, unary activations
// with their derivatives, and the sum that takes a broadcast gradient back to an operand's shape.
// Launchers, the op codes' Rust side and the CPU reference: src/ops/elementwise.rs.
//
// Index arithmetic is 32-bit unsigned (the launchers refuse tensors of 2^31 or more elements),
// which keeps the div/mod of the broadcast and reduction kernels cheap.

// Most dimensions a layout holds after merging dims that are contiguous in every operand.
#define MAX_RANK 6
// Threads per block of `sum_to_shape`; the launcher uses the same value.
#define SUM_THREADS 256

// Must match `BinaryOp::code` in src/ops/elementwise.rs.
enum BinaryOpCode { OP_ADD = 0, OP_SUB = 1, OP_MUL = 2, OP_DIV = 3 };

// Must match `UnaryOp::code` in src/ops/elementwise.rs.
enum UnaryOpCode {
    OP_GELU = 0,
    OP_QUICK_GELU = 1,
    OP_SIGMOID = 2,
    OP_SOFTPLUS = 3,
    OP_EXP = 4,
    OP_LOG = 5,
    OP_SQRT = 6,
    OP_SQUARE = 7,
    OP_NEG = 8,
    OP_RELU = 9,
};

// Output dims (row-major) and each input's element strides, 0 along broadcast dims.
// Mirrors `BroadcastLayout` in src/ops/elementwise.rs.
struct BroadcastLayout {
    unsigned int rank;
    unsigned int dims[MAX_RANK];
    unsigned int a_strides[MAX_RANK];
    unsigned int b_strides[MAX_RANK];
};

// x seen as kept dims (they index the output) and reduced dims (summed). When x's last dim is
// kept it is `inner` (stride 1 in x and in the output) and is not listed in kept_dims; otherwise
// inner is 1. The output is [outer_outputs, inner], row-major over the kept dims.
// Mirrors `ReduceLayout` in src/ops/elementwise.rs.
struct ReduceLayout {
    unsigned int kept_rank;
    unsigned int kept_dims[MAX_RANK];
    unsigned int kept_strides[MAX_RANK];
    unsigned int reduced_rank;
    unsigned int reduced_dims[MAX_RANK];
    unsigned int reduced_strides[MAX_RANK];
    unsigned int inner;
    unsigned int outer_outputs;
    unsigned int reduced;
};

__device__ __forceinline__ unsigned int grid_start() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ unsigned int grid_stride() { return blockDim.x * gridDim.x; }

// ---------------------------------------------------------------------------------------------
// Binary ops

template <int Op>
__device__ __forceinline__ float binary_apply(float a, float b) {
    if (Op == OP_ADD) return a + b;
    if (Op == OP_SUB) return a - b;
    if (Op == OP_MUL) return a * b;
    return a / b;
}

template <int Op>
__device__ void binary_same_loop(float* __restrict__ out, const float* __restrict__ a,
                                 const float* __restrict__ b, unsigned int n) {
    for (unsigned int i = grid_start(); i < n; i += grid_stride()) out[i] = binary_apply<Op>(a[i], b[i]);
}

template <int Op>
__device__ void binary_broadcast_loop(float* __restrict__ out, const float* __restrict__ a,
                                      const float* __restrict__ b, const BroadcastLayout& layout,
                                      unsigned int n) {
    for (unsigned int i = grid_start(); i < n; i += grid_stride()) {
        unsigned int rest = i, a_offset = 0, b_offset = 0;
#pragma unroll
        for (int d = MAX_RANK - 1; d >= 0; --d) {
            if (d < (int)layout.rank) {
                const unsigned int coord = rest % layout.dims[d];
                rest /= layout.dims[d];
                a_offset += coord * layout.a_strides[d];
                b_offset += coord * layout.b_strides[d];
            }
        }
        out[i] = binary_apply<Op>(a[a_offset], b[b_offset]);
    }
}

// out = a op b for a and b of the output's shape (the fast path: no index arithmetic).
extern "C" __global__ void binary_same(float* __restrict__ out, const float* __restrict__ a,
                                       const float* __restrict__ b, int op, unsigned int n) {
    // `op` is the same for every thread: dispatch once, outside the element loop.
    switch (op) {
        case OP_ADD: binary_same_loop<OP_ADD>(out, a, b, n); break;
        case OP_SUB: binary_same_loop<OP_SUB>(out, a, b, n); break;
        case OP_MUL: binary_same_loop<OP_MUL>(out, a, b, n); break;
        case OP_DIV: binary_same_loop<OP_DIV>(out, a, b, n); break;
    }
}

// out = a op b with broadcasting described by `layout`; n = number of output elements.
extern "C" __global__ void binary_broadcast(float* __restrict__ out, const float* __restrict__ a,
                                            const float* __restrict__ b, int op, BroadcastLayout layout,
                                            unsigned int n) {
    switch (op) {
        case OP_ADD: binary_broadcast_loop<OP_ADD>(out, a, b, layout, n); break;
        case OP_SUB: binary_broadcast_loop<OP_SUB>(out, a, b, layout, n); break;
        case OP_MUL: binary_broadcast_loop<OP_MUL>(out, a, b, layout, n); break;
        case OP_DIV: binary_broadcast_loop<OP_DIV>(out, a, b, layout, n); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar affine map: y = x * alpha + beta (scale: beta = 0; add_scalar: alpha = 1, both exact).

extern "C" __global__ void affine_forward(float* __restrict__ y, const float* __restrict__ x, float alpha,
                                          float beta, unsigned int n) {
    for (unsigned int i = grid_start(); i < n; i += grid_stride()) y[i] = x[i] * alpha + beta;
}

// ---------------------------------------------------------------------------------------------
// Unary ops. Formulas follow PyTorch's so results agree to rounding.

#define SQRT1_2 0.70710678118654752440f
// 1 / sqrt(2 * pi)
#define INV_SQRT_2PI 0.39894228040143267794f
#define QUICK_GELU_SLOPE 1.702f
#define SOFTPLUS_THRESHOLD 20.0f

// exp is only taken of a non-positive argument: no overflow, full relative accuracy in both tails.
__device__ __forceinline__ float stable_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

template <int Op>
__device__ __forceinline__ float unary_apply(float x) {
    switch (Op) {
        case OP_GELU: return x * 0.5f * (1.0f + erff(x * SQRT1_2));
        case OP_QUICK_GELU: return x * stable_sigmoid(QUICK_GELU_SLOPE * x);
        case OP_SIGMOID: return stable_sigmoid(x);
        // Above the threshold softplus(x) equals x in f32 (and exp(x) could overflow).
        case OP_SOFTPLUS: return x > SOFTPLUS_THRESHOLD ? x : log1pf(expf(x));
        case OP_EXP: return expf(x);
        case OP_LOG: return logf(x);
        case OP_SQRT: return sqrtf(x);
        case OP_SQUARE: return x * x;
        // Written so that NaN passes through, as torch.relu does (fmaxf would turn it into 0).
        case OP_RELU: return (x > 0.0f || x != x) ? x : 0.0f;
        default: return -x;  // OP_NEG
    }
}

// dx given dy and the saved tensor: the output y for sigmoid, exp and sqrt, the input x otherwise
// (`UnaryOp::backward_uses_output` on the Rust side).
template <int Op>
__device__ __forceinline__ float unary_derivative_times(float saved, float dy) {
    switch (Op) {
        case OP_GELU: {
            const float cdf = 0.5f * (1.0f + erff(saved * SQRT1_2));
            const float pdf = expf(-0.5f * saved * saved) * INV_SQRT_2PI;
            return dy * (cdf + saved * pdf);
        }
        case OP_QUICK_GELU: {
            const float s = stable_sigmoid(QUICK_GELU_SLOPE * saved);
            // Bracketed so that a huge |x| meets s * (1 - s) = 0 before it can overflow to inf * 0.
            return dy * (s + saved * (QUICK_GELU_SLOPE * s * (1.0f - s)));
        }
        case OP_SIGMOID: return dy * (1.0f - saved) * saved;
        case OP_SOFTPLUS: {
            if (saved > SOFTPLUS_THRESHOLD) return dy;
            const float z = expf(saved);  // at most e^20: finite
            return dy * z / (z + 1.0f);
        }
        case OP_EXP: return dy * saved;
        case OP_LOG: return dy / saved;
        case OP_SQRT: return dy / (2.0f * saved);
        case OP_SQUARE: return dy * 2.0f * saved;
        // PyTorch's threshold_backward: 0 where x <= 0 (so 0 at x = 0), dy elsewhere; a select,
        // not dy * (x > 0), so an infinite dy at x <= 0 still gives 0 rather than NaN.
        case OP_RELU: return saved <= 0.0f ? 0.0f : dy;
        default: return -dy;  // OP_NEG
    }
}

template <int Op>
__device__ void unary_forward_loop(float* __restrict__ y, const float* __restrict__ x, unsigned int n) {
    for (unsigned int i = grid_start(); i < n; i += grid_stride()) y[i] = unary_apply<Op>(x[i]);
}

template <int Op>
__device__ void unary_backward_loop(float* __restrict__ dx, const float* __restrict__ saved,
                                    const float* __restrict__ dy, unsigned int n) {
    for (unsigned int i = grid_start(); i < n; i += grid_stride()) dx[i] = unary_derivative_times<Op>(saved[i], dy[i]);
}

// Turns a runtime op code into a call of LOOP<code>(args...), once per kernel.
#define DISPATCH_UNARY(op, LOOP, ...)                                         \
    switch (op) {                                                             \
        case OP_GELU: LOOP<OP_GELU>(__VA_ARGS__); break;                      \
        case OP_QUICK_GELU: LOOP<OP_QUICK_GELU>(__VA_ARGS__); break;          \
        case OP_SIGMOID: LOOP<OP_SIGMOID>(__VA_ARGS__); break;                \
        case OP_SOFTPLUS: LOOP<OP_SOFTPLUS>(__VA_ARGS__); break;              \
        case OP_EXP: LOOP<OP_EXP>(__VA_ARGS__); break;                        \
        case OP_LOG: LOOP<OP_LOG>(__VA_ARGS__); break;                        \
        case OP_SQRT: LOOP<OP_SQRT>(__VA_ARGS__); break;                      \
        case OP_SQUARE: LOOP<OP_SQUARE>(__VA_ARGS__); break;                  \
        case OP_NEG: LOOP<OP_NEG>(__VA_ARGS__); break;                        \
        case OP_RELU: LOOP<OP_RELU>(__VA_ARGS__); break;                      \
    }

extern "C" __global__ void unary_forward(float* __restrict__ y, const float* __restrict__ x, int op,
                                         unsigned int n) {
    DISPATCH_UNARY(op, unary_forward_loop, y, x, n)
}

extern "C" __global__ void unary_backward(float* __restrict__ dx, const float* __restrict__ saved,
                                          const float* __restrict__ dy, int op, unsigned int n) {
    DISPATCH_UNARY(op, unary_backward_loop, dx, saved, dy, n)
}

// ---------------------------------------------------------------------------------------------
// Sum over the reduced dims of `layout`.
//
// Block (blockDim.x, blockDim.y) with blockDim.x * blockDim.y = SUM_THREADS and blockDim.y a
// power of two. blockIdx.x picks one row of outputs (`outer`) and a tile of blockDim.x adjacent
// columns of `inner`; threadIdx.x walks those columns, so a warp reads consecutive addresses in
// the column-sum case ([rows, C] -> [C]). When inner is 1 (the reduced dims are innermost, e.g.
// everything -> a scalar) blockDim.x is 1 and consecutive threads read consecutive reduced
// elements instead. threadIdx.y strides over the reduced elements, and blockIdx.y splits them
// across gridDim.y blocks when there are few outputs: split s writes its partial sums to
// out[s * outer_outputs * inner + ...], which the launcher reduces again in a second pass.
// The summation order is fixed, so results are deterministic (no atomics).
extern "C" __global__ void sum_to_shape(float* __restrict__ out, const float* __restrict__ x, ReduceLayout layout) {
    __shared__ float partial[SUM_THREADS];
    const unsigned int tiles = (layout.inner + blockDim.x - 1) / blockDim.x;
    const unsigned int outer = blockIdx.x / tiles;
    const unsigned int col = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
    const bool active = col < layout.inner;

    unsigned int base = col, rest = outer;
#pragma unroll
    for (int d = MAX_RANK - 1; d >= 0; --d) {
        if (d < (int)layout.kept_rank) {
            base += (rest % layout.kept_dims[d]) * layout.kept_strides[d];
            rest /= layout.kept_dims[d];
        }
    }

    float acc = 0.0f;
    if (active) {
        for (unsigned int r = blockIdx.y * blockDim.y + threadIdx.y; r < layout.reduced; r += blockDim.y * gridDim.y) {
            unsigned int offset = base, rr = r;
#pragma unroll
            for (int d = MAX_RANK - 1; d >= 0; --d) {
                if (d < (int)layout.reduced_rank) {
                    offset += (rr % layout.reduced_dims[d]) * layout.reduced_strides[d];
                    rr /= layout.reduced_dims[d];
                }
            }
            acc += x[offset];
        }
    }

    // Tree over threadIdx.y: each column's partial sums meet in row 0.
    const unsigned int t = threadIdx.y * blockDim.x + threadIdx.x;
    partial[t] = acc;
    __syncthreads();
    for (unsigned int half = blockDim.y / 2; half > 0; half >>= 1) {
        if (threadIdx.y < half) partial[t] += partial[t + half * blockDim.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && active) {
        out[blockIdx.y * (layout.outer_outputs * layout.inner) + outer * layout.inner + col] = partial[threadIdx.x];
    }
}
