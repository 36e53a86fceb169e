//! An odometer over a row-major index space that keeps strided offsets current: the CPU
//! kernels of broadcasts, reductions and permutes walk their outer dimensions with it.

/// A row-major walk over `dims` from a linear position, keeping each operand's offset current
/// (one add per step instead of a div/mod per dim).
pub(crate) struct StridedWalk<'a, const K: usize> {
    dims: &'a [usize],
    strides: [&'a [usize]; K],
    coords: Vec<usize>,
    pub(crate) offsets: [usize; K],
}

impl<'a, const K: usize> StridedWalk<'a, K> {
    pub(crate) fn new(dims: &'a [usize], strides: [&'a [usize]; K], start: usize) -> Self {
        let mut coords = vec![0; dims.len()];
        let mut rest = start;
        for (d, &size) in dims.iter().enumerate().rev() {
            coords[d] = rest % size;
            rest /= size;
        }
        let offsets = std::array::from_fn(|k| coords.iter().zip(strides[k]).map(|(c, s)| c * s).sum());
        StridedWalk { dims, strides, coords, offsets }
    }

    pub(crate) fn advance(&mut self) {
        for d in (0..self.dims.len()).rev() {
            self.coords[d] += 1;
            for k in 0..K {
                self.offsets[k] += self.strides[k][d];
            }
            if self.coords[d] < self.dims[d] {
                return;
            }
            for k in 0..K {
                self.offsets[k] -= self.strides[k][d] * self.dims[d];
            }
            self.coords[d] = 0;
        }
    }
}
