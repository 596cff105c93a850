//! Linear layers: `y = x · Wᵀ` for a batch of rows, each row `in` floats.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};

use crate::quant::BlockMatrix;

/// A weight matrix of shape (out, in).
#[derive(Clone, Debug)]
pub enum Linear {
    /// Q4_1 / Q8_0 blocks, multiplied in f32 on the dequantized values (see `quant`).
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

    pub fn shape(&self) -> [usize; 2] {
        match self {
            Self::Blocks(blocks) => blocks.shape(),
            Self::Dense(weight) => {
                let dims = weight.dims();
                [dims[0], dims[1]]
            }
        }
    }

    /// `x` is `batch` rows of `in` floats; the result is `batch` rows of `out`.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        match self {
            Self::Blocks(blocks) => Ok(blocks.matmul(x, batch)),
            Self::Dense(weight) => {
                let x = Tensor::from_slice(x, (batch, weight.dims()[1]), &Device::Cpu)?;
                x.matmul(&weight.t()?)?.flatten_all()?.to_vec1()
            }
        }
    }

    /// Rows of the matrix itself, as f32: an embedding look-up, row after row.
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Self::Blocks(blocks) => {
                Ok(ids.iter().flat_map(|&id| blocks.row(id as usize)).collect())
            }
            Self::Dense(weight) => {
                weight.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?.flatten_all()?.to_vec1()
            }
        }
    }
}

/// Several linear layers over the same input (a layer's query, key and value;
/// its gate and up projections), computed as one product where their blocks
/// stack: one pass over the input and one parallel dispatch instead of
/// several, which is most of what a single decoded token waits on. Each output
/// row is the parts' outputs side by side, in the order given.
#[derive(Debug)]
pub struct Stacked {
    shapes: Vec<[usize; 2]>,
    product: Stacking,
}

#[derive(Debug)]
enum Stacking {
    /// The parts' weight rows one after another.
    One(Linear),
    /// Parts whose types differ (a mixed quantization), run one by one.
    Each(Vec<Linear>),
}

impl Stacked {
    pub fn new(parts: Vec<Linear>) -> Self {
        let shapes = parts.iter().map(Linear::shape).collect();
        let blocks: Option<Vec<&BlockMatrix>> = parts
            .iter()
            .map(|part| match part {
                Linear::Blocks(blocks) => Some(blocks.as_ref()),
                Linear::Dense(_) => None,
            })
            .collect();
        let product = match blocks.and_then(|blocks| BlockMatrix::stack(&blocks)) {
            Some(stacked) => Stacking::One(Linear::Blocks(Arc::new(stacked))),
            None => Stacking::Each(parts),
        };
        Self { shapes, product }
    }

    /// Each part's (out, in).
    pub fn shapes(&self) -> &[[usize; 2]] {
        &self.shapes
    }

    /// `batch` rows, each the parts' outputs side by side.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        match &self.product {
            Stacking::One(linear) => linear.forward(x, batch),
            Stacking::Each(parts) => {
                let outputs =
                    parts.iter().map(|part| part.forward(x, batch)).collect::<Result<Vec<_>>>()?;
                let mut rows = Vec::with_capacity(outputs.iter().map(Vec::len).sum());
                for row in 0..batch {
                    for (output, [out, _]) in outputs.iter().zip(&self.shapes) {
                        rows.extend_from_slice(&output[row * out..][..*out]);
                    }
                }
                Ok(rows)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn linear(rows: usize, dtype: GgmlDType, seed: u64) -> Linear {
        let mut rng = fastrand::Rng::with_seed(seed);
        let values: Vec<f32> = (0..rows * 64).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let weights = Tensor::from_vec(values, (rows, 64), &Device::Cpu).unwrap();
        Linear::from_qtensor(&QTensor::quantize(&weights, dtype).unwrap()).unwrap()
    }

    /// Stacked or run one by one, the parts give the bits they give alone.
    #[test]
    fn stacked_parts_equal_the_parts_side_by_side() {
        let same = vec![linear(40, GgmlDType::Q4_1, 1), linear(16, GgmlDType::Q4_1, 2)];
        let mixed = vec![linear(40, GgmlDType::Q4_1, 1), linear(16, GgmlDType::Q8_0, 2)];
        let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        for (parts, stacks) in [(same, true), (mixed, false)] {
            let alone: Vec<Vec<f32>> = parts.iter().map(|p| p.forward(&x, 3).unwrap()).collect();
            let stacked = Stacked::new(parts);
            assert_eq!(matches!(stacked.product, Stacking::One(_)), stacks);
            assert_eq!(stacked.shapes(), [[40, 64], [16, 64]]);
            let got = stacked.forward(&x, 3).unwrap();
            for row in 0..3 {
                let expected = [&alone[0][row * 40..][..40], &alone[1][row * 16..][..16]].concat();
                assert_eq!(got[row * 56..][..56], expected[..], "row {row}");
            }
        }
    }
}
