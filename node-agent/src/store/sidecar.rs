//! The original (LDM) config YAML that may sit beside a single-file
//! checkpoint (`model.safetensors` + `model.yaml`, as A1111 and InvokeAI
//! read them). It states what a checkpoint's tensors cannot: whether the
//! UNet predicts noise or velocity (`model.params.parameterization`). The
//! native image size follows from that (768 for SD 2.x v-prediction): the
//! files' own `image_size` is the latent size of training crops and reads 64
//! for 512 and 768 models alike.

use super::{file, Result, StoreError};
use modelcache_crds::PredictionType;
use std::path::Path;

/// Larger sidecars are refused: real ones are a few kilobytes.
const MAX_BYTES: u64 = 1 << 20;

/// The sidecar of `checkpoint`, if there is one: its prediction type.
pub fn prediction_type(checkpoint: &Path) -> Result<Option<PredictionType>> {
    let path = checkpoint.with_extension("yaml");
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(&path)(e)),
    };
    if meta.len() > MAX_BYTES {
        return Err(StoreError::invalid(
            &path,
            format!(
                "is {} bytes; a config YAML has at most {MAX_BYTES}",
                meta.len()
            ),
        ));
    }
    let text = file::read_to_string(&path)?;
    parse(&text)
        .map(Some)
        .map_err(|reason| StoreError::invalid(&path, reason))
}

/// `model.params.parameterization` of an LDM config: `v` is v-prediction,
/// `eps` (or none: the LDM default) noise, `x0` the sample itself.
pub fn parse(text: &str) -> std::result::Result<PredictionType, String> {
    let v: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| format!("is not a YAML config: {e}"))?;
    let Some(params) = v.get("model").and_then(|m| m.get("params")) else {
        return Err("has no model.params: not an LDM config".into());
    };
    match params.get("parameterization") {
        None | Some(serde_json::Value::Null) => Ok(PredictionType::Epsilon),
        Some(p) => match p.as_str() {
            Some("eps") => Ok(PredictionType::Epsilon),
            Some("v") => Ok(PredictionType::VPrediction),
            Some("x0") => Ok(PredictionType::Sample),
            _ => Err(format!(
                "model.params.parameterization is {p}; expected \"eps\", \"v\" or \"x0\""
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameterization_decides_and_bad_configs_say_why() {
        let v = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n    image_size: 64\n";
        assert_eq!(parse(v), Ok(PredictionType::VPrediction));
        assert_eq!(
            parse("model:\n  params:\n    linear_start: 0.00085\n"),
            Ok(PredictionType::Epsilon)
        );
        assert_eq!(
            parse("model: {params: {parameterization: eps}}"),
            Ok(PredictionType::Epsilon)
        );
        for (bad, why) in [
            ("model: {}", "model.params"),
            ("[1, 2", "not a YAML"),
            ("model: {params: {parameterization: velocity}}", "velocity"),
            ("model: {params: {parameterization: [v]}}", "expected"),
            ("a: &a [*a, *a]", "not a YAML"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
