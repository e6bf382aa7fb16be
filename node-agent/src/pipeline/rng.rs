//! The project's own seeded Gaussian generator. candle's CPU generator cannot be
//! seeded, so initial latents and sampling noise come from here: ChaCha8 (a
//! stable, portable stream) through Box–Muller, so a seed reproduces an image on
//! every machine and version.

use candle_core::{Device, Result, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct NormalRng {
    rng: ChaCha8Rng,
    spare: Option<f32>,
    /// Draws given in advance, used instead of the stream: a reference run's
    /// exact noise, so that a test can reproduce another implementation's image.
    replay: Option<std::vec::IntoIter<f32>>,
}

impl NormalRng {
    pub fn new(seed: u64) -> Self {
        NormalRng {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
            replay: None,
        }
    }

    /// A generator that hands out `draws` in order, and fails past their end.
    pub fn replay(draws: Vec<f32>) -> Self {
        NormalRng {
            replay: Some(draws.into_iter()),
            ..NormalRng::new(0)
        }
    }

    /// A uniform sample in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// A tensor of standard normal samples.
    pub fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = match &mut self.replay {
            Some(draws) => {
                let v: Vec<f32> = draws.by_ref().take(n).collect();
                if v.len() < n {
                    return Err(candle_core::Error::Msg("the replayed draws ran out".into()));
                }
                v
            }
            None => (0..n).map(|_| self.sample()).collect(),
        };
        Tensor::from_vec(v, shape, device)
    }
}

/// Where a scheduler's sampling noise comes from: one generator, or one per
/// image of a batch.
pub trait Noise {
    /// A tensor of standard normal samples.
    fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

impl Noise for NormalRng {
    fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        NormalRng::tensor(self, shape, device)
    }
}

/// A batch's noise: row `i` of a `[B, ...]` tensor comes from generator `i`,
/// so an image draws the same noise whatever batch it runs in.
impl Noise for &mut [NormalRng] {
    fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.len()) {
            return Err(candle_core::Error::Msg(format!(
                "noise of shape {shape:?} for a batch of {}",
                self.len()
            )));
        }
        let row = [&[1], &shape[1..]].concat();
        let rows = self
            .iter_mut()
            .map(|r| r.tensor(&row, device))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_roughly_normal() {
        let a: Vec<f32> = {
            let mut r = NormalRng::new(42);
            (0..10_000).map(|_| r.sample()).collect()
        };
        let b: Vec<f32> = {
            let mut r = NormalRng::new(42);
            (0..10_000).map(|_| r.sample()).collect()
        };
        assert_eq!(a, b);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        let mut c = NormalRng::new(43);
        assert_ne!(a[0], c.sample());
    }

    #[test]
    fn a_batch_row_draws_what_its_generator_draws_alone() {
        let mut rngs = [NormalRng::new(3), NormalRng::new(9)];
        let mut batch = &mut rngs[..];
        let t = Noise::tensor(&mut batch, &[2, 2, 3], &Device::Cpu).unwrap();
        for (i, seed) in [3u64, 9].into_iter().enumerate() {
            let alone = NormalRng::new(seed)
                .tensor(&[1, 2, 3], &Device::Cpu)
                .unwrap();
            let row = t.narrow(0, i, 1).unwrap();
            assert_eq!(
                row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert!(Noise::tensor(&mut batch, &[3, 2], &Device::Cpu).is_err());
    }
}
