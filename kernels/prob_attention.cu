// Fused probabilistic cross-attention of MedCLIPSeg (docs/model.md §2.3), forward and backward.
// Launchers and the CPU reference: src/ops/prob_attention.rs. Tests: tests/prob_attention.rs.
//
//   S_mu    = Q K_mu^T / sqrt(C)                  logits = S_mu - beta * S_sigma
//   S_sigma = sqrt((Q*Q) K_var^T / C)             A      = softmax over keys (logits)
//   V_s     = V_mu + sqrt(V_var) * eps            O      = A V_s
//
// Tensors are [rows, T, C] with rows = samples * batch (sample s = row / batch). The noise eps of
// element (row, key, c) is philox_normal(seed, stream_first + s * stream_stride,
// b * item_noise_stride + key * C + c) with b = row % batch: the same value the CPU draws, so both
// backends see bit-identical noise. item_noise_stride is Tk * C when each batch item draws its own
// noise (training) and 0 when every item reads the same elements (inference: an image's maps do
// not depend on its batch; ItemNoise in src/philox.rs).
// Antithetic mode (NoiseMode in src/philox.rs) passes negate_bit != 0: a sample whose nominal
// stream has that bit set reads the stream without it, negated (plain mode passes 0).
// It is drawn here, in the kernels, and never stored: the backward kernels draw it again.
//
// Layout shared by the kernels. 256 threads = 8 warps. Query and key tiles are staged in shared
// memory with a row stride of C + 1 floats, so the score loops (lanes on different keys, same
// column) hit 16 or 32 different banks. The C columns of an output tile are spread over the 32
// lanes of a warp (column lane + 32 * m for m < CPT, CPT = ceil(C / 32) <= 8, a template
// parameter so that the accumulators stay in registers); queries or keys are spread over warps.
// The launchers allow C <= 256 (the model has C = 256 and C = 16 in the tiny config).
//
// Forward:  one block per (query tile of 32, row); loops over key tiles of 16 with an online
//           softmax, so A is never materialised; writes O and the row log-sum-exp (saved for the
//           backward, 1 float per query).
// Backward: delta = rowsum(dO * O) = sum_k A dA (one small kernel); dQ by query tiles looping over
//           key tiles (like the forward); dK_mu, dK_var, dV_mu, dV_var by key tiles looping over
//           query tiles. Logits, A and V_s are recomputed; no atomics, so results are deterministic.
#include "philox.cuh"

// Every kernel runs 256 threads and is declared __launch_bounds__(256, 2): at most 128 registers,
// so two blocks fit an SM's register file (shared memory allows 1-3 blocks at C = 256 anyway).
// ptxas (sm_90) reports 80-128 registers and no spills for every variant; without the minimum of
// 2 blocks it capped some variants at 64 registers and spilled.
// build.rs reads the six PA_* tile sizes below (keep them `#define NAME <integer>` lines) into Rust
// constants of the same names, from which src/ops/prob_attention.rs sizes launches and shared memory.
#define PA_THREADS 256
#define PA_WARPS 8
// Forward and dQ: queries per block and keys per staged tile.
#define PA_TQ 32
#define PA_TK 16
// dK/dV: keys per block and queries per staged tile.
#define PA_KV_TK 16
#define PA_KV_TQ 16

__device__ __forceinline__ float pa_neg_infinity() { return __int_as_float(0xff800000); }

// The Philox stream the sample that `row` belongs to reads, and in *sign the sign its noise
// takes: -1 for the odd draw of an antithetic pair (negate_bit set in its nominal stream), else 1.
__device__ __forceinline__ unsigned long long pa_stream(int row, int batch, unsigned long long stream_first,
                                                        unsigned long long stream_stride,
                                                        unsigned long long negate_bit, float* sign) {
    const unsigned long long nominal = stream_first + (unsigned long long)(row / batch) * stream_stride;
    *sign = (nominal & negate_bit) ? -1.0f : 1.0f;
    return nominal & ~negate_bit;
}

// Copies rows [t0, t0 + n) of one [T, C] matrix into shared memory with row stride ld.
__device__ __forceinline__ void pa_stage_rows(float* dst, int ld, const float* __restrict__ src, int t0, int n,
                                              int C) {
    const float* from = src + (size_t)t0 * C;
    for (int e = threadIdx.x; e < n * C; e += PA_THREADS) dst[(e / C) * ld + e % C] = from[e];
}

