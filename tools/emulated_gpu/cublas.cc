// The emulated cuBLAS (built as libcublas.so): the handle calls and the one product the engine
// uses, cublasGemmStridedBatchedEx. Every argument is checked as the library documents it, every
// matrix element read or written is checked against the emulated device memory (inside a live
// allocation, read only once written), and the product is accumulated in f64, so a wrong
// transpose, leading dimension or stride shows up as an error or as a wrong result.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "emu_runtime.h"

using emu::lock;

namespace {

enum BlasStatus : int {
    kBlasSuccess = 0,
    kBlasNotInitialized = 1,
    kBlasInvalidValue = 7,
    kBlasExecutionFailed = 13,
    kBlasNotSupported = 15,
};

enum Operation : int { kOpN = 0, kOpT = 1, kOpC = 2 };
constexpr int kDataR32F = 0;  // cudaDataType CUDA_R_32F
// cublasComputeType_t values that accept f32 operands and an f32 result.
constexpr int kCompute32F = 68, kCompute32FPedantic = 69, kCompute32FFast16F = 74, kCompute32FFast16BF = 75,
              kCompute32FFastTF32 = 77;
constexpr int kTf32TensorOpMath = 3;
constexpr int kDisallowReducedPrecisionReduction = 16;

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
    int pointer_mode = 0;  // 0: host, 1: device
};
std::set<const void*> g_handles;

// The byte span one operand's matrices cover across all batches, for the aliasing check.
struct Span {
    uintptr_t begin, end;
};

const char* op_name(int op) { return op == kOpN ? "N" : op == kOpT ? "T" : "C"; }

// Rounds an f32 to TF32 (10 explicit mantissa bits, nearest even), as tensor cores read it.
float to_tf32(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u) return v;
    bits += 0xfffu + ((bits >> 13) & 1u);
    bits &= ~0x1fffu;
    std::memcpy(&v, &bits, 4);
    return v;
}

// A column-major matrix of `rows` x `cols` with leading dimension `ld` inside device memory,
// `batches` times at `stride` elements apart: every column checked once (in a live allocation,
// and written before, unless it is only written).
bool check_matrix(const char* name, uintptr_t base, int rows, int cols, int ld, long long stride, int batches,
                  bool read, std::string* why, Span* span) {
    span->begin = base;
    span->end = base;
    for (int b = 0; b < batches; ++b) {
        for (int c = 0; c < cols; ++c) {
            const uintptr_t column = base + (uintptr_t(b) * uintptr_t(stride) + uintptr_t(c) * uintptr_t(ld)) * 4;
            const size_t bytes = size_t(rows) * 4;
            std::string where;
            emu::Allocation* a = emu::whole_range(column, bytes, &where);
            const std::string at = std::string(name) + ", batch " + std::to_string(b) + ", column " + std::to_string(c);
            if (!a) {
                *why = at + ": " + where;
                return false;
            }
            if (read) {
                if (uintptr_t first = emu::first_uninitialised(*a, column, bytes)) {
                    *why = at + ": byte " + std::to_string(first - a->begin) + " of " + emu::describe_allocation(*a) +
                           " is read but was never written";
                    return false;
                }
            }
            span->begin = std::min(span->begin, column);
            span->end = std::max(span->end, column + bytes);
        }
    }
    return true;
}

bool overlap(const Span& a, const Span& b) { return a.begin < b.end && b.begin < a.end; }

