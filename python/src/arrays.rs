//! NumPy arrays in and out of the engine's types. The Python layer (`mcs_engine/__init__.py`)
//! has already turned the caller's array into what the engine takes (8-bit, B, G, R or grey,
//! C order); these checks keep a direct caller of `_native` from reaching a panic.

use mcs_engine::data::Image8;
use mcs_engine::segment::Segmentation;
use numpy::ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::Failure;

/// One result as the tuple `_native` returns: `(mask, probability, uncertainty,
/// foreground_fraction, mean_uncertainty)`, each map `height x width`.
pub type Maps<'py> = (Bound<'py, PyArray2<bool>>, Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>, f64, f64);

/// An `(height, width, channels)` uint8 array (channels 1 or 3, C order) as an [`Image8`].
pub fn image_from_array(array: &PyReadonlyArray3<'_, u8>) -> Result<Image8, Failure> {
    let [height, width, channels] = [0, 1, 2].map(|axis| array.shape()[axis]);
    let data = array.as_slice().map_err(|_| invalid("the image array must be C-contiguous".into()))?;
    if channels != 1 && channels != 3 {
        return Err(invalid(format!("expected 1 or 3 channels (grey or B, G, R), got {channels}")));
    }
    Ok(Image8::from_raw(width, height, channels, data.to_vec())?)
}

fn invalid(message: String) -> Failure {
    Failure::Engine(mcs_engine::Error::Invalid(message))
}

/// A segmentation's maps as NumPy arrays (moved, not copied).
pub fn maps_to_arrays(py: Python<'_>, result: Segmentation) -> Result<Maps<'_>, Failure> {
    let (fraction, mean) = (result.foreground_fraction(), result.mean_uncertainty());
    let shape = (result.height, result.width);
    let plane = |values| Array2::from_shape_vec(shape, values).map_err(shape_error);
    let mask = Array2::from_shape_vec(shape, result.mask).map_err(shape_error)?;
    Ok((
        mask.into_pyarray(py),
        plane(result.probability)?.into_pyarray(py),
        plane(result.uncertainty)?.into_pyarray(py),
        fraction,
        mean,
    ))
}

/// An [`Image8`] as an `(height, width, channels)` uint8 array.
pub fn image_to_array(py: Python<'_>, image: Image8) -> Result<Bound<'_, PyArray3<u8>>, Failure> {
    let array = Array3::from_shape_vec((image.height, image.width, image.channels), image.data).map_err(shape_error)?;
    Ok(array.into_pyarray(py))
}

fn shape_error(error: numpy::ndarray::ShapeError) -> Failure {
    Failure::Internal(format!("a map does not fit its image's size: {error}"))
}
