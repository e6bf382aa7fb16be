//! The one-shot commands of `modelcache-agent`: everything but `serve`. The
//! option types are the command line's own (clap), so flags are defined once.
//! Each command prints what it did on stdout; errors carry their context up
//! to `main`.

use crate::cache::{CacheConfig, DiskLoader, ModelCache};
use crate::pipeline::{self, DiffusersModel, GenerateParams, Seamless};
use crate::{device, store};
use anyhow::Context;
use base64::Engine;
use modelcache_crds::{Precision, SchedulerKind};
use std::path::{Path, PathBuf};

/// What `generate` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateOptions {
    /// A diffusers folder or a single-file checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Compute device: auto (the first GPU in CUDA builds, else the CPU), cpu
    /// or cuda:N (of a list, the first).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute precision on a GPU (f16, bf16, f32); the CPU computes in f32.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// ddim, euler, euler-ancestral, heun, lms, pndm, dpm++2m, dpm++2m-karras
    /// or unipc (default: the model's own, from its scheduler_config.json).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// WIDTHxHEIGHT, multiples of 8 (default 512x512, or --init-image's size).
    #[arg(long)]
    pub size: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of images (written as OUT, OUT-1, …).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Initial latents (safetensors, key `latents`) instead of seeded noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// LoRA adapters as PATH:WEIGHT (or PATH, weight 1).
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// Number of final CLIP layers to skip.
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// Tile seamlessly along x, y or xy (circular padding in the UNet and VAE).
    #[arg(long, default_value = "none")]
    pub seamless: Seamless,
    /// Textual inversion embedding files (or learned_embeds.bin folders), used in
    /// the prompt as `<name>` where name is the file stem.
    #[arg(long = "embedding")]
    pub embeddings: Vec<PathBuf>,
    /// Architecture of a single-file checkpoint (a diffusers-layout folder).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Tokenizer folder for a single-file checkpoint (default: the standard CLIP vocabulary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where converted checkpoints are cached.
    #[arg(
        long,
        env = "MODELCACHE_STATE_DIR",
        default_value = ".modelcache-state"
    )]
    pub state_dir: PathBuf,
    /// A VAE used in place of the model's own: a VAE file (converted once) or
    /// a diffusers VAE folder.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// An image to edit (PNG, JPEG or WebP): image-to-image, or inpainting
    /// with --mask. The output takes its size unless --size is given.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// The area of --init-image to repaint: a PNG whose fully transparent
    /// pixels (or, without alpha, white pixels) are repainted.
    #[arg(long, requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// How much of --init-image is redrawn, 0 to 1 (default 0.8, or 1 with --mask).
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
    /// An SDXL refiner (a diffusers folder, or a single file converted once)
    /// that finishes the denoising after --denoising-end.
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// The share of the schedule the model denoises before --refiner takes
    /// over, above 0 and at most 1 (1: the refiner is not used).
    #[arg(long, requires = "refiner", default_value_t = pipeline::DEFAULT_REFINER_SWITCH)]
    pub denoising_end: f64,
    /// A ControlNet and its control image:
    /// `model=PATH,image=PNG[,weight=W][,start=S][,end=E][,preprocess=canny]`
    /// (a diffusers folder or a single file converted once; weight 1, start 0,
    /// end 1 by default). Repeat for several.
    #[arg(long = "controlnet")]
    pub controlnets: Vec<ControlSpec>,
    /// An image prompt: `model=FILE,image=PNG[,weight=W][,encoder=DIR]` (an
    /// IP-Adapter file and the image; its CLIP Vision encoder is the
    /// `image_encoder/` folder beside the file unless `encoder` names one).
    #[arg(long)]
    pub ip_adapter: Option<IpAdapterSpec>,
    /// Output file: .png, or .npy for the float32 HWC image in [0, 1].
    #[arg(long)]
    pub out: PathBuf,
}

