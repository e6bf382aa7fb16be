//! Working out what a model file or folder is — type, base, variant, prediction
//! type, format and size — from headers and config files only, never the weights.
//!
//! Real models have standard widths (768/1024/2048/1280). When widths are not
//! standard (the tiny fixtures), the probe decides from structure instead and
//! records in `evidence` what decided, so a surprising answer can be explained.

use super::error::{Result, StoreError};
use super::index::TensorIndex;
use super::{open_weights, read_json, weights_files};
use modelcache_crds::{BaseModel, ModelFormat, ModelType, ModelVariant, Precision, PredictionType};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Bytes of a model's weights at each precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct SizeByPrecision {
    #[serde(rename = "F16")]
    pub f16: u64,
    #[serde(rename = "BF16")]
    pub bf16: u64,
    #[serde(rename = "F32")]
    pub f32: u64,
}

impl SizeByPrecision {
    pub fn of(index: &TensorIndex) -> Self {
        SizeByPrecision {
            f16: index.bytes_at(Precision::F16),
            bf16: index.bytes_at(Precision::BF16),
            f32: index.bytes_at(Precision::F32),
        }
    }

    pub fn at(&self, p: Precision) -> u64 {
        match p {
            Precision::F16 => self.f16,
            Precision::BF16 => self.bf16,
            Precision::F32 => self.f32,
        }
    }

    fn add(&mut self, o: SizeByPrecision) {
        self.f16 += o.f16;
        self.bf16 += o.bf16;
        self.f32 += o.f32;
    }
}

/// The probe's answer, printed by `modelcache-agent probe` and reported in ModelNode status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub path: PathBuf,
    #[serde(rename = "type")]
    pub model_type: ModelType,
    /// None when no evidence decides (CLIP vision encoders fit every base); see `evidence`.
    pub base: Option<BaseModel>,
    pub variant: Option<ModelVariant>,
    pub prediction_type: Option<PredictionType>,
    pub format: ModelFormat,
    /// Bytes of the weights at each compute precision.
    pub size_bytes: SizeByPrecision,
    pub file_bytes: u64,
    pub tensor_count: u64,
    /// Native resolution (512, 768 or 1024) of a main model.
    pub image_size: Option<u32>,
    /// SD 2.x v-prediction models need attention computed in f32.
    pub upcast_attention: bool,
    /// What decided each answer.
    pub evidence: Vec<String>,
}

impl ProbeResult {
    fn new(path: &Path, model_type: ModelType, format: ModelFormat) -> Self {
        ProbeResult {
            path: path.to_path_buf(),
            model_type,
            base: None,
            variant: None,
            prediction_type: None,
            format,
            size_bytes: SizeByPrecision::default(),
            file_bytes: 0,
            tensor_count: 0,
            image_size: None,
            upcast_attention: false,
            evidence: Vec::new(),
        }
    }

    fn finish(mut self) -> Self {
        if self.model_type == ModelType::Main {
            self.upcast_attention = self.base == Some(BaseModel::Sd2)
                && self.prediction_type == Some(PredictionType::VPrediction);
            self.image_size = self.base.map(|b| match b {
                BaseModel::Sdxl | BaseModel::SdxlRefiner => 1024,
                BaseModel::Sd2 if self.upcast_attention => 768,
                _ => 512,
            });
        }
        self
    }
}

/// Probes a model file or diffusers folder.
pub fn probe(path: &Path) -> Result<ProbeResult> {
    let meta = std::fs::metadata(path).map_err(StoreError::io(path))?;
    if meta.is_dir() {
        probe_folder(path)
    } else {
        let index = open_weights(path)?;
        probe_checkpoint(&index)
    }
}

const MAIN_PREFIXES: &[&str] = &[
    "cond_stage_model.",
    "first_stage_model.",
    "model.diffusion_model.",
    "conditioner.embedders.",
];

