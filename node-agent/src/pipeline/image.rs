//! Generated images and the files they are written to.

use std::io::Write;

/// An RGB image as float32 values in [0, 1], height × width × 3.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Image {
    /// 8-bit RGB, rounded as diffusers' `numpy_to_pil` does.
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    /// PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header()?;
            w.write_image_data(&self.to_rgb8())?;
        }
        Ok(out)
    }

    /// A NumPy `.npy` file of the float32 HWC image (before rounding).
    pub fn to_npy(&self) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}, 3), }}",
            self.height, self.width
        );
        let total = 10 + header.len() + 1;
        header.push_str(&" ".repeat(total.next_multiple_of(64) - total));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + self.data.len() * 4);
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in &self.data {
            let _ = out.write_all(&v.to_le_bytes());
        }
        out
    }
}

/// Why bytes are not a float32 `.npy` array this reader handles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file")]
    NotNpy,
    #[error("the .npy header is truncated or not text")]
    Header,
    #[error("unsupported .npy layout (float32, C order only): {0}")]
    Layout(String),
    #[error("the .npy data length does not match its shape")]
    Length,
}

/// Reads a float32 `.npy` array (C order): shape and values.
pub fn read_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    if bytes.len() < 12 || &bytes[..6] != b"\x93NUMPY" {
        return Err(NpyError::NotNpy);
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or(NpyError::Header)?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(NpyError::Layout(header.to_string()));
    }
    let shape: Option<Vec<usize>> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(|text| {
            text.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().ok())
                .collect()
        })
        .and_then(|dims: Option<Vec<usize>>| dims);
    let shape = shape.ok_or_else(|| NpyError::Layout(header.to_string()))?;
    let data: Vec<f32> = bytes[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if Some(data.len()) != shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)) {
        return Err(NpyError::Length);
    }
    Ok((shape, data))
}

/// Width and height from a PNG's IHDR chunk, if `bytes` is a PNG.
pub fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    Some((be(16), be(20)))
}

/// Why uploaded bytes are not an image an edit can use.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("is not a PNG, JPEG or WebP image")]
    Format,
    #[error("is {width}x{height}, more than the {max} pixels an edit may upload")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("cannot be decoded: {0}")]
    Corrupt(String),
}

/// Reads the header of an uploaded image and refuses it, before a pixel is
/// decoded, when it is not PNG, JPEG or WebP or has more than `max_pixels`:
/// a few kilobytes of compressed data can claim gigabytes of pixels.
fn reader(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<image::ImageReader<std::io::Cursor<&[u8]>>, DecodeError> {
    use image::ImageFormat;
    let open = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Corrupt(e.to_string()))
    };
    let probe = open()?;
    if !matches!(
        probe.format(),
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)
    ) {
        return Err(DecodeError::Format);
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max: max_pixels,
        });
    }
    let mut r = open()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // RGBA at 16 bits per channel, twice over for conversions.
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 16);
    r.limits(limits);
    Ok(r)
}

fn decode(bytes: &[u8], max_pixels: u64) -> Result<image::DynamicImage, DecodeError> {
    reader(bytes, max_pixels)?
        .decode()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))
}

/// An uploaded PNG, JPEG or WebP as an RGB image (alpha dropped).
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<Image, DecodeError> {
    let rgb = decode(bytes, max_pixels)?.to_rgb8();
    Ok(Image {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
    })
}

/// An uploaded mask: with an alpha channel, its fully transparent pixels are
/// repainted (OpenAI's convention); without one, its light pixels are
/// (luminance ≥ 0.5, diffusers' convention for black-and-white masks).
pub fn decode_mask(bytes: &[u8], max_pixels: u64) -> Result<super::Mask, DecodeError> {
    let img = decode(bytes, max_pixels)?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        img.to_rgba8()
            .pixels()
            .map(|p| if p[3] == 0 { 1.0 } else { 0.0 })
            .collect()
    } else {
        img.to_luma8()
            .pixels()
            .map(|p| if p[0] >= 128 { 1.0 } else { 0.0 })
            .collect()
    };
    Ok(super::Mask {
        width,
        height,
        data,
    })
}

impl Image {
    /// The image resampled to `width` × `height` (Lanczos, as diffusers'
    /// image processor resizes).
    pub fn resized(&self, width: usize, height: usize) -> Image {
        self.resampled(width, height, image::imageops::FilterType::Lanczos3)
    }

    /// The image resampled to `width` × `height` with `filter`, clamped to [0, 1].
    pub fn resampled(
        &self,
        width: usize,
        height: usize,
        filter: image::imageops::FilterType,
    ) -> Image {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let src =
            image::Rgb32FImage::from_raw(self.width as u32, self.height as u32, self.data.clone());
        let Some(src) = src else {
            return self.clone();
        };
        let out = image::imageops::resize(&src, width as u32, height as u32, filter);
        Image {
            width,
            height,
            data: out
                .into_raw()
                .into_iter()
                .map(|v| v.clamp(0.0, 1.0))
                .collect(),
        }
    }
}

impl super::Mask {
    /// The mask resampled to `width` × `height` (nearest pixel, so it stays binary).
    pub fn resized(&self, width: usize, height: usize) -> super::Mask {
        let data = (0..height)
            .flat_map(|y| (0..width).map(move |x| (y, x)))
            .map(|(y, x)| {
                self.data[(y * self.height / height) * self.width + x * self.width / width]
            })
            .collect();
        super::Mask {
            width,
            height,
            data,
        }
    }
}
