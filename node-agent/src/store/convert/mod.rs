//! Conversion of single-file (LDM/SGM layout, as A1111 and Civitai publish them)
//! checkpoints to the diffusers layout, as diffusers' `from_single_file` does.
//!
//! The key maps ([`keys`]) are pure functions over tensor names, tested one by
//! one; [`plan`] turns a checkpoint's names into each component's tensors;
//! [`configs`] supplies the architecture; [`write`] streams tensor by tensor:
//! a checkpoint's bytes are copied, never cast, so a converted folder is
//! bit-identical to what diffusers itself would hold. Only OpenCLIP's
//! `text_projection` needs its data transposed.

pub mod configs;
pub mod controlnet;
pub mod keys;
pub mod plan;
pub mod vae;
pub mod write;

pub use configs::{builtin_config, folder_config};
pub use controlnet::{convert_controlnet, converted_controlnet};
pub use keys::{openclip_key, unet_key, vae_key, UnetLayout};
pub use plan::{openclip_plan, plan_main, plan_vae_keys, Layout, Op, Plan, Planned};
pub use vae::converted_vae;
pub use write::write_component;

use super::error::{Result, StoreError};
use super::open_weights;
use configs::component_name;
use modelcache_crds::BaseModel;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What to convert and where the result goes.
pub struct ConvertRequest<'a> {
    pub checkpoint: &'a Path,
    pub out_dir: &'a Path,
    /// A diffusers-layout folder whose configs (and tokenizer) describe the architecture.
    pub config_dir: Option<&'a Path>,
    /// A tokenizer folder to copy (`tokenizer/`), when the config folder has none.
    pub tokenizer_dir: Option<&'a Path>,
}