/// One `--controlnet`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    pub model: PathBuf,
    pub image: PathBuf,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub canny: bool,
}

impl std::str::FromStr for ControlSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (mut model, mut image) = (None, None);
        let mut spec = ControlSpec {
            model: PathBuf::new(),
            image: PathBuf::new(),
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            canny: false,
        };
        for pair in s.split(',') {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
            let number = || {
                v.parse::<f64>()
                    .map_err(|_| format!("{k}={v:?} is not a number"))
            };
            match k.trim() {
                "model" => model = Some(PathBuf::from(v)),
                "image" => image = Some(PathBuf::from(v)),
                "weight" => spec.weight = number()?,
                "start" => spec.start = number()?,
                "end" => spec.end = number()?,
                "preprocess" if v == "canny" => spec.canny = true,
                "preprocess" => return Err(format!("preprocess {v:?}: only canny is offered")),
                other => {
                    return Err(format!(
                        "unknown key {other:?} (model, image, weight, start, end, preprocess)"
                    ))
                }
            }
        }
        spec.model = model.ok_or("model=PATH is required")?;
        spec.image = image.ok_or("image=PNG is required")?;
        Ok(spec)
    }
}

/// `--ip-adapter`.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterSpec {
    pub model: PathBuf,
    pub image: PathBuf,
    pub weight: f64,
    pub encoder: Option<PathBuf>,
}

impl std::str::FromStr for IpAdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (mut model, mut image, mut weight, mut encoder) = (None, None, 1.0, None);
        for pair in s.split(',') {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
            match k.trim() {
                "model" => model = Some(PathBuf::from(v)),
                "image" => image = Some(PathBuf::from(v)),
                "encoder" => encoder = Some(PathBuf::from(v)),
                "weight" => {
                    weight = v
                        .parse()
                        .map_err(|_| format!("weight={v:?} is not a number"))?
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} (model, image, weight, encoder)"
                    ))
                }
            }
        }
        Ok(IpAdapterSpec {
            model: model.ok_or("model=FILE is required")?,
            image: image.ok_or("image=PNG is required")?,
            weight,
            encoder,
        })
    }
}

/// `--ip-adapter` as the pipeline's image prompt. A folder in InvokeAI's
/// layout (`ip_adapter.bin`, `image_encoder.txt`) needs `encoder=`; a
/// pickled file is converted once into the state folder.
fn read_ip_adapter(spec: &IpAdapterSpec, state_dir: &Path) -> anyhow::Result<pipeline::IpAdapter> {
    let at = || format!("--ip-adapter model={}", spec.model.display());
    let file = if spec.model.is_dir() {
        store::probe::ip_adapter_weights(&spec.model)
            .with_context(|| format!("{}: no ip_adapter.safetensors or ip_adapter.bin", at()))?
    } else {
        spec.model.clone()
    };
    let file = store::convert::converted_safetensors(state_dir, &file).with_context(at)?;
    let encoder = match &spec.encoder {
        Some(e) => e.clone(),
        None => spec
            .model
            .parent()
            .unwrap_or(Path::new("."))
            .join("image_encoder"),
    };
    let model = pipeline::IpAdapterModel::open(&file, &encoder).with_context(at)?;
    let bytes = std::fs::read(&spec.image)
        .with_context(|| format!("--ip-adapter image={}", spec.image.display()))?;
    let image = pipeline::image::decode_image(&bytes, MAX_EDIT_PIXELS)
        .with_context(|| format!("--ip-adapter image={}", spec.image.display()))?;
    Ok(pipeline::IpAdapter {
        model: std::sync::Arc::new(model),
        image,
        weight: spec.weight,
    })
}