/// Type of a single-file checkpoint: the first key in file order that matches a rule decides.
pub fn checkpoint_type(index: &TensorIndex) -> Result<ModelType> {
    if index
        .path
        .file_name()
        .is_some_and(|n| n == "learned_embeds.bin")
    {
        return Ok(ModelType::Embedding);
    }
    for key in index.names() {
        if MAIN_PREFIXES.iter().any(|p| key.starts_with(p)) {
            return Ok(ModelType::Main);
        }
        if key.starts_with("encoder.conv_in") || key.starts_with("decoder.conv_in") {
            return Ok(ModelType::Vae);
        }
        if key.starts_with("lora_te") || key.starts_with("lora_unet_") {
            return Ok(ModelType::Lora);
        }
        if key.ends_with("to_k_lora.up.weight") || key.ends_with("to_q_lora.down.weight") {
            return Ok(ModelType::Lora);
        }
        if key.ends_with(".lora_A.weight")
            || key.ends_with(".lora.down.weight")
            || key.ends_with(".lora_down.weight")
        {
            // diffusers/PEFT layouts (`unet.….lora_A.weight`, `….lora.down.weight`)
            return Ok(ModelType::Lora);
        }
        if key.starts_with("control_model") || key.starts_with("input_blocks") {
            return Ok(ModelType::ControlNet);
        }
        if key.starts_with("image_proj.") || key.starts_with("ip_adapter.") {
            return Ok(ModelType::IpAdapter);
        }
        if key == "emb_params"
            || key == "string_to_param"
            || key.starts_with("string_to_param.")
            || key == "clip_l"
            || key == "clip_g"
        {
            return Ok(ModelType::Embedding);
        }
    }
    if index.tensors.len() < 10 && !index.tensors.is_empty() {
        return Ok(ModelType::Embedding);
    }
    Err(StoreError::invalid(
        &index.path,
        "unable to determine model type: no tensor name matches a known model layout",
    ))
}

fn probe_checkpoint(index: &TensorIndex) -> Result<ProbeResult> {
    let path = &index.path;
    let model_type = checkpoint_type(index)?;
    let mut r = ProbeResult::new(path, model_type, ModelFormat::Checkpoint);
    r.size_bytes = SizeByPrecision::of(index);
    r.file_bytes = index.file_bytes;
    r.tensor_count = index.tensors.len() as u64;
    match model_type {
        ModelType::Main => probe_main_checkpoint(index, &mut r)?,
        ModelType::Vae => {
            r.base = Some(vae_base_by_name(path, &mut r.evidence));
        }
        ModelType::Lora => probe_lora(index, &mut r)?,
        ModelType::ControlNet => probe_controlnet_checkpoint(index, &mut r)?,
        ModelType::IpAdapter => probe_ip_adapter(index, &mut r),
        ModelType::Embedding => probe_embedding(index, &mut r),
        _ => {}
    }
    Ok(r.finish())
}

fn width(index: &TensorIndex, key: &str) -> Option<usize> {
    index.shape(key).and_then(|s| s.last().copied())
}

