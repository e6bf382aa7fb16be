//! The models found under `--models-dir`. Standalone, the agent serves every
//! text-to-image model among them, named by its path relative to that folder
//! without the file extension (`sd15/dreamshaper.safetensors` →
//! `sd15/dreamshaper`); in a cluster, ModelDeployments name them by relative
//! path (`model.path`), and every probed model is reported in the ModelNode.

use crate::cache::CacheKey;
use crate::pipeline::{ControlModel, DiffusersModel, IpAdapterModel, ModelError};
use crate::store::{self, convert, ProbeResult};
use modelcache_crds::{text_to_image, ModelFormat, ModelType};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a model of the catalog cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("unknown model {0:?}")]
    Unknown(String),
    #[error("{}: {source}", path.display())]
    Model { path: PathBuf, source: ModelError },
}

/// Why a file a request names cannot be used as an adapter. A missing file
/// and one a link shows outside the folder get the same answer, so that
/// requests cannot probe what exists outside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterPathError {
    #[error("{0:?} must be a path relative to the models folder, without '..'")]
    NotRelative(String),
    #[error("{0:?} is not a file in the models folder")]
    NotAvailable(String),
    #[error("{0:?}: adapters are read from .safetensors files")]
    NotSafetensors(String),
}

/// Why a VAE a request or deployment names cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("vae {0:?} is not a VAE file or folder in the models folder")]
    NotFound(String),
    #[error("vae {name:?} is a {kind} model, not a VAE")]
    NotVae { name: String, kind: ModelType },
    #[error("vae {name:?}: {source}")]
    Convert {
        name: String,
        source: crate::store::StoreError,
    },
}

/// Why a ControlNet a request or deployment names cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlNetError {
    #[error("{0:?} is not a ControlNet or T2I-Adapter in the models folder")]
    NotFound(String),
    #[error("{name:?} is a {kind} model, not a ControlNet or T2I-Adapter")]
    NotControlNet { name: String, kind: ModelType },
    #[error("{name:?}: {source}")]
    Convert {
        name: String,
        source: crate::store::StoreError,
    },
    #[error("{name:?}: {source}")]
    Model { name: String, source: ModelError },
}

/// Why an IP-Adapter a request names cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IpAdapterLookupError {
    #[error("{0:?} is not an IP-Adapter in the models folder")]
    NotFound(String),
    #[error("{name:?} is a {kind} model, not an IP-Adapter")]
    NotIpAdapter { name: String, kind: ModelType },
    #[error("image encoder {0:?} is not a CLIP Vision model folder in the models folder")]
    NoEncoder(String),
    #[error("{0:?} needs its CLIP Vision image encoder: an image_encoder/ folder beside it, or one named with image_encoder")]
    EncoderUnknown(String),
    #[error("image_encoder.txt names {0:?}, and no CLIP Vision model of that path or folder name is in the models folder")]
    EncoderNotFound(String),
    #[error("{name:?}: {source}")]
    Model { name: String, source: ModelError },
}

/// A model found under the root.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// Relative path without the file extension: the standalone API's model name.
    pub name: String,
    /// Relative path as a ModelDeployment's `model.path` spells it.
    pub rel_path: String,
    pub path: PathBuf,
    pub probe: ProbeResult,
}

impl CatalogEntry {
    /// Whether the model can generate images from text (see [`text_to_image`]).
    pub fn servable(&self) -> bool {
        text_to_image(self.probe.model_type, self.probe.base, self.probe.variant).is_ok()
    }
}

/// Servable models by name, and the opened pipelines.
pub struct Catalog {
    root: PathBuf,
    /// The disk tier's folder of downloaded models, searched beside the root.
    downloads: Option<PathBuf>,
    state_dir: PathBuf,
    tokenizer_dir: Option<PathBuf>,
    models: std::sync::RwLock<Arc<Models>>,
    /// When the folder was last searched, for [`Catalog::rescan_if_older`].
    scanned: Mutex<std::time::Instant>,
    opened: Mutex<HashMap<String, Arc<DiffusersModel>>>,
    /// ControlNets and T2I-Adapters opened for requests, by relative path:
    /// opening one reads its headers and configuration, which every request
    /// naming it should not pay again. Emptied by a rescan.
    controls: Mutex<HashMap<String, Arc<ControlModel>>>,
    /// IP-Adapters opened for requests, by relative path and encoder.
    ip_adapters: Mutex<HashMap<IpAdapterKey, Arc<IpAdapterModel>>>,
}

