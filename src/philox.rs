//! Counter-based Gaussian noise: Philox4x32-10 followed by Box–Muller, identical bit for bit on
//! the CPU, on the GPU and in the NumPy reference.
//!
//! Every random number of MedCLIPSeg (the reparameterised V sample of each probabilistic
//! attention) is `normal(seed, stream, i)`: a pure function of a 64-bit seed, a 64-bit stream id
//! (see [`stream_id`]) and the element index. There is no generator state, so any element can be
//! produced anywhere (a kernel can draw its own noise in-register) and a stochastic forward pass
//! is reproducible and comparable across backends.
//!
//! The three implementations that must stay identical:
//! - `tools/reference/philox.py`, which *defines* the generator (read its docstring);
//! - this module (CPU);
//! - `kernels/philox.cuh` (device functions, used by `kernels/philox.cu` and fused kernels).
//!
//! Why polynomials instead of `f32::ln` / `sin` / `cos`: library transcendental functions are
//! only faithfully rounded and differ in the last bit between libm, CUDA and NumPy. Here ln and
//! sin/cos are fixed polynomials evaluated with IEEE-rounded `+ - * /` and `sqrt` in one written
//! order, which every backend computes identically. Rust never contracts `a * b + c` into a fused
//! multiply-add, so the expressions below are written exactly as in `philox.py`; constants are
//! given as bit patterns so no decimal conversion can differ between languages.

use rayon::prelude::*;

/// Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11).
const MUL_0: u32 = 0xD251_1F53;
const MUL_1: u32 = 0xCD9E_8D57;
const WEYL_0: u32 = 0x9E37_79B9;
const WEYL_1: u32 = 0xBB67_AE85;

const ONE: f32 = f32::from_bits(0x3F80_0000);
const HALF: f32 = f32::from_bits(0x3F00_0000);
const QUARTER: f32 = f32::from_bits(0x3E80_0000);
const FOUR: f32 = f32::from_bits(0x4080_0000);
const MINUS_TWO: f32 = f32::from_bits(0xC000_0000);
/// 2^-24: `uniform` scales an odd integer below 2^24 by it.
const TWO_POW_MINUS_24: f32 = f32::from_bits(0x3380_0000);
/// ln(2) split so that `e * LN2_HI` is exact for |e| <= 24.
const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
const SQRT2: f32 = f32::from_bits(0x3FB5_04F3);
const TWO_PI: f32 = f32::from_bits(0x40C9_0FDB);
/// ln(m) = s * (2 + z*(2/3 + z*(2/5 + z*(2/7 + z*2/9)))), s = (m-1)/(m+1), z = s^2; highest power first.
const LOG_COEFFS: [f32; 5] = [
    f32::from_bits(0x3E63_8E39),
    f32::from_bits(0x3E92_4925),
    f32::from_bits(0x3ECC_CCCD),
    f32::from_bits(0x3F2A_AAAB),
    f32::from_bits(0x4000_0000),
];
/// sin(x) = x + x^3 * (-1/6 + x^2*(1/120 + x^2*(-1/5040 + x^2/362880))); highest power first.
const SIN_COEFFS: [f32; 4] = [
    f32::from_bits(0x3638_EF1D),
    f32::from_bits(0xB950_0D01),
    f32::from_bits(0x3C08_8889),
    f32::from_bits(0xBE2A_AAAB),
];
/// cos(x) = 1 + x^2 * (-1/2 + x^2*(1/24 + x^2*(-1/720 + x^2*(1/40320 - x^2/3628800)))); highest power first.
const COS_COEFFS: [f32; 5] = [
    f32::from_bits(0xB493_F27E),
    f32::from_bits(0x37D0_0D01),
    f32::from_bits(0xBAB6_0B61),
    f32::from_bits(0x3D2A_AAAB),
    f32::from_bits(0xBF00_0000),
];

/// Philox4x32 with 10 rounds: the 128-bit `counter` encrypted under the 64-bit `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut words = counter;
    for round in 0..10 {
        words = philox_round(words, round_key(key, round));
    }
    words
}

