// placeholder until the elementwise family lands
extern "C" __global__ void elementwise_placeholder(float* x) { x[0] = 0.0f; }
