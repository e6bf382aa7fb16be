//! Enums shared by the CRDs, the probe, the scheduler and the HTTP API.
//!
//! The serialized form (CRDs, JSON printed by the tools) is PascalCase. Users type
//! the lowercase kebab/snake forms on command lines and in HTTP requests, which
//! [`std::str::FromStr`] accepts alongside the PascalCase spelling.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An enum value that did not parse; names the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of: {expected}")]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// Defines a PascalCase enum with its lowercase aliases.
macro_rules! api_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident => [$($alias:literal),+] ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The PascalCase spelling used in resources and printed JSON.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            /// The lowercase spelling used in flags, the HTTP API and metric labels.
            pub fn as_flag(self) -> &'static str {
                match self { $($name::$variant => api_enum!(@first $($alias),+)),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $(
                    if s == stringify!($variant) $(|| s.eq_ignore_ascii_case($alias))+ {
                        return Ok($name::$variant);
                    }
                )+
                Err(ParseEnumError {
                    what: $what,
                    value: s.to_string(),
                    expected: [$(api_enum!(@first $($alias),+)),+].join(", "),
                })
            }
        }
    };
    (@first $first:literal $(, $rest:literal)*) => { $first };
}

api_enum! {
    /// The model family a set of weights belongs to.
    BaseModel, "base model" {
        /// Stable Diffusion 1.x (CLIP ViT-L text encoder, 768-wide cross-attention).
        Sd1 => ["sd1", "sd-1"],
        /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 1024-wide cross-attention).
        Sd2 => ["sd2", "sd-2"],
        /// Stable Diffusion XL base (two text encoders, 2048-wide cross-attention).
        Sdxl => ["sdxl"],
        /// Stable Diffusion XL refiner (one OpenCLIP bigG encoder, 1280-wide cross-attention).
        SdxlRefiner => ["sdxl-refiner", "sdxl_refiner"],
    }
}

api_enum! {
    /// What kind of model a file or folder holds.
    ModelType, "model type" {
        /// A full text-to-image pipeline (UNet, VAE, text encoders).
        Main => ["main"],
        /// A standalone VAE.
        Vae => ["vae"],
        /// A LoRA-family adapter (LoRA, LoCon, LoHA, LoKR, IA3, full diff).
        Lora => ["lora"],
        /// A ControlNet.
        ControlNet => ["controlnet", "control-net", "control_net"],
        /// A textual-inversion embedding.
        Embedding => ["embedding"],
        /// An IP-Adapter.
        IpAdapter => ["ip-adapter", "ip_adapter"],
        /// A CLIP vision encoder.
        ClipVision => ["clip-vision", "clip_vision"],
        /// A T2I-Adapter.
        T2iAdapter => ["t2i-adapter", "t2i_adapter"],
    }
}

api_enum! {
    /// UNet input variant of a main model.
    ModelVariant, "model variant" {
        /// Plain text-to-image (4 input channels).
        Normal => ["normal"],
        /// Inpainting (9 input channels).
        Inpaint => ["inpaint"],
        /// Depth-conditioned (5 input channels).
        Depth => ["depth"],
    }
}

api_enum! {
    /// What the UNet predicts; decides how the scheduler steps.
    PredictionType, "prediction type" {
        /// The noise (SD 1.x, SD 2.x base 512, SDXL).
        Epsilon => ["epsilon"],
        /// The velocity (SD 2.x 768).
        VPrediction => ["v-prediction", "v_prediction"],
        /// The denoised sample.
        Sample => ["sample"],
    }
}