fn probe_main_checkpoint(index: &TensorIndex, r: &mut ProbeResult) -> Result<()> {
    let path = &index.path;
    let k21 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
    let k41 = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight";
    let base = match (width(index, k21), width(index, k41)) {
        (Some(768), _) => Some((
            BaseModel::Sd1,
            "cross-attention width 768 (input_blocks.2.1 attn2.to_k)",
        )),
        (Some(1024), _) => Some((
            BaseModel::Sd2,
            "cross-attention width 1024 (input_blocks.2.1 attn2.to_k)",
        )),
        (None, Some(2048)) => Some((
            BaseModel::Sdxl,
            "cross-attention width 2048 (input_blocks.4.1 attn2.to_k)",
        )),
        (None, Some(1280)) => Some((
            BaseModel::SdxlRefiner,
            "cross-attention width 1280 (input_blocks.4.1 attn2.to_k)",
        )),
        _ => None,
    };
    let base = match base {
        Some((b, why)) => {
            r.evidence.push(format!("base {b}: {why}"));
            b
        }
        None => {
            let (b, why) = main_base_from_structure(index).ok_or_else(|| {
                StoreError::invalid(
                    path,
                    "cannot determine base type: cross-attention width is not 768, 1024, 1280 or 2048 and the text encoder layout is not recognised",
                )
            })?;
            r.evidence.push(format!("base {b}: {why}"));
            b
        }
    };
    r.base = Some(base);

    let in_ch = index
        .shape("model.diffusion_model.input_blocks.0.0.weight")
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| {
            StoreError::invalid(
                path,
                "main checkpoint has no model.diffusion_model.input_blocks.0.0.weight",
            )
        })?;
    r.variant = Some(variant_from_in_channels(path, in_ch)?);
    r.evidence.push(format!(
        "variant {}: UNet has {in_ch} input channels",
        r.variant.map_or("", |v| v.as_str())
    ));

    let sidecar = super::sidecar::prediction_type(&index.path)?;
    r.prediction_type = checkpoint_prediction(index, base, sidecar, &mut r.evidence);
    Ok(())
}

/// Base model of a main checkpoint whose widths are not standard, from the layout
/// of its text encoders and UNet projections.
fn main_base_from_structure(index: &TensorIndex) -> Option<(BaseModel, &'static str)> {
    let has_prefix = |p: &str| index.names().any(|k| k.starts_with(p));
    if has_prefix("conditioner.embedders.1.model.") {
        return Some((
            BaseModel::Sdxl,
            "two text encoders (conditioner.embedders.0 CLIP + embedders.1 OpenCLIP)",
        ));
    }
    if has_prefix("conditioner.embedders.0.model.") {
        return Some((
            BaseModel::SdxlRefiner,
            "one OpenCLIP text encoder under conditioner.embedders.0 (SDXL refiner layout)",
        ));
    }
    if has_prefix("cond_stage_model.model.") {
        return Some((
            BaseModel::Sd2,
            "OpenCLIP text encoder layout (cond_stage_model.model.*)",
        ));
    }
    if has_prefix("cond_stage_model.transformer.") {
        return Some((
            BaseModel::Sd1,
            "Hugging Face CLIP text encoder layout (cond_stage_model.transformer.*)",
        ));
    }
    let proj = index.shape("model.diffusion_model.input_blocks.1.1.proj_in.weight")?;
    if proj.len() == 4 {
        Some((
            BaseModel::Sd1,
            "convolutional proj_in in the UNet transformers (SD 1.x)",
        ))
    } else {
        Some((
            BaseModel::Sd2,
            "linear proj_in in the UNet transformers (SD 2.x)",
        ))
    }
}

fn variant_from_in_channels(path: &Path, in_ch: usize) -> Result<ModelVariant> {
    match in_ch {
        4 => Ok(ModelVariant::Normal),
        9 => Ok(ModelVariant::Inpaint),
        5 => Ok(ModelVariant::Depth),
        n => Err(StoreError::invalid(
            path,
            format!("cannot determine variant: UNet has {n} input channels (expected 4, 5 or 9)"),
        )),
    }
}