// Stages V_s = V_mu + sqrt(V_var) * eps for keys [k0, k0 + n) of one row into `dst` (stride ld).
// The n * C noise indices of the tile are one contiguous range starting at (b * Tk + k0) * C, so
// each thread draws whole Philox blocks of 4 elements and keeps the lanes inside the range.
__device__ __forceinline__ void pa_stage_v_sample(float* dst, int ld, const float* __restrict__ v_mu,
                                                  const float* __restrict__ v_var, int k0, int n, int C,
                                                  unsigned long long seed, unsigned long long stream,
                                                  unsigned long long noise_first, float sign) {
    const unsigned long long start = noise_first + (unsigned long long)k0 * C;
    const unsigned long long end = start + (unsigned long long)n * C;
    const unsigned long long first_block = start >> 2;
    const unsigned long long blocks = ((end - 1) >> 2) - first_block + 1;
    const float* mu = v_mu + (size_t)k0 * C;
    const float* var = v_var + (size_t)k0 * C;
    for (unsigned long long j = threadIdx.x; j < blocks; j += PA_THREADS) {
        const unsigned long long block = first_block + j;
        const float4 z = philox_normal4(seed, stream, block);
        const float lanes[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const unsigned long long index = 4 * block + l;
            if (index < start || index >= end) continue;
            const int e = (int)(index - start);  // element of the [n, C] tile
            dst[(e / C) * ld + e % C] = mu[e] + sqrtf(var[e]) * (sign * lanes[l]);  // sign: exact
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid (rows, ceil(Tq / 32)). Dynamic shared memory, in floats:
//   (PA_TQ + 2 * PA_TK) * (C + 1) + PA_TQ * PA_TK + 3 * PA_TQ.
template <int CPT>
__device__ void pa_forward(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                           const float* __restrict__ k_mu, const float* __restrict__ k_var,
                           const float* __restrict__ v_mu, const float* __restrict__ v_var, int batch, int Tq,
                           int Tk, int C, float beta, unsigned long long seed, unsigned long long stream_first,
                           unsigned long long stream_stride, unsigned long long negate_bit,
                           unsigned long long item_noise_stride) {
    constexpr int QPT = PA_TQ / PA_WARPS;  // queries per thread in the accumulation
    extern __shared__ float smem[];
    const int ld = C + 1;
    float* q_s = smem;                   // [PA_TQ][ld]
    float* kmu_s = q_s + PA_TQ * ld;     // [PA_TK][ld]; holds V_s once the scores are taken
    float* kvar_s = kmu_s + PA_TK * ld;  // [PA_TK][ld]
    float* p_s = kvar_s + PA_TK * ld;    // [PA_TQ][PA_TK] logits, then exp(logit - running max)
    float* max_s = p_s + PA_TQ * PA_TK;  // running max per query
    float* sum_s = max_s + PA_TQ;        // running sum of exp per query
    float* rescale_s = sum_s + PA_TQ;    // factor the accumulators are multiplied by this tile

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.x, q0 = blockIdx.y * PA_TQ;
    const int nq = min(PA_TQ, Tq - q0);
    const size_t q_base = (size_t)row * Tq * C, k_base = (size_t)row * Tk * C;
    float sign;
    const unsigned long long stream = pa_stream(row, batch, stream_first, stream_stride, negate_bit, &sign);
    const unsigned long long noise_first = (unsigned long long)(row % batch) * item_noise_stride;
    const float inv_sqrt_c = 1.0f / sqrtf((float)C), inv_c = 1.0f / (float)C;

    pa_stage_rows(q_s, ld, q + q_base, q0, nq, C);
    if (tid < PA_TQ) {
        max_s[tid] = pa_neg_infinity();
        sum_s[tid] = 0.0f;
    }
    float acc[QPT][CPT];
#pragma unroll
    for (int j = 0; j < QPT; ++j)
#pragma unroll
        for (int m = 0; m < CPT; ++m) acc[j][m] = 0.0f;

    for (int k0 = 0; k0 < Tk; k0 += PA_TK) {
        const int nk = min(PA_TK, Tk - k0);
        __syncthreads();  // the previous tile's V_s and p_s are consumed (and q_s is staged)
        pa_stage_rows(kmu_s, ld, k_mu + k_base, k0, nk, C);
        pa_stage_rows(kvar_s, ld, k_var + k_base, k0, nk, C);
        __syncthreads();

        // Scores: thread -> key tid % 16 and queries tid / 16 and tid / 16 + 16.
        {
            const int kk = tid % PA_TK;
#pragma unroll
            for (int j = 0; j < PA_TQ * PA_TK / PA_THREADS; ++j) {
                const int i = tid / PA_TK + j * (PA_THREADS / PA_TK);
                float logit = pa_neg_infinity();
                if (i < nq && kk < nk) {
                    float mu = 0.0f, var = 0.0f;
                    for (int c = 0; c < C; ++c) {
                        const float qv = q_s[i * ld + c];
                        mu += qv * kmu_s[kk * ld + c];
                        var += qv * qv * kvar_s[kk * ld + c];
                    }
                    logit = mu * inv_sqrt_c - beta * sqrtf(var * inv_c);
                }
                p_s[i * PA_TK + kk] = logit;
            }
        }
        __syncthreads();

        // Online softmax (threads < 32) and V_s staging (all threads) touch disjoint memory.
        if (tid < PA_TQ) {
            const int i = tid;
            if (i < nq) {
                const float old_max = max_s[i];
                float new_max = old_max;
                for (int kk = 0; kk < nk; ++kk) new_max = fmaxf(new_max, p_s[i * PA_TK + kk]);
                float tile_sum = 0.0f;
                for (int kk = 0; kk < PA_TK; ++kk) {
                    const float e = kk < nk ? expf(p_s[i * PA_TK + kk] - new_max) : 0.0f;
                    p_s[i * PA_TK + kk] = e;
                    tile_sum += e;
                }
                const float rescale = expf(old_max - new_max);  // 0 on the first tile (old_max = -inf)
                sum_s[i] = sum_s[i] * rescale + tile_sum;
                max_s[i] = new_max;
                rescale_s[i] = rescale;
            } else {
                // Padding queries: keep their (never written) accumulators at 0 rather than NaN.
                for (int kk = 0; kk < PA_TK; ++kk) p_s[i * PA_TK + kk] = 0.0f;
                rescale_s[i] = 0.0f;
            }
        }
        pa_stage_v_sample(kmu_s, ld, v_mu + k_base, v_var + k_base, k0, nk, C, seed, stream, noise_first, sign);
        __syncthreads();

        // acc[i][c] = acc[i][c] * rescale[i] + sum_k p[i][k] * V_s[k][c]
        // thread -> queries warp + 8 j, columns lane + 32 m.
#pragma unroll
        for (int j = 0; j < QPT; ++j) {
            const float r = rescale_s[warp + PA_WARPS * j];
#pragma unroll
            for (int m = 0; m < CPT; ++m) acc[j][m] *= r;
        }
        for (int kk = 0; kk < nk; ++kk) {
            float v[CPT];
#pragma unroll
            for (int m = 0; m < CPT; ++m) {
                const int c = lane + 32 * m;
                v[m] = c < C ? kmu_s[kk * ld + c] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < QPT; ++j) {
                const float p = p_s[(warp + PA_WARPS * j) * PA_TK + kk];
#pragma unroll
                for (int m = 0; m < CPT; ++m) acc[j][m] += p * v[m];
            }
        }
    }

    // The last writes of max_s / sum_s were followed by a barrier inside the loop.
#pragma unroll
    for (int j = 0; j < QPT; ++j) {
        const int i = warp + PA_WARPS * j;
        if (i >= nq) continue;
        const float inv_sum = 1.0f / sum_s[i];
#pragma unroll
        for (int m = 0; m < CPT; ++m) {
            const int c = lane + 32 * m;
            if (c < C) out[q_base + (size_t)(q0 + i) * C + c] = acc[j][m] * inv_sum;
        }
    }
    if (tid < nq) lse[(size_t)row * Tq + q0 + tid] = max_s[tid] + logf(sum_s[tid]);
}

#define PA_FORWARD(CPT)                                                                                         \
    extern "C" __global__ void __launch_bounds__(PA_THREADS, 2) prob_attention_forward_c##CPT(                  \
        float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,                          \
        const float* __restrict__ k_mu, const float* __restrict__ k_var, const float* __restrict__ v_mu,        \
        const float* __restrict__ v_var, int batch, int Tq, int Tk, int C, float beta, unsigned long long seed, \
        unsigned long long stream_first, unsigned long long stream_stride, unsigned long long negate_bit,       \
        unsigned long long item_noise_stride) {                                                                 \
        pa_forward<CPT>(out, lse, q, k_mu, k_var, v_mu, v_var, batch, Tq, Tk, C, beta, seed, stream_first,      \
                        stream_stride, negate_bit, item_noise_stride);                                          \
    }
PA_FORWARD(1)
PA_FORWARD(2)
PA_FORWARD(4)
PA_FORWARD(8)

// ---------------------------------------------------------------------------------------------
// Backward, step 1: delta[r, i] = sum_c dO[r, i, c] * O[r, i, c] (= sum_k A_ik dA_ik).
// One warp per query row; grid-stride over rows * Tq query rows.
extern "C" __global__ void prob_attention_delta(float* __restrict__ delta, const float* __restrict__ d_out,
                                                const float* __restrict__ out, long long query_rows, int C) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < query_rows; r += warps) {
        const float* a = d_out + r * C;
        const float* b = out + r * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += a[c] * b[c];
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (lane == 0) delta[r] = s;
    }
}

