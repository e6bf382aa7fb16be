//! The body of `POST /v1/images/generations` and its validation into
//! generation parameters: limits, defaults (a deployment's, then the model's
//! native size), adapter paths, and the embeddings a prompt names.

use super::ApiError;
use crate::catalog::Catalog;
use crate::pipeline::{embedding, GenerateParams, Refiner, Seamless, DEFAULT_REFINER_SWITCH};
use crate::routes::Target;
use modelcache_crds::{BaseModel, SchedulerKind};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_n: u32,
    pub max_side: u32,
    pub max_steps: u32,
    /// Most width × height × steps × n one request may ask for: what it costs
    /// grows with all four, and one request must not hold a slot for long.
    pub max_pixel_steps: u64,
    /// Longest a request may take, queueing included; `None`: no limit.
    pub timeout: Option<std::time::Duration>,
    /// Largest `/v1/images/edits` body (the image and mask with the fields).
    pub max_upload_bytes: usize,
    /// Most pixels an uploaded image or mask may have, checked from its
    /// header before it is decoded.
    pub max_image_pixels: u64,
}

/// The default `--max-pixel-steps`: four 1024×1024 images of 64 steps.
pub const DEFAULT_MAX_PIXEL_STEPS: u64 = 1 << 28;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 10,
            max_prompt_chars: 4000,
            max_n: 4,
            max_side: 2048,
            max_steps: 150,
            max_pixel_steps: DEFAULT_MAX_PIXEL_STEPS,
            timeout: Some(std::time::Duration::from_secs(600)),
            max_upload_bytes: 32 << 20,
            max_image_pixels: 2048 * 2048,
        }
    }
}

/// A LoRA named in a request.
#[derive(Debug, Deserialize)]
pub struct LoraRequest {
    pub path: String,
    #[serde(default)]
    pub weight: Option<f64>,
}

/// `POST /v1/images/generations` body. Unknown OpenAI fields (quality, style,
/// user) are accepted and ignored, as other image backends do.
#[derive(Debug, Deserialize)]
pub struct GenerationRequest {
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    #[serde(default)]
    pub seamless: Option<serde_json::Value>,
    #[serde(default)]
    pub clip_skip: Option<u32>,
    /// A VAE under the models folder used in place of the model's own.
    #[serde(default)]
    pub vae: Option<String>,
    /// An SDXL refiner under the models folder that finishes the images.
    #[serde(default)]
    pub refiner: Option<String>,
    /// The share of the schedule the model denoises before the refiner takes
    /// over, above 0 and at most 1 (1: no refiner).
    #[serde(default)]
    pub denoising_end: Option<f64>,
    /// Answer with Server-Sent Events: previews while denoising, then the images.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Previews to stream before each image, 0 to 3.
    #[serde(default)]
    pub partial_images: Option<u32>,
    /// ControlNets conditioning the images, each with its control image.
    #[serde(default)]
    pub controlnet: Option<Vec<super::control::ControlNetRequest>>,
    /// Control images uploaded as form parts (edits), for the `controlnet`
    /// entries without an `image`, in order.
    #[serde(skip)]
    pub control_uploads: std::collections::VecDeque<Vec<u8>>,
    /// An image prompt.
    #[serde(default)]
    pub ip_adapter: Option<super::control::IpAdapterRequest>,
    /// The `ip_adapter_image` form part (edits).
    #[serde(skip)]
    pub ip_adapter_upload: Option<Vec<u8>>,
}

impl GenerationRequest {
    /// Whether the request carries images in its body (only such bodies
    /// may be larger than `--max-body-bytes`).
    pub fn carries_images(&self) -> bool {
        self.controlnet
            .as_ref()
            .is_some_and(|c| c.iter().any(|c| c.image.is_some()))
            || self.ip_adapter.as_ref().is_some_and(|i| i.image.is_some())
    }
}

/// Most previews a streamed request may ask for per image, as OpenAI allows.
pub const MAX_PARTIAL_IMAGES: u32 = 3;

fn parse_size(size: &str, max: u32) -> Result<(usize, usize), ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "size {size:?} must be \"auto\" or WIDTHxHEIGHT, multiples of 8 from 64 to {max}"
        ))
        .param("size")
    };
    let (w, h) = size.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if w % 8 != 0 || h % 8 != 0 || !(64..=max).contains(&w) || !(64..=max).contains(&h) {
        return Err(bad());
    }
    Ok((w as usize, h as usize))
}

/// The size asked for; without one (or with `auto`), the deployment's
/// default, else the model's native size.
fn output_size(
    size: Option<&str>,
    defaults: &modelcache_crds::GenerationDefaults,
    native: usize,
    max_side: u32,
) -> Result<(usize, usize), ApiError> {
    match size.filter(|s| *s != "auto") {
        Some(sz) => parse_size(sz, max_side),
        None => Ok((
            defaults.width.map_or(native, |w| w.max(8) as usize),
            defaults.height.map_or(native, |h| h.max(8) as usize),
        )),
    }
}