/// `--controlnet`s as the pipeline's controls, images at the output size.
fn read_controls(
    specs: &[ControlSpec],
    state_dir: &Path,
    (width, height): (usize, usize),
) -> anyhow::Result<Vec<pipeline::Control>> {
    specs
        .iter()
        .map(|c| {
            let at = || format!("--controlnet model={}", c.model.display());
            let dir = if c.model.is_dir() {
                c.model.clone()
            } else {
                store::convert::converted_controlnet(state_dir, &c.model).with_context(at)?
            };
            let model = pipeline::ControlModel::open(&dir).with_context(at)?;
            let bytes = std::fs::read(&c.image)
                .with_context(|| format!("--controlnet image={}", c.image.display()))?;
            let image = pipeline::image::decode_image(&bytes, MAX_EDIT_PIXELS)
                .with_context(|| format!("--controlnet image={}", c.image.display()))?;
            let image = if c.canny {
                pipeline::canny::canny(
                    &image,
                    pipeline::canny::DEFAULT_LOW,
                    pipeline::canny::DEFAULT_HIGH,
                )
            } else {
                image
            };
            Ok(pipeline::Control {
                model: std::sync::Arc::new(model),
                image: image.resized(width, height),
                weight: c.weight,
                start: c.start,
                end: c.end,
            })
        })
        .collect()
}

/// The most pixels `generate` reads from an --init-image or --mask.
const MAX_EDIT_PIXELS: u64 = 8192 * 8192;

/// `--init-image`, `--mask` and `--strength` as an edit, at the image's size.
fn read_edit(
    image: &Path,
    mask: Option<&Path>,
    strength: Option<f64>,
) -> anyhow::Result<pipeline::Edit> {
    use pipeline::image::{decode_image, decode_mask};
    let read = |p: &Path| std::fs::read(p).with_context(|| p.display().to_string());
    let image = decode_image(&read(image)?, MAX_EDIT_PIXELS)
        .with_context(|| format!("--init-image {}", image.display()))?;
    let mask = match mask {
        Some(path) => Some(
            decode_mask(&read(path)?, MAX_EDIT_PIXELS)
                .with_context(|| format!("--mask {}", path.display()))?,
        ),
        None => None,
    };
    pipeline::Edit::new(image, mask, strength).map_err(|e| match e {
        pipeline::edit::EditError::MaskSize { .. } => anyhow::anyhow!("--mask: {e}"),
        pipeline::edit::EditError::Strength(_) => anyhow::anyhow!("--strength: {e}"),
    })
}

