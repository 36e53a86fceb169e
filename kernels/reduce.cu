// placeholder until the reduce family lands
extern "C" __global__ void reduce_placeholder(float* x) { x[0] = 0.0f; }
