//! Linear layers: `y = x · Wᵀ` for a batch of rows.

use candle_core::{Result, Tensor};

/// A weight matrix of shape (out, in), kept in f32.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }


    /// `x` is (rows, in); the result is (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }
}

impl Linear {
    pub fn shape(&self) -> &[usize] {
        self.weight.dims()
    }
}