// Recomputes, for query i (row of q_s) and key kk (row of the key tiles), the attention weight
// a = A_ik and the logit gradients g = dL/dlogit_ik = A_ik (dA_ik - delta_i) and
// h = g / S_sigma_ik (0 where S_sigma = 0: sqrt has no derivative there; the subgradient 0 is taken).
__device__ __forceinline__ void pa_pair_grads(const float* q_s, const float* do_s, const float* kmu_s,
                                              const float* kvar_s, const float* vs_s, int ld, int i, int kk, int C,
                                              float beta, float inv_sqrt_c, float inv_c, float lse_i,
                                              float delta_i, float* a, float* g, float* h) {
    float mu = 0.0f, var = 0.0f, da = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float qv = q_s[i * ld + c];
        mu += qv * kmu_s[kk * ld + c];
        var += qv * qv * kvar_s[kk * ld + c];
        da += do_s[i * ld + c] * vs_s[kk * ld + c];
    }
    const float sigma = sqrtf(var * inv_c);
    *a = expf(mu * inv_sqrt_c - beta * sigma - lse_i);
    *g = *a * (da - delta_i);
    *h = sigma > 0.0f ? *g / sigma : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Backward, step 2: dQ. Grid (rows, ceil(Tq / 32)). Dynamic shared memory, in floats:
