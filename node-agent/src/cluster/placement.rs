//! What this node should hold for the ModelDeployments placed on it, and
//! preparing one placement: find, verify, open (converting a checkpoint
//! once) and warm its model.

use crate::agent::Agent;
use crate::cache::{CacheError, CacheKey, TierKind};
use crate::catalog::CatalogError;
use crate::store::StoreError;
use kube::ResourceExt;
use modelcache_crds::{
    GenerationDefaults, IpAdapterSpec, LoraSpec, ModelDeployment, ModelType, PlacementRole,
    Precision, RemoteSource, Tier, WarmTier,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Least time between two searches of the models folder for a missing model.
const RESCAN_AFTER: Duration = Duration::from_secs(5);

/// What the agent should hold for one deployment placed on its node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// `namespace/name`.
    pub key: String,
    pub path: String,
    pub sha256: Option<String>,
    /// Where to download the model from when this node does not have it.
    pub source: Option<RemoteSource>,
    pub warm: WarmTier,
    pub role: PlacementRole,
    pub precision: Precision,
    pub loras: Vec<LoraSpec>,
    pub vae: Option<String>,
    pub refiner: Option<String>,
    pub controlnets: Vec<String>,
    pub ip_adapter: Option<IpAdapterSpec>,
    pub defaults: GenerationDefaults,
}

/// The placements that name `node`, by deployment.
pub fn desired(node: &str, deployments: &[Arc<ModelDeployment>]) -> BTreeMap<String, Desired> {
    let mut out = BTreeMap::new();
    for md in deployments {
        if md.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(p) = md
            .status
            .as_ref()
            .and_then(|s| s.placements.iter().find(|p| p.node == node))
        else {
            continue;
        };
        let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        out.insert(
            key.clone(),
            Desired {
                key,
                path: md.spec.model.path.clone(),
                sha256: md.spec.model.sha256.clone(),
                source: md.spec.model.source.clone(),
                warm: md.spec.warm_tier,
                role: p.role,
                precision: md.spec.precision,
                loras: md.spec.loras.clone(),
                vae: md.spec.vae.clone(),
                refiner: md.spec.refiner.clone(),
                controlnets: md.spec.controlnets.clone(),
                ip_adapter: md.spec.ip_adapter.clone(),
                defaults: md.spec.defaults.clone(),
            },
        );
    }
    out
}

