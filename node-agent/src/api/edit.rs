//! The body of `POST /v1/images/edits`: OpenAI's multipart form (`image`,
//! optional `mask`, `prompt`, `model`, `n`, `size`, `response_format`) plus
//! this API's generation fields, read into a [`GenerationRequest`] and the
//! image to edit, which is checked before it is decoded.

use super::request::{validate, GenerationRequest, Limits};
use super::ApiError;
use crate::catalog::Catalog;
use crate::pipeline::edit::EditError;
use crate::pipeline::image::{decode_image, decode_mask, DecodeError};
use crate::pipeline::{Edit, GenerateParams};
use crate::routes::Target;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::http::StatusCode;
use serde_json::{Map, Value};

/// What an edit uploads besides the generation's fields: the files, not yet
/// decoded, and the strength.
#[derive(Debug)]
pub struct Upload {
    image: Vec<u8>,
    mask: Option<Vec<u8>>,
    strength: Option<f64>,
}

/// Form fields that are numbers or JSON; the rest are strings.
const INTEGERS: [&str; 5] = ["n", "steps", "seed", "clip_skip", "partial_images"];
const FLOATS: [&str; 3] = ["guidance_scale", "strength", "denoising_end"];

fn multipart_error(e: MultipartError, limits: &Limits) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than {} bytes",
                limits.max_upload_bytes
            ),
            "invalid_request_error",
            "request_too_large",
        )
    } else {
        ApiError::invalid(format!(
            "invalid multipart/form-data body: {}",
            e.body_text()
        ))
    }
}

/// Reads the form. Unknown fields (OpenAI's `quality`, `user`, `background`…)
/// are accepted and ignored, as on `/v1/images/generations`.
pub async fn read_form(
    mut m: Multipart,
    limits: &Limits,
) -> Result<(GenerationRequest, Upload), ApiError> {
    let mut fields = Map::new();
    let (mut image, mut mask) = (None, None);
    let mut control_uploads = std::collections::VecDeque::new();
    let mut ip_adapter_upload = None;
    while let Some(field) = m
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limits))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e, limits))?;
        match name.as_str() {
            // gpt-image clients send `image[]`; its first image is the one edited.
            "image" | "image[]" => {
                image.get_or_insert(bytes.to_vec());
            }
            "mask" => mask = Some(bytes.to_vec()),
            "controlnet_image" | "controlnet_image[]" => control_uploads.push_back(bytes.to_vec()),
            "ip_adapter_image" => ip_adapter_upload = Some(bytes.to_vec()),
            _ => {
                let Some(field) = [
                    "model",
                    "prompt",
                    "negative_prompt",
                    "size",
                    "response_format",
                    "scheduler",
                    "seamless",
                    "loras",
                    "controlnet",
                    "ip_adapter",
                    "vae",
                    "refiner",
                    "stream",
                ]
                .into_iter()
                .chain(INTEGERS)
                .chain(FLOATS)
                .find(|f| *f == name) else {
                    continue;
                };
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| ApiError::invalid(format!("{field} is not UTF-8")).param(field))?
                    .trim();
                fields.insert(field.to_string(), field_value(field, text)?);
            }
        }
    }
    let strength = match fields.remove("strength") {
        Some(v) => v.as_f64(),
        None => None,
    };
    let mut request: GenerationRequest = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("invalid form: {e}")))?;
    request.control_uploads = control_uploads;
    request.ip_adapter_upload = ip_adapter_upload;
    let image = image.ok_or_else(|| ApiError::invalid("image is required").param("image"))?;
    Ok((
        request,
        Upload {
            image,
            mask,
            strength,
        },
    ))
}

