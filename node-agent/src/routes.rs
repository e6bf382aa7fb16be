//! Which model a request's `model` names.
//!
//! Standalone, every servable model of the catalog is served by its name.
//! In cluster mode only the ModelDeployments whose placement on this node is
//! Ready are, by `namespace/name` or by `name` alone when that is unambiguous;
//! the cluster side replaces the table whenever a placement changes.

use crate::catalog::Catalog;
use modelcache_crds::{GenerationDefaults, LoraSpec, Precision};
use std::collections::HashMap;
use std::sync::RwLock;

/// A ModelDeployment this agent serves in cluster mode (its placement here is Ready).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `namespace/name`.
    pub deployment: String,
    /// Catalog name of the model.
    pub model: String,
    /// Adapters applied to every request, before the request's own.
    pub loras: Vec<LoraSpec>,
    /// The VAE used unless a request names another (`spec.vae`).
    pub vae: Option<String>,
    /// The SDXL refiner used unless a request names another (`spec.refiner`).
    pub refiner: Option<String>,
    /// What its weights are computed in on GPUs (`spec.precision`).
    pub precision: Precision,
    /// Values for what a request leaves out.
    pub defaults: GenerationDefaults,
}

/// Why a request's `model` names nothing served here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("model {0:?} does not exist; see GET /v1/models")]
    Unknown(String),
    #[error("model {0:?} is not served here: no ModelDeployment of that name has a Ready placement on this node; see GET /v1/models")]
    NotPlaced(String),
    #[error("model {0:?} names ModelDeployments in several namespaces; use \"namespace/name\"")]
    Ambiguous(String),
}

/// The model a request is for: the catalog name and, in cluster mode, the
/// deployment whose settings apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub model: String,
    pub route: Option<Route>,
}

impl Target {
    /// The name metrics and logs use: the deployment in cluster mode, else the model.
    pub fn label(&self) -> &str {
        self.route
            .as_ref()
            .map_or(self.model.as_str(), |r| r.deployment.as_str())
    }
}

/// The routing table; `None` until cluster mode sets one (standalone).
#[derive(Debug, Default)]
pub struct Routes(RwLock<Option<HashMap<String, Route>>>);

impl Routes {
    /// Switches to cluster mode's routing and replaces what is served.
    pub fn set(&self, routes: HashMap<String, Route>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(routes);
    }

    /// The deployments served, sorted; `None` standalone.
    pub fn deployments(&self) -> Option<Vec<Route>> {
        let routes = self.0.read().unwrap_or_else(|p| p.into_inner());
        routes.as_ref().map(|r| {
            let mut v: Vec<Route> = r.values().cloned().collect();
            v.sort_by(|a, b| a.deployment.cmp(&b.deployment));
            v
        })
    }

    /// What a request's `model` names: `name` or `namespace/name` (standalone
    /// also accepts the `default/` prefix clients of a cluster would send).
    pub fn resolve(&self, catalog: &Catalog, requested: &str) -> Result<Target, RouteError> {
        let routes = self.0.read().unwrap_or_else(|p| p.into_inner());
        let Some(routes) = routes.as_ref() else {
            let name = requested.strip_prefix("default/").unwrap_or(requested);
            return match catalog.get(name) {
                Some(_) => Ok(Target {
                    model: name.to_string(),
                    route: None,
                }),
                None => Err(RouteError::Unknown(requested.to_string())),
            };
        };
        resolve_route(routes, requested)
    }
}

/// Cluster mode's lookup: the exact `namespace/name`, or a `name` that only
/// one namespace has.
fn resolve_route(routes: &HashMap<String, Route>, requested: &str) -> Result<Target, RouteError> {
    let target = |r: &Route| Target {
        model: r.model.clone(),
        route: Some(r.clone()),
    };
    if let Some(r) = routes.get(requested) {
        return Ok(target(r));
    }
    let mut by_name = routes
        .values()
        .filter(|r| r.deployment.rsplit('/').next() == Some(requested));
    match (by_name.next(), by_name.next()) {
        (Some(r), None) => Ok(target(r)),
        (Some(_), Some(_)) => Err(RouteError::Ambiguous(requested.to_string())),
        (None, _) => Err(RouteError::NotPlaced(requested.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(deployments: &[(&str, &str)]) -> HashMap<String, Route> {
        deployments
            .iter()
            .map(|(d, m)| {
                (
                    d.to_string(),
                    Route {
                        deployment: d.to_string(),
                        model: m.to_string(),
                        loras: Vec::new(),
                        vae: None,
                        refiner: None,
                        precision: Precision::F16,
                        defaults: GenerationDefaults::default(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn names_resolve_by_namespace_or_alone_when_unambiguous() {
        let t = table(&[("ml/sd", "m1"), ("art/sd", "m2"), ("ml/xl", "m3")]);
        assert_eq!(resolve_route(&t, "art/sd").unwrap().model, "m2");
        let xl = resolve_route(&t, "xl").unwrap();
        assert_eq!((xl.model.as_str(), xl.label()), ("m3", "ml/xl"));
        assert_eq!(
            resolve_route(&t, "sd"),
            Err(RouteError::Ambiguous("sd".into()))
        );
        assert_eq!(
            resolve_route(&t, "other"),
            Err(RouteError::NotPlaced("other".into()))
        );
        assert_eq!(
            resolve_route(&t, "ml/other"),
            Err(RouteError::NotPlaced("ml/other".into()))
        );
    }

    #[test]
    fn cluster_mode_lists_only_its_deployments() {
        let routes = Routes::default();
        assert_eq!(routes.deployments(), None, "standalone until set");
        routes.set(table(&[("b/x", "m"), ("a/y", "m")]));
        let listed: Vec<String> = routes
            .deployments()
            .unwrap()
            .into_iter()
            .map(|r| r.deployment)
            .collect();
        assert_eq!(listed, ["a/y", "b/x"]);
    }
}
