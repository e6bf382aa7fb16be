//! Cheap previews of a generation in progress: the predicted clean latents
//! projected to RGB by a fixed linear map per latent space (the factors
//! front ends such as ComfyUI fit for SD 1.x/2.x and SDXL latents), then
//! enlarged to the image's size. No VAE runs, so a preview costs a few
//! multiply-adds per latent pixel instead of a decode.

use super::Image;
use candle_core::{DType, Tensor};
use modelcache_crds::BaseModel;

/// RGB from each of the four latent channels, and a bias, for SD 1.x/2.x.
const SD: ([[f32; 3]; 4], [f32; 3]) = (
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    [0.0, 0.0, 0.0],
);

/// The same for SDXL's latent space.
const SDXL: ([[f32; 3]; 4], [f32; 3]) = (
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    [0.1084, -0.0175, -0.0011],
);

/// A preview of `latents` (`[1, C, h, w]`, scaled like the UNet's) at
/// `width`×`height`. Latents of other than four channels show their first
/// three as they are.
pub fn preview(
    latents: &Tensor,
    base: BaseModel,
    width: usize,
    height: usize,
) -> candle_core::Result<Image> {
    let (_, c, h, w) = latents.dims4()?;
    let x = latents
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (factors, bias) = if base == BaseModel::Sdxl { SDXL } else { SD };
    let at = |ch: usize, i: usize| x[ch * h * w + i];
    let rgb: Vec<[f32; 3]> = (0..h * w)
        .map(|i| {
            let mut px = bias;
            if c == 4 {
                for (ch, f) in factors.iter().enumerate() {
                    for k in 0..3 {
                        px[k] += at(ch, i) * f[k];
                    }
                }
            } else {
                for (k, v) in px.iter_mut().enumerate() {
                    *v = if k < c { at(k, i) } else { 0.0 };
                }
            }
            px.map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
        })
        .collect();
    // Nearest-neighbour enlargement: each latent pixel covers a block.
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let ly = (y * h / height.max(1)).min(h.saturating_sub(1));
        for xo in 0..width {
            let lx = (xo * w / width.max(1)).min(w.saturating_sub(1));
            data.extend_from_slice(&rgb[ly * w + lx]);
        }
    }
    Ok(Image {
        width,
        height,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_preview_has_the_image_size_and_follows_the_latents() {
        // One latent pixel strongly along channel 0, one along channel 3.
        let mut v = vec![0f32; 4 * 2]; // 4 channels × 1 × 2 pixels
        v[0] = 2.0; // channel 0, pixel 0
        v[3 * 2 + 1] = 2.0; // channel 3, pixel 1
        let t = Tensor::from_vec(v, (1, 4, 1, 2), &Device::Cpu).unwrap();
        let img = preview(&t, BaseModel::Sd1, 16, 8).unwrap();
        assert_eq!((img.width, img.height, img.data.len()), (16, 8, 16 * 8 * 3));
        let px = |x: usize, y: usize| &img.data[(y * 16 + x) * 3..][..3];
        // Channel 0 is bright in every colour; channel 3 dark, bluest of all.
        assert!(px(0, 0).iter().all(|&c| c > 0.7), "{:?}", px(0, 0));
        assert!(px(15, 7).iter().all(|&c| c < 0.5), "{:?}", px(15, 7));
        assert!(px(15, 7)[2] < px(15, 7)[0]);
        // Each latent pixel covers its half of the image.
        assert_eq!(px(7, 3), px(0, 0));
        assert_eq!(px(8, 3), px(15, 7));
    }
}
