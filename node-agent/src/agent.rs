//! The agent's core, built once and shared by the HTTP API and the cluster
//! side: the model cache, the catalog of the models folder, and the metrics
//! that describe both.

use crate::cache::{CacheConfig, DiskLoader, EntryInfo, ModelCache, TierKind};
use crate::catalog::Catalog;
use crate::fetch::disk::DiskTier;
use crate::fetch::{FetchMetrics, Fetcher, Options as DownloadOptions};
use crate::metrics::AgentMetrics;
use modelcache_crds::Tier;
use std::time::Duration;

pub struct Agent {
    pub cache: ModelCache,
    pub catalog: Catalog,
    pub metrics: AgentMetrics,
    /// The disk tier that remote models are downloaded into, when the
    /// agent has one (cluster mode).
    pub fetcher: Option<Fetcher>,
}

/// A model's copy in one cache tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Residency {
    pub tier: TierKind,
    /// Bytes of the model's components in that tier.
    pub bytes: u64,
    /// Whether a request is using it now.
    pub locked: bool,
    /// Since the most recent use of any of its components.
    pub idle: Duration,
}

impl Agent {
    /// A cache with `config`'s budgets that reads model files from disk, its
    /// metrics registered, serving `catalog`.
    pub fn new(config: CacheConfig, catalog: Catalog) -> Result<Self, prometheus::Error> {
        let metrics = AgentMetrics::new()?;
        let cache = ModelCache::new(config, Box::new(DiskLoader), Some(&metrics.registry));
        metrics.register_cache(cache.clone())?;
        Ok(Agent {
            cache,
            catalog,
            metrics,
            fetcher: None,
        })
    }

    /// The agent with a disk tier for downloads, its metrics registered.
    pub fn with_downloads(
        mut self,
        disk: DiskTier,
        options: DownloadOptions,
    ) -> Result<Self, prometheus::Error> {
        let metrics = FetchMetrics::register(&self.metrics.registry)?;
        self.fetcher = Some(Fetcher::new(disk, options, Some(metrics)));
        Ok(self)
    }

    /// Where the model named `name` is resident, device tier first, given the
    /// cache's `entries`. A tier counts when it holds the model's UNet, the
    /// component every denoising step needs; a model never opened is on disk.
    pub fn residency(&self, name: &str, entries: &[EntryInfo]) -> Vec<Residency> {
        let Some(model) = self.catalog.opened(name) else {
            return Vec::new();
        };
        let keys = model.component_keys();
        [TierKind::Device, TierKind::Ram]
            .into_iter()
            .filter_map(|tier| {
                let here: Vec<&EntryInfo> = entries
                    .iter()
                    .filter(|e| e.tier == tier && !e.loading && keys.contains(&e.key.weights()))
                    .collect();
                here.iter()
                    .any(|e| e.key.name() == "unet")
                    .then(|| Residency {
                        tier,
                        bytes: here.iter().map(|e| e.bytes).sum(),
                        locked: here.iter().any(|e| e.locked),
                        idle: here.iter().map(|e| e.idle).min().unwrap_or_default(),
                    })
            })
            .collect()
    }

    /// The fastest tier a request for `name` finds it in.
    pub fn tier(&self, name: &str, entries: &[EntryInfo]) -> Tier {
        self.residency(name, entries)
            .first()
            .map_or(Tier::Disk, |r| r.tier.into())
    }
}
