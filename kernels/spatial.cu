// Spatial ops of the decoder, forward and backward:
//  - depthwise 3x3 convolution, zero padding 1, stride 1, NHWC layout, weight [C, 1, 3, 3];
//  - bilinear resize with PyTorch's align_corners=False rule, NCHW layout.
// Launchers and the CPU reference: src/ops/spatial.rs. All loops are grid-stride over flat
// indices, so any size works with any grid. No atomics: every gradient is a gather or a
// fixed-order two-stage sum, so results are bit-reproducible run to run.

// ---------------------------------------------------------------------------------------------
// Depthwise 3x3 convolution (NHWC)
// ---------------------------------------------------------------------------------------------

// One output element per iteration. With flip = false:
//   out[b,h,w,c] = sum_{i,j<3} in[b, h+i-1, w+j-1, c] * weight[c, i, j]   (the forward, y from x)
// With flip = true the kernel is mirrored, which is the input gradient (dx from dy):
//   out[b,h,w,c] = sum_{i,j<3} in[b, h+1-i, w+1-j, c] * weight[c, i, j]
// Taps outside the image read as zero (the padding).
template <bool flip>
__device__ __forceinline__ void depthwise3x3_nhwc(float* __restrict__ out, const float* __restrict__ in,
                                                  const float* __restrict__ weight, int batch, int height,
                                                  int width, int channels) {
    const long n = (long)batch * height * width * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long pixel = idx / channels;
        const int w = (int)(pixel % width);
        const long row = pixel / width;  // b * height + h
        const int h = (int)(row % height);
        const long image_row0 = row - h;  // b * height
        const float* wc = weight + c * 9;
        float acc = 0.0f;
        for (int i = 0; i < 3; ++i) {
            const int hh = flip ? h + 1 - i : h + i - 1;
            if (hh < 0 || hh >= height) continue;
            for (int j = 0; j < 3; ++j) {
                const int ww = flip ? w + 1 - j : w + j - 1;
                if (ww < 0 || ww >= width) continue;
                acc += in[((image_row0 + hh) * width + ww) * channels + c] * wc[i * 3 + j];
            }
        }
        out[idx] = acc;
    }
}

extern "C" __global__ void depthwise3x3_nhwc_forward(float* __restrict__ y, const float* __restrict__ x,
                                                     const float* __restrict__ weight, int batch, int height,
                                                     int width, int channels) {
    depthwise3x3_nhwc<false>(y, x, weight, batch, height, width, channels);
}

extern "C" __global__ void depthwise3x3_nhwc_backward_input(float* __restrict__ dx, const float* __restrict__ dy,
                                                            const float* __restrict__ weight, int batch,
                                                            int height, int width, int channels) {
    depthwise3x3_nhwc<true>(dx, dy, weight, batch, height, width, channels);
}

// x[row, w, c] of the image whose first row is image_row0, or 0 outside the image.
__device__ __forceinline__ float padded_x(const float* __restrict__ x, long image_row0, int h, int w, int height,
                                          int width, int channels, int c) {
    return (h >= 0 && h < height && w >= 0 && w < width) ? x[((image_row0 + h) * width + w) * channels + c] : 0.0f;
}

// Stage 1 of the weight gradient dweight[c,i,j] = sum_{b,h,w} dy[b,h,w,c] * x[b,h+i-1,w+j-1,c].
// The B*H image rows are cut into `chunks` runs of `rows_per_chunk` rows; one thread per
// (chunk, channel) sums its run and writes partial[chunk, c, i*3+j]. Along each row the 3x3
// neighbourhood of x slides in registers, so each step loads one new column of 3 values.
extern "C" __global__ void depthwise3x3_nhwc_weight_partial(float* __restrict__ partial, const float* __restrict__ x,
                                                            const float* __restrict__ dy, int batch, int height,
                                                            int width, int channels, int rows_per_chunk,
                                                            int chunks) {
    const long n = (long)chunks * channels;
    const long rows = (long)batch * height;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long chunk = idx / channels;
        const long row_begin = chunk * rows_per_chunk;
        const long row_end = min(row_begin + rows_per_chunk, rows);
        float acc[9];
        for (int k = 0; k < 9; ++k) acc[k] = 0.0f;
        for (long row = row_begin; row < row_end; ++row) {
            const int h = (int)(row % height);
            const long image_row0 = row - h;
            // window[i][j] = x at (h+i-1, w+j-1) for the current w.
            float window[3][3];
            for (int i = 0; i < 3; ++i) {
                window[i][0] = 0.0f;  // column w-1 = -1 is padding
                window[i][1] = padded_x(x, image_row0, h + i - 1, 0, height, width, channels, c);
                window[i][2] = padded_x(x, image_row0, h + i - 1, 1, height, width, channels, c);
            }
            for (int w = 0; w < width; ++w) {
                const float g = dy[(row * width + w) * channels + c];
                for (int i = 0; i < 3; ++i)
                    for (int j = 0; j < 3; ++j) acc[i * 3 + j] += g * window[i][j];
                for (int i = 0; i < 3; ++i) {
                    window[i][0] = window[i][1];
                    window[i][1] = window[i][2];
                    window[i][2] = padded_x(x, image_row0, h + i - 1, w + 2, height, width, channels, c);
                }
            }
        }
        for (int k = 0; k < 9; ++k) partial[idx * 9 + k] = acc[k];
    }
}

