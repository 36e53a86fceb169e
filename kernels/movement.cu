// placeholder until the movement family lands
extern "C" __global__ void movement_placeholder(float* x) { x[0] = 0.0f; }
