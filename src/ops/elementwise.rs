//! PLACEHOLDER until the elementwise family lands.
use crate::error::Result;
use crate::tensor::Tensor;
/// Untracked `a + b` for equal shapes.
pub fn add_untracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, y) = (a.cpu_data("add")?, b.cpu_data("add")?);
    Tensor::from_vec(x.iter().zip(y).map(|(p, q)| p + q).collect(), a.shape())
}
