//! A linear layer whose result for each sample of a batch does not depend
//! on the batch. On the CPU, gemm picks its kernels by the shape of the
//! product, and a product of a few rows (a time embedding: one per sample;
//! attention at the UNet's coarsest level) rounds a row differently with 2
//! rows than with 16; a tiny random model amplifies that into visibly
//! different images. Such products run one per sample, which keeps every
//! image of a batch bit-identical to the image run alone. Products of
//! [`SPLIT_BELOW`] rows per sample or more were found to round each row the
//! same whatever the batch (the batching tests check it on every fixture),
//! and run whole: splitting them too cost up to a third of an
//! SD-1.5-sized step on the CPU. GPUs run the whole batch in one product.

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;

/// Rows per sample below which a product runs one sample at a time.
pub const SPLIT_BELOW: usize = 16;

#[derive(Clone, Debug)]
pub struct Linear(nn::Linear);

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear(nn::Linear::new(weight, bias))
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vs: nn::VarBuilder) -> Result<Linear> {
    nn::linear(in_dim, out_dim, vs).map(Linear)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vs: nn::VarBuilder) -> Result<Linear> {
    nn::linear_no_bias(in_dim, out_dim, vs).map(Linear)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let samples = x.dims().first().copied().unwrap_or(1);
        let rows_per_sample: usize = x.dims()[1..x.rank().saturating_sub(1).max(1)]
            .iter()
            .product();
        if !x.device().is_cpu() || x.rank() < 2 || samples <= 1 || rows_per_sample >= SPLIT_BELOW {
            return self.0.forward(x);
        }
        let out = (0..samples)
            .map(|i| self.0.forward(&x.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&out, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_sample_gets_the_bits_it_gets_alone() {
        let dev = Device::Cpu;
        // Small products, where gemm's kernels differ by row count.
        let w = Tensor::randn(0f32, 1.0, (64, 128), &dev).unwrap();
        let lin = Linear::new(w, Some(Tensor::randn(0f32, 1.0, 64, &dev).unwrap()));
        for shape in [vec![6, 128], vec![6, 4, 128]] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let all = lin.forward(&x).unwrap();
            for i in 0..6 {
                let alone = lin.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                let diff = (all.narrow(0, i, 1).unwrap() - alone)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{shape:?} sample {i}");
            }
        }
    }
}
