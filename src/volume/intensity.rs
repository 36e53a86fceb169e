//! Voxel intensities to the 8-bit grey range the model was trained on (docs/volumes.md §3): a CT
//! window (`--window C,W`) or, by default, the volume's own 0.5th and 99.5th percentiles, mapped
//! linearly to 0 .. 255 and clipped. One mapping for the whole volume, so every slice of it gets
//! the same grey for the same value.

use crate::error::{Error, Result};

/// The default percentiles (`--percentiles`): the darkest 0.5 % and brightest 0.5 % of voxels are
/// clipped, so a few outliers (metal, air at the border) do not squeeze the tissue's contrast.
pub const DEFAULT_PERCENTILES: (f64, f64) = (0.5, 99.5);

/// How voxel values become grey levels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Intensity {
    /// A window: values from `center - width / 2` (black) to `center + width / 2` (white), as the
    /// DICOM window (e.g. soft tissue `40,400`, lung `-600,1500` in Hounsfield units).
    Window {
        /// Window centre.
        center: f64,
        /// Window width (> 0).
        width: f64,
    },
    /// The `low`-th percentile of the volume's voxels to black and the `high`-th to white (both
    /// in percent, `0 <= low < high <= 100`; NumPy's linear interpolation between ranks).
    Percentiles {
        /// Lower percentile.
        low: f64,
        /// Upper percentile.
        high: f64,
    },
}

impl Default for Intensity {
    fn default() -> Intensity {
        Intensity::Percentiles { low: DEFAULT_PERCENTILES.0, high: DEFAULT_PERCENTILES.1 }
    }
}

impl Intensity {
    /// Parses `--window C,W` (C any number, W above 0).
    pub fn parse_window(text: &str) -> std::result::Result<Intensity, String> {
        let (center, width) = parse_pair(text)?;
        if width <= 0.0 {
            return Err(format!("window width {width} must be above 0 (`--window CENTER,WIDTH`, e.g. 40,400)"));
        }
        Ok(Intensity::Window { center, width })
    }

    /// Parses `--percentiles LOW,HIGH` (0 <= LOW < HIGH <= 100).
    pub fn parse_percentiles(text: &str) -> std::result::Result<Intensity, String> {
        let (low, high) = parse_pair(text)?;
        if !(0.0 <= low && low < high && high <= 100.0) {
            return Err(format!("percentiles {low},{high}: need 0 <= LOW < HIGH <= 100"));
        }
        Ok(Intensity::Percentiles { low, high })
    }

    /// The values mapped to black and white for `voxels` (finite values; see
    /// [`super::Volume::check_finite`]). Error: no voxel.
    pub fn range(&self, voxels: &[f32]) -> Result<(f64, f64)> {
        match *self {
            Intensity::Window { center, width } => Ok((center - width / 2.0, center + width / 2.0)),
            Intensity::Percentiles { low, high } => {
                if voxels.is_empty() {
                    return Err(Error::Invalid("percentiles of an empty volume".into()));
                }
                let mut sorted = voxels.to_vec();
                sorted.sort_unstable_by(f32::total_cmp);
                Ok((percentile(&sorted, low), percentile(&sorted, high)))
            }
        }
    }
}

fn parse_pair(text: &str) -> std::result::Result<(f64, f64), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let numbers: Vec<f64> = parts.iter().filter_map(|p| p.parse::<f64>().ok()).filter(|v| v.is_finite()).collect();
    match numbers[..] {
        [a, b] if parts.len() == 2 => Ok((a, b)),
        _ => Err(format!("`{text}` is not two finite numbers separated by a comma")),
    }
}

/// The `p`-th percentile (0 .. 100) of sorted values, linearly interpolated between the two
/// nearest ranks (NumPy's default `linear` method).
pub fn percentile(sorted: &[f32], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    let f = rank - below as f64;
    f64::from(sorted[below]) * (1.0 - f) + f64::from(sorted[above]) * f
}

/// Maps values to grey levels: `black` to 0, `white` to 255, linear between, clipped, rounded
/// to the nearest level. When `white <= black` (a constant volume, or a window/percentile pair
/// that meet) values above `white` are 255 and the rest 0 (a constant volume is black).
pub fn to_grey(values: &[f32], (black, white): (f64, f64)) -> Vec<u8> {
    let span = white - black;
    values
        .iter()
        .map(|&v| {
            let v = f64::from(v);
            if span <= 0.0 {
                return if v > white { 255 } else { 0 };
            }
            ((v - black) / span * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let sorted: Vec<f32> = (0..=10).map(|v| v as f32).collect();
        // numpy.percentile(range(11), [0, 50, 99.5]) = 0, 5, 9.95
        assert_eq!(percentile(&sorted, 0.0), 0.0);
        assert_eq!(percentile(&sorted, 50.0), 5.0);
        assert!((percentile(&sorted, 99.5) - 9.95).abs() < 1e-12);
    }

    #[test]
    fn a_window_maps_its_ends_to_black_and_white() {
        let window = Intensity::parse_window("40,400").unwrap();
        let range = window.range(&[]).unwrap();
        assert_eq!(range, (-160.0, 240.0));
        assert_eq!(to_grey(&[-1000.0, -160.0, 40.0, 240.0, 3000.0], range), vec![0, 0, 128, 255, 255]);
    }

    #[test]
    fn bad_windows_and_percentiles_are_refused() {
        assert!(Intensity::parse_window("40").is_err());
        assert!(Intensity::parse_window("40,0").unwrap_err().contains("above 0"));
        assert!(Intensity::parse_window("a,b").is_err());
        assert!(Intensity::parse_percentiles("99,1").is_err());
        assert!(Intensity::parse_percentiles("0,100").is_ok());
    }

    #[test]
    fn a_constant_volume_maps_to_one_level() {
        let range = Intensity::default().range(&[7.0; 10]).unwrap();
        assert_eq!(to_grey(&[7.0, 8.0], range), vec![0, 255]);
    }
}