//   (2 * PA_TQ + 3 * PA_TK) * (C + 1) + 2 * PA_TQ * PA_TK + 2 * PA_TQ.
// dQ_i = (1/sqrt(C)) sum_k g_ik K_mu_k - (beta/C) Q_i * sum_k h_ik K_var_k
template <int CPT>
__device__ void pa_backward_dq(float* __restrict__ dq, const float* __restrict__ d_out,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const float* __restrict__ q, const float* __restrict__ k_mu,
                               const float* __restrict__ k_var, const float* __restrict__ v_mu,
                               const float* __restrict__ v_var, int batch, int Tq, int Tk, int C, float beta,
                               unsigned long long seed, unsigned long long stream_first,
                               unsigned long long stream_stride, unsigned long long negate_bit,
                               unsigned long long item_noise_stride) {
    constexpr int QPT = PA_TQ / PA_WARPS;
    extern __shared__ float smem[];
    const int ld = C + 1;
    float* q_s = smem;                    // [PA_TQ][ld]
    float* do_s = q_s + PA_TQ * ld;       // [PA_TQ][ld]
    float* kmu_s = do_s + PA_TQ * ld;     // [PA_TK][ld]
    float* kvar_s = kmu_s + PA_TK * ld;   // [PA_TK][ld]
    float* vs_s = kvar_s + PA_TK * ld;    // [PA_TK][ld]
    float* g_s = vs_s + PA_TK * ld;       // [PA_TQ][PA_TK]
    float* h_s = g_s + PA_TQ * PA_TK;     // [PA_TQ][PA_TK]
    float* lse_s = h_s + PA_TQ * PA_TK;   // [PA_TQ]
    float* delta_s = lse_s + PA_TQ;       // [PA_TQ]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.x, q0 = blockIdx.y * PA_TQ;
    const int nq = min(PA_TQ, Tq - q0);
    const size_t q_base = (size_t)row * Tq * C, k_base = (size_t)row * Tk * C;
    float sign;
    const unsigned long long stream = pa_stream(row, batch, stream_first, stream_stride, negate_bit, &sign);
    const unsigned long long noise_first = (unsigned long long)(row % batch) * item_noise_stride;
    const float inv_sqrt_c = 1.0f / sqrtf((float)C), inv_c = 1.0f / (float)C;

    pa_stage_rows(q_s, ld, q + q_base, q0, nq, C);
    pa_stage_rows(do_s, ld, d_out + q_base, q0, nq, C);
    if (tid < nq) {
        lse_s[tid] = lse[(size_t)row * Tq + q0 + tid];
        delta_s[tid] = delta[(size_t)row * Tq + q0 + tid];
    }
    float acc_mu[QPT][CPT], acc_var[QPT][CPT];
#pragma unroll
    for (int j = 0; j < QPT; ++j)
#pragma unroll
        for (int m = 0; m < CPT; ++m) acc_mu[j][m] = acc_var[j][m] = 0.0f;

    for (int k0 = 0; k0 < Tk; k0 += PA_TK) {
        const int nk = min(PA_TK, Tk - k0);
        __syncthreads();  // the previous tile is consumed (and the query tiles are staged)
        pa_stage_rows(kmu_s, ld, k_mu + k_base, k0, nk, C);
        pa_stage_rows(kvar_s, ld, k_var + k_base, k0, nk, C);
        pa_stage_v_sample(vs_s, ld, v_mu + k_base, v_var + k_base, k0, nk, C, seed, stream, noise_first, sign);
        __syncthreads();
        {
            const int kk = tid % PA_TK;
#pragma unroll
            for (int j = 0; j < PA_TQ * PA_TK / PA_THREADS; ++j) {
                const int i = tid / PA_TK + j * (PA_THREADS / PA_TK);
                float a = 0.0f, g = 0.0f, h = 0.0f;
                if (i < nq && kk < nk)
                    pa_pair_grads(q_s, do_s, kmu_s, kvar_s, vs_s, ld, i, kk, C, beta, inv_sqrt_c, inv_c, lse_s[i],
                                  delta_s[i], &a, &g, &h);
                g_s[i * PA_TK + kk] = g;
                h_s[i * PA_TK + kk] = h;
            }
        }
        __syncthreads();
        for (int kk = 0; kk < nk; ++kk) {
            float km[CPT], kv[CPT];
#pragma unroll
            for (int m = 0; m < CPT; ++m) {
                const int c = lane + 32 * m;
                km[m] = c < C ? kmu_s[kk * ld + c] : 0.0f;
                kv[m] = c < C ? kvar_s[kk * ld + c] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < QPT; ++j) {
                const int i = warp + PA_WARPS * j;
                const float g = g_s[i * PA_TK + kk], h = h_s[i * PA_TK + kk];
#pragma unroll
                for (int m = 0; m < CPT; ++m) {
                    acc_mu[j][m] += g * km[m];
                    acc_var[j][m] += h * kv[m];
                }
            }
        }
    }

#pragma unroll
    for (int j = 0; j < QPT; ++j) {
        const int i = warp + PA_WARPS * j;
        if (i >= nq) continue;
#pragma unroll
        for (int m = 0; m < CPT; ++m) {
            const int c = lane + 32 * m;
            if (c < C)
                dq[q_base + (size_t)(q0 + i) * C + c] =
                    acc_mu[j][m] * inv_sqrt_c - beta * inv_c * q_s[i * ld + c] * acc_var[j][m];
        }
    }
}

