//! Image editing's inputs as the denoising loop needs them: the image to
//! start from, the mask of what to repaint, and where in the schedule the
//! edit begins. The arithmetic follows diffusers' img2img and inpaint
//! pipelines, so that an edit here equals an edit there.

use super::Image;
use candle_core::{Device, Result, Tensor};

/// An image to edit: image-to-image without a mask, inpainting with one.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// The image, already at the output size.
    pub image: Image,
    pub mask: Option<Mask>,
    /// How much of the schedule runs: 0 keeps the image, 1 starts from noise.
    pub strength: f64,
}

/// Which pixels to repaint, at the image's size: 1 repaints, 0 keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    /// Row-major, each value 0 or 1.
    pub data: Vec<f32>,
}

/// Why an image and mask cannot be edited together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EditError {
    #[error(
        "mask is {mask_w}x{mask_h} but image is {image_w}x{image_h}; they must be the same size"
    )]
    MaskSize {
        mask_w: usize,
        mask_h: usize,
        image_w: usize,
        image_h: usize,
    },
    #[error("strength {0} must be from 0 to 1")]
    Strength(f64),
}

impl Edit {
    /// An edit of `image`, checked: the mask of the image's size, the
    /// strength in 0..=1, by default diffusers' (0.8 for image-to-image, 1
    /// for inpainting).
    pub fn new(
        image: Image,
        mask: Option<Mask>,
        strength: Option<f64>,
    ) -> std::result::Result<Self, EditError> {
        if let Some(m) = &mask {
            if (m.width, m.height) != (image.width, image.height) {
                return Err(EditError::MaskSize {
                    mask_w: m.width,
                    mask_h: m.height,
                    image_w: image.width,
                    image_h: image.height,
                });
            }
        }
        let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
        if !(0.0..=1.0).contains(&strength) {
            return Err(EditError::Strength(strength));
        }
        Ok(Edit {
            image,
            mask,
            strength,
        })
    }

    /// The edit at the output size: the image resampled, the mask too.
    pub fn resized(self, width: usize, height: usize) -> Self {
        Edit {
            image: self.image.resized(width, height),
            mask: self.mask.map(|m| m.resized(width, height)),
            strength: self.strength,
        }
    }
}

impl Mask {
    /// The mask of a whole image: everything is repainted.
    pub fn full(width: usize, height: usize) -> Self {
        Mask {
            width,
            height,
            data: vec![1.0; width * height],
        }
    }

    /// The mask at latent resolution, `[1, 1, h/8, w/8]`: the pixel at the
    /// top-left of each 8×8 block, as torch's nearest-neighbour interpolation
    /// (diffusers' `prepare_mask_latents`) picks it.
    pub fn latent(&self, device: &Device) -> Result<Tensor> {
        let (h, w) = (self.height / 8, self.width / 8);
        let v: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).map(move |x| (y, x)))
            .map(|(y, x)| self.data[8 * y * self.width + 8 * x])
            .collect();
        Tensor::from_vec(v, (1, 1, h, w), device)
    }
}

/// The first step of `steps` that an edit at `strength` runs (diffusers'
/// `get_timesteps`: the last `int(steps × strength)` steps run), or `None`
/// when none would.
pub fn start_step(steps: usize, strength: f64) -> Option<usize> {
    let run = ((steps as f64 * strength) as usize).min(steps);
    (run > 0).then_some(steps - run)
}

/// An image as the VAE encoder takes it: `[1, 3, H, W]` in [-1, 1].
pub fn image_tensor(image: &Image, device: &Device) -> Result<Tensor> {
    let hwc = Tensor::from_slice(&image.data, (image.height, image.width, 3), device)?;
    (hwc.permute((2, 0, 1))?.unsqueeze(0)? * 2.0)? - 1.0
}

/// A control image as a ControlNet takes it: `[1, 3, H, W]` in [0, 1].
pub fn control_tensor(image: &Image, device: &Device) -> Result<Tensor> {
    let hwc = Tensor::from_slice(&image.data, (image.height, image.width, 3), device)?;
    hwc.permute((2, 0, 1))?.unsqueeze(0)
}

/// The image with the area to repaint blanked (0 in [-1, 1], mid grey), as
/// the 9-channel inpainting UNets are conditioned on.
pub fn masked_image_tensor(image: &Image, mask: &Mask, device: &Device) -> Result<Tensor> {
    let keep: Vec<f32> = mask.data.iter().map(|m| 1.0 - m).collect();
    let keep = Tensor::from_vec(keep, (1, 1, mask.height, mask.width), device)?;
    image_tensor(image, device)?.broadcast_mul(&keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_defaults_its_strength_and_refuses_what_cannot_go_together() {
        let image = |w, h| Image {
            width: w,
            height: h,
            data: vec![0.0; w * h * 3],
        };
        assert_eq!(Edit::new(image(8, 8), None, None).unwrap().strength, 0.8);
        let masked = Edit::new(image(8, 8), Some(Mask::full(8, 8)), None).unwrap();
        assert_eq!(masked.strength, 1.0);
        assert_eq!(
            Edit::new(image(8, 8), None, Some(1.5)).unwrap_err(),
            EditError::Strength(1.5)
        );
        let e = Edit::new(image(16, 8), Some(Mask::full(8, 8)), None).unwrap_err();
        assert!(
            e.to_string().contains("mask is 8x8 but image is 16x8"),
            "{e}"
        );
        let r = masked.resized(16, 24);
        assert_eq!((r.image.width, r.image.height), (16, 24));
        assert_eq!(r.mask.map(|m| (m.width, m.height)), Some((16, 24)));
    }

    #[test]
    fn strength_picks_the_last_steps() {
        assert_eq!(start_step(4, 1.0), Some(0));
        assert_eq!(start_step(4, 0.5), Some(2));
        assert_eq!(start_step(10, 0.75), Some(3));
        assert_eq!(start_step(4, 0.2), None);
        assert_eq!(start_step(4, 0.0), None);
    }

    #[test]
    fn the_latent_mask_samples_each_block_at_its_corner() {
        let mut m = Mask::full(16, 16);
        m.data.iter_mut().for_each(|v| *v = 0.0);
        m.data[8 * 16 + 8] = 1.0; // top-left pixel of block (1, 1)
        m.data[1] = 1.0; // inside block (0, 0), not its corner
        let l = m.latent(&Device::Cpu).unwrap();
        assert_eq!(l.dims(), [1, 1, 2, 2]);
        assert_eq!(
            l.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn the_masked_image_is_grey_where_it_is_repainted() {
        let image = Image {
            width: 8,
            height: 8,
            data: vec![1.0; 8 * 8 * 3],
        };
        let mut mask = Mask::full(8, 8);
        mask.data[..32].iter_mut().for_each(|v| *v = 0.0);
        let t = masked_image_tensor(&image, &mask, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], 1.0, "kept");
        assert_eq!(v[40], 0.0, "repainted");
    }
}
