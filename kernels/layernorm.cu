// placeholder until the layernorm family lands
extern "C" __global__ void layernorm_placeholder(float* x) { x[0] = 0.0f; }
