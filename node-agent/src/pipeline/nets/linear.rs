//! A linear layer whose result for each sample of a batch does not depend
//! on the batch. On the CPU, gemm picks its kernels by the shape of the
//! product, so the same row multiplied in a product of 2 rows and in one of
//! 16 can round differently; a tiny random model amplifies that into
//! visibly different images. One product per sample keeps every image of a
//! batch bit-identical to the image run alone, at the cost of one gemm call
//! per sample (the products stay as large as a single image's). GPUs run
//! the whole batch in one product.

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;

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
        if !x.device().is_cpu() || x.rank() < 2 || samples <= 1 {
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
