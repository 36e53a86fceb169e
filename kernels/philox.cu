// placeholder until the philox family lands
extern "C" __global__ void philox_placeholder(float* x) { x[0] = 0.0f; }