#define PA_BACKWARD_DQ(CPT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(PA_THREADS, 2) prob_attention_backward_dq_c##CPT(              \
        float* __restrict__ dq, const float* __restrict__ d_out, const float* __restrict__ lse,                 \
        const float* __restrict__ delta, const float* __restrict__ q, const float* __restrict__ k_mu,           \
        const float* __restrict__ k_var, const float* __restrict__ v_mu, const float* __restrict__ v_var,       \
        int batch, int Tq, int Tk, int C, float beta, unsigned long long seed, unsigned long long stream_first, \
        unsigned long long stream_stride, unsigned long long negate_bit,                                        \
        unsigned long long item_noise_stride) {                                                                 \
        pa_backward_dq<CPT>(dq, d_out, lse, delta, q, k_mu, k_var, v_mu, v_var, batch, Tq, Tk, C, beta, seed,   \
                            stream_first, stream_stride, negate_bit, item_noise_stride);                        \
    }
PA_BACKWARD_DQ(1)
PA_BACKWARD_DQ(2)
PA_BACKWARD_DQ(4)
PA_BACKWARD_DQ(8)

// ---------------------------------------------------------------------------------------------
// Backward, step 3: gradients of the keys and values. Grid (rows, ceil(Tk / 16)). Dynamic shared
// memory, in floats: (3 * PA_KV_TK + 2 * PA_KV_TQ) * (C + 1) + 3 * PA_KV_TQ * PA_KV_TK + 2 * PA_KV_TQ.
//   dK_mu_k  = (1/sqrt(C)) sum_i g_ik Q_i
//   dK_var_k = -(beta/(2C)) sum_i h_ik Q_i^2
//   dV_mu_k  = sum_i A_ik dO_i                     (= dV_s)
//   dV_var_k = dV_s * eps_k / (2 sqrt(V_var_k))
// Any output pointer may be null (that gradient is not wanted).
template <int CPT>
__device__ void pa_backward_dkv(float* __restrict__ dk_mu, float* __restrict__ dk_var, float* __restrict__ dv_mu,
                                float* __restrict__ dv_var, const float* __restrict__ d_out,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                const float* __restrict__ q, const float* __restrict__ k_mu,
                                const float* __restrict__ k_var, const float* __restrict__ v_mu,
                                const float* __restrict__ v_var, int batch, int Tq, int Tk, int C, float beta,
                                unsigned long long seed, unsigned long long stream_first,
                                unsigned long long stream_stride, unsigned long long negate_bit,
                                unsigned long long item_noise_stride) {
    constexpr int KPT = PA_KV_TK / PA_WARPS;  // keys per thread in the accumulation
    extern __shared__ float smem[];
    const int ld = C + 1;
    float* kmu_s = smem;                       // [PA_KV_TK][ld]
    float* kvar_s = kmu_s + PA_KV_TK * ld;     // [PA_KV_TK][ld]
    float* vs_s = kvar_s + PA_KV_TK * ld;      // [PA_KV_TK][ld]
    float* q_s = vs_s + PA_KV_TK * ld;         // [PA_KV_TQ][ld]
    float* do_s = q_s + PA_KV_TQ * ld;         // [PA_KV_TQ][ld]
    float* a_s = do_s + PA_KV_TQ * ld;         // [PA_KV_TQ][PA_KV_TK]
    float* g_s = a_s + PA_KV_TQ * PA_KV_TK;    // [PA_KV_TQ][PA_KV_TK]
    float* h_s = g_s + PA_KV_TQ * PA_KV_TK;    // [PA_KV_TQ][PA_KV_TK]
    float* lse_s = h_s + PA_KV_TQ * PA_KV_TK;  // [PA_KV_TQ]
    float* delta_s = lse_s + PA_KV_TQ;         // [PA_KV_TQ]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.x, k0 = blockIdx.y * PA_KV_TK;
    const int nk = min(PA_KV_TK, Tk - k0);
    const size_t q_base = (size_t)row * Tq * C, k_base = (size_t)row * Tk * C;
    float sign;
    const unsigned long long stream = pa_stream(row, batch, stream_first, stream_stride, negate_bit, &sign);
    const unsigned long long noise_first = (unsigned long long)(row % batch) * item_noise_stride;
    const float inv_sqrt_c = 1.0f / sqrtf((float)C), inv_c = 1.0f / (float)C;

    pa_stage_rows(kmu_s, ld, k_mu + k_base, k0, nk, C);
    pa_stage_rows(kvar_s, ld, k_var + k_base, k0, nk, C);
    pa_stage_v_sample(vs_s, ld, v_mu + k_base, v_var + k_base, k0, nk, C, seed, stream, noise_first, sign);

    float acc_kmu[KPT][CPT], acc_kvar[KPT][CPT], acc_v[KPT][CPT];
#pragma unroll
    for (int j = 0; j < KPT; ++j)
#pragma unroll
        for (int m = 0; m < CPT; ++m) acc_kmu[j][m] = acc_kvar[j][m] = acc_v[j][m] = 0.0f;

    for (int i0 = 0; i0 < Tq; i0 += PA_KV_TQ) {
        const int nq = min(PA_KV_TQ, Tq - i0);
        __syncthreads();  // the previous query tile is consumed (and the key tiles are staged)
        pa_stage_rows(q_s, ld, q + q_base, i0, nq, C);
        pa_stage_rows(do_s, ld, d_out + q_base, i0, nq, C);
        if (tid < nq) {
            lse_s[tid] = lse[(size_t)row * Tq + i0 + tid];
            delta_s[tid] = delta[(size_t)row * Tq + i0 + tid];
        }
        __syncthreads();
        {
            // One (query, key) pair per thread: key tid % 16, query tid / 16.
            const int kk = tid % PA_KV_TK, i = tid / PA_KV_TK;
            float a = 0.0f, g = 0.0f, h = 0.0f;
            if (i < nq && kk < nk)
                pa_pair_grads(q_s, do_s, kmu_s, kvar_s, vs_s, ld, i, kk, C, beta, inv_sqrt_c, inv_c, lse_s[i],
                              delta_s[i], &a, &g, &h);
            a_s[i * PA_KV_TK + kk] = a;
            g_s[i * PA_KV_TK + kk] = g;
            h_s[i * PA_KV_TK + kk] = h;
        }
        __syncthreads();
        // thread -> keys warp + 8 j, columns lane + 32 m.
        for (int i = 0; i < nq; ++i) {
            float qv[CPT], dov[CPT];
#pragma unroll
            for (int m = 0; m < CPT; ++m) {
                const int c = lane + 32 * m;
                qv[m] = c < C ? q_s[i * ld + c] : 0.0f;
                dov[m] = c < C ? do_s[i * ld + c] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < KPT; ++j) {
                const int kk = warp + PA_WARPS * j;
                const float a = a_s[i * PA_KV_TK + kk], g = g_s[i * PA_KV_TK + kk], h = h_s[i * PA_KV_TK + kk];
#pragma unroll
                for (int m = 0; m < CPT; ++m) {
                    acc_kmu[j][m] += g * qv[m];
                    acc_kvar[j][m] += h * qv[m] * qv[m];
                    acc_v[j][m] += a * dov[m];
                }
            }
        }
    }

#pragma unroll
    for (int j = 0; j < KPT; ++j) {
        const int kk = warp + PA_WARPS * j;
        if (kk >= nk) continue;
#pragma unroll
        for (int m = 0; m < CPT; ++m) {
            const int c = lane + 32 * m;
            if (c >= C) continue;
            const size_t at = k_base + (size_t)(k0 + kk) * C + c;
            if (dk_mu) dk_mu[at] = acc_kmu[j][m] * inv_sqrt_c;
            if (dk_var) dk_var[at] = -0.5f * beta * inv_c * acc_kvar[j][m];
            if (dv_mu) dv_mu[at] = acc_v[j][m];
            if (dv_var) {
                const unsigned long long index = noise_first + (unsigned long long)(k0 + kk) * C + c;
                const float eps = sign * philox_normal(seed, stream, index);
                dv_var[at] = acc_v[j][m] * eps / (2.0f * sqrtf(v_var[at]));
            }
        }
    }
}