/// The prediction type of a main checkpoint: its sidecar YAML's, else its
/// metadata's, else what its base and training step suggest.
fn checkpoint_prediction(
    index: &TensorIndex,
    base: BaseModel,
    sidecar: Option<PredictionType>,
    evidence: &mut Vec<String>,
) -> Option<PredictionType> {
    if let Some(pt) = sidecar {
        evidence.push(format!(
            "prediction type {pt}: model.params.parameterization of {}",
            index.path.with_extension("yaml").display()
        ));
        return Some(pt);
    }
    if let Some(p) = index.metadata.get("modelspec.prediction_type") {
        let pt = if p.starts_with('v') {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        };
        evidence.push(format!(
            "prediction type {pt}: safetensors metadata modelspec.prediction_type={p}"
        ));
        return Some(pt);
    }
    let (pt, why) = match (base, index.global_step) {
        (BaseModel::Sd2, Some(220000)) => (
            PredictionType::Epsilon,
            "global_step 220000 (SD 2.x 512 base)".to_string(),
        ),
        (BaseModel::Sd2, Some(110000)) => (
            PredictionType::VPrediction,
            "global_step 110000 (SD 2.x 768)".to_string(),
        ),
        (BaseModel::Sd2, _) => (
            PredictionType::VPrediction,
            "SD 2.x default (768-v); pass a scheduler config to override".to_string(),
        ),
        (_, _) => (PredictionType::Epsilon, format!("{base} default")),
    };
    evidence.push(format!("prediction type {pt}: {why}"));
    Some(pt)
}

/// SD and SDXL VAEs have identical shapes; a name ending in `xl` says SDXL.
fn vae_base_by_name(path: &Path, evidence: &mut Vec<String>) -> BaseModel {
    let mut name = path
        .file_stem()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name == "vae" || name == "diffusion_pytorch_model" {
        if let Some(parent) = path.parent().and_then(Path::file_name) {
            name = parent.to_string_lossy().to_lowercase();
        }
    }
    if name_says_xl(&name) {
        evidence.push(format!(
            "base Sdxl: the name {name:?} says XL (SD and SDXL VAEs have the same shapes)"
        ));
        BaseModel::Sdxl
    } else {
        evidence.push(
            "base Sd1: SD and SDXL VAEs have the same shapes and the name does not say XL".into(),
        );
        BaseModel::Sd1
    }
}

/// `xl` followed by a word boundary (`my-xl`, `sdxl_vae`), not `mixlture`.
fn name_says_xl(name: &str) -> bool {
    let b = name.as_bytes();
    b.windows(2).enumerate().any(|(i, w)| {
        w == b"xl"
            && b.get(i + 2)
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
    }) || name.contains("sdxl")
}

/// LoRA token-vector length: the cross-attention context width
/// or the text encoder width(s).
pub fn lora_token_vector_length(index: &TensorIndex) -> Option<usize> {
    let extract = |key: &str| -> Option<usize> {
        let (layer, leaf) = key.split_once('.')?;
        let shape = index.shape(key)?;
        if leaf == "lora_down.weight"
            || leaf == "hada_w1_b"
            || leaf == "hada_w2_b"
            || leaf == "diff"
        {
            return shape.get(1).copied();
        }
        if leaf.contains("lokr_") {
            let w = |n: &str| {
                index
                    .shape(&format!("{layer}.lokr_{n}"))
                    .or_else(|| index.shape(&format!("{layer}.lokr_{n}_b")))
                    .and_then(|s| s.get(1).copied())
            };
            return Some(w("w1")? * w("w2")?);
        }
        if leaf == "weight" && !layer.contains("lora_unet_") {
            return shape.first().copied();
        }
        None
    };
    let (mut te1, mut te2) = (None, None);
    for key in index.names() {
        let mut result = None;
        if key.starts_with("lora_unet_")
            && (key.contains("_attn2_to_k.") || key.contains("_attn2_to_v."))
        {
            result = extract(key);
        } else if key.starts_with("lora_te") && key.contains("_self_attn_") {
            let v = extract(key);
            if key.starts_with("lora_te_") {
                result = v;
            } else if key.starts_with("lora_te1_") {
                te1 = te1.or(v);
            } else if key.starts_with("lora_te2_") {
                te2 = te2.or(v);
            }
        }
        if let (Some(a), Some(b)) = (te1, te2) {
            result = Some(a + b);
        }
        if result.is_some() {
            return result;
        }
    }
    None
}

