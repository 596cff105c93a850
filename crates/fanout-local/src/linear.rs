//! Linear layers: `y = x · Wᵀ` for a batch of rows.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};

use crate::quant::BlockMatrix;

/// A weight matrix of shape (out, in).
#[derive(Clone, Debug)]
pub enum Linear {
    /// Q4_1 / Q8_0 blocks, multiplied exactly as the dequantized weights (see `quant`).
    Blocks(Arc<BlockMatrix>),
    /// Any other type, dequantized to f32 (candle's matmul).
    Dense(Tensor),
}

impl Linear {
    pub fn from_qtensor(tensor: &QTensor) -> Result<Self> {
        Ok(match BlockMatrix::from_qtensor(tensor) {
            Some(blocks) => Self::Blocks(Arc::new(blocks)),
            None => Self::Dense(tensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?),
        })
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Blocks(blocks) => blocks.shape().to_vec(),
            Self::Dense(weight) => weight.dims().to_vec(),
        }
    }

    /// `x` is (rows, in); the result is (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Blocks(blocks) => x.contiguous()?.apply_op1_no_bwd(blocks.as_ref()),
            Self::Dense(weight) => x.matmul(&weight.t()?),
        }
    }

    /// Rows of the matrix itself, as f32: an embedding look-up.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Blocks(blocks) => {
                let width = blocks.shape()[1];
                let mut values = Vec::with_capacity(ids.len() * width);
                for &id in ids {
                    values.extend(blocks.row(id as usize));
                }
                Tensor::from_vec(values, (ids.len(), width), &Device::Cpu)
            }
            Self::Dense(weight) => weight.index_select(&Tensor::new(ids, &Device::Cpu)?, 0),
        }
    }
}