/// The key of round `round` (0-based): the seed plus `round` Weyl increments.
#[inline(always)]
fn round_key([k0, k1]: [u32; 2], round: u32) -> [u32; 2] {
    [k0.wrapping_add(WEYL_0.wrapping_mul(round)), k1.wrapping_add(WEYL_1.wrapping_mul(round))]
}

/// One Philox4x32 round of the counter words under a round key.
#[inline(always)]
fn philox_round([c0, c1, c2, c3]: [u32; 4], [k0, k1]: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(MUL_0) * u64::from(c0);
    let p1 = u64::from(MUL_1) * u64::from(c2);
    let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
    let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
    [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]
}

/// `(2 * (bits >> 9) + 1) * 2^-24`: an odd multiple of 2^-24 in (0, 1), exact in f32 (never 0,
/// so its logarithm is finite).
#[inline(always)]
pub fn uniform(bits: u32) -> f32 {
    let odd = ((bits >> 9) << 1) | 1;
    odd as f32 * TWO_POW_MINUS_24
}

/// Horner evaluation, highest coefficient first, as `_poly` in philox.py.
#[inline(always)]
fn poly(coeffs: &[f32], z: f32) -> f32 {
    let mut acc = coeffs[0];
    for &c in &coeffs[1..] {
        acc = acc * z + c;
    }
    acc
}

/// Natural logarithm of a normal positive f32 (the generator feeds it values in (0, 1)) by the
/// fixed polynomial of philox.py: u = 2^e * m with m in (sqrt(2)/2, sqrt(2)], then an atanh series.
#[inline(always)]
pub fn ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127;
    let mantissa = f32::from_bits((bits & 0x7F_FFFF) | 0x3F80_0000);
    // Selects rather than a branch, so that a loop over many values vectorises.
    let above = mantissa > SQRT2;
    let mantissa = if above { mantissa * HALF } else { mantissa }; // exact
    let exponent = if above { exponent + 1 } else { exponent };
    let s = (mantissa - ONE) / (mantissa + ONE);
    let z = s * s;
    let log_mantissa = s * poly(&LOG_COEFFS, z);
    let e = exponent as f32;
    e * LN2_HI + (e * LN2_LO + log_mantissa)
}

/// `(sin(2 pi u), cos(2 pi u))` for u in (0, 1): u is reduced exactly to the nearest quarter turn,
/// leaving |x| <= pi/4 for the polynomials.
#[inline(always)]
pub fn sincos_2pi(u: f32) -> (f32, f32) {
    let quarter_turns = (u * FOUR + HALF).floor() as i32;
    let f = u - quarter_turns as f32 * QUARTER; // exact, |f| <= 1/8
    let x = f * TWO_PI;
    let x2 = x * x;
    let s = x + (x * x2) * poly(&SIN_COEFFS, x2);
    let c = ONE + x2 * poly(&COS_COEFFS, x2);
    // The quadrant's rotation as selects (a vectorisable form of a four-way match).
    let quadrant = quarter_turns & 3;
    let swapped = quadrant & 1 == 1;
    let (sin, cos) = if swapped { (c, -s) } else { (s, c) };
    if quadrant >= 2 {
        (-sin, -cos)
    } else {
        (sin, cos)
    }
}

/// Box–Muller on two Philox words: `(radius * cos, radius * sin)` for the even and odd lane.
#[inline(always)]
fn box_muller(first: u32, second: u32) -> (f32, f32) {
    let radius = (MINUS_TWO * ln(uniform(first))).sqrt();
    let (sin, cos) = sincos_2pi(uniform(second));
    (radius * cos, radius * sin)
}

/// The four normals of elements `4 * block .. 4 * block + 4` under (seed, stream).
pub fn normal_block(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    let counter = [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32];
    let [r0, r1, r2, r3] = philox4x32_10(counter, [seed as u32, (seed >> 32) as u32]);
    let (z0, z1) = box_muller(r0, r1);
    let (z2, z3) = box_muller(r2, r3);
    [z0, z1, z2, z3]
}

