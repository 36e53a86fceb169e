// 2x2 max pooling with stride 2 (PyTorch's nn.MaxPool2d(2)) on NHWC activations, and its backward.
// Launchers and the CPU reference: src/ops/pool.rs. Grid-stride loops over flat indices; the
// backward is a gather (each input element decides whether its window chose it), so no atomics.

// Flat index, within the image row-major order, of the element of window (oh, ow) that the pool
// picks for channel c: the window is scanned (0,0), (0,1), (1,0), (1,1) and an element replaces
// the best so far when it is greater or NaN. So the first maximum wins ties and a NaN wins over
// numbers (the last NaN if several), exactly PyTorch's `val > maxval || isnan(val)` rule.
// Returns the offset of the chosen element relative to `image` (the batch's first element).
__device__ __forceinline__ long window_choice(const float* __restrict__ image, int oh, int ow, int width,
                                              int channels, int c) {
    const long top = ((long)(2 * oh) * width + 2 * ow) * channels + c;
    const long offsets[4] = {top, top + channels, top + (long)width * channels, top + (long)width * channels + channels};
    long best = offsets[0];
    float best_value = image[best];
    for (int k = 1; k < 4; ++k) {
        const float v = image[offsets[k]];
        if (v > best_value || v != v) {
            best = offsets[k];
            best_value = v;
        }
    }
    return best;
}

// y[b, oh, ow, c] = x at window_choice. x is [B, H, W, C], y [B, H/2, W/2, C] (floor).
extern "C" __global__ void max_pool2x2_nhwc_forward(float* __restrict__ y, const float* __restrict__ x, int batch,
                                                    int height, int width, int channels) {
    const int out_h = height / 2, out_w = width / 2;
    const long n = (long)batch * out_h * out_w * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long pixel = idx / channels;
        const int ow = (int)(pixel % out_w);
        const long row = pixel / out_w;
        const int oh = (int)(row % out_h);
        const long b = row / out_h;
        const float* image = x + b * height * (long)width * channels;
        y[idx] = image[window_choice(image, oh, ow, width, channels, c)];
    }
}

// dx[b, h, w, c] = dy[b, h/2, w/2, c] if (h, w) is the element its window chose, else 0; an odd last
// row or column belongs to no window and gets 0.
extern "C" __global__ void max_pool2x2_nhwc_backward(float* __restrict__ dx, const float* __restrict__ x,
                                                     const float* __restrict__ dy, int batch, int height, int width,
                                                     int channels) {
    const int out_h = height / 2, out_w = width / 2;
    const long n = (long)batch * height * width * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long pixel = idx / channels;
        const int w = (int)(pixel % width);
        const long row = pixel / width;
        const int h = (int)(row % height);
        const long b = row / height;
        float g = 0.0f;
        if (h < 2 * out_h && w < 2 * out_w) {
            const long image_start = b * height * (long)width * channels;
            const long chosen = window_choice(x + image_start, h / 2, w / 2, width, channels, c);
            if (image_start + chosen == idx) g = dy[((b * out_h + h / 2) * out_w + w / 2) * channels + c];
        }
        dx[idx] = g;
    }
}