/// An IP-Adapter's relative path and its named encoder's.
type IpAdapterKey = (String, Option<String>);

/// `map`'s value for `key`, opened by `open` the first time (a failure is
/// not kept, so a fixed file is found again).
fn memo<K: std::hash::Hash + Eq, V, E>(
    map: &Mutex<HashMap<K, Arc<V>>>,
    key: K,
    open: impl FnOnce() -> Result<Arc<V>, E>,
) -> Result<Arc<V>, E> {
    if let Some(v) = map.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(v.clone());
    }
    let v = open()?;
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, v.clone());
    Ok(v)
}

/// What one search of the folder found.
#[derive(Default)]
struct Models {
    /// Servable models by name.
    entries: BTreeMap<String, CatalogEntry>,
    /// Every probed model (adapters too) by relative path.
    found: BTreeMap<String, CatalogEntry>,
}

/// The name of a model at `path` under `root`.
pub fn model_name(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = if path.is_file() {
        rel.with_extension("")
    } else {
        rel.to_path_buf()
    };
    rel.to_string_lossy().into_owned()
}

/// How a model found in the downloads folder is named: a download is a
/// folder named as the deployment's `model.path`, so a single file fetched
/// into it (`sd15.safetensors/sd15.safetensors`) is named by its folder.
fn download_rel(downloads: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(downloads).unwrap_or(path);
    let single = path.is_file()
        && path
            .parent()
            .is_some_and(|dir| dir.join(crate::fetch::disk::MARKER).is_file());
    let rel = if single {
        rel.parent().unwrap_or(rel)
    } else {
        rel
    };
    rel.to_string_lossy().into_owned()
}

impl Models {
    /// Searches `root` (then `downloads`; a model the root has wins) and
    /// keeps the models that can generate images; logs the rest.
    fn search(root: &Path, downloads: Option<&Path>) -> Models {
        let mut models = Models::default();
        models.add(root, |path| {
            let rel = path.strip_prefix(root).unwrap_or(path);
            (model_name(root, path), rel.to_string_lossy().into_owned())
        });
        if let Some(dl) = downloads {
            models.add(dl, |path| {
                let rel = download_rel(dl, path);
                let name = if Path::new(&rel).extension().is_some() && path.is_file() {
                    Path::new(&rel)
                        .with_extension("")
                        .to_string_lossy()
                        .into_owned()
                } else {
                    rel.clone()
                };
                (name, rel)
            });
        }
        models
    }

    /// Adds the models under `dir`, named (name, relative path) by `names`.
    fn add(&mut self, dir: &Path, names: impl Fn(&Path) -> (String, String)) {
        let found = store::search::find_models(dir);
        for (p, why) in &found.skipped {
            tracing::warn!(path = %p.display(), "skipped: {why}");
        }
        for path in found.models {
            let (name, rel_path) = names(&path);
            if self.found.contains_key(&rel_path) {
                continue;
            }
            let probe = match store::probe(&path) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("skipped: {e}");
                    continue;
                }
            };
            let entry = CatalogEntry {
                name,
                rel_path,
                path,
                probe,
            };
            if entry.servable() {
                if !self.entries.contains_key(&entry.name) {
                    tracing::info!(model = %entry.name, base = ?entry.probe.base, format = %entry.probe.format, "found model");
                    self.entries.insert(entry.name.clone(), entry.clone());
                }
            } else {
                tracing::info!(path = %entry.rel_path, r#type = %entry.probe.model_type, "not a text-to-image model; not served");
            }
            self.found.insert(entry.rel_path.clone(), entry);
        }
    }
}

impl Catalog {
    /// Searches `root` (see [`Catalog::rescan`] for later changes).
    pub fn scan(root: &Path, state_dir: &Path, tokenizer_dir: Option<&Path>) -> Catalog {
        Self::scan_with(root, None, state_dir, tokenizer_dir)
    }