/// Element `index` of the standard normal noise drawn under (seed, stream).
pub fn normal(seed: u64, stream: u64, index: u64) -> f32 {
    normal_block(seed, stream, index / 4)[(index % 4) as usize]
}

/// Philox blocks per rayon task: large enough to amortise scheduling, small enough to balance.
const BLOCKS_PER_TASK: usize = 4096;

/// Fills `out` with elements `0..out.len()` of the noise drawn under (seed, stream).
pub fn fill_normal(seed: u64, stream: u64, out: &mut [f32]) {
    out.par_chunks_mut(4 * BLOCKS_PER_TASK).enumerate().for_each(|(task, chunk)| {
        fill_normal_from(seed, stream, (4 * task * BLOCKS_PER_TASK) as u64, chunk);
    });
}

/// Philox blocks computed side by side in [`normal_group`]: eight, one AVX2 vector per word.
const GROUP: usize = 8;

/// Fills `out` with elements `first .. first + out.len()` of the noise under (seed, stream), on
/// one thread, [`GROUP`] Philox blocks at a time with the CPU's vector instructions. The values
/// are those of [`normal`], bit for bit: the same IEEE operations in the same order per lane.
pub fn fill_normal_from(seed: u64, stream: u64, first: u64, out: &mut [f32]) {
    crate::fastmath::vectorised(
        #[inline(always)]
        || {
            let mut element = first;
            let mut rest = &mut out[..];
            while !rest.is_empty() {
                let block = element / 4;
                let skip = (element % 4) as usize;
                let values = normal_group(seed, stream, block);
                let take = (4 * GROUP - skip).min(rest.len());
                let (head, tail) = rest.split_at_mut(take);
                head.copy_from_slice(&values[skip..skip + take]);
                rest = tail;
                element += take as u64;
            }
        },
    );
}

/// The normals of blocks `first_block .. first_block + GROUP` (elements in order), as
/// [`normal_block`] computes them, written lane-parallel so that the loops vectorise.
// Lane-indexed loops over parallel arrays are the form that vectorises here.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn normal_group(seed: u64, stream: u64, first_block: u64) -> [f32; 4 * GROUP] {
    let mut words = [[0u32; GROUP]; 4];
    for lane in 0..GROUP {
        let block = first_block + lane as u64;
        words[0][lane] = block as u32;
        words[1][lane] = (block >> 32) as u32;
        words[2][lane] = stream as u32;
        words[3][lane] = (stream >> 32) as u32;
    }
    let key = [seed as u32, (seed >> 32) as u32];
    for round in 0..10 {
        let round_key = round_key(key, round);
        for lane in 0..GROUP {
            let lane_words = [words[0][lane], words[1][lane], words[2][lane], words[3][lane]];
            let [c0, c1, c2, c3] = philox_round(lane_words, round_key);
            (words[0][lane], words[1][lane], words[2][lane], words[3][lane]) = (c0, c1, c2, c3);
        }
    }
    let mut normals = [[0.0f32; GROUP]; 4];
    for pair in 0..2 {
        for lane in 0..GROUP {
            let (even, odd) = box_muller(words[2 * pair][lane], words[2 * pair + 1][lane]);
            normals[2 * pair][lane] = even;
            normals[2 * pair + 1][lane] = odd;
        }
    }
    let mut out = [0.0f32; 4 * GROUP];
    for lane in 0..GROUP {
        for word in 0..4 {
            out[4 * lane + word] = normals[word][lane];
        }
    }
    out
}

/// The stream of the noise for one probabilistic attention:
/// `(draw << 16) | (adapter << 1) | direction`, where direction 0 is image->text and 1 is
/// text->image, `adapter` is the PVL adapter index and `draw` the Monte-Carlo sample index
/// (inference) or the training step (training).
pub fn stream_id(draw: u64, adapter: u32, direction: u32) -> u64 {
    // Wider fields would silently collide with their neighbours; the model never comes close
    // (a dozen adapters, two directions, far fewer than 2^48 draws).
    debug_assert!(direction < 2 && adapter < (1 << 15) && draw < (1 << 48), "stream_id fields out of range");
    (draw << 16) | (u64::from(adapter) << 1) | u64::from(direction)
}

