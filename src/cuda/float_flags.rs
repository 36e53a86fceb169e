// Included by build.rs (flags for nvcc) and by src/cuda/kernels.rs (flags for NVRTC), so the two
// compilers get the same floating-point behaviour by construction.
//
// IEEE division and square root, denormals kept, FMA contraction allowed (`--fmad=true`, for
// speed). The Philox generator stays bit-exact under contraction because kernels/philox.cuh writes
// every float operation as an explicitly rounded intrinsic (`__fmul_rn`, `__fadd_rn`, ...), which
// neither compiler fuses; elsewhere FMA changes results only within the tests' tolerances.
const FLOAT_FLAGS: [&str; 4] = ["--prec-div=true", "--prec-sqrt=true", "--ftz=false", "--fmad=true"];