    /// [`Catalog::scan`] that also finds the models downloaded into `downloads`.
    pub fn scan_with(
        root: &Path,
        downloads: Option<&Path>,
        state_dir: &Path,
        tokenizer_dir: Option<&Path>,
    ) -> Catalog {
        Catalog {
            root: root.to_path_buf(),
            downloads: downloads.map(Path::to_path_buf),
            state_dir: state_dir.to_path_buf(),
            tokenizer_dir: tokenizer_dir.map(Path::to_path_buf),
            models: std::sync::RwLock::new(Arc::new(Models::search(root, downloads))),
            scanned: Mutex::new(std::time::Instant::now()),
            opened: Mutex::new(HashMap::new()),
            controls: Mutex::new(HashMap::new()),
            ip_adapters: Mutex::new(HashMap::new()),
        }
    }

    fn models(&self) -> Arc<Models> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Searches the folder again: models added since are found, removed ones
    /// forgotten (with their opened pipelines).
    pub fn rescan(&self) {
        let models = Models::search(&self.root, self.downloads.as_deref());
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| models.entries.contains_key(name));
        self.controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.ip_adapters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.models.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(models);
        *self.scanned.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
    }

    /// [`Catalog::rescan`] unless the last search is younger than `age`.
    pub fn rescan_if_older(&self, age: std::time::Duration) {
        let due = self
            .scanned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= age;
        if due {
            self.rescan();
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `text` with paths under the models folder made relative to it and
    /// paths under the state folder shown as `<state>/…`: what clients see of
    /// an error, without the host's layout.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        let downloads = self.downloads.as_ref().unwrap_or(&self.root);
        for (dir, shown) in [
            (&self.root, ""),
            (downloads, ""),
            (&self.state_dir, "<state>/"),
        ] {
            let canonical = dir.canonicalize().ok();
            for form in [Some(dir.clone()), canonical].into_iter().flatten() {
                let prefix = format!("{}/", form.display());
                if prefix.len() > 1 {
                    out = out.replace(&prefix, shown);
                }
            }
        }
        out
    }

    /// The writable folder for converted checkpoints and hashes.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The servable models, sorted by name.
    pub fn entries(&self) -> Vec<CatalogEntry> {
        self.models().entries.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<CatalogEntry> {
        self.models().entries.get(name).cloned()
    }

    /// Every probed model, adapters included, sorted by relative path.
    pub fn found(&self) -> Vec<CatalogEntry> {
        self.models().found.values().cloned().collect()
    }

    /// The textual inversion embedding a prompt names as `<name>` (file stem, or
    /// folder of a diffusers `learned_embeds.bin`), if one is under the root.
    pub fn embedding(&self, name: &str) -> Option<CatalogEntry> {
        self.models()
            .found
            .values()
            .find(|e| {
                e.probe.model_type == ModelType::Embedding
                    && crate::pipeline::embedding::trigger_name(&e.path) == name
            })
            .cloned()
    }

    /// A model by its relative path (`model.path`; a trailing `/` or leading `./` is ignored).
    pub fn by_path(&self, rel: &str) -> Option<CatalogEntry> {
        let rel = crate::fetch::normalize(rel);
        self.models().found.get(rel).cloned()
    }

    /// The pipeline of a model that has been opened, if it has.
    pub fn opened(&self, name: &str) -> Option<Arc<DiffusersModel>> {
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Cache key of a component of a model that has been opened, if it has.
    pub fn opened_component(&self, name: &str, component: &str) -> Option<CacheKey> {
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|m| m.component(component))
    }

    /// A file named relative to the models folder (a LoRA in a request): relative,
    /// no `..`, inside the folder after resolving symlinks, a safetensors file.
    pub fn resolve_file(&self, rel: &str) -> Result<PathBuf, AdapterPathError> {
        let p = Path::new(rel);
        if rel.is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(AdapterPathError::NotRelative(rel.to_string()));
        }
        let real = self
            .root
            .join(p)
            .canonicalize()
            .map_err(|_| AdapterPathError::NotAvailable(rel.to_string()))?;
        // A models folder that cannot be resolved holds no file either.
        let root = self
            .root
            .canonicalize()
            .map_err(|_| AdapterPathError::NotAvailable(rel.to_string()))?;
        if !real.starts_with(&root) || !real.is_file() {
            return Err(AdapterPathError::NotAvailable(rel.to_string()));
        }
        if real.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(AdapterPathError::NotSafetensors(rel.to_string()));
        }
        Ok(real)
    }

    /// The diffusers folder of the VAE at `rel` (a VAE file is converted once
    /// into the state folder). Only what the last scan found under the root is
    /// found here, so a path cannot reach outside it.
    pub fn vae(&self, rel: &str) -> Result<PathBuf, VaeError> {
        let entry = self
            .by_path(rel)
            .ok_or_else(|| VaeError::NotFound(rel.to_string()))?;
        if entry.probe.model_type != ModelType::Vae {
            return Err(VaeError::NotVae {
                name: rel.to_string(),
                kind: entry.probe.model_type,
            });
        }
        match entry.probe.format {
            ModelFormat::Diffusers => Ok(entry.path),
            ModelFormat::Checkpoint => convert::converted_vae(&self.state_dir, &entry.path)
                .map_err(|source| VaeError::Convert {
                    name: rel.to_string(),
                    source,
                }),
        }
    }

    /// The ControlNet or T2I-Adapter at `rel` (a single-file ControlNet is
    /// converted once into the state folder). Only what the last scan found
    /// under the root is found here, so a path cannot reach outside it.
    pub fn controlnet(&self, rel: &str) -> Result<Arc<ControlModel>, ControlNetError> {
        let key = crate::fetch::normalize(rel).to_string();
        memo(&self.controls, key, || self.open_controlnet(rel))
    }

    fn open_controlnet(&self, rel: &str) -> Result<Arc<ControlModel>, ControlNetError> {
        let entry = self
            .by_path(rel)
            .ok_or_else(|| ControlNetError::NotFound(rel.to_string()))?;
        if !matches!(
            entry.probe.model_type,
            ModelType::ControlNet | ModelType::T2iAdapter
        ) {
            return Err(ControlNetError::NotControlNet {
                name: rel.to_string(),
                kind: entry.probe.model_type,
            });
        }
        let dir = match entry.probe.format {
            ModelFormat::Diffusers => entry.path,
            ModelFormat::Checkpoint => convert::converted_controlnet(&self.state_dir, &entry.path)
                .map_err(|source| ControlNetError::Convert {
                    name: rel.to_string(),
                    source,
                })?,
        };
        ControlModel::open(&dir)
            .map(Arc::new)
            .map_err(|source| ControlNetError::Model {
                name: rel.to_string(),
                source,
            })
    }

    /// The IP-Adapter file at `rel` with its image encoder: the CLIP Vision
    /// folder `encoder` names, else the `image_encoder/` folder beside the
    /// file. Only what the last scan found under the root is found here.
    pub fn ip_adapter(
        &self,
        rel: &str,
        encoder: Option<&str>,
    ) -> Result<Arc<IpAdapterModel>, IpAdapterLookupError> {
        let key = (
            crate::fetch::normalize(rel).to_string(),
            encoder.map(|e| crate::fetch::normalize(e).to_string()),
        );
        memo(&self.ip_adapters, key, || {
            self.open_ip_adapter(rel, encoder)
        })
    }

    fn open_ip_adapter(
        &self,
        rel: &str,
        encoder: Option<&str>,
    ) -> Result<Arc<IpAdapterModel>, IpAdapterLookupError> {
        let entry = self
            .by_path(rel)
            .ok_or_else(|| IpAdapterLookupError::NotFound(rel.to_string()))?;
        if entry.probe.model_type != ModelType::IpAdapter {
            return Err(IpAdapterLookupError::NotIpAdapter {
                name: rel.to_string(),
                kind: entry.probe.model_type,
            });
        }
        // A folder in InvokeAI's layout names its encoder in image_encoder.txt.
        let (file, named) = match entry.probe.format {
            ModelFormat::Diffusers => (
                store::probe::ip_adapter_weights(&entry.path)
                    .ok_or_else(|| IpAdapterLookupError::NotFound(rel.to_string()))?,
                std::fs::read_to_string(entry.path.join("image_encoder.txt"))
                    .ok()
                    .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
                    .filter(|l| !l.is_empty()),
            ),
            ModelFormat::Checkpoint => (entry.path.clone(), None),
        };
        let clip_vision = |path: &str| {
            self.by_path(path)
                .filter(|c| c.probe.model_type == ModelType::ClipVision)
        };
        let encoder = match (encoder, named) {
            (Some(e), _) => {
                clip_vision(e)
                    .ok_or_else(|| IpAdapterLookupError::NoEncoder(e.to_string()))?
                    .path
            }
            (None, Some(id)) => self
                .encoder_named(&id)
                .ok_or(IpAdapterLookupError::EncoderNotFound(id))?,
            (None, None) => {
                let beside = Path::new(rel)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join("image_encoder");
                clip_vision(&beside.to_string_lossy())
                    .ok_or_else(|| IpAdapterLookupError::EncoderUnknown(rel.to_string()))?
                    .path
            }
        };
        // The cache reads safetensors: a pickled adapter is converted once.
        let file = convert::converted_safetensors(&self.state_dir, &file).map_err(|e| {
            IpAdapterLookupError::Model {
                name: rel.to_string(),
                source: e.into(),
            }
        })?;
        IpAdapterModel::open(&file, &encoder)
            .map(Arc::new)
            .map_err(|source| IpAdapterLookupError::Model {
                name: rel.to_string(),
                source,
            })
    }

    /// The CLIP Vision folder an IP-Adapter folder's `image_encoder.txt`
    /// names: by its path under the models folder, by its folder's name, or
    /// by the encoder InvokeAI installs for `ViT-H` / `ViT-G`.
    fn encoder_named(&self, id: &str) -> Option<PathBuf> {
        let alias = match id {
            "ViT-H" => "ip_adapter_sd_image_encoder",
            "ViT-G" => "ip_adapter_sdxl_image_encoder",
            "ViT-L" => "clip-vit-large-patch14",
            other => other,
        };
        let models = self.models();
        let vision = || {
            models
                .found
                .values()
                .filter(|c| c.probe.model_type == ModelType::ClipVision)
        };
        vision()
            .find(|c| c.rel_path == id)
            .or_else(|| {
                vision().find(|c| {
                    Path::new(&c.rel_path)
                        .file_name()
                        .is_some_and(|n| n == id || n == alias)
                })
            })
            .map(|c| c.path.clone())
    }

    /// The pipeline of a model: single-file checkpoints are converted once into
    /// the state folder (never next to the model), then opened.
    pub fn open(&self, name: &str) -> Result<Arc<DiffusersModel>, CatalogError> {
        let entry = self
            .get(name)
            .ok_or_else(|| CatalogError::Unknown(name.to_string()))?;
        self.open_as(entry, false)
    }

    /// The pipeline of the SDXL refiner at `rel` under the models folder,
    /// converted like [`Catalog::open`]. Only what the last scan found is
    /// found here, so a path cannot reach outside the folder.
    pub fn refiner(&self, rel: &str) -> Result<Arc<DiffusersModel>, CatalogError> {
        let entry = self
            .by_path(rel)
            .ok_or_else(|| CatalogError::Unknown(rel.to_string()))?;
        self.open_as(entry, true)
    }

    fn open_as(
        &self,
        entry: CatalogEntry,
        refiner: bool,
    ) -> Result<Arc<DiffusersModel>, CatalogError> {
        let name = entry.name.as_str();
        if let Some(m) = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .filter(|m| m.refiner == refiner)
        {
            return Ok(m.clone());
        }
        let model_err = |source: ModelError| CatalogError::Model {
            path: entry.path.clone(),
            source,
        };
        let dir = match entry.probe.format {
            ModelFormat::Diffusers => entry.path.clone(),
            ModelFormat::Checkpoint => convert::converted(
                &self.state_dir,
                &entry.path,
                store::config_beside(&entry.path).as_deref(),
                self.tokenizer_dir.as_deref(),
            )
            .map_err(|e| model_err(e.into()))?,
        };
        let open = if refiner {
            DiffusersModel::open_refiner
        } else {
            DiffusersModel::open
        };
        let model = Arc::new(open(&dir).map_err(model_err)?);
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), model.clone());
        Ok(model)
    }
}