impl PredictionType {
    /// The spelling of diffusers' `scheduler_config.json`.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

api_enum! {
    /// On-disk layout of a model.
    ModelFormat, "model format" {
        /// One file in the original (LDM/SGM) layout, as A1111 and Civitai publish them.
        Checkpoint => ["checkpoint"],
        /// A diffusers folder with `model_index.json` or `config.json`.
        Diffusers => ["diffusers"],
    }
}

api_enum! {
    /// Which layout a ModelDeployment expects its `model.path` to be in.
    FormatHint, "model format" {
        /// Decide from the files.
        Auto => ["auto"],
        /// A single-file checkpoint.
        Checkpoint => ["checkpoint"],
        /// A diffusers folder.
        Diffusers => ["diffusers"],
    }
}

// The enum comes from `api_enum!`, which cannot derive Default for some enums only.
#[allow(clippy::derivable_impls)]
impl Default for FormatHint {
    fn default() -> Self {
        FormatHint::Auto
    }
}

api_enum! {
    /// Numeric precision of the weights on the compute device.
    Precision, "precision" {
        /// 16-bit IEEE floats (the usual serving precision on GPUs).
        F16 => ["f16", "fp16", "float16"],
        /// bfloat16.
        BF16 => ["bf16", "bfloat16"],
        /// 32-bit floats (the CPU device always computes in F32).
        F32 => ["f32", "fp32", "float32"],
    }
}

// The enum comes from `api_enum!`, which cannot derive Default for some enums only.
#[allow(clippy::derivable_impls)]
impl Default for Precision {
    fn default() -> Self {
        Precision::F16
    }
}

impl Precision {
    /// Bytes per element at this precision.
    pub fn element_bytes(self) -> u64 {
        match self {
            Precision::F16 | Precision::BF16 => 2,
            Precision::F32 => 4,
        }
    }
}

api_enum! {
    /// What the assigned nodes keep a model in while no request uses it.
    WarmTier, "warm tier" {
        /// Nothing: loaded on demand and evictable.
        None => ["none"],
        /// Host memory (the agent's RAM tier).
        Ram => ["ram"],
        /// Device memory (the agent's VRAM tier).
        Vram => ["vram"],
    }
}

// The enum comes from `api_enum!`, which cannot derive Default for some enums only.
#[allow(clippy::derivable_impls)]
impl Default for WarmTier {
    fn default() -> Self {
        WarmTier::None
    }
}

api_enum! {
    /// Where a copy of a model is.
    Tier, "tier" {
        /// Only on the node's disk.
        Disk => ["disk"],
        /// In the RAM tier of the agent's cache.
        Ram => ["ram"],
        /// In device memory.
        Vram => ["vram"],
    }
}

api_enum! {
    /// Denoising scheduler.
    SchedulerKind, "scheduler" {
        /// DDIM (deterministic with eta 0).
        Ddim => ["ddim"],
        /// Euler (the ODE solver; deterministic).
        Euler => ["euler"],
        /// Euler ancestral (adds fresh noise every step).
        EulerAncestral => ["euler-ancestral", "euler_ancestral", "euler-a", "euler_a"],
        /// Heun (second order: two UNet evaluations per step but the last).
        Heun => ["heun"],
        /// Linear multistep (order 4).
        Lms => ["lms"],
        /// PNDM as the pseudo linear multistep method (PLMS, `skip_prk_steps`).
        Pndm => ["pndm", "plms"],
        /// DPM-Solver++ (2M).
        DpmPlusPlus2M => ["dpm++2m", "dpmpp-2m", "dpmpp_2m", "dpm-plus-plus-2m"],
        /// DPM-Solver++ (2M) on the Karras noise levels.
        DpmPlusPlus2MKarras => ["dpm++2m-karras", "dpmpp-2m-karras", "dpmpp_2m_karras"],
        /// UniPC (second order, bh2, predictor and corrector).
        UniPc => ["unipc", "uni-pc", "uni_pc"],
    }
}

/// Why a model cannot serve text-to-image requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotTextToImage {
    #[error("is a {0} model, not a text-to-image pipeline")]
    NotMain(ModelType),
    #[error(
        "is the {0} variant; text-to-image needs the Normal or Inpaint variant of a base model"
    )]
    Variant(ModelVariant),
    #[error("is an SDXL refiner, which refines images and cannot generate from text alone")]
    Refiner,
}

/// The one rule for which models serve text-to-image: a main model of the
/// normal variant (4 latent input channels) or an inpainting one (which
/// generates from text with everything masked), not an SDXL refiner. The
/// agent serves and the operator resolves exactly these.
pub fn text_to_image(
    model_type: ModelType,
    base: Option<BaseModel>,
    variant: Option<ModelVariant>,
) -> Result<(), NotTextToImage> {
    if model_type != ModelType::Main {
        return Err(NotTextToImage::NotMain(model_type));
    }
    if let Some(v) = variant.filter(|v| *v == ModelVariant::Depth) {
        return Err(NotTextToImage::Variant(v));
    }
    if base == Some(BaseModel::SdxlRefiner) {
        return Err(NotTextToImage::Refiner);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_spellings_and_pascal_case() {
        assert_eq!(
            "euler_ancestral".parse::<SchedulerKind>(),
            Ok(SchedulerKind::EulerAncestral)
        );
        assert_eq!(
            "euler-ancestral".parse::<SchedulerKind>(),
            Ok(SchedulerKind::EulerAncestral)
        );
        assert_eq!(
            "EulerAncestral".parse::<SchedulerKind>(),
            Ok(SchedulerKind::EulerAncestral)
        );
        assert_eq!("sd-1".parse::<BaseModel>(), Ok(BaseModel::Sd1));
        assert_eq!(
            "v_prediction".parse::<PredictionType>(),
            Ok(PredictionType::VPrediction)
        );
        assert_eq!("fp16".parse::<Precision>(), Ok(Precision::F16));
    }

    #[test]
    fn unknown_value_names_the_choices() {
        let err = "sd3".parse::<BaseModel>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown base model \"sd3\"; expected one of: sd1, sd2, sdxl, sdxl-refiner"
        );
    }

    #[test]
    fn only_normal_or_inpainting_main_models_that_are_not_refiners_serve_text_to_image() {
        use ModelType::*;
        let sd1 = Some(BaseModel::Sd1);
        assert_eq!(text_to_image(Main, sd1, None), Ok(()));
        assert_eq!(text_to_image(Main, sd1, Some(ModelVariant::Normal)), Ok(()));
        assert_eq!(
            text_to_image(Lora, sd1, None),
            Err(NotTextToImage::NotMain(Lora))
        );
        assert_eq!(
            text_to_image(Main, sd1, Some(ModelVariant::Inpaint)),
            Ok(())
        );
        assert_eq!(
            text_to_image(Main, sd1, Some(ModelVariant::Depth)),
            Err(NotTextToImage::Variant(ModelVariant::Depth))
        );
        assert_eq!(
            text_to_image(Main, Some(BaseModel::SdxlRefiner), None),
            Err(NotTextToImage::Refiner)
        );
        assert_eq!(
            NotTextToImage::Variant(ModelVariant::Depth).to_string(),
            "is the Depth variant; text-to-image needs the Normal or Inpaint variant of a base model"
        );
    }

    #[test]
    fn serializes_pascal_case() {
        assert_eq!(
            serde_json::to_string(&BaseModel::SdxlRefiner).unwrap(),
            "\"SdxlRefiner\""
        );
        assert_eq!(
            serde_json::to_string(&ModelType::T2iAdapter).unwrap(),
            "\"T2iAdapter\""
        );
        assert_eq!(Tier::Vram.as_flag(), "vram");
    }
}
