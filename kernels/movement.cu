// Data movement: permuted copies, slice copies (narrow / concat and their gradients), row gathers
// and their deterministic scatter-add, and rows repeated down a matrix (the bias pre-fill of
// `linear`). Launchers and CPU references: src/ops/movement.rs.
//
// Every kernel is a grid-stride loop over its output elements, so any size and any grid work.
// Indices are 32-bit: the launchers refuse tensors of 2^31 elements or more.

#define MAX_PERMUTE_RANK 6

// The output's dimensions and, for each output dimension, the input stride it walks. Unused
// leading dimensions have size 1 and stride 0, so the loop below has a fixed trip count.
struct PermuteLayout {
    unsigned int dims[MAX_PERMUTE_RANK];
    unsigned int src_strides[MAX_PERMUTE_RANK];
};

// out[i] = in[offset of output coordinate i under the permutation].
extern "C" __global__ void permute_copy(float* __restrict__ out, const float* __restrict__ in, unsigned int n,
                                        PermuteLayout layout) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned int rest = i, src = 0;
#pragma unroll
        for (int d = MAX_PERMUTE_RANK - 1; d >= 0; --d) {
            const unsigned int coordinate = rest % layout.dims[d];
            rest /= layout.dims[d];
            src += coordinate * layout.src_strides[d];
        }
        out[i] = in[src];
    }
}

// For o < count and r < chunk: dst[o * dst_block + dst_offset + r] = src[o * src_block + src_offset + r].
// Narrow reads a slice of each src block; its gradient and concat write one into each dst block.
extern "C" __global__ void copy_slices(float* __restrict__ dst, const float* __restrict__ src, unsigned int count,
                                       unsigned int chunk, unsigned int src_block, unsigned int src_offset,
                                       unsigned int dst_block, unsigned int dst_offset) {
    const unsigned int n = count * chunk;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const unsigned int o = i / chunk, r = i - o * chunk;
        dst[o * dst_block + dst_offset + r] = src[o * src_block + src_offset + r];
    }
}

// out[j, :] = table[ids[j], :] for j < n (ids were checked against the table on the host).
extern "C" __global__ void gather_rows(float* __restrict__ out, const float* __restrict__ table,
                                       const unsigned int* __restrict__ ids, unsigned int n, unsigned int cols) {
    const unsigned int total = n * cols;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned int j = i / cols, c = i - j * cols;
        out[i] = table[ids[j] * cols + c];
    }
}

// Gradient of gather_rows without atomics: the host grouped the gathered positions by table row
// (rows[u] took positions[starts[u] .. starts[u+1]], in increasing order), so each output element
// is one thread's sum in a fixed order: deterministic, and equal to the CPU's sequential sum.
// dtable starts zeroed; rows never gathered stay zero.
extern "C" __global__ void scatter_add_rows(float* __restrict__ dtable, const float* __restrict__ dy,
                                            const unsigned int* __restrict__ rows, const unsigned int* __restrict__ starts,
                                            const unsigned int* __restrict__ positions, unsigned int unique_rows,
                                            unsigned int cols) {
    const unsigned int total = unique_rows * cols;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned int u = i / cols, c = i - u * cols;
        float sum = 0.0f;
        for (unsigned int p = starts[u]; p < starts[u + 1]; ++p) sum += dy[positions[p] * cols + c];
        dtable[rows[u] * cols + c] = sum;
    }
}

// out[r, c] = row[c] for r < rows.
extern "C" __global__ void repeat_rows(float* __restrict__ out, const float* __restrict__ row, unsigned int rows,
                                       unsigned int cols) {
    const unsigned int total = rows * cols;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        out[i] = row[i % cols];
    }
}

// out[c] = sum over r < rows of x[r, c]: the gradient of a bias and of rows (or batches)
// repeated. Block (32, 8): threadIdx.x picks one of 32 adjacent columns (coalesced reads),
// threadIdx.y one of 8 row lanes that each sum rows y, y + 8, ... in increasing order; the 8
// partial sums are then added in lane order. Deterministic: the order never depends on timing.
#define SUM_COLUMNS_LANES 8
extern "C" __global__ void sum_columns(float* __restrict__ out, const float* __restrict__ x, unsigned int rows,
                                       unsigned int cols) {
    __shared__ float partial[SUM_COLUMNS_LANES][32];
    for (unsigned int base = blockIdx.x * 32; base < cols; base += gridDim.x * 32) {
        const unsigned int c = base + threadIdx.x;
        float sum = 0.0f;
        if (c < cols) {
            for (unsigned int r = threadIdx.y; r < rows; r += SUM_COLUMNS_LANES) sum += x[(size_t)r * cols + c];
        }
        partial[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            float total = partial[0][threadIdx.x];
            for (int lane = 1; lane < SUM_COLUMNS_LANES; ++lane) total += partial[lane][threadIdx.x];
            out[c] = total;
        }
        __syncthreads();  // partial is reused by the next column group
    }
}