/// Why a placement could not be prepared; the message goes into the
/// placement's status, where the user reads it.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("model path {path:?} is not under this agent's models folder {root} (searched again; it is retried)")]
    NotFound { path: String, root: String },
    #[error("{path:?} is a {model_type} model, not a text-to-image base model")]
    NotServable { path: String, model_type: ModelType },
    #[error("hashing {path:?}: {source}")]
    Hash { path: String, source: StoreError },
    #[error(
        "sha256 mismatch: spec.model.sha256 is {want} but the files on this node hash to {have}{}",
        if *.downloaded { "; the download was deleted" } else { "" }
    )]
    Sha256 {
        want: String,
        have: String,
        /// The copy was downloaded (and is deleted, so nothing is left of it).
        downloaded: bool,
    },
    #[error("spec.model.source: {0}")]
    Source(#[from] modelcache_crds::SourceError),
    #[error(transparent)]
    Credentials(#[from] super::credentials::CredentialsError),
    #[error("downloading spec.model.source: {0}")]
    Download(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Open(#[from] CatalogError),
    #[error("spec.refiner {path:?}: {reason}")]
    Refiner { path: String, reason: String },
    #[error("spec.{0}")]
    Vae(#[from] crate::catalog::VaeError),
    #[error("spec.{field}: {reason}")]
    Conditioning { field: String, reason: String },
    #[error(transparent)]
    Warm(#[from] CacheError),
    #[error("preparing the model failed: {0}")]
    Task(String),
}

/// What preparing a placement produced.
pub struct Prepared {
    /// Catalog name of the model.
    pub model: String,
    pub tier: Tier,
    pub sha256: Option<String>,
    pub message: Option<String>,
    /// Every cache entry the placement warms: the model's components, its
    /// refiner's, its VAE override, its ControlNets and T2I-Adapters, and
    /// its IP-Adapter with the image encoder.
    pub keys: Vec<CacheKey>,
}

/// Whether the node has the placement's model (searching the folders
/// again if it was not there at the last search). Blocking.
pub fn present(agent: &Agent, path: &str) -> bool {
    let catalog = &agent.catalog;
    if catalog.by_path(path).is_some() {
        return true;
    }
    catalog.rescan_if_older(RESCAN_AFTER);
    catalog.by_path(path).is_some()
}

/// Finds, verifies, opens (converting a checkpoint once) and warms a placement's
/// model. Blocking: runs on the blocking pool.
pub fn prepare(agent: &Agent, d: &Desired) -> Result<Prepared, PlacementError> {
    let catalog = &agent.catalog;
    let entry = match catalog.by_path(&d.path) {
        Some(e) => e,
        None => {
            // It may have been copied in since the last search.
            catalog.rescan_if_older(RESCAN_AFTER);
            catalog
                .by_path(&d.path)
                .ok_or_else(|| PlacementError::NotFound {
                    path: d.path.clone(),
                    root: catalog.root().display().to_string(),
                })?
        }
    };
    if !entry.servable() {
        return Err(PlacementError::NotServable {
            path: d.path.clone(),
            model_type: entry.probe.model_type,
        });
    }
    let mut sha256 = None;
    if let Some(want) = &d.sha256 {
        let have = crate::store::identity::sha256(&entry.path, Some(catalog.state_dir())).map_err(
            |source| PlacementError::Hash {
                path: d.path.clone(),
                source,
            },
        )?;
        if !have.eq_ignore_ascii_case(want) {
            let fetcher = agent
                .fetcher
                .as_ref()
                .filter(|f| entry.path.starts_with(f.disk().root()));
            if let Some(f) = fetcher {
                f.remove(&entry.rel_path);
                catalog.rescan();
            }
            return Err(PlacementError::Sha256 {
                want: want.clone(),
                have,
                downloaded: fetcher.is_some(),
            });
        }
        sha256 = Some(have);
    }
    let model = catalog.open(&entry.name)?;
    let mut keys = model.component_keys();
    if let Some(path) = &d.refiner {
        let refused = |reason: String| PlacementError::Refiner {
            path: path.clone(),
            reason,
        };
        let refiner = catalog.refiner(path).map_err(|e| refused(e.to_string()))?;
        crate::pipeline::check_refiner(&model, &refiner).map_err(|e| refused(e.to_string()))?;
        keys.extend(refiner.component_keys());
    }
    if let Some(path) = &d.vae {
        keys.push(CacheKey::from(catalog.vae(path)?));
    }
    for (i, path) in d.controlnets.iter().enumerate() {
        let refused = |reason: String| PlacementError::Conditioning {
            field: format!("controlnets[{i}]"),
            reason,
        };
        let control = catalog
            .controlnet(path)
            .map_err(|e| refused(e.to_string()))?;
        if control.base != model.base || !control.fits(&model.unet) {
            return Err(refused(format!(
                "{path:?} is for {} models and does not fit the model ({})",
                control.base, model.base
            )));
        }
        keys.push(control.key());
    }
    if let Some(ip) = &d.ip_adapter {
        let refused = |reason: String| PlacementError::Conditioning {
            field: "ipAdapter".into(),
            reason,
        };
        let adapter = catalog
            .ip_adapter(&ip.path, ip.image_encoder.as_deref())
            .map_err(|e| refused(e.to_string()))?;
        crate::pipeline::ip_adapter::check(&model, &adapter).map_err(|e| refused(e.to_string()))?;
        keys.extend([adapter.key(), adapter.encoder_key()]);
    }
    let tier = TierKind::for_warm(d.warm);
    if let Some(t) = tier {
        let dtype = agent
            .cache
            .dtype_for(Some(crate::device::dtype_of(d.precision)));
        for key in &keys {
            agent.cache.warm_as(key, t, dtype)?;
        }
    }
    let cpu_only = agent
        .cache
        .config()
        .devices
        .iter()
        .all(|s| s.device.is_cpu());
    let message = (cpu_only && d.precision != Precision::F32).then(|| {
        format!(
            "computing in F32 on the CPU (spec.precision {} applies on GPUs)",
            d.precision
        )
    });
    Ok(Prepared {
        model: entry.name.clone(),
        tier: tier.map_or(Tier::Disk, Tier::from),
        sha256,
        message,
        keys,
    })
}
