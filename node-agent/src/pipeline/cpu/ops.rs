//! Fused element-wise kernels for the CPU (f32): group norm (with the SiLU
//! that follows it in every resnet), GEGLU, and the vectorised `exp` and
//! `erf` they and the attention kernel share.
//!
//! Through candle a group norm is nine passes over the activations (sum,
//! subtract, square, sum, add, sqrt, divide, multiply, add), each into freshly
//! allocated memory, and candle's SiLU and GELU call the C library's scalar
//! `expf`/`erff` on the main thread. On SD 1.5 at 512×512 these kept one of
//! the two reference cores busy while the other idled for a quarter of a
//! step. Here each is one parallel pass.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Whether these kernels handle tensors like `t` (f32 on the CPU).
pub fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The f32 slice behind a CPU tensor made contiguous.
pub(super) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            f(&v[layout.start_offset()..][..layout.shape().elem_count()])
        }
        _ => candle_core::bail!("expected an f32 CPU tensor"),
    }
}

/// Defines `fn $name` that runs its body compiled for AVX2 and FMA when the
/// CPU has them (every x86 server of the last decade), and for the baseline
/// otherwise: the same source, vectorised 8 lanes wide instead of 4.
macro_rules! vectorised {
    ($(#[$m:meta])* $v:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])* $v fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn generic($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    generic($($a),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}

/// Lanes of the reductions below: separate accumulators, so that the
/// compiler can keep them in one vector register.
const L: usize = 8;

vectorised! {
    /// Replaces each value by `exp(value − max)` and returns their sum: a
    /// softmax row before the division.
    pub fn exp_shifted_in_place(row: &mut [f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; L];
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                m[i] = m[i].max(c[i]);
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&m)
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for i in 0..L {
                c[i] = exp(c[i] - max);
                sum[i] += c[i];
            }
        }
        let mut total: f32 = sum.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            total += *x;
        }
        total
    }
}

vectorised! {
    /// Mean and variance of `xs`, summed in f64.
    fn moments(xs: &[f32]) -> (f32, f32) {
        let n = xs.len().max(1) as f64;
        let mut s = [0f64; L];
        let mut chunks = xs.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                s[i] += c[i] as f64;
            }
        }
        let mean = (s.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| x as f64).sum::<f64>()) / n;
        let mut s = [0f64; L];
        let mut chunks = xs.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                let d = c[i] as f64 - mean;
                s[i] += d * d;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        (mean as f32, ((s.iter().sum::<f64>() + tail) / n) as f32)
    }
}

vectorised! {
    /// `dst = (src − mean)·scale + shift`, then SiLU if asked.
    fn normalise(src: &[f32], dst: &mut [f32], mean: f32, scale: f32, shift: f32, silu: bool) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x - mean) * scale + shift;
        }
        if silu {
            dst.iter_mut().for_each(|x| *x /= 1.0 + exp(-*x));
        }
    }
}

vectorised! {
    /// One row of GEGLU: `dst = h·gelu(g)` where `src` is `[h, g]`.
    fn geglu_row(src: &[f32], dst: &mut [f32]) {
        let (h, g) = src.split_at(dst.len());
        for ((d, &h), &g) in dst.iter_mut().zip(h).zip(g) {
            *d = h * 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// Group normalisation of `x` (`[n, c, …]`) over `groups` groups of
/// channels, scaled by `weight` and shifted by `bias` (`[c]`), then SiLU if
/// `silu`. Matches `candle_nn::GroupNorm` (biased variance, `eps` inside the
/// square root); the sums are in f64, so it is at least as accurate.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: {groups} groups do not divide input {dims:?}");
    }
    let (n, c) = (dims[0], dims[1]);
    let plane = dims[2..].iter().product::<usize>();
    let (w, b) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
    if w.len() != c || b.len() != c {
        candle_core::bail!("group_norm: {c} channels but {} weights", w.len());
    }
    let per_group = c / groups * plane;
    let mut out = vec![0f32; n * c * plane];
    with_slice(x, |xs| {
        out.par_chunks_mut(per_group.max(1))
            .zip(xs.par_chunks(per_group.max(1)))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (mean, var) = moments(src);
                let inv_std = 1.0 / (var as f64 + eps).sqrt() as f32;
                let first = (i % groups) * (c / groups);
                for (j, (d, s)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                    let ch = first + j;
                    normalise(s, d, mean, inv_std * w[ch], b[ch], silu);
                }
            });
        Ok(())
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// GEGLU over the last dimension of `x` (`[…, 2·d]` → `[…, d]`): the first
/// half times the exact (erf) GELU of the second, as diffusers computes it.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("geglu: a scalar has no last dimension");
    };
    if !last.is_multiple_of(2) {
        candle_core::bail!("geglu: last dimension {last} is odd");
    }
    let d = last / 2;
    let mut out = vec![0f32; x.elem_count() / 2];
    if d > 0 {
        with_slice(x, |xs| {
            out.par_chunks_mut(d)
                .zip(xs.par_chunks(last))
                .for_each(|(dst, src)| geglu_row(src, dst));
            Ok(())
        })?;
    }
    let mut shape = lead.to_vec();
    shape.push(d);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// `eˣ` by Cephes' `expf` polynomial: x = n·ln2 + r with |r| ≤ ln2/2, then
/// eʳ by a degree-7 polynomial and 2ⁿ through the exponent bits. Within 2 ulp
/// of the correctly rounded result over the range where eˣ is a normal f32;
/// below it the result is the smallest normal (softmax cannot tell), above
/// it e^88.7. Branch-free and without float-to-int conversions (which Rust
/// saturates, one lane at a time), so that it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.722_83);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two, so that n·ln2 is subtracted exactly.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let two_n = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    y * f32::from_bits(two_n)
}

