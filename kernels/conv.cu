// Dense 2-D convolutions on NHWC activations: the data movement around the GEMMs that do the
// arithmetic (the GEMMs themselves run in cuBLAS).
//  - 3x3, zero padding 1, stride 1: im2col (input -> one row of 9*C values per output pixel,
//    columns ordered (ky, kx, c)) and its adjoint col2im, written as a gather;
//  - transposed 2x2, stride 2: the interleave of a [pixels, (di, dj, o)] product into the 2x2
//    output blocks (plus the bias), and the de-interleave of the output gradient.
// Launchers and the CPU reference: src/ops/conv.rs. Every loop is grid-stride over flat indices,
// so any size works with any grid. No atomics and no scatter: each output element is written by
// exactly one thread, and col2im sums its nine terms in a fixed order.

// cols[p, (ky*3 + kx)*C + c] = x[first_image + b, h + ky - 1, w + kx - 1, c] for the output pixel
// p = (b*H + h)*W + w of the images first_image .. first_image + images - 1 (0 in the padding).
// Consecutive threads take consecutive c, so both the reads and the writes are coalesced runs.
extern "C" __global__ void im2col3x3_nhwc(float* __restrict__ cols, const float* __restrict__ x, int first_image,
                                          int images, int height, int width, int channels) {
    const long row_len = 9L * channels;
    const long n = (long)images * height * width * row_len;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const long pixel = idx / row_len;
        const int col = (int)(idx - pixel * row_len);
        const int tap = col / channels;
        const int c = col - tap * channels;
        const int w = (int)(pixel % width);
        const long row = pixel / width;  // b * height + h, within the chunk
        const int h = (int)(row % height);
        const long image = first_image + row / height;
        const int hh = h + tap / 3 - 1;
        const int ww = w + tap % 3 - 1;
        const bool inside = hh >= 0 && hh < height && ww >= 0 && ww < width;
        cols[idx] = inside ? x[((image * height + hh) * width + ww) * channels + c] : 0.0f;
    }
}

// The adjoint of im2col3x3_nhwc for the same images: each input element gathers the nine column
// entries that copied it, dx[first_image + b, h, w, c] = sum over (ky, kx) in row-major order of
// dcols[(b, h + 1 - ky, w + 1 - kx), (ky*3 + kx)*C + c], taps whose pixel lies outside the image
// left out. dx holds the whole batch; only this chunk's images are written.
extern "C" __global__ void col2im3x3_nhwc(float* __restrict__ dx, const float* __restrict__ dcols, int first_image,
                                          int images, int height, int width, int channels) {
    const long row_len = 9L * channels;
    const long n = (long)images * height * width * channels;
    float* __restrict__ out = dx + (long)first_image * height * width * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long pixel = idx / channels;
        const int w = (int)(pixel % width);
        const long row = pixel / width;
        const int h = (int)(row % height);
        const long image_row0 = row - h;
        float acc = 0.0f;
        for (int ky = 0; ky < 3; ++ky) {
            const int hh = h + 1 - ky;
            if (hh < 0 || hh >= height) continue;
            for (int kx = 0; kx < 3; ++kx) {
                const int ww = w + 1 - kx;
                if (ww < 0 || ww >= width) continue;
                acc += dcols[((image_row0 + hh) * width + ww) * row_len + (ky * 3 + kx) * channels + c];
            }
        }
        out[idx] = acc;
    }
}

// y[b, 2i + di, 2j + dj, o] = z[(b*H + i)*W + j, (di*2 + dj)*C + o] (+ bias[o] when bias is not
// null), for an input grid of H x W pixels and C output channels. One thread per output element,
// so the writes are coalesced; the reads are runs of C (a row of z holds the 2x2 block).
extern "C" __global__ void interleave2x2_nhwc(float* __restrict__ y, const float* __restrict__ z,
                                              const float* __restrict__ bias, int batch, int height, int width,
                                              int channels) {
    const int out_w = 2 * width;
    const long n = (long)batch * 2 * height * out_w * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int o = (int)(idx % channels);
        const long out_pixel = idx / channels;
        const int ow = (int)(out_pixel % out_w);
        const long out_row = out_pixel / out_w;  // b * 2H + oh
        const int oh = (int)(out_row % (2 * height));
        const long b = out_row / (2 * height);
        const long in_pixel = (b * height + oh / 2) * width + ow / 2;
        const int block = (oh % 2) * 2 + ow % 2;
        const float v = z[(in_pixel * 4 + block) * channels + o];
        y[idx] = bias != nullptr ? v + bias[o] : v;
    }
}

// The adjoint gather: dz[(b*H + i)*W + j, (di*2 + dj)*C + o] = dy[b, 2i + di, 2j + dj, o].
extern "C" __global__ void deinterleave2x2_nhwc(float* __restrict__ dz, const float* __restrict__ dy, int batch,
                                                int height, int width, int channels) {
    const long row_len = 4L * channels;
    const long n = (long)batch * height * width * row_len;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const long in_pixel = idx / row_len;
        const int col = (int)(idx - in_pixel * row_len);
        const int block = col / channels;
        const int o = col - block * channels;
        const int j = (int)(in_pixel % width);
        const long row = in_pixel / width;  // b * H + i
        const int i = (int)(row % height);
        const long b = row / height;
        const long oh = 2L * i + block / 2;
        const long ow = 2L * j + block % 2;
        dz[idx] = dy[((b * 2 * height + oh) * 2 * width + ow) * channels + o];
    }
}
