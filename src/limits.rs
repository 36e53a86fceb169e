//! How big an input may be, in one place (docs/limits.md): the pixels of an input image and the
//! Monte-Carlo samples one pass stacks, both bounded by this machine's memory, so that a value a
//! user typed ends in a one-line error before any work, never in an allocation abort.

use crate::model::ModelConfig;

/// The most pixels an input image may have unless the caller raises the limit (`predict
/// --max-pixels`, `segment::Options::max_pixels`): 100 megapixels, about 3 GB at
/// [`BYTES_PER_PIXEL`], while any scan or slide a user is likely to pass at full size fits.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Bytes `predict` holds per input pixel at its peak, rounded up: the B, G, R image (3), the maps
/// (probability 4, uncertainty 4, mask 1), then while writing a `.npy` copy of a map (4) or a
/// colour picture and its PNG encoding (up to 6), with the heap the allocator keeps. Measured at
/// 30 samples: a 5000 x 5000 RGB PNG peaks at 766 MB resident (31 bytes per pixel with the model
/// and the program itself), a 10000 x 10000 one at 2.51 GB (25 bytes per pixel; docs/limits.md).
pub const BYTES_PER_PIXEL: u64 = 32;

/// How many times the largest activation of one sample ([`ModelConfig::sample_activation_elements`],
/// 4 bytes each) a sample adds to a pass: the resident memory of `bench predict` grows by about 10
/// times it per sample on the paper config (3 to 7 times on the small ones); 16 leaves room.
pub const SAMPLE_ACTIVATION_COPIES: u64 = 16;

/// This machine's physical memory in bytes; `None` where it cannot be told (no limit then).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system parameters; -1 (unknown) is handled below.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let (pages, page_size) = (u64::try_from(pages).ok()?, u64::try_from(page_size).ok()?);
    pages.checked_mul(page_size)
}

/// The most pixels an image may have on this machine, whatever `--max-pixels` asks for: what
/// [`BYTES_PER_PIXEL`] lets fit in its memory.
pub fn max_pixels_ceiling() -> u64 {
    physical_memory().map_or(u64::MAX, |memory| memory / BYTES_PER_PIXEL)
}

/// Bytes one Monte-Carlo sample of one image adds to a batched pass of `config`
/// ([`SAMPLE_ACTIVATION_COPIES`] times its largest activation in f32); `None` on overflow.
pub fn sample_bytes(config: &ModelConfig) -> Option<u64> {
    config.sample_activation_elements()?.checked_mul(4 * SAMPLE_ACTIVATION_COPIES)
}

/// The most samples one pass of `images` images may stack on this machine: samples x images x
/// [`sample_bytes`] must fit in its memory.
pub fn max_samples(config: &ModelConfig, images: usize) -> u64 {
    let per_sample = sample_bytes(config).unwrap_or(u64::MAX).saturating_mul(images.max(1) as u64).max(1);
    physical_memory().map_or(u64::MAX, |memory| memory / per_sample)
}
