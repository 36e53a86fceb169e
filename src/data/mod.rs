//! Data for training and evaluation: prompt files, the official dataset layout, the official
//! pre-processing (cv2-exact resize, BGR + ImageNet normalisation), the rotation augmentation,
//! loader threads and the built-in synthetic dataset.
//!
//! Flow of one sample: a [`SampleSource`] (files via [`DatasetIndex`], or memory via
//! [`InMemoryDataset`]) yields a `size` x `size` BGR image and 0/1 mask ([`RawSample`]); the
//! [`Loader`] rotates it (training only) and normalises it into a [`Batch`].

pub mod augment;
pub mod captions;
pub mod check;
pub mod layout;
pub mod loader;
pub mod preprocess;
pub mod prompts;
pub mod random;
pub mod synthetic;

pub use augment::{rotate_nearest, rotate_pair, rotation_for, MAX_ROTATION_DEGREES};
pub use check::{check_split, SplitCheck};
pub use layout::{
    check_file_name, existing_layout_parts, open_prompted_images, open_split, prompt_file_path, DatasetIndex, Item,
    PromptedImage, Split, SplitFolders, DATA_PERCENTAGES,
};
pub use loader::{
    epoch_order, load_batch, prepare_sample, Batch, Batches, InMemoryDataset, Loader, LoaderConfig, RawSample,
    SampleSource,
};
pub use preprocess::{
    binarise_mask, load_pair, normalise_bgr, read_bgr, read_bgr_within, read_grey, read_mask, resize_linear,
    resize_nearest, Image8, IMAGENET_MEAN, IMAGENET_STD,
};
pub use prompts::{read_prompt_file, write_prompt_xlsx, PromptRow};
pub use synthetic::{generate, synthetic_splits, write_official_layout, SyntheticSample, SyntheticSplits, WORDS};