/// Validates a request into generation parameters; a deployment's defaults fill
/// in what the request leaves out, and its adapters come before the request's.
/// Without a size, the model's native one (512, 768 for SD 2.x-v, 1024 for SDXL).
pub fn validate(
    r: &GenerationRequest,
    target: &Target,
    catalog: &Catalog,
    l: &Limits,
) -> Result<GenerateParams, ApiError> {
    let native = catalog
        .get(&target.model)
        .and_then(|e| e.probe.image_size)
        .map_or(512, |n| n.min(l.max_side) as usize);
    let route = target.route.as_ref();
    let defaults = route.map(|r| r.defaults.clone()).unwrap_or_default();
    let negative_prompt = r
        .negative_prompt
        .clone()
        .or(defaults.negative_prompt.clone())
        .unwrap_or_default();
    if r.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt must not be empty").param("prompt"));
    }
    if r.prompt.chars().count() > l.max_prompt_chars
        || negative_prompt.chars().count() > l.max_prompt_chars
    {
        return Err(ApiError::invalid(format!(
            "prompt is longer than {} characters",
            l.max_prompt_chars
        ))
        .param("prompt"));
    }
    let n = r.n.unwrap_or(1);
    if !(1..=l.max_n).contains(&n) {
        return Err(ApiError::invalid(format!("n must be from 1 to {}", l.max_n)).param("n"));
    }
    match r.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "response_format {other:?} is not supported; use b64_json"
            ))
            .param("response_format"))
        }
    }
    if r.partial_images.is_some_and(|k| k > MAX_PARTIAL_IMAGES) {
        return Err(ApiError::invalid(format!(
            "partial_images must be from 0 to {MAX_PARTIAL_IMAGES}"
        ))
        .param("partial_images"));
    }
    let (width, height) = output_size(r.size.as_deref(), &defaults, native, l.max_side)?;
    let steps = r
        .steps
        .or(defaults.steps.map(|v| v.max(1) as u32))
        .unwrap_or(25);
    if !(1..=l.max_steps).contains(&steps) {
        return Err(
            ApiError::invalid(format!("steps must be from 1 to {}", l.max_steps)).param("steps"),
        );
    }
    let cost = (width as u64) * (height as u64) * u64::from(steps) * u64::from(n);
    if cost > l.max_pixel_steps {
        return Err(ApiError::invalid(format!(
            "width × height × steps × n is {cost}, more than this agent's limit of {} (--max-pixel-steps); ask for fewer or smaller images, or fewer steps",
            l.max_pixel_steps
        ))
        .param("size"));
    }
    let guidance = r.guidance_scale.or(defaults.guidance_scale).unwrap_or(7.5);
    if !(0.0..=30.0).contains(&guidance) {
        return Err(
            ApiError::invalid("guidance_scale must be from 0 to 30").param("guidance_scale")
        );
    }
    // Without one, the deployment's; without that, the model's own.
    let scheduler = match &r.scheduler {
        Some(name) => Some(
            name.parse::<SchedulerKind>()
                .map_err(|e| ApiError::invalid(e.to_string()).param("scheduler"))?,
        ),
        None => defaults.scheduler,
    };
    let requested = r.loras.as_deref().unwrap_or_default();
    if requested.len() > 16 {
        return Err(ApiError::invalid("at most 16 loras per request").param("loras"));
    }
    let deployment_loras = route.map_or(&[][..], |r| r.loras.as_slice());
    let loras = deployment_loras
        .iter()
        .map(|l| (l.path.as_str(), Some(l.weight)))
        .chain(requested.iter().map(|l| (l.path.as_str(), l.weight)))
        .map(|(path, weight)| {
            let weight = weight.unwrap_or(1.0);
            if !(-4.0..=4.0).contains(&weight) {
                return Err(ApiError::invalid(format!(
                    "lora {path:?}: weight must be from -4 to 4"
                ))
                .param("loras"));
            }
            let path = catalog
                .resolve_file(path)
                .map_err(|e| ApiError::invalid(e.to_string()).param("loras"))?;
            Ok((path, weight))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let seamless = match &r.seamless {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
            Seamless::NONE
        }
        Some(serde_json::Value::Bool(true)) => Seamless { x: true, y: true },
        Some(serde_json::Value::String(axes)) => {
            axes.parse()
                .map_err(|e: crate::pipeline::nets::conv::ParseSeamlessError| {
                    ApiError::invalid(e.to_string()).param("seamless")
                })?
        }
        Some(_) => {
            return Err(
                ApiError::invalid("seamless must be true, false, \"x\", \"y\" or \"xy\"")
                    .param("seamless"),
            )
        }
    };
    let clip_skip = r.clip_skip.unwrap_or(0);
    if clip_skip > 12 {
        return Err(ApiError::invalid("clip_skip must be from 0 to 12").param("clip_skip"));
    }
    let seed = r.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let vae = match r.vae.as_deref().or(route.and_then(|r| r.vae.as_deref())) {
        Some(rel) => Some(
            catalog
                .vae(rel)
                .map_err(|e| ApiError::invalid(e.to_string()).param("vae"))?,
        ),
        None => None,
    };
    let refiner = refiner(r, route, &defaults, catalog, target)?;
    let base = catalog.get(&target.model).and_then(|e| e.probe.base);
    let controls = super::control::controls(
        r.controlnet.as_deref().unwrap_or_default(),
        r.control_uploads.clone(),
        base,
        (width, height),
        catalog,
        l,
    )?;
    let ip_adapter = match &r.ip_adapter {
        Some(ip) => Some(super::control::ip_adapter(
            ip,
            r.ip_adapter_upload.clone(),
            base,
            catalog,
            l,
        )?),
        None if r.ip_adapter_upload.is_some() => {
            return Err(ApiError::invalid(
                "an ip_adapter_image part needs the ip_adapter field naming the adapter",
            )
            .param("ip_adapter"))
        }
        None => None,
    };
    // `<name>` in a prompt uses the embedding of that name under the models folder.
    let mut embeddings: Vec<(String, PathBuf)> = Vec::new();
    for name in embedding::triggers(&r.prompt)
        .into_iter()
        .chain(embedding::triggers(&negative_prompt))
    {
        if let Some(e) = catalog.embedding(&name) {
            if !embeddings.iter().any(|(n, _)| *n == name) {
                embeddings.push((name, e.path.clone()));
            }
        }
    }
    Ok(GenerateParams {
        prompt: r.prompt.clone(),
        negative_prompt,
        steps: steps as usize,
        guidance_scale: guidance,
        width,
        height,
        seed,
        scheduler,
        n: n as usize,
        latents: None,
        clip_skip: clip_skip as usize,
        loras,
        embeddings,
        seamless,
        vae,
        edit: None,
        draws: None,
        refiner,
        // A deployment computes at its own precision on GPUs.
        dtype: route.map(|r| crate::device::dtype_of(r.precision)),
        controls,
        ip_adapter,
    })
}

