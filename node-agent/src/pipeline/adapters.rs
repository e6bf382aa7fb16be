//! A request's LoRA-family adapters, fetched from the cache and parsed once
//! for the whole request, then applied to each network as it is built.

use super::lora::{self, Adapter};
use super::{DiffusersModel, PipelineError, RequestError};
use crate::cache::{CacheKey, DeviceModel, ModelCache, ModelGuard, Reservation};
use crate::store;
use candle_core::DType;
use modelcache_crds::ModelType;
use std::path::{Path, PathBuf};

/// An adapter is judged by its header before any of it is loaded: it must
/// probe as a LoRA-family adapter and be no larger than the model's weights at
/// f32 (what a full-weight diff of that model weighs). Anything else would be
/// read whole into the cache, pushing real models out, only to be refused.
fn check(path: &Path, model: &DiffusersModel) -> Result<(), RequestError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let not_adapter = |why: String| RequestError::NotAnAdapter {
        name: name.clone(),
        why,
    };
    let index = store::open_weights(path).map_err(|e| not_adapter(e.to_string()))?;
    let kind = store::probe::checkpoint_type(&index).map_err(|e| not_adapter(e.to_string()))?;
    if kind != ModelType::Lora {
        return Err(not_adapter(format!("it is a {kind} model")));
    }
    if index.file_bytes > model.bytes_f32 {
        return Err(not_adapter(format!(
            "its {} bytes are more than the model's own {} bytes of weights",
            index.file_bytes, model.bytes_f32
        )));
    }
    Ok(())
}

/// The adapters of one request, locked in the device tier until it ends.
pub struct Adapters {
    parsed: Vec<(Adapter, f64)>,
    _locked: Vec<ModelGuard<DeviceModel>>,
}

impl Adapters {
    /// Checks, locks and parses `loras` (adapter files and their weights)
    /// for `model`, on the device at the model's `dtype`.
    pub fn lock(
        cache: &ModelCache,
        model: &DiffusersModel,
        loras: &[(PathBuf, f64)],
        dtype: Option<DType>,
    ) -> Result<Self, PipelineError> {
        let mut parsed = Vec::with_capacity(loras.len());
        let mut locked = Vec::with_capacity(loras.len());
        for (path, weight) in loras {
            check(path, model)?;
            let key = CacheKey::from(path.as_path());
            let guard = cache.get_device_as(&key, cache.dtype_for(dtype))?;
            let adapter = Adapter::from_tensors(&guard.tensors)
                .map_err(|source| RequestError::Adapter { key, source })?;
            parsed.push((adapter, *weight));
            locked.push(guard);
        }
        Ok(Adapters {
            parsed,
            _locked: locked,
        })
    }

    /// A component's weights with the adapters' layers under `prefix` applied.
    /// The patched copies live only for this request; their bytes are
    /// reserved in the component's device tier first (released when the
    /// returned reservation drops), so adapters cannot push the device past
    /// its budget.
    pub fn weights(
        &self,
        cache: &ModelCache,
        component: &ModelGuard<DeviceModel>,
        prefix: &str,
    ) -> Result<(candle_nn::VarBuilder<'static>, Option<Reservation>), PipelineError> {
        let adapters: Vec<(&Adapter, f64)> = self.parsed.iter().map(|(a, w)| (a, *w)).collect();
        let bytes = lora::patch_bytes(&component.tensors, prefix, &adapters);
        let held = if bytes > 0 {
            let what = CacheKey::from(format!("{} with adapters", component.key()));
            Some(cache.reserve_device(&what, component.slot(), bytes)?)
        } else {
            None
        };
        let vb = lora::var_builder(
            &component.tensors,
            component.dtype,
            &component.device,
            prefix,
            &adapters,
        )
        .map_err(RequestError::from)?;
        Ok((vb, held))
    }
}