/// erf by Abramowitz & Stegun 7.1.26, the approximation PyTorch's vectorised
/// CPU GELU uses: 1.5e-7 from erf in exact arithmetic, 5.9e-7 at worst in
/// f32 (measured; erf is then within 5 ulp of 1).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - p * exp(-a * a);
    y.copysign(x)
}

#[cfg(test)]
pub(in crate::pipeline) mod tests {
    use super::*;

    /// Deterministic values in ±spread/2, for the CPU kernels' tests.
    pub(in crate::pipeline) fn random(shape: &[usize], seed: u64, spread: f32) -> Tensor {
        let mut s = seed;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(in crate::pipeline) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
            x += 0.001_7;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!((0.0..1.2e-38).contains(&exp(-1000.0)));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_its_stated_error() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((erf(x) as f64 - libm_erf(x as f64)).abs());
            x += 0.000_3;
        }
        assert!(worst < 1e-6, "max abs error {worst}");
        assert!(erf(0.0).abs() < 1e-7 && erf(-3.0) < -0.9999);
        assert!(erf(f32::NAN).is_nan());
    }

    /// erf through candle's f64 implementation, as the reference.
    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn group_norm_matches_candles() {
        // (n, c, h, w, groups): the UNet's 32 groups, one group, odd sizes,
        // and an offset mean, which a one-pass variance would lose.
        for (i, &(n, c, h, w, groups, offset)) in [
            (2, 64, 8, 8, 32, 0.0),
            (1, 6, 5, 3, 1, 0.0),
            (2, 12, 7, 1, 4, 40.0),
        ]
        .iter()
        .enumerate()
        {
            let x = (random(&[n, c, h, w], i as u64, 4.0) + offset).unwrap();
            let weight = random(&[c], 10 + i as u64, 2.0);
            let bias = random(&[c], 20 + i as u64, 2.0);
            let gn =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-5).unwrap();
            let want = candle_nn::Module::forward(&gn, &x).unwrap();
            let got = group_norm(&x, groups, 1e-5, &weight, &bias, false).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i}: max abs diff {d}");
            let want = candle_nn::ops::silu(&want).unwrap();
            let got = group_norm(&x, groups, 1e-5, &weight, &bias, true).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i} with SiLU: max abs diff {d}");
        }
    }

    #[test]
    fn geglu_matches_candles() {
        for (i, shape) in [[2, 9, 10], [1, 3, 34]].iter().enumerate() {
            let x = random(shape, i as u64, 8.0);
            let d = shape[2] / 2;
            let want = (x.narrow(2, 0, d).unwrap()
                * x.narrow(2, d, d).unwrap().gelu_erf().unwrap())
            .unwrap();
            let got = geglu(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "case {i}: max abs diff {diff}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = random(&[1, 6, 2, 2], 1, 1.0);
        let (w, b) = (random(&[6], 2, 1.0), random(&[6], 3, 1.0));
        assert!(group_norm(&x, 4, 1e-5, &w, &b, false).is_err());
        assert!(group_norm(&x, 0, 1e-5, &w, &b, false).is_err());
        assert!(group_norm(&x, 3, 1e-5, &random(&[5], 2, 1.0), &b, false).is_err());
        assert!(geglu(&random(&[2, 3], 1, 1.0)).is_err());
    }
}
