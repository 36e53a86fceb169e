// Adam (PyTorch torch.optim.Adam, no amsgrad) and AdamW (the decoupled weight decay
// param *= 1 - lr * weight_decay first; decay = 1 for Adam): one launch updates every parameter
// of a model in place. Launcher and CPU reference: src/ops/adam.rs.
//
// The host uploads a table with one row per parameter,
//   { param ptr, grad ptr, m ptr, v ptr, end },
// where `end` is the running total of elements up to and including that parameter, so the
// parameters form one virtual array of `total` elements. A grid-stride loop walks that array; each
// thread's indices only grow, so its cursor into the table only moves forward (one pass over the
// table per thread, and the work is balanced whatever the parameter sizes).
//
// Every operation is an explicitly rounded intrinsic in the order src/ops/adam.rs writes it, so the
// GPU and the CPU agree bit for bit (no contraction into FMA beyond the two FMAs PyTorch itself
// performs, no approximate sqrt or division).

struct AdamScalars {
    float lerp_coeff;       // lerp weight, or weight - 1 when PyTorch lerps from the end
    int lerp_from_end;      // 1 when |1 - beta1| >= 0.5 (PyTorch's large-weight lerp branch)
    float beta2;
    float one_minus_beta2;
    float bias_correction2_sqrt;
    float eps;
    float neg_step_size;    // -lr / (1 - beta1^t)
    float decay;            // AdamW's 1 - lr * weight_decay (1: Adam)
};

static constexpr int ADAM_TABLE_COLUMNS = 5;

extern "C" __global__ void adam_step(const unsigned long long* __restrict__ table, int count,
                                     unsigned long long total, AdamScalars s) {
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    int row = 0;
    unsigned long long begin = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        while (row < count && i >= table[row * ADAM_TABLE_COLUMNS + 4]) {
            begin = table[row * ADAM_TABLE_COLUMNS + 4];
            ++row;
        }
        const unsigned long long* entry = table + row * ADAM_TABLE_COLUMNS;
        float* param = reinterpret_cast<float*>(entry[0]);
        const float* grad = reinterpret_cast<const float*>(entry[1]);
        float* m = reinterpret_cast<float*>(entry[2]);
        float* v = reinterpret_cast<float*>(entry[3]);
        const unsigned long long j = i - begin;

        const float g = grad[j];
        // exp_avg.lerp_(grad, 1 - beta1): fma(coeff, g - m, base), base m or g by branch.
        const float m_old = m[j];
        const float m_new = __fmaf_rn(s.lerp_coeff, __fsub_rn(g, m_old), s.lerp_from_end ? g : m_old);
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): fma(value * g, g, v * beta2).
        const float v_new = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(v[j], s.beta2));
        // denom = v.sqrt() / bias_correction2_sqrt + eps; param.addcdiv_(m, denom, value=-step_size).
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v_new), s.bias_correction2_sqrt), s.eps);
        param[j] = __fadd_rn(__fmul_rn(param[j], s.decay), __fdiv_rn(__fmul_rn(s.neg_step_size, m_new), denom));
        m[j] = m_new;
        v[j] = v_new;
    }
}