#define PA_BACKWARD_DKV(CPT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(PA_THREADS, 2) prob_attention_backward_dkv_c##CPT(             \
        float* __restrict__ dk_mu, float* __restrict__ dk_var, float* __restrict__ dv_mu,                       \
        float* __restrict__ dv_var, const float* __restrict__ d_out, const float* __restrict__ lse,             \
        const float* __restrict__ delta, const float* __restrict__ q, const float* __restrict__ k_mu,           \
        const float* __restrict__ k_var, const float* __restrict__ v_mu, const float* __restrict__ v_var,       \
        int batch, int Tq, int Tk, int C, float beta, unsigned long long seed, unsigned long long stream_first, \
        unsigned long long stream_stride, unsigned long long negate_bit,                                        \
        unsigned long long item_noise_stride) {                                                                 \
        pa_backward_dkv<CPT>(dk_mu, dk_var, dv_mu, dv_var, d_out, lse, delta, q, k_mu, k_var, v_mu, v_var,      \
                             batch, Tq, Tk, C, beta, seed, stream_first, stream_stride, negate_bit,             \
                             item_noise_stride);                                                                \
    }
PA_BACKWARD_DKV(1)
PA_BACKWARD_DKV(2)
PA_BACKWARD_DKV(4)
PA_BACKWARD_DKV(8)