/// A form field's text as the JSON value the generation request has there.
fn field_value(field: &'static str, text: &str) -> Result<Value, ApiError> {
    let bad = |what: &str| ApiError::invalid(format!("{field} must be {what}")).param(field);
    Ok(if INTEGERS.contains(&field) {
        Value::from(text.parse::<u64>().map_err(|_| bad("a whole number"))?)
    } else if FLOATS.contains(&field) {
        let v = text.parse::<f64>().map_err(|_| bad("a number"))?;
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| bad("a finite number"))?
    } else if field == "loras" {
        serde_json::from_str(text).map_err(|_| bad("a JSON list of {\"path\", \"weight\"}"))?
    } else if field == "ip_adapter" {
        serde_json::from_str(text)
            .map_err(|_| bad("a JSON object {\"model\", \"image\", \"weight\"}"))?
    } else if field == "controlnet" {
        serde_json::from_str(text).map_err(|_| {
            bad("a JSON list of {\"model\", \"image\", \"weight\", \"start\", \"end\"}")
        })?
    } else if field == "stream" {
        Value::Bool(text.parse::<bool>().map_err(|_| bad("true or false"))?)
    } else if field == "seamless" && matches!(text, "true" | "false") {
        Value::Bool(text == "true")
    } else {
        Value::String(text.to_string())
    })
}

fn decode_error(field: &'static str, e: DecodeError) -> ApiError {
    ApiError::invalid(format!("{field} {e}")).param(field)
}

/// Validates an edit into generation parameters. The output is the image's
/// size unless `size` asks for another, to which image and mask are resized.
pub fn validate_edit(
    mut request: GenerationRequest,
    form: Upload,
    target: &Target,
    catalog: &Catalog,
    l: &Limits,
) -> Result<GenerateParams, ApiError> {
    let image =
        decode_image(&form.image, l.max_image_pixels).map_err(|e| decode_error("image", e))?;
    let mask = match &form.mask {
        Some(bytes) => {
            Some(decode_mask(bytes, l.max_image_pixels).map_err(|e| decode_error("mask", e))?)
        }
        None => None,
    };
    let edit = Edit::new(image, mask, form.strength).map_err(|e| {
        let field = match e {
            EditError::MaskSize { .. } => "mask",
            EditError::Strength(_) => "strength",
        };
        ApiError::invalid(e.to_string()).param(field)
    })?;
    let image = &edit.image;
    if request.size.as_deref().is_none_or(|s| s == "auto") {
        if !image.width.is_multiple_of(8)
            || !image.height.is_multiple_of(8)
            || image.width.max(image.height) > l.max_side as usize
            || image.width.min(image.height) < 64
        {
            return Err(ApiError::invalid(format!(
                "image is {}x{}; without a size its sides must be multiples of 8 from 64 to {} (or ask for a size and it is resized)",
                image.width, image.height, l.max_side
            ))
            .param("image"));
        }
        request.size = Some(format!("{}x{}", image.width, image.height));
    }
    let strength = edit.strength;
    let mut p = validate(&request, target, catalog, l)?;
    if crate::pipeline::edit::start_step(p.steps, strength).is_none() {
        return Err(ApiError::invalid(format!(
            "strength {strength} of {} steps runs no step: raise strength or steps",
            p.steps
        ))
        .param("strength"));
    }
    p.edit = Some(edit.resized(p.width, p.height));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_become_the_request_s_types_or_name_the_field() {
        assert_eq!(field_value("n", "2").unwrap(), Value::from(2u64));
        assert_eq!(field_value("strength", "0.5").unwrap(), Value::from(0.5));
        assert_eq!(field_value("seamless", "true").unwrap(), Value::Bool(true));
        assert_eq!(field_value("seamless", "x").unwrap(), Value::from("x"));
        assert_eq!(
            field_value("loras", r#"[{"path": "a.safetensors"}]"#).unwrap()[0]["path"],
            "a.safetensors"
        );
        for (field, bad) in [
            ("n", "two"),
            ("steps", "-1"),
            ("strength", "NaN"),
            ("loras", "a.safetensors"),
            ("stream", "yes"),
        ] {
            let e = field_value(field, bad).unwrap_err();
            assert_eq!(e.param, Some(field));
        }
    }
}