float read_scalar(const Handle& h, const void* p, const char* name, std::string* why, bool* ok) {
    *ok = true;
    if (!p) {
        *ok = false;
        *why = std::string(name) + " is null";
        return 0;
    }
    if (h.pointer_mode == 0) return *static_cast<const float*>(p);
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    emu::Allocation* a = emu::whole_range(address, 4, why);
    if (!a || emu::first_uninitialised(*a, address, 4)) {
        *ok = false;
        if (a) *why = std::string(name) + " (device pointer mode) was never written";
        return 0;
    }
    return *static_cast<const float*>(p);
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API int cublasCreate_v2(void** handle) {
    if (!handle) return kBlasInvalidValue;
    auto held = lock();
    auto* h = new Handle;
    g_handles.insert(h);
    *handle = h;
    return kBlasSuccess;
}
API int cublasDestroy_v2(void* handle) {
    auto held = lock();
    if (!g_handles.erase(handle)) return kBlasNotInitialized;
    delete static_cast<Handle*>(handle);
    return kBlasSuccess;
}
API int cublasSetStream_v2(void* handle, void* stream) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    static_cast<Handle*>(handle)->stream = stream;
    return kBlasSuccess;
}
API int cublasGetStream_v2(void* handle, void** stream) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    if (!stream) return kBlasInvalidValue;
    *stream = static_cast<Handle*>(handle)->stream;
    return kBlasSuccess;
}
API int cublasSetMathMode(void* handle, int mode) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    const int base = mode & ~kDisallowReducedPrecisionReduction;
    if (base < 0 || base > kTf32TensorOpMath) return kBlasInvalidValue;
    static_cast<Handle*>(handle)->math_mode = mode;
    return kBlasSuccess;
}
API int cublasGetMathMode(void* handle, int* mode) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    if (!mode) return kBlasInvalidValue;
    *mode = static_cast<Handle*>(handle)->math_mode;
    return kBlasSuccess;
}
API int cublasSetPointerMode_v2(void* handle, int mode) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    if (mode != 0 && mode != 1) return kBlasInvalidValue;
    static_cast<Handle*>(handle)->pointer_mode = mode;
    return kBlasSuccess;
}
API int cublasGetPointerMode_v2(void* handle, int* mode) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    if (!mode) return kBlasInvalidValue;
    *mode = static_cast<Handle*>(handle)->pointer_mode;
    return kBlasSuccess;
}

API int cublasGemmStridedBatchedEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha_p,
                                   const void* A, int a_type, int lda, long long stride_a, const void* B, int b_type,
                                   int ldb, long long stride_b, const void* beta_p, void* C, int c_type, int ldc,
                                   long long stride_c, int batches, int compute, int algo) {
    auto held = lock();
    if (!g_handles.count(handle)) return kBlasNotInitialized;
    const Handle& h = *static_cast<Handle*>(handle);
    char call[256];
    std::snprintf(call, sizeof call,
                  "cublasGemmStridedBatchedEx(%s, %s, m=%d, n=%d, k=%d, lda=%d, strideA=%lld, ldb=%d, strideB=%lld, "
                  "ldc=%d, strideC=%lld, batches=%d)",
                  transa >= 0 && transa <= 2 ? op_name(transa) : "?", transb >= 0 && transb <= 2 ? op_name(transb) : "?",
                  m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batches);
    auto invalid = [&](const std::string& why) { return emu::refuse(kBlasInvalidValue, std::string(call) + ": " + why); };
    if (transa < kOpN || transa > kOpC || transb < kOpN || transb > kOpC) return invalid("unknown operation");
    if (m < 0 || n < 0 || k < 0 || batches < 0) return invalid("m, n, k and batchCount must not be negative");
    const int a_rows = transa == kOpN ? m : k, a_cols = transa == kOpN ? k : m;
    const int b_rows = transb == kOpN ? k : n, b_cols = transb == kOpN ? n : k;
    if (lda < std::max(1, a_rows)) return invalid("lda must be at least max(1, " + std::to_string(a_rows) + ")");
    if (ldb < std::max(1, b_rows)) return invalid("ldb must be at least max(1, " + std::to_string(b_rows) + ")");
    if (ldc < std::max(1, m)) return invalid("ldc must be at least max(1, m)");
    if (a_type != kDataR32F || b_type != kDataR32F || c_type != kDataR32F) {
        return emu::refuse(kBlasNotSupported, std::string(call) + ": only CUDA_R_32F operands are emulated");
    }
    if (compute != kCompute32F && compute != kCompute32FPedantic && compute != kCompute32FFast16F &&
        compute != kCompute32FFast16BF && compute != kCompute32FFastTF32) {
        return emu::refuse(kBlasNotSupported, std::string(call) + ": compute type " + std::to_string(compute) +
                                                  " does not take CUDA_R_32F operands and result");
    }
    if (!(algo == -1 || (algo >= 0 && algo <= 23) || (algo >= 99 && algo <= 115))) return invalid("unknown algorithm");
    if (emu::sticky_fault() != 0) return kBlasExecutionFailed;
    if (m == 0 || n == 0 || batches == 0) return kBlasSuccess;

    std::string why;
    bool ok = true;
    const float alpha = read_scalar(h, alpha_p, "alpha", &why, &ok);
    if (!ok) return invalid(why);
    const float beta = read_scalar(h, beta_p, "beta", &why, &ok);
    if (!ok) return invalid(why);
    const bool reads_ab = k > 0 && alpha != 0.0f;
    const bool reads_c = beta != 0.0f;
    Span a_span{}, b_span{}, c_span{};
    const auto a0 = reinterpret_cast<uintptr_t>(A), b0 = reinterpret_cast<uintptr_t>(B), c0 = reinterpret_cast<uintptr_t>(C);
    if (reads_ab && (!check_matrix("A", a0, a_rows, a_cols, lda, stride_a, batches, true, &why, &a_span) ||
                     !check_matrix("B", b0, b_rows, b_cols, ldb, stride_b, batches, true, &why, &b_span))) {
        emu::fault(emu::kIllegalAddress, std::string(call) + ": " + why);
        return kBlasExecutionFailed;
    }
    if (!check_matrix("C", c0, m, n, ldc, stride_c, batches, reads_c, &why, &c_span)) {
        emu::fault(emu::kIllegalAddress, std::string(call) + ": " + why);
        return kBlasExecutionFailed;
    }
    if (batches > 1 && uint64_t(std::llabs(stride_c)) < uint64_t(ldc) * uint64_t(n - 1) + uint64_t(m)) {
        emu::fault(emu::kLaunchFailed, std::string(call) + ": the C matrices of consecutive batches overlap "
                                                           "(strideC below ldc*(n-1)+m), so batches race on them");
        return kBlasExecutionFailed;
    }
    if (reads_ab && (overlap(c_span, a_span) || overlap(c_span, b_span))) {
        emu::fault(emu::kLaunchFailed, std::string(call) + ": C overlaps " + (overlap(c_span, a_span) ? "A" : "B") +
                                           ", which the product reads while writing C");
        return kBlasExecutionFailed;
    }

    // Tensor-core TF32 where the handle or the compute type allows it, so a strict-FP32 path that
    // silently turned into TF32 would not match an f64 reference.
    const bool tf32 = compute == kCompute32FFastTF32 ||
                      (compute == kCompute32F && (h.math_mode & ~kDisallowReducedPrecisionReduction) == kTf32TensorOpMath);
    const auto* a = static_cast<const float*>(A);
    const auto* b = static_cast<const float*>(B);
    auto* c = static_cast<float*>(C);
    std::vector<double> column(static_cast<size_t>(m));
    for (int batch = 0; batch < batches; ++batch) {
        const float* ab = a + batch * stride_a;
        const float* bb = b + batch * stride_b;
        float* cb = c + batch * stride_c;
        for (int j = 0; j < n; ++j) {
            std::fill(column.begin(), column.end(), 0.0);
            if (reads_ab) {
                for (int p = 0; p < k; ++p) {
                    float bv = transb == kOpN ? bb[p + size_t(j) * ldb] : bb[j + size_t(p) * ldb];
                    if (tf32) bv = to_tf32(bv);
                    for (int i = 0; i < m; ++i) {
                        float av = transa == kOpN ? ab[i + size_t(p) * lda] : ab[p + size_t(i) * lda];
                        if (tf32) av = to_tf32(av);
                        column[i] += double(av) * double(bv);
                    }
                }
            }
            float* cj = cb + size_t(j) * ldc;
            for (int i = 0; i < m; ++i) {
                const double prior = reads_c ? double(beta) * double(cj[i]) : 0.0;
                cj[i] = static_cast<float>(double(alpha) * column[i] + prior);
            }
            emu::Allocation* target = emu::find_allocation(reinterpret_cast<uintptr_t>(cj));
            emu::mark_initialised(*target, reinterpret_cast<uintptr_t>(cj), size_t(m) * 4);
        }
    }
    return kBlasSuccess;
}