/// How the Monte-Carlo draws of one forward pass share their noise.
///
/// The Philox scheme is the same in every mode — the noise of draw `d` is a pure function of
/// (seed, stream of some draw, element index) — so every mode is bit-reproducible and identical on
/// every backend. Only which stream a draw reads, and its sign, change. Training always uses
/// [`NoiseMode::Plain`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum NoiseMode {
    /// Independent draws: draw `d` reads its own stream (the official code's sampling).
    #[default]
    Plain,
    /// Antithetic pairs: draw `2j + 1` reads the stream of draw `2j` and negates it, so a pair's
    /// Gaussian vectors are `eps` and `-eps` exactly. Pairs are formed on the absolute draw index
    /// (not on a sample's position in one call), so an odd number of draws leaves the last one
    /// unpaired and plain. Each draw is still marginally N(0, I); the mean over a pair cancels the
    /// odd part of the response to the noise.
    Antithetic,
}

impl NoiseMode {
    /// Every mode, in the order the command line lists them.
    pub const ALL: [NoiseMode; 2] = [NoiseMode::Plain, NoiseMode::Antithetic];

    /// The name `--noise` takes.
    pub fn name(self) -> &'static str {
        match self {
            NoiseMode::Plain => "plain",
            NoiseMode::Antithetic => "antithetic",
        }
    }

    /// `(the draw whose stream draw `draw` reads, whether it negates that noise)`.
    pub fn source(self, draw: u64) -> (u64, bool) {
        match self {
            NoiseMode::Plain => (draw, false),
            NoiseMode::Antithetic => (draw & !1, draw & 1 == 1),
        }
    }

    /// The bit of a [`stream_id`] that holds the draw's lowest bit when this mode negates odd
    /// draws, else 0. A kernel that knows only a draw's nominal stream `s` reads stream
    /// `s & !bit`, negated when `s & bit != 0` — the same as [`NoiseMode::source`], because
    /// `stream_id` keeps the draw in its high bits, shifted by a constant.
    pub fn negate_bit(self) -> u64 {
        match self {
            NoiseMode::Plain => 0,
            NoiseMode::Antithetic => stream_id(1, 0, 0),
        }
    }
}

/// Where the items of a batch read their noise in a draw's stream.
///
/// One item's noise is a block of consecutive elements of the stream (`n` elements: keys x
/// channels of an attention). Which block an item reads decides whether batching changes its
/// result: see docs/model.md §5.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ItemNoise {
    /// Item `b` reads elements `b * n ..`: every item of a batch draws its own noise. Training and
    /// the official code (and the parity fixtures) draw this way; an image's draws then depend on
    /// its row in the batch.
    ByRow,
    /// Every item reads elements `0 .. n`: an item's noise depends only on the seed and the draw,
    /// so an image gets the same maps alone or at any position of any batch. Inference uses it
    /// (`segment`, `predict`, `eval`, training's validation). Items of one batch see the same
    /// Gaussian vectors, which leaves each image's maps an unbiased estimate (a map is computed from
    /// its own image only).
    Shared,
}

impl ItemNoise {
    /// The index of the first noise element of batch item `item`, whose noise is `per_item`
    /// consecutive elements.
    pub fn first_element(self, item: usize, per_item: usize) -> u64 {
        match self {
            ItemNoise::ByRow => (item as u64) * per_item as u64,
            ItemNoise::Shared => 0,
        }
    }
}

impl std::fmt::Display for NoiseMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for NoiseMode {
    type Err = crate::error::Error;

    /// `plain` or `antithetic`; anything else is an error that lists the choices.
    fn from_str(text: &str) -> Result<NoiseMode, Self::Err> {
        NoiseMode::ALL.into_iter().find(|mode| mode.name() == text).ok_or_else(|| {
            let names: Vec<&str> = NoiseMode::ALL.iter().map(|m| m.name()).collect();
            crate::error::Error::Invalid(format!("unknown noise mode `{text}`: expected one of {}", names.join(", ")))
        })
    }
}
