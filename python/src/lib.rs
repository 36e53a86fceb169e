//! `mcs_engine._native`: the engine's [`Segmenter`] for Python, wrapped by the pure-Python
//! package `mcs_engine` (python/mcs_engine/__init__.py), which turns the caller's NumPy arrays
//! into what the engine takes and the tuples returned here into `Segmentation` objects.
//! docs/python.md describes the package; this module is its thin, GIL-free core: every call
//! copies its input out of Python objects, releases the GIL for the work (so Python threads
//! segment in parallel), and returns new arrays.

mod arrays;
mod errors;

use std::path::PathBuf;

use mcs_engine::segment::{read_image_within, select_device, Options, Segmenter, DEFAULT_MAX_PIXELS};
use numpy::{PyArray3, PyReadonlyArray3};
use pyo3::prelude::*;

use arrays::{image_from_array, image_to_array, maps_to_arrays, Maps};
use errors::{guarded, load_error, to_py, Failure};

/// A loaded model (see `mcs_engine.Segmenter`, which wraps this class).
#[pyclass(frozen, module = "mcs_engine._native", name = "Segmenter")]
struct NativeSegmenter {
    inner: Segmenter,
}

#[pymethods]
impl NativeSegmenter {
    /// Loads the model folder `model` onto `device` ("auto", "cpu", "cuda", "cuda:N").
    #[new]
    #[pyo3(signature = (model, device = "auto".to_string()))]
    fn new(py: Python<'_>, model: PathBuf, device: String) -> PyResult<Self> {
        py.detach(|| guarded(|| Segmenter::load_on(&model, &select_device(&device)?)))
            .map(|inner| NativeSegmenter { inner })
            .map_err(|failure| load_error(py, failure, &model))
    }

    /// The device the model runs on ("cpu", "cuda:0", ...).
    #[getter]
    fn device(&self) -> String {
        self.inner.device().name()
    }

    /// The folder the model was loaded from.
    #[getter]
    fn model(&self) -> Option<PathBuf> {
        self.inner.origin().map(PathBuf::from)
    }

    /// The side of the model's square input in pixels.
    #[getter]
    fn image_size(&self) -> usize {
        self.inner.config().image_size
    }

    /// The model config's name.
    #[getter]
    fn config_name(&self) -> String {
        self.inner.config().name.clone()
    }

    /// Segments one `(height, width, 1 | 3)` uint8 B, G, R (or grey) image, C order.
    #[pyo3(signature = (image, prompt, samples, seed, noise, threshold, max_pixels, resize))]
    #[allow(clippy::too_many_arguments)]
    fn segment<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArray3<'py, u8>,
        prompt: String,
        samples: usize,
        seed: u64,
        noise: String,
        threshold: f32,
        max_pixels: u64,
        resize: String,
    ) -> PyResult<Maps<'py>> {
        let image = image_from_array(&image).map_err(|f| to_py(py, f))?;
        let result = py.detach(|| {
            guarded(|| {
                let options = options(samples, seed, &noise, threshold, max_pixels, &resize)?;
                self.inner.segment(&image, &prompt, &options)
            })
        });
        result.and_then(|result| maps_to_arrays(py, result)).map_err(|f| to_py(py, f))
    }

    /// Segments image `i` for prompt `i` in one pass; lists of equal length.
    #[pyo3(signature = (images, prompts, samples, seed, noise, threshold, max_pixels, resize))]
    #[allow(clippy::too_many_arguments)]
    fn segment_batch<'py>(
        &self,
        py: Python<'py>,
        images: Vec<PyReadonlyArray3<'py, u8>>,
        prompts: Vec<String>,
        samples: usize,
        seed: u64,
        noise: String,
        threshold: f32,
        max_pixels: u64,
        resize: String,
    ) -> PyResult<Vec<Maps<'py>>> {
        let fail = |f| to_py(py, f);
        if images.len() != prompts.len() {
            let message = format!("{} images but {} prompts: give one prompt per image", images.len(), prompts.len());
            return Err(fail(Failure::Engine(mcs_engine::Error::Invalid(message))));
        }
        let images = images
            .iter()
            .enumerate()
            .map(|(i, array)| image_from_array(array).map_err(|f| item_failure(i, f)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        let results = py.detach(|| {
            guarded(|| {
                let options = options(samples, seed, &noise, threshold, max_pixels, &resize)?;
                let items: Vec<_> =
                    images.iter().zip(&prompts).map(|(image, prompt)| (image, prompt.as_str())).collect();
                self.inner.segment_batch(&items, &options)
            })
        });
        let results = results.map_err(fail)?;
        results.into_iter().map(|result| maps_to_arrays(py, result).map_err(fail)).collect()
    }
}

/// The engine's options from the call's arguments; the rest keep their defaults.
fn options(
    samples: usize,
    seed: u64,
    noise: &str,
    threshold: f32,
    max_pixels: u64,
    resize: &str,
) -> mcs_engine::Result<Options> {
    let options = Options { samples, seed, threshold, noise: noise.parse()?, max_pixels, resize: resize.parse()? };
    options.check()?;
    Ok(options)
}

/// A batch item's conversion error names the item, as the engine's own batch errors do.
fn item_failure(item: usize, failure: Failure) -> Failure {
    match failure {
        Failure::Engine(error) => Failure::Engine(error.context(format!("item {item}"))),
        other => other,
    }
}

/// Decodes a PNG or JPEG file as the engine (and `mcs-engine predict`) does: `(height, width, 3)`
/// uint8, B, G, R; grey files replicated, alpha dropped, 16-bit samples cut to their high byte.
#[pyfunction]
#[pyo3(signature = (path, max_pixels = DEFAULT_MAX_PIXELS))]
fn read_image(py: Python<'_>, path: PathBuf, max_pixels: u64) -> PyResult<Bound<'_, PyArray3<u8>>> {
    py.detach(|| guarded(|| read_image_within(&path, max_pixels)))
        .and_then(|image| image_to_array(py, image))
        .map_err(|f| to_py(py, f))
}

/// The native module: `Segmenter`, `read_image`, `DEFAULT_MAX_PIXELS`.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<NativeSegmenter>()?;
    module.add_function(wrap_pyfunction!(read_image, module)?)?;
    module.add("DEFAULT_MAX_PIXELS", DEFAULT_MAX_PIXELS)?;
    Ok(())
}
