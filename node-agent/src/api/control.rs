//! The `controlnet` field of both image endpoints: which ControlNets (and
//! T2I-Adapters, which it takes alike) condition the images, each with its control image (base64 in JSON, or a
//! `controlnet_image` part of an edit's form), weight and span of the
//! denoising, checked into [`Control`]s at the generation's size.

use super::request::Limits;
use super::ApiError;
use crate::catalog::Catalog;
use crate::pipeline::canny::{canny, DEFAULT_HIGH, DEFAULT_LOW};
use crate::pipeline::image::decode_image;
use crate::pipeline::{Control, IpAdapter};
use base64::Engine;
use modelcache_crds::BaseModel;
use serde::Deserialize;

/// Most ControlNets one request may use: each costs about half a UNet
/// evaluation per step.
pub const MAX_CONTROLNETS: usize = 4;

/// One entry of `controlnet`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetRequest {
    /// The ControlNet's path under the models folder.
    pub model: String,
    /// The control image, base64 (a `data:` URL prefix is accepted); in an
    /// edit's form it may come as a `controlnet_image` part instead.
    #[serde(default)]
    pub image: Option<String>,
    /// diffusers' `controlnet_conditioning_scale`, default 1.
    #[serde(default)]
    pub weight: Option<f64>,
    /// The share of the denoising it acts in: `control_guidance_start` and
    /// `_end`, default 0 and 1.
    #[serde(default)]
    pub start: Option<f64>,
    #[serde(default)]
    pub end: Option<f64>,
    /// `"canny"`: the image is a photo whose edges are the control.
    #[serde(default)]
    pub preprocess: Option<String>,
    /// Canny's hysteresis thresholds on the 0–255 gradient scale (100, 200).
    #[serde(default)]
    pub low_threshold: Option<f64>,
    #[serde(default)]
    pub high_threshold: Option<f64>,
}

/// The `ip_adapter` field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterRequest {
    /// The IP-Adapter file's path under the models folder.
    pub model: String,
    /// The image prompt, base64 (or an `ip_adapter_image` form part).
    #[serde(default)]
    pub image: Option<String>,
    /// How strongly the image counts (diffusers' IP-Adapter scale), default 1.
    #[serde(default)]
    pub weight: Option<f64>,
    /// A CLIP Vision folder under the models folder; default the
    /// `image_encoder/` folder beside the adapter.
    #[serde(default)]
    pub image_encoder: Option<String>,
}

/// The image of a field: its base64 text, else the form part.
fn image_bytes(
    b64: Option<&str>,
    upload: Option<Vec<u8>>,
    part: &str,
    at: impl Fn(&str, String) -> ApiError,
) -> Result<Vec<u8>, ApiError> {
    match b64 {
        Some(b64) => {
            let b64 = b64.split_once(";base64,").map_or(b64, |(_, b)| b);
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| at("image", format!("is not base64: {e}")))
        }
        None => upload.ok_or_else(|| {
            at(
                "image",
                format!("is required (base64 in JSON, or a {part} part of the form)"),
            )
        }),
    }
}

/// What the `ip_adapter` field asks for; `upload` is the form's
/// `ip_adapter_image` part, `base` the model's.
pub fn ip_adapter(
    r: &IpAdapterRequest,
    upload: Option<Vec<u8>>,
    base: Option<BaseModel>,
    catalog: &Catalog,
    l: &Limits,
) -> Result<IpAdapter, ApiError> {
    let at = |field: &str, what: String| {
        ApiError::invalid(format!("ip_adapter.{field}: {what}")).param("ip_adapter")
    };
    if upload.is_some() && r.image.is_some() {
        return Err(at(
            "image",
            "given twice (in JSON and as a form part)".into(),
        ));
    }
    let model = catalog
        .ip_adapter(&r.model, r.image_encoder.as_deref())
        .map_err(|e| at("model", e.to_string()))?;
    if let (Some(model), Some(adapter)) = (base, model.base.filter(|b| Some(*b) != base)) {
        let why = crate::pipeline::ip_adapter::IpAdapterError::Base { adapter, model };
        return Err(at("model", format!("{:?} {why}", r.model)));
    }
    let weight = r.weight.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&weight) {
        return Err(at("weight", "must be from 0 to 2".into()));
    }
    let bytes = image_bytes(r.image.as_deref(), upload, "ip_adapter_image", at)?;
    let image = decode_image(&bytes, l.max_image_pixels).map_err(|e| at("image", e.to_string()))?;
    Ok(IpAdapter {
        model,
        image,
        weight,
    })
}

/// What a request's `controlnet` entries ask for, as [`Control`]s whose
/// images are at `width` × `height`. `uploads` are the form's
/// `controlnet_image` parts, taken in order by the entries without an
/// `image`. `base` is the model's.
pub fn controls(
    requests: &[ControlNetRequest],
    mut uploads: std::collections::VecDeque<Vec<u8>>,
    base: Option<BaseModel>,
    (width, height): (usize, usize),
    catalog: &Catalog,
    l: &Limits,
) -> Result<Vec<Control>, ApiError> {
    if requests.len() > MAX_CONTROLNETS {
        return Err(bad(format!(
            "at most {MAX_CONTROLNETS} ControlNets per request"
        )));
    }
    let mut out = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let at = |field: &str, what: String| bad(format!("controlnet[{i}].{field}: {what}"));
        let model = catalog
            .controlnet(&r.model)
            .map_err(|e| at("model", e.to_string()))?;
        if let Some(base) = base.filter(|b| *b != model.base) {
            let why = crate::pipeline::control::ControlError::Base {
                control: model.base,
                model: base,
            };
            return Err(at("model", format!("{:?} {why}", r.model)));
        }
        let weight = r.weight.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&weight) {
            return Err(at("weight", "must be from 0 to 2".into()));
        }
        let (start, end) = (r.start.unwrap_or(0.0), r.end.unwrap_or(1.0));
        if !(0.0 <= start && start < end && end <= 1.0) {
            let why = crate::pipeline::control::ControlError::Span { start, end };
            return Err(at("start", why.to_string()));
        }
        let upload = match r.image {
            Some(_) => None,
            None => uploads.pop_front(),
        };
        let bytes = image_bytes(r.image.as_deref(), upload, "controlnet_image", at)?;
        let image =
            decode_image(&bytes, l.max_image_pixels).map_err(|e| at("image", e.to_string()))?;
        let image = match r.preprocess.as_deref() {
            None | Some("none") => image,
            Some("canny") => {
                let low = r.low_threshold.unwrap_or(DEFAULT_LOW as f64);
                let high = r.high_threshold.unwrap_or(DEFAULT_HIGH as f64);
                if !(0.0 <= low && low <= high && high <= 1020.0) {
                    return Err(at(
                        "low_threshold",
                        "thresholds must satisfy 0 ≤ low ≤ high ≤ 1020".into(),
                    ));
                }
                canny(&image, low as f32, high as f32)
            }
            Some(other) => {
                return Err(at(
                    "preprocess",
                    format!("{other:?} is not offered; use \"canny\" or send the control image"),
                ))
            }
        };
        out.push(Control {
            model,
            // As diffusers' control image processor: resized to the output.
            image: image.resized(width, height),
            weight,
            start,
            end,
        });
    }
    if !uploads.is_empty() {
        return Err(bad(format!(
            "{} controlnet_image parts more than the controlnet entries without an image",
            uploads.len()
        )));
    }
    Ok(out)
}

fn bad(message: String) -> ApiError {
    ApiError::invalid(message).param("controlnet")
}
