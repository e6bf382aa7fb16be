//! A faster 2-D convolution for the CPU (f32, no groups, no dilation).
//!
//! candle's CPU convolution re-lays-out the whole kernel on every call, copies
//! the input to NHWC, allocates — and so has the kernel zero-fill — a fresh
//! patch matrix for every 512 output pixels, and scatters each product into
//! the output. On SD 1.5 at 512×512 that page-zeroing alone was a quarter of a
//! denoising step. Here the kernel is used as stored (`[c_out, c_in·kh·kw]`
//! row-major is already the GEMM's left operand), the patches of a tile of
//! output pixels are built in NCHW order in a buffer the thread keeps, and
//! gemm writes each tile's product straight into the output, which starts as
//! the bias. Results equal candle's up to the order of float additions.

use super::ops::with_slice;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Patch buffers stay under this many f32s (32 MiB) unless one output row of
/// a tile needs more.
const TILE_FLOATS: usize = 8 << 20;

thread_local! {
    /// The patch matrix of the current tile; kept so that it is not mapped and
    /// zero-filled again for every tile of every convolution.
    static PATCHES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv2d`] handles this case; otherwise use candle's.
pub fn applies(x: &Tensor, w: &Tensor, groups: usize, dilation: usize) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && groups == 1
        && dilation == 1
        && x.rank() == 4
        && w.rank() == 4
}

/// `x` (`[n, c_in, h, w]`) convolved with `w` (`[c_out, c_in, kh, kw]`), plus
/// `bias` (`[c_out]`), with zero padding `pad` and `stride`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    conv2d_in_tiles(x, w, bias, stride, pad, TILE_FLOATS)
}

/// [`conv2d`] with patch buffers of about `tile_floats` f32s.
fn conv2d_in_tiles(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    tile_floats: usize,
) -> Result<Tensor> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, c_in_w, kh, kw) = w.dims4()?;
    if c_in != c_in_w || stride == 0 || h == 0 || wd == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
        candle_core::bail!(
            "conv2d: input {:?} does not fit kernel {:?} (stride {stride}, padding {pad})",
            x.dims(),
            w.dims()
        );
    }
    let (oh, ow) = (
        (h + 2 * pad - kh) / stride + 1,
        (wd + 2 * pad - kw) / stride + 1,
    );
    let pixels = oh * ow;
    let k = c_in * kh * kw;
    let mut out = vec![0f32; n * c_out * pixels];
    if let Some(b) = bias {
        let b = b.to_vec1::<f32>()?;
        for (row, v) in out.chunks_mut(pixels).zip(b.iter().cycle()) {
            row.fill(*v);
        }
    }
    // A 1×1 convolution's patch matrix is the image itself.
    let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == 0;
    // Whole output rows per tile, as many as fit the buffer budget.
    let tile = (tile_floats / k).max(1).div_ceil(ow) * ow;
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    with_slice(x, |xs| {
        with_slice(w, |ws| {
            PATCHES.with(|buf| {
                let mut col = buf.borrow_mut();
                for b in 0..n {
                    let img = &xs[b * c_in * h * wd..][..c_in * h * wd];
                    let step = if pointwise { pixels } else { tile };
                    for t0 in (0..pixels).step_by(step) {
                        let cols = step.min(pixels - t0);
                        let rhs = if pointwise {
                            img
                        } else {
                            col.resize(k * cols, 0.0);
                            patches(img, (c_in, h, wd), (kh, kw), stride, pad, ow, t0, &mut col);
                            &col[..]
                        };
                        let dst = &mut out[b * c_out * pixels + t0..];
                        // SAFETY: dst holds c_out rows of `pixels` floats from t0
                        // (the last row needs only `cols` of them), ws holds
                        // c_out × k and rhs holds k × cols, all row-major.
                        unsafe {
                            gemm::gemm(
                                c_out,
                                cols,
                                k,
                                dst.as_mut_ptr(),
                                1,
                                pixels as isize,
                                true,
                                ws.as_ptr(),
                                1,
                                k as isize,
                                rhs.as_ptr(),
                                1,
                                cols as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                parallelism,
                            );
                        }
                    }
                }
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, (n, c_out, oh, ow), &Device::Cpu)
}

/// Fills `col` (`[c_in·kh·kw, cols]`) with the input patches of output pixels
/// `t0..t0 + cols` (row-major over an output `ow` wide); zero where the
/// kernel overlaps the padding. Channels are filled in parallel: done on one
/// thread, this copy left the other cores idle for a tenth of a UNet step.
#[allow(clippy::too_many_arguments)]
fn patches(
    img: &[f32],
    (c_in, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    pad: usize,
    ow: usize,
    t0: usize,
    col: &mut [f32],
) {
    let cols = col.len() / (c_in * kh * kw);
    col.par_chunks_mut(kh * kw * cols)
        .zip(img.par_chunks(h * w))
        .for_each(|(rows, plane)| {
            for (row, (i, j)) in rows
                .chunks_mut(cols)
                .zip((0..kh).flat_map(|i| (0..kw).map(move |j| (i, j))))
            {
                let (mut pixel, mut q) = (t0, 0);
                while q < cols {
                    let (y, x0) = (pixel / ow, pixel % ow);
                    let run = (ow - x0).min(cols - q);
                    let dst = &mut row[q..q + run];
                    let iy = (y * stride + i) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                    } else {
                        let src = &plane[iy as usize * w..][..w];
                        for (d, x) in dst.iter_mut().zip(x0..) {
                            let ix = (x * stride + j) as isize - pad as isize;
                            *d = if ix >= 0 && ix < w as isize {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                    pixel += run;
                    q += run;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::ops::tests::{max_diff, random as random_in};
    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        random_in(shape, seed, 1.0)
    }

    #[test]
    fn matches_candles_convolution() {
        // (n, c_in, h, w, c_out, k, stride, pad): the UNet's and VAE's shapes
        // in miniature, odd sizes, strided downsamplers and a 1×1 shortcut.
        for (i, &(n, c_in, h, w, c_out, k, stride, pad)) in [
            (2, 4, 8, 8, 8, 3, 1, 1),
            (1, 3, 7, 5, 4, 3, 2, 1),
            (2, 6, 9, 9, 5, 1, 1, 0),
            (1, 2, 5, 6, 3, 3, 1, 0),
            (1, 5, 16, 16, 7, 3, 2, 0),
            (2, 8, 6, 6, 16, 3, 1, 2),
        ]
        .iter()
        .enumerate()
        {
            let x = random(&[n, c_in, h, w], i as u64);
            let wt = random(&[c_out, c_in, k, k], 100 + i as u64);
            let b = random(&[c_out], 200 + i as u64);
            let want = x
                .conv2d(&wt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let got = conv2d(&x, &wt, Some(&b), stride, pad).unwrap();
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i}: max abs diff {d}");
        }
    }

    #[test]
    fn tiles_smaller_than_the_output_give_the_same_result() {
        // A buffer for one or two output rows: the output is written tile by
        // tile, each a whole number of rows, in both images of the batch.
        let x = random(&[2, 4, 9, 8], 1);
        let wt = random(&[3, 4, 3, 3], 2);
        let b = random(&[3], 3);
        let want = conv2d_in_tiles(&x, &wt, Some(&b), 1, 1, usize::MAX).unwrap();
        for floats in [1, 300, 600] {
            let got = conv2d_in_tiles(&x, &wt, Some(&b), 1, 1, floats).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-6, "{floats} floats per tile: max abs diff {d}");
        }
        let want = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        let got = conv2d(&x, &wt, None, 1, 1).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-3, "max abs diff {d}");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = random(&[1, 3, 4, 4], 1);
        let wt = random(&[2, 4, 3, 3], 2);
        assert!(conv2d(&x, &wt, None, 1, 1).is_err());
        let big = random(&[2, 3, 7, 7], 3);
        assert!(conv2d(&x, &big, None, 1, 0).is_err());
        let empty = Tensor::zeros((1, 3, 0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&empty, &random(&[2, 3, 1, 1], 4), None, 1, 1).is_err());
    }
}