/// Converts a main checkpoint to a diffusers folder. Writes into a temporary
/// sibling and renames it into place, so a failed conversion leaves nothing.
pub fn convert_main(req: &ConvertRequest) -> Result<PathBuf> {
    let index = open_weights(req.checkpoint)?;
    let probe = super::probe::probe(req.checkpoint)?;
    if probe.model_type != modelcache_crds::ModelType::Main {
        return Err(StoreError::Conversion {
            path: req.checkpoint.to_path_buf(),
            reason: format!(
                "is a {} model; only main checkpoints are converted",
                probe.model_type
            ),
        });
    }
    let base = probe
        .base
        .ok_or_else(|| StoreError::invalid(req.checkpoint, "cannot determine the base model"))?;
    let v = probe.prediction_type == Some(modelcache_crds::PredictionType::VPrediction);
    let mut config = match req.config_dir {
        Some(dir) => folder_config(dir)?,
        None => builtin_config(base, v),
    };
    // The checkpoint's own YAML outranks the architecture folder's scheduler.
    if let Some(pt) = super::sidecar::prediction_type(req.checkpoint)? {
        if let Some(sched) = config.get_mut("scheduler") {
            sched["prediction_type"] = serde_json::Value::from(pt.diffusers_name());
        }
    }
    let unet_cfg = config.get("unet").cloned().unwrap_or_default();
    let layout = Layout {
        unet: UnetLayout {
            layers_per_block: unet_cfg["layers_per_block"].as_u64().unwrap_or(2) as usize,
            text_time: unet_cfg["addition_embed_type"].as_str() == Some("text_time"),
        },
        vae_levels: config
            .get("vae")
            .and_then(|v| v["block_out_channels"].as_array())
            .map_or(4, Vec::len),
        text_layers: config
            .get("text_encoder")
            .and_then(|c| c["num_hidden_layers"].as_u64())
            .map(|n| n as usize),
        text_layers_2: config
            .get("text_encoder_2")
            .and_then(|c| c["num_hidden_layers"].as_u64())
            .map(|n| n as usize),
    };
    let plan = plan_main(&index, base, layout)?;
    plan::check_config(&index, &plan, &config, req.config_dir.is_some())?;

    write_atomically(req.out_dir, |tmp| {
        let write_json = |p: &Path, v: &Value| -> Result<()> {
            let text = serde_json::to_string_pretty(v)
                .map_err(|e| StoreError::invalid(p, e.to_string()))?;
            std::fs::write(p, text).map_err(StoreError::io(p))
        };
        write_json(&tmp.join("model_index.json"), &config["model_index"])?;
        for (comp, planned) in &plan.components {
            let dir = tmp.join(comp);
            std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            if let Some(cfg) = config.get(component_name(comp)) {
                write_json(&dir.join("config.json"), cfg)?;
            }
            let file = if comp.starts_with("text_encoder") {
                "model.safetensors"
            } else {
                "diffusion_pytorch_model.safetensors"
            };
            write_component(&index, planned, &dir.join(file))?;
        }
        if let Some(s) = config.get("scheduler") {
            let dir = tmp.join("scheduler");
            std::fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            write_json(&dir.join("scheduler_config.json"), s)?;
        }
        for tok in ["tokenizer", "tokenizer_2"] {
            // Folders named on the command line are trusted; a tokenizer found
            // beside the checkpoint is copied only from inside the checkpoint's folder.
            let beside = req.checkpoint.parent().map(|p| p.join(tok));
            let src = req
                .config_dir
                .map(|d| (d.join(tok), None))
                .filter(|(d, _)| d.is_dir())
                .or_else(|| {
                    req.tokenizer_dir
                        .filter(|_| tok == "tokenizer")
                        .map(|d| (d.to_path_buf(), None))
                })
                .or_else(|| {
                    beside
                        .filter(|d| d.is_dir())
                        .map(|d| (d, req.checkpoint.parent()))
                });
            let needed = config["model_index"][tok]
                .as_array()
                .is_some_and(|a| a.iter().all(|v| !v.is_null()));
            match src {
                Some((src, confine)) => copy_dir(&src, &tmp.join(tok), confine)?,
                // A single file carries no tokenizer: use the standard CLIP vocabulary
                // shipped with the agent (SD 2.x and SDXL's second encoder pad with "!").
                None if needed => {
                    let pad = if tok == "tokenizer_2" || base == BaseModel::Sd2 {
                        "!"
                    } else {
                        "<|endoftext|>"
                    };
                    super::clip_vocab::write_standard_clip(&tmp.join(tok), pad)
                        .map_err(StoreError::io(tmp.join(tok)))?;
                }
                None => {}
            }
        }
        Ok(())
    })
}

/// Writes a one-component diffusers folder (a VAE, a ControlNet) at `out`:
/// the planned tensors as `diffusion_pytorch_model.safetensors` beside
/// `config`.
pub(crate) fn write_single_component(
    index: &crate::store::TensorIndex,
    planned: &[Planned],
    config: &Value,
    out: &Path,
) -> Result<PathBuf> {
    write_atomically(out, |tmp| {
        write_component(
            index,
            planned,
            &tmp.join("diffusion_pytorch_model.safetensors"),
        )?;
        let text = serde_json::to_string_pretty(config)
            .map_err(|e| StoreError::invalid(&index.path, e.to_string()))?;
        std::fs::write(tmp.join("config.json"), text).map_err(StoreError::io(tmp))
    })
}

/// A pickled weights file (`.bin`, `.pt`, `.pth`, `.ckpt`) as safetensors,
/// written once into the state folder with every tensor's bytes as they are
/// (the cache reads only safetensors); a safetensors file is itself.
pub fn converted_safetensors(state_dir: &Path, file: &Path) -> Result<PathBuf> {
    if file.extension().is_some_and(|e| e == "safetensors") {
        return Ok(file.to_path_buf());
    }
    let out = cache_dir(state_dir, file, None)?;
    let name = file
        .file_stem()
        .map(|s| format!("{}.safetensors", s.to_string_lossy()))
        .unwrap_or_else(|| "weights.safetensors".into());
    if out.join(&name).is_file() {
        return Ok(out.join(name));
    }
    let index = open_weights(file)?;
    let planned: Vec<Planned> = index
        .tensors
        .iter()
        .map(|t| Planned {
            src: t.name.clone(),
            dst: t.name.clone(),
            op: Op::Copy {
                shape: t.shape.clone(),
            },
        })
        .collect();
    write_atomically(&out, |tmp| {
        write_component(&index, &planned, &tmp.join(&name))
    })?;
    Ok(out.join(name))
}