/// Generates images from a model without the server.
pub fn generate(a: GenerateOptions) -> anyhow::Result<()> {
    let loras = a
        .loras
        .iter()
        .map(|spec| {
            let (path, weight) = match spec.rsplit_once(':') {
                Some((p, w)) => match w.parse::<f64>() {
                    Ok(w) => (p, w),
                    Err(_) => (spec.as_str(), 1.0),
                },
                None => (spec.as_str(), 1.0),
            };
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("--lora {spec}: {path} not found"))?;
            Ok((path, weight))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vae = match &a.vae {
        Some(p) if p.is_dir() => Some(p.clone()),
        Some(p) => Some(
            store::convert::converted_vae(&a.state_dir, p)
                .with_context(|| format!("--vae {}", p.display()))?,
        ),
        None => None,
    };
    let edit = match &a.init_image {
        Some(path) => Some(read_edit(path, a.mask.as_deref(), a.strength)?),
        None => None,
    };
    let (width, height) = match (&a.size, &edit) {
        (Some(size), _) => parse_size(size)?,
        (None, Some(e)) => (e.image.width, e.image.height),
        (None, None) => (512, 512),
    };
    let edit = edit.map(|e| e.resized(width, height));
    let folder = |path: &Path, config: Option<&Path>| -> anyhow::Result<PathBuf> {
        if path.is_dir() {
            return Ok(path.to_path_buf());
        }
        store::convert::converted(&a.state_dir, path, config, a.tokenizer.as_deref())
            .with_context(|| path.display().to_string())
    };
    let dir = folder(&a.model, a.config.as_deref())?;
    let model = DiffusersModel::open(&dir).with_context(|| dir.display().to_string())?;
    if !(a.denoising_end > 0.0 && a.denoising_end <= 1.0) {
        anyhow::bail!("--denoising-end must be above 0 and at most 1");
    }
    let refiner = match &a.refiner {
        Some(path) if a.denoising_end < 1.0 => {
            let dir = folder(path, store::config_beside(path).as_deref())?;
            let refiner = DiffusersModel::open_refiner(&dir)
                .with_context(|| format!("--refiner {}", dir.display()))?;
            pipeline::check_refiner(&model, &refiner).context("--refiner")?;
            Some(pipeline::Refiner {
                model: std::sync::Arc::new(refiner),
                switch: a.denoising_end,
            })
        }
        _ => None,
    };
    let latents = match &a.latents {
        Some(p) => Some(
            candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .map_err(|e| {
                    anyhow::anyhow!("{}: {}", p.display(), store::error::candle_message(&e))
                })?
                .remove("latents")
                .with_context(|| format!("{} has no tensor named `latents`", p.display()))?,
        ),
        None => None,
    };
    let p = GenerateParams {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        steps: a.steps,
        guidance_scale: a.guidance,
        width,
        height,
        seed: a.seed,
        scheduler: a.scheduler,
        n: a.n,
        latents,
        clip_skip: a.clip_skip,
        loras,
        embeddings: a
            .embeddings
            .iter()
            .map(|p| (pipeline::embedding::trigger_name(p), p.clone()))
            .collect(),
        seamless: a.seamless,
        vae,
        edit,
        draws: None,
        refiner,
        dtype: None,
        controls: read_controls(&a.controlnets, &a.state_dir, (width, height))?,
        ip_adapter: a
            .ip_adapter
            .as_ref()
            .map(|s| read_ip_adapter(s, &a.state_dir))
            .transpose()?,
    };
    // Adapters are cached twice too (file bytes in RAM, tensors on the device).
    let adapter_bytes: u64 = p
        .loras
        .iter()
        .filter_map(|(path, _)| std::fs::metadata(path).ok())
        .map(|m| m.len() * 2)
        .sum();
    let compute = device::open(&a.device, a.precision)
        .context("--device")?
        .remove(0);
    let cache = ModelCache::new(
        CacheConfig::for_one_model(
            compute.device.clone(),
            compute.dtype,
            model.bytes_f32
                + p.refiner.as_ref().map_or(0, |r| r.model.bytes_f32)
                + p.controls.iter().map(|c| c.model.bytes_f32).sum::<u64>()
                + p.ip_adapter.as_ref().map_or(0, |i| i.model.bytes_f32),
            adapter_bytes,
        ),
        Box::new(DiskLoader),
        None,
    );
    let images = pipeline::generate(&cache, &model, &p, &|stage| {
        if let pipeline::Stage::Denoising { step, steps } = stage {
            tracing::info!(step, steps, "denoising");
        }
        true
    })?;
    for (i, img) in images.iter().enumerate() {
        let out = if i == 0 {
            a.out.clone()
        } else {
            numbered(&a.out, i)
        };
        let bytes = match out.extension().and_then(|e| e.to_str()) {
            Some("npy") => img.to_npy(),
            _ => img.to_png()?,
        };
        std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn parse_size(size: &str) -> anyhow::Result<(usize, usize)> {
    let (w, h) = size
        .split_once('x')
        .context("--size must be WIDTHxHEIGHT")?;
    Ok((
        w.parse::<usize>().context("--size width")?,
        h.parse::<usize>().context("--size height")?,
    ))
}

/// `out`, `out-1`, `out-2`, … for the images after the first.
fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}-{i}{ext}"))
}

/// What `request` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct RequestOptions {
    /// Base URL, http://HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model (standalone) or ModelDeployment name (cluster).
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "a lighthouse at dusk")]
    pub prompt: String,
    /// WIDTHxHEIGHT.
    #[arg(long, default_value = "512x512")]
    pub size: String,
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// File holding a bearer token to send.
    #[arg(long, env = "MODELCACHE_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where to write the PNG.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Sends one generation request and checks that a PNG of the requested size
