//! Counter-based randomness for the data pipeline: every draw is a pure function of its inputs
//! (seed, epoch, sample, purpose), so shuffles, augmentations and synthetic images never depend
//! on thread timing or on how many workers there are.

/// The splitmix64 finaliser: a bijective 64-bit mix with full avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a sequence of words into one 64-bit draw; each word goes through a full mix so that
/// (a, b) and (b, a) give unrelated results.
pub fn hash_words(words: &[u64]) -> u64 {
    words.iter().fold(0x6A09_E667_F3BC_C908, |state, &word| mix64(state ^ mix64(word)))
}

/// A uniform f64 in [0, 1) from the top 53 bits of a draw.
pub fn unit_f64(draw: u64) -> f64 {
    (draw >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// An integer in `0..n` (n > 0) from a draw, by multiply-shift (bias below 2^-32 for small n).
pub fn below(draw: u64, n: u64) -> u64 {
    (((draw >> 32) * n) >> 32).min(n.saturating_sub(1))
}

/// A sequential view over one keyed stream: the k-th call hashes (key..., k).
pub struct Stream {
    key: u64,
    counter: u64,
}

impl Stream {
    pub fn new(words: &[u64]) -> Self {
        Stream { key: hash_words(words), counter: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        mix64(self.key ^ mix64(self.counter))
    }

    pub fn unit(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    pub fn below(&mut self, n: usize) -> usize {
        below(self.next_u64(), n as u64) as usize
    }
}