/// Writes a folder under a temporary name beside `out` and renames it into
/// place, so that a conversion cut short leaves no half-written model (and
/// the `.partial-*` leftovers of a crash are removed at start).
pub fn write_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .map_err(StoreError::io(&tmp))
        .and_then(|()| write(&tmp));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::rename(&tmp, out).map_err(StoreError::io(out))?;
    Ok(out.to_path_buf())
}

/// Copies the regular files of `src` into `dst`. With `confine`, every file
/// must resolve inside that folder: a link out of the models folder would
/// otherwise copy a file it does not hold into the converted model.
fn copy_dir(src: &Path, dst: &Path, confine: Option<&Path>) -> Result<()> {
    let confine = confine
        .map(|c| c.canonicalize().map_err(StoreError::io(c)))
        .transpose()?;
    std::fs::create_dir_all(dst).map_err(StoreError::io(dst))?;
    for entry in std::fs::read_dir(src).map_err(StoreError::io(src))? {
        let entry = entry.map_err(StoreError::io(src))?;
        let p = entry.path();
        let real = p.canonicalize().map_err(StoreError::io(&p))?;
        if confine.as_ref().is_some_and(|c| !real.starts_with(c)) {
            return Err(StoreError::invalid(
                &p,
                "links outside the folder of the checkpoint; not copied into the converted model",
            ));
        }
        if real.is_dir() {
            continue;
        }
        let mut from = super::file::open_regular(&real)?;
        let to = dst.join(entry.file_name());
        let mut out = std::fs::File::create(&to).map_err(StoreError::io(&to))?;
        std::io::copy(&mut from, &mut out).map_err(StoreError::io(&to))?;
    }
    Ok(())
}

/// Where the converted form of a checkpoint is cached under `--state-dir`:
/// keyed by the file's path, size and modification time, so an edited file is
/// converted again and model folders are never written to.
pub fn cache_dir(
    state_dir: &Path,
    checkpoint: &Path,
    config_dir: Option<&Path>,
) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let abs = checkpoint
        .canonicalize()
        .map_err(StoreError::io(checkpoint))?;
    let m = std::fs::metadata(&abs).map_err(StoreError::io(&abs))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(abs.to_string_lossy().as_bytes());
    h.update(m.len().to_le_bytes());
    h.update(mtime.to_le_bytes());
    // A sidecar YAML decides the prediction type: editing it converts anew.
    if let Ok(yaml) = std::fs::metadata(abs.with_extension("yaml")) {
        let mtime = yaml
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(b"sidecar");
        h.update(yaml.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    if let Some(c) = config_dir {
        h.update(
            c.canonicalize()
                .map_err(StoreError::io(c))?
                .to_string_lossy()
                .as_bytes(),
        );
    }
    Ok(state_dir
        .join("converted")
        .join(super::identity::hex(&h.finalize()[..16])))
}

/// The diffusers folder for a checkpoint: converted once, then reused from the cache.
pub fn converted(
    state_dir: &Path,
    checkpoint: &Path,
    config_dir: Option<&Path>,
    tokenizer_dir: Option<&Path>,
) -> Result<PathBuf> {
    let out = cache_dir(state_dir, checkpoint, config_dir)?;
    if out.join("model_index.json").exists() {
        return Ok(out);
    }
    convert_main(&ConvertRequest {
        checkpoint,
        out_dir: &out,
        config_dir,
        tokenizer_dir,
    })
}
