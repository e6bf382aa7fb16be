//! The Canny edge detector that turns a photo into the edge map a canny
//! ControlNet is trained on, as OpenCV's `cv2.Canny(image, low, high)` on
//! the RGB image computes it (what the ControlNet authors and diffusers'
//! examples run): 3×3 Sobel gradients of each 8-bit channel (replicated
//! borders), per pixel the channel of the largest L1 magnitude, thinning to
//! the local maxima along the gradient quantised to 0°, 45°, 90° or 135°,
//! and hysteresis between the two thresholds. Integer arithmetic throughout,
//! as OpenCV's, so the edges are the same pixels.

use super::image::Image;

/// OpenCV's thresholds in the diffusers ControlNet examples.
pub const DEFAULT_LOW: f32 = 100.0;
pub const DEFAULT_HIGH: f32 = 200.0;

/// tan(22.5°) in OpenCV's fixed point (15 fractional bits).
const TG22: i64 = 13573;
const SHIFT: u32 = 15;

/// The edges of `image` as a black image with white edges (three equal
/// channels, 0 or 1). Thresholds are on the 0–255 scale of L1 gradient
/// magnitudes (OpenCV floors them); `low` ≤ `high`.
pub fn canny(image: &Image, low: f32, high: f32) -> Image {
    let (w, h) = (image.width, image.height);
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    let px: Vec<i64> = image
        .data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as i64)
        .collect();
    let at = |x: isize, y: isize, c: usize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        px[(y * w + x) * 3 + c]
    };
    // Per pixel, the channel with the largest L1 magnitude (the first on ties).
    let mut gx = vec![0i64; w * h];
    let mut gy = vec![0i64; w * h];
    let mut mag = vec![0i64; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for c in 0..3 {
                let dx = (at(x + 1, y - 1, c) + 2 * at(x + 1, y, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x - 1, y, c) + at(x - 1, y + 1, c));
                let dy = (at(x - 1, y + 1, c) + 2 * at(x, y + 1, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x, y - 1, c) + at(x + 1, y - 1, c));
                let m = dx.abs() + dy.abs();
                if c == 0 || m > mag[i] {
                    (gx[i], gy[i], mag[i]) = (dx, dy, m);
                }
            }
        }
    }
    // Magnitudes outside the image are 0.
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 0: not an edge, 1: weak (above low), 2: strong (above high).
    let mut class = vec![0u8; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (xs, ys) = (gx[i], gy[i]);
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let maximum = if ay < tg22x {
                v > m(x - 1, y) && v >= m(x + 1, y)
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                v > m(x, y - 1) && v >= m(x, y + 1)
            } else {
                let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                v > m(x - s, y - 1) && v > m(x + s, y + 1)
            };
            if maximum {
                class[i] = if v > high { 2 } else { 1 };
            }
        }
    }
    // Hysteresis: weak pixels connected (8-neighbourhood) to a strong one.
    let mut edge = vec![false; w * h];
    let mut stack: Vec<usize> = (0..w * h).filter(|&i| class[i] == 2).collect();
    for &i in &stack {
        edge[i] = true;
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if class[j] == 1 && !edge[j] {
                    edge[j] = true;
                    stack.push(j);
                }
            }
        }
    }
    Image {
        width: w,
        height: h,
        data: edge
            .iter()
            .flat_map(|&e| [if e { 1.0 } else { 0.0 }; 3])
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> Image {
        Image {
            width: w,
            height: h,
            data: (0..w * h).flat_map(|i| [f(i % w, i / w); 3]).collect(),
        }
    }

    fn edges(img: &Image) -> Vec<(usize, usize)> {
        (0..img.width * img.height)
            .filter(|i| img.data[3 * i] == 1.0)
            .map(|i| (i % img.width, i / img.width))
            .collect()
    }

    #[test]
    fn a_vertical_step_is_one_thin_vertical_line() {
        let img = image(16, 12, |x, _| if x < 8 { 0.0 } else { 1.0 });
        let e = edges(&canny(&img, DEFAULT_LOW, DEFAULT_HIGH));
        assert_eq!(e.len(), 12, "one pixel per row: {e:?}");
        assert!(e.iter().all(|&(x, _)| x == 7 || x == 8), "{e:?}");
    }

    #[test]
    fn weak_edges_survive_only_when_joined_to_strong_ones() {
        // A step of 0.3 (77 of 255: gradient 4 × 77 = 308) is strong; a step
        // of 0.1 (26: 104) is weak: alone it vanishes, continuing a strong
        // one it stays.
        let weak = image(16, 16, |x, _| if x < 8 { 0.0 } else { 0.1 });
        assert!(edges(&canny(&weak, DEFAULT_LOW, DEFAULT_HIGH)).is_empty());
        let joined = image(16, 16, |x, y| match (x < 8, y < 8) {
            (true, _) => 0.0,
            (false, true) => 0.3,
            (false, false) => 0.1,
        });
        let e = edges(&canny(&joined, DEFAULT_LOW, DEFAULT_HIGH));
        assert!(
            e.iter().any(|&(_, y)| y >= 12),
            "the weak half continues: {e:?}"
        );
    }

    proptest! {
        #[test]
        fn flat_images_have_no_edges_and_every_output_is_a_binary_map(
            w in 1usize..20, h in 1usize..20, v in 0.0f32..1.0, seed in any::<u64>(),
        ) {
            let flat = image(w, h, |_, _| v);
            prop_assert!(edges(&canny(&flat, DEFAULT_LOW, DEFAULT_HIGH)).is_empty());
            let noisy = image(w, h, |x, y| {
                let z = (x as u64 * 31 + y as u64 * 17) ^ seed;
                (z.wrapping_mul(6364136223846793005) >> 40) as f32 / (1u64 << 24) as f32
            });
            let out = canny(&noisy, DEFAULT_LOW, DEFAULT_HIGH);
            prop_assert_eq!((out.width, out.height), (w, h));
            prop_assert!(out.data.iter().all(|&v| v == 0.0 || v == 1.0));
        }
    }
}