/// The refiner that finishes a request's images: the request's, else the
/// deployment's, unless `denoising_end` is 1.
fn refiner(
    r: &GenerationRequest,
    route: Option<&crate::routes::Route>,
    defaults: &modelcache_crds::GenerationDefaults,
    catalog: &Catalog,
    target: &Target,
) -> Result<Option<Refiner>, ApiError> {
    let switch = r
        .denoising_end
        .or(defaults.denoising_end)
        .unwrap_or(DEFAULT_REFINER_SWITCH);
    if !(switch > 0.0 && switch <= 1.0) {
        return Err(ApiError::invalid(
            "denoising_end must be above 0 and at most 1 (1: no refiner)",
        )
        .param("denoising_end"));
    }
    let Some(rel) = r
        .refiner
        .as_deref()
        .or(route.and_then(|r| r.refiner.as_deref()))
    else {
        return Ok(None);
    };
    if switch == 1.0 {
        return Ok(None);
    }
    let base = catalog.get(&target.model).and_then(|e| e.probe.base);
    if base != Some(BaseModel::Sdxl) {
        return Err(ApiError::invalid(format!(
            "refiner: the model is {}, and a refiner only finishes SDXL images",
            base.map_or("of an unknown base".to_string(), |b| b.to_string())
        ))
        .param("refiner"));
    }
    let model = catalog
        .refiner(rel)
        .map_err(|e| ApiError::invalid(format!("refiner {rel:?}: {e}")).param("refiner"))?;
    Ok(Some(Refiner { model, switch }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_multiples_of_8_within_the_limit() {
        assert_eq!(parse_size("512x768", 2048).unwrap(), (512, 768));
        assert_eq!(parse_size(" 64 x 64 ", 2048).unwrap(), (64, 64));
        for bad in ["512", "511x512", "4096x64", "0x0", "axb", "56x64"] {
            let e = parse_size(bad, 2048).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn auto_or_no_size_is_the_deployment_s_default_else_the_model_s_own() {
        let none = modelcache_crds::GenerationDefaults::default();
        let wide = modelcache_crds::GenerationDefaults {
            width: Some(768),
            ..Default::default()
        };
        for size in [None, Some("auto")] {
            assert_eq!(output_size(size, &none, 1024, 2048).unwrap(), (1024, 1024));
            assert_eq!(output_size(size, &wide, 512, 2048).unwrap(), (768, 512));
        }
        assert_eq!(
            output_size(Some("64x72"), &wide, 512, 2048).unwrap(),
            (64, 72)
        );
    }
}
