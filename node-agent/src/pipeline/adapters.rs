//! A request's LoRA-family adapters, fetched from the cache and parsed once
//! for the whole request, then applied to each network as it is built.

use super::lora::{self, Adapter};
use super::{PipelineError, RequestError};
use crate::cache::{CacheKey, DeviceModel, ModelCache, ModelGuard, Reservation};
use std::path::PathBuf;

/// The adapters of one request, locked in the device tier until it ends.
pub struct Adapters {
    parsed: Vec<(Adapter, f64)>,
    _locked: Vec<ModelGuard<DeviceModel>>,
}

impl Adapters {
    /// Locks and parses `loras` (adapter files and their weights).
    pub fn lock(cache: &ModelCache, loras: &[(PathBuf, f64)]) -> Result<Self, PipelineError> {
        let mut parsed = Vec::with_capacity(loras.len());
        let mut locked = Vec::with_capacity(loras.len());
        for (path, weight) in loras {
            let key = CacheKey::from(path.as_path());
            let guard = cache.get_device(&key)?;
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