// Stage 2: out[t] = sum over chunks, in chunk order, of partial[chunk, t] (t over C*9).
extern "C" __global__ void sum_chunk_partials(float* __restrict__ out, const float* __restrict__ partial, int len,
                                              int chunks) {
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < len; t += (long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int chunk = 0; chunk < chunks; ++chunk) s += partial[(long)chunk * len + t];
        out[t] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// Bilinear resize, align_corners=False (NCHW)
// ---------------------------------------------------------------------------------------------

// Where output index `dst` samples the input along one axis, exactly as PyTorch's
// area_pixel_compute_source_index + guard_index_and_lambda in f32:
//   src = max(scale * (dst + 0.5) - 0.5, 0), i0 = min(floor(src), in-1), i1 = min(i0+1, in-1),
//   l1 = clamp(src - i0, 0, 1), l0 = 1 - l1, with scale = in/out computed by the launcher.
// The _rn intrinsics stop nvcc contracting the index arithmetic into an FMA, which would round
// differently from the CPU reference and could move a sample across a pixel boundary.
struct Taps {
    int i0, i1;
    float l0, l1;
};

__device__ __forceinline__ Taps bilinear_taps(int dst, int in_size, float scale) {
    float src = __fsub_rn(__fmul_rn(scale, __fadd_rn((float)dst, 0.5f)), 0.5f);
    if (src < 0.0f) src = 0.0f;
    Taps t;
    t.i0 = min((int)floorf(src), in_size - 1);
    t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
    t.l1 = fminf(fmaxf(__fsub_rn(src, (float)t.i0), 0.0f), 1.0f);
    t.l0 = __fsub_rn(1.0f, t.l1);
    return t;
}

// y[p, oy, ox] = l0y * (l0x * x[p,y0,x0] + l1x * x[p,y0,x1]) + l1y * (l0x * x[p,y1,x0] + l1x * x[p,y1,x1])
// for every plane p = n * C + c and the output rows oy = first_row .. first_row + rows - 1 (y holds only
// those rows: a large resize can be made one band at a time). The taps need no output height:
// scale_h (in_h / out_h of the whole resize) carries it.
extern "C" __global__ void resize_bilinear_nchw_forward(float* __restrict__ y, const float* __restrict__ x,
                                                        int planes, int in_h, int in_w, int rows, int out_w,
                                                        float scale_h, float scale_w, int first_row) {
    const long n = (long)planes * rows * out_w;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int ox = (int)(idx % out_w);
        const int oy = first_row + (int)((idx / out_w) % rows);
        const long plane = idx / ((long)out_w * rows);
        const Taps ty = bilinear_taps(oy, in_h, scale_h);
        const Taps tx = bilinear_taps(ox, in_w, scale_w);
        const float* row0 = x + (plane * in_h + ty.i0) * in_w;
        const float* row1 = x + (plane * in_h + ty.i1) * in_w;
        y[idx] = ty.l0 * (tx.l0 * row0[tx.i0] + tx.l1 * row0[tx.i1]) +
                 ty.l1 * (tx.l0 * row1[tx.i0] + tx.l1 * row1[tx.i1]);
    }
}

// Weight with which output index `dst` reads input index `i` along one axis (0 when it does not).
// Both taps can name the same input (at the clamped last index); their weights then add.
__device__ __forceinline__ float tap_weight(const Taps& t, int i) {
    return (t.i0 == i ? t.l0 : 0.0f) + (t.i1 == i ? t.l1 : 0.0f);
}

// The outputs that can read input index i have i0 in {i-1, i}, i.e. src in [i-1, i+1), i.e.
// dst in about [(i-0.5)*out/in - 0.5, (i+1.5)*out/in - 0.5). One index of margin on each side
// absorbs rounding; bilinear_taps then decides exactly. Outputs whose source position was
// clamped up to 0 read inputs 0 and 1 (input 1 with weight 0, which still multiplies dy, as in
// PyTorch's scatter), so for those two inputs the window starts at output 0.
__device__ __forceinline__ int first_reader(int i, int in_size, int out_size) {
    if (i <= 1) return 0;
    const float ratio = (float)out_size / (float)in_size;
    return max((int)floorf(((float)i - 0.5f) * ratio - 0.5f) - 1, 0);
}

__device__ __forceinline__ int last_reader(int i, int in_size, int out_size) {
    const float ratio = (float)out_size / (float)in_size;
    return min((int)ceilf(((float)i + 1.5f) * ratio - 0.5f) + 1, out_size - 1);
}

// Gather form of the backward: one thread per input element,
//   dx[p, iy, ix] = sum over the outputs (oy, ox) that read it of wy(oy, iy) * wx(ox, ix) * dy[p, oy, ox].
extern "C" __global__ void resize_bilinear_nchw_backward(float* __restrict__ dx, const float* __restrict__ dy,
                                                         int planes, int in_h, int in_w, int out_h, int out_w,
                                                         float scale_h, float scale_w) {
    const long n = (long)planes * in_h * in_w;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int ix = (int)(idx % in_w);
        const int iy = (int)((idx / in_w) % in_h);
        const long plane = idx / ((long)in_w * in_h);
        const int ox_first = first_reader(ix, in_w, out_w), ox_last = last_reader(ix, in_w, out_w);
        const int oy_first = first_reader(iy, in_h, out_h), oy_last = last_reader(iy, in_h, out_h);
        float acc = 0.0f;
        for (int oy = oy_first; oy <= oy_last; ++oy) {
            const Taps ty = bilinear_taps(oy, in_h, scale_h);
            if (ty.i0 != iy && ty.i1 != iy) continue;
            const float wy = tap_weight(ty, iy);
            const float* dy_row = dy + (plane * out_h + oy) * out_w;
            float row_acc = 0.0f;
            for (int ox = ox_first; ox <= ox_last; ++ox) {
                const Taps tx = bilinear_taps(ox, in_w, scale_w);
                if (tx.i0 != ix && tx.i1 != ix) continue;
                row_acc += tap_weight(tx, ix) * dy_row[ox];
            }
            acc += wy * row_acc;
        }
        dx[idx] = acc;
    }
}