fn probe_lora(index: &TensorIndex, r: &mut ProbeResult) -> Result<()> {
    let len = lora_token_vector_length(index);
    let base = match len {
        Some(768) => Some(BaseModel::Sd1),
        Some(1024) => Some(BaseModel::Sd2),
        Some(2048) => Some(BaseModel::Sdxl),
        _ => None,
    };
    if let (Some(b), Some(n)) = (base, len) {
        r.evidence
            .push(format!("base {b}: token vector length {n}"));
        r.base = Some(b);
        return Ok(());
    }
    // Structure: SDXL LoRAs name two text encoders or Stability-style UNet blocks.
    let names: Vec<&str> = index.names().collect();
    if names
        .iter()
        .any(|k| k.starts_with("lora_te1_") || k.starts_with("lora_te2_"))
    {
        r.base = Some(BaseModel::Sdxl);
        r.evidence
            .push("base Sdxl: adapters for two text encoders (lora_te1_/lora_te2_)".into());
        return Ok(());
    }
    if let Some(n) = len {
        if ![768, 1024, 2048, 1280].contains(&n) {
            r.evidence.push(format!(
                "base unknown: token vector length {n} is not a standard width (768 SD1, 1024 SD2, 2048 SDXL) and the key layout fits SD1 and SD2 alike; it is checked against the model it is applied to"
            ));
            return Ok(());
        }
    }
    Err(StoreError::invalid(
        &index.path,
        format!("unknown LoRA type: token vector length {len:?} (expected 768, 1024 or 2048)"),
    ))
}

fn probe_controlnet_checkpoint(index: &TensorIndex, r: &mut ProbeResult) -> Result<()> {
    for prefix in ["control_model.", ""] {
        let k21 = format!("{prefix}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight");
        let k41 = format!("{prefix}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight");
        let (base, why) = match (width(index, &k21), width(index, &k41)) {
            (Some(768), _) => (BaseModel::Sd1, "cross-attention width 768"),
            (Some(1024), _) => (BaseModel::Sd2, "cross-attention width 1024"),
            (None, Some(2048)) => (BaseModel::Sdxl, "cross-attention width 2048"),
            (None, None) => continue,
            // A width no released base has (a test network): its structure tells.
            _ if index.contains(&format!("{prefix}label_emb.0.0.weight")) => (
                BaseModel::Sdxl,
                "cross-attention width is not standard; SDXL's added embeddings (label_emb)",
            ),
            _ if index
                .shape(&format!("{prefix}input_blocks.1.1.proj_in.weight"))
                .is_some_and(|s| s.len() == 2) =>
            {
                (
                    BaseModel::Sd2,
                    "cross-attention width is not standard; linear proj_in (SD 2.x)",
                )
            }
            _ => (
                BaseModel::Sd1,
                "cross-attention width is not standard; convolutional proj_in (SD 1.x)",
            ),
        };
        r.base = Some(base);
        r.evidence
            .push(format!("base {base}: {why} of {prefix}input_blocks"));
        return Ok(());
    }
    Err(StoreError::invalid(
        &index.path,
        "cannot determine the base of this ControlNet: no cross-attention in its input blocks",
    ))
}