/// comes back: the chart's `helm test`.
pub fn request(a: RequestOptions) -> anyhow::Result<()> {
    let token = a
        .token_file
        .as_deref()
        .map(modelcache_support::read_secret)
        .transpose()?;
    let body = serde_json::json!({
        "model": a.model, "prompt": a.prompt, "size": a.size, "steps": a.steps,
        "n": 1, "response_format": "b64_json",
    });
    let started = std::time::Instant::now();
    let (status, reply) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crate::client::post_json(
            &a.url,
            "/v1/images/generations",
            &body,
            token.as_deref(),
        ))?;
    let v: serde_json::Value = serde_json::from_slice(&reply)
        .with_context(|| format!("HTTP {status}: the reply is not JSON"))?;
    if status != 200 {
        anyhow::bail!(
            "HTTP {status}: {}",
            v["error"]["message"].as_str().unwrap_or("no error message")
        );
    }
    let b64 = v["data"][0]["b64_json"]
        .as_str()
        .context("the reply has no data[0].b64_json")?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("data[0].b64_json is not base64")?;
    let (w, h) = pipeline::image::png_size(&png).context("the image is not a PNG")?;
    if format!("{w}x{h}") != a.size {
        anyhow::bail!("asked for {} but got a {w}x{h} image", a.size);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, &png).with_context(|| format!("writing {}", out.display()))?;
    }
    println!(
        "ok: {w}x{h} PNG from {} in {:.1} s",
        a.model,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints what a model is, as JSON.
pub fn probe(path: &Path) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&store::probe(path)?)?);
    Ok(())
}

/// Prints every model under `root` with its probe result (JSON lines);
/// unreadable entries go to stderr.
pub fn search(root: &Path) -> anyhow::Result<()> {
    let found = store::search::find_models(root);
    for (p, why) in &found.skipped {
        eprintln!("skipped {}: {why}", p.display());
    }
    for m in &found.models {
        match store::probe(m) {
            Ok(r) => println!("{}", serde_json::to_string(&r)?),
            Err(e) => eprintln!("skipped {}: {e}", m.display()),
        }
    }
    Ok(())
}

/// Converts a single-file checkpoint (a main model or a ControlNet) into a diffusers folder.
pub fn convert(req: &store::convert::ConvertRequest) -> anyhow::Result<()> {
    let kind = store::probe(req.checkpoint)
        .with_context(|| format!("probing {}", req.checkpoint.display()))?
        .model_type;
    let out = match kind {
        modelcache_crds::ModelType::ControlNet => {
            store::convert::convert_controlnet(req.checkpoint, req.out_dir)
        }
        _ => store::convert::convert_main(req),
    }
    .with_context(|| format!("converting {}", req.checkpoint.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Merges 2 or 3 models tensor by tensor.
pub fn merge(req: &store::merge::MergeRequest) -> anyhow::Result<()> {
    let r = store::merge::merge(req)?;
    println!(
        "wrote {}: {} tensors merged, {} copied from the first model",
        req.out.display(),
        r.merged,
        r.copied
    );
    for c in r.skipped_components {
        println!("component {c}: layouts differ, kept the first model's");
    }
    Ok(())
}

/// Prints a model's SHA-256 content identity.
pub fn hash(path: &Path, state_dir: Option<&Path>) -> anyhow::Result<()> {
    println!("{}", store::identity::sha256(path, state_dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_images_are_numbered_before_the_extension() {
        assert_eq!(
            numbered(Path::new("out/cat.png"), 2),
            Path::new("out/cat-2.png")
        );
        assert_eq!(numbered(Path::new("cat"), 1), Path::new("cat-1"));
        assert_eq!(parse_size("64x96").unwrap(), (64, 96));
        assert!(parse_size("64").is_err());
    }
}