/// The weights file of an IP-Adapter folder in InvokeAI's layout.
pub fn ip_adapter_weights(dir: &Path) -> Option<std::path::PathBuf> {
    ["ip_adapter.safetensors", "ip_adapter.bin"]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// An IP-Adapter's base from the width of its image tokens (the UNet's
/// cross-attention width); a width no release has leaves it open, and the
/// adapter is checked against the model it is used with.
fn probe_ip_adapter(index: &TensorIndex, r: &mut ProbeResult) {
    let width = width(index, "ip_adapter.1.to_k_ip.weight");
    r.base = match width {
        Some(768) => Some(BaseModel::Sd1),
        Some(1024) => Some(BaseModel::Sd2),
        Some(2048) => Some(BaseModel::Sdxl),
        _ => None,
    };
    r.evidence.push(match r.base {
        Some(b) => format!("base {b}: image tokens of width {}", width.unwrap_or(0)),
        None => format!("base open: image tokens of width {width:?} (no released base has it)"),
    });
}

fn probe_embedding(index: &TensorIndex, r: &mut ProbeResult) {
    if index.contains("clip_l") && index.contains("clip_g") {
        r.base = Some(BaseModel::Sdxl);
        r.evidence
            .push("base Sdxl: embeddings for both SDXL text encoders (clip_l, clip_g)".into());
        return;
    }
    let dim = if let Some(t) = index
        .tensors
        .iter()
        .find(|t| t.name.starts_with("string_to_param"))
    {
        t.shape.last().copied()
    } else if let Some(s) = index.shape("emb_params") {
        s.last().copied()
    } else {
        index.tensors.first().and_then(|t| t.shape.last().copied())
    };
    r.base = match dim {
        Some(768) => Some(BaseModel::Sd1),
        Some(1024) => Some(BaseModel::Sd2),
        _ => None,
    };
    match (r.base, dim) {
        (Some(b), Some(d)) => r.evidence.push(format!("base {b}: embedding width {d}")),
        (_, d) => r.evidence.push(format!(
            "base unknown: embedding width {d:?} is not 768 (SD1) or 1024 (SD2); it is checked against the text encoder it is used with"
        )),
    }
}

/// Marker files that make a folder one model.
pub const MODEL_FOLDER_MARKERS: &[&str] = &[
    "model_index.json",
    "config.json",
    "learned_embeds.bin",
    "pytorch_lora_weights.bin",
    "pytorch_lora_weights.safetensors",
    "image_encoder.txt",
];

fn probe_folder(dir: &Path) -> Result<ProbeResult> {
    if dir.join("unet/model.onnx").exists() {
        return Err(StoreError::invalid(
            dir,
            "ONNX pipelines are not supported; use the diffusers or single-file PyTorch weights",
        ));
    }
    if dir.join("learned_embeds.bin").exists() {
        let index = open_weights(&dir.join("learned_embeds.bin"))?;
        let mut r = ProbeResult::new(dir, ModelType::Embedding, ModelFormat::Diffusers);
        probe_embedding(&index, &mut r);
        r.size_bytes = SizeByPrecision::of(&index);
        r.file_bytes = index.file_bytes;
        r.tensor_count = index.tensors.len() as u64;
        return Ok(r);
    }
    for f in [
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights.bin",
    ] {
        if dir.join(f).exists() {
            let index = open_weights(&dir.join(f))?;
            let mut r = ProbeResult::new(dir, ModelType::Lora, ModelFormat::Diffusers);
            probe_lora(&index, &mut r)?;
            r.size_bytes = SizeByPrecision::of(&index);
            r.file_bytes = index.file_bytes;
            r.tensor_count = index.tensors.len() as u64;
            return Ok(r);
        }
    }
    if dir.join("image_encoder.txt").exists() {
        // InvokeAI's IP-Adapter folder: the weights and the name of their encoder.
        let file = ip_adapter_weights(dir).ok_or_else(|| {
            StoreError::invalid(
                dir,
                "an IP-Adapter folder (image_encoder.txt) without ip_adapter.safetensors or ip_adapter.bin",
            )
        })?;
        let index = open_weights(&file)?;
        let mut r = ProbeResult::new(dir, ModelType::IpAdapter, ModelFormat::Diffusers);
        probe_ip_adapter(&index, &mut r);
        r.size_bytes = SizeByPrecision::of(&index);
        r.file_bytes = index.file_bytes;
        r.tensor_count = index.tensors.len() as u64;
        return Ok(r.finish());
    }
    let (config_name, config) = if dir.join("model_index.json").exists() {
        (
            "model_index.json",
            read_json(&dir.join("model_index.json"))?,
        )
    } else if dir.join("config.json").exists() {
        ("config.json", read_json(&dir.join("config.json"))?)
    } else {
        return Err(StoreError::invalid(
            dir,
            "not a model folder: no model_index.json or config.json",
        ));
    };
    let class = config["_class_name"]
        .as_str()
        .or_else(|| config["architectures"][0].as_str())
        .unwrap_or_default()
        .to_string();
    let model_type = match class.as_str() {
        "StableDiffusionPipeline"
        | "StableDiffusionInpaintPipeline"
        | "StableDiffusionXLPipeline"
        | "StableDiffusionXLImg2ImgPipeline"
        | "StableDiffusionXLInpaintPipeline"
        | "StableDiffusionDepth2ImgPipeline" => ModelType::Main,
        "AutoencoderKL" | "AutoencoderTiny" => ModelType::Vae,
        "ControlNetModel" => ModelType::ControlNet,
        "CLIPVisionModelWithProjection" => ModelType::ClipVision,
        "T2IAdapter" => ModelType::T2iAdapter,
        other => {
            return Err(StoreError::invalid(
                dir,
                format!(
                    "{config_name} names class {other:?}; supported: StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, their Inpaint variants, AutoencoderKL, AutoencoderTiny, ControlNetModel, CLIPVisionModelWithProjection, T2IAdapter"
                ),
            ))
        }
    };
    let mut r = ProbeResult::new(dir, model_type, ModelFormat::Diffusers);
    let mut total = SizeByPrecision::default();
    for file in weights_files(dir)? {
        let index = open_weights(&file)?;
        total.add(SizeByPrecision::of(&index));
        r.file_bytes += index.file_bytes;
        r.tensor_count += index.tensors.len() as u64;
    }
    r.size_bytes = total;
    match model_type {
        ModelType::Main => probe_main_folder(dir, &class, &config, &mut r)?,
        ModelType::Vae => {
            let scaling = config["scaling_factor"].as_f64();
            let sample = config["sample_size"].as_u64();
            if scaling == Some(0.13025) && matches!(sample, Some(512) | Some(1024)) {
                r.base = Some(BaseModel::Sdxl);
                r.evidence
                    .push("base Sdxl: scaling_factor 0.13025 with sample_size 512/1024".into());
            } else {
                r.base = Some(vae_base_by_name(dir, &mut r.evidence));
            }
        }
        ModelType::ControlNet => {
            let cad = config["cross_attention_dim"].as_u64();
            let (base, why) = match cad {
                Some(768) => (BaseModel::Sd1, "cross_attention_dim 768"),
                Some(1024) => (BaseModel::Sd2, "cross_attention_dim 1024"),
                Some(2048) => (BaseModel::Sdxl, "cross_attention_dim 2048"),
                None => {
                    return Err(StoreError::invalid(
                        dir,
                        "ControlNet config.json lacks cross_attention_dim",
                    ))
                }
                // A width no released base has (a test network): its
                // structure tells, as for main models.
                Some(_) if config["addition_embed_type"].as_str() == Some("text_time") => (
                    BaseModel::Sdxl,
                    "cross_attention_dim is not standard; SDXL's added text/time embeddings",
                ),
                Some(_) if config["use_linear_projection"].as_bool() == Some(true) => (
                    BaseModel::Sd2,
                    "cross_attention_dim is not standard; linear proj_in (SD 2.x)",
                ),
                Some(_) => (
                    BaseModel::Sd1,
                    "cross_attention_dim is not standard; convolutional proj_in (SD 1.x)",
                ),
            };
            r.base = Some(base);
            r.evidence.push(format!("base {base}: config.json {why}"));
        }
        ModelType::T2iAdapter => {
            r.base = Some(match config["adapter_type"].as_str() {
                Some("full_adapter_xl") => BaseModel::Sdxl,
                Some("full_adapter") | Some("light_adapter") => BaseModel::Sd1,
                other => return Err(StoreError::invalid(dir, format!("T2I-Adapter adapter_type {other:?} is not full_adapter, light_adapter or full_adapter_xl"))),
            });
            r.evidence.push("base from config.json adapter_type".into());
        }
        ModelType::ClipVision => r
            .evidence
            .push("base any: a CLIP vision encoder works with every base".into()),
        _ => {}
    }
    Ok(r.finish())
}

fn probe_main_folder(
    dir: &Path,
    class: &str,
    index: &serde_json::Value,
    r: &mut ProbeResult,
) -> Result<()> {
    let unet = read_json(&dir.join("unet/config.json"))?;
    let cad = unet["cross_attention_dim"].as_u64();
    let base = match cad {
        Some(768) => Some(BaseModel::Sd1),
        Some(1024) => Some(BaseModel::Sd2),
        Some(1280) => Some(BaseModel::SdxlRefiner),
        Some(2048) => Some(BaseModel::Sdxl),
        _ => None,
    };
    let base = if let Some(b) = base {
        r.evidence.push(format!(
            "base {b}: unet cross_attention_dim {}",
            cad.unwrap_or_default()
        ));
        b
    } else {
        let has_te2 = index["text_encoder_2"]
            .as_array()
            .is_some_and(|a| a.iter().all(|v| !v.is_null()));
        let has_te1 = index["text_encoder"]
            .as_array()
            .is_some_and(|a| a.iter().all(|v| !v.is_null()));
        let (b, why) = if class.starts_with("StableDiffusionXL") {
            if has_te1 && has_te2 {
                (
                    BaseModel::Sdxl,
                    "an SDXL pipeline with two text encoders".to_string(),
                )
            } else {
                (
                    BaseModel::SdxlRefiner,
                    "an SDXL pipeline with only text_encoder_2 (refiner)".to_string(),
                )
            }
        } else {
            let te = read_json(&dir.join("text_encoder/config.json")).ok();
            let act = te
                .as_ref()
                .and_then(|t| t["hidden_act"].as_str().map(str::to_string));
            let linear = unet["use_linear_projection"].as_bool().unwrap_or(false);
            match (act.as_deref(), linear) {
                (Some("quick_gelu"), false) => (
                    BaseModel::Sd1,
                    "quick_gelu CLIP text encoder and convolutional proj_in (SD 1.x)".into(),
                ),
                (Some("gelu"), true) => (
                    BaseModel::Sd2,
                    "gelu OpenCLIP-style text encoder and linear proj_in (SD 2.x)".into(),
                ),
                (_, false) => (BaseModel::Sd1, "convolutional proj_in (SD 1.x)".into()),
                (_, true) => (BaseModel::Sd2, "linear proj_in (SD 2.x)".into()),
            }
        };
        let cad = cad.map_or("missing".to_string(), |c| c.to_string());
        r.evidence.push(format!(
            "base {b}: cross_attention_dim {cad} is not standard; {why}"
        ));
        b
    };
    r.base = Some(base);
    let in_ch = unet["in_channels"].as_u64().unwrap_or(4) as usize;
    r.variant = Some(variant_from_in_channels(dir, in_ch)?);
    r.evidence.push(format!(
        "variant {}: unet in_channels {in_ch}",
        r.variant.map_or("", |v| v.as_str())
    ));
    let sched = read_json(&dir.join("scheduler/scheduler_config.json")).ok();
    r.prediction_type = match sched.as_ref().and_then(|s| s["prediction_type"].as_str()) {
        Some("v_prediction") => Some(PredictionType::VPrediction),
        Some("epsilon") => Some(PredictionType::Epsilon),
        Some("sample") => Some(PredictionType::Sample),
        _ => None,
    };
    if let Some(p) = r.prediction_type {
        r.evidence
            .push(format!("prediction type {p}: scheduler_config.json"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xl_name_rule_needs_a_word_boundary() {
        assert!(name_says_xl("my-xl"));
        assert!(name_says_xl("sdxl-vae-fp16"));
        assert!(!name_says_xl("mixlture"));
    }
}
