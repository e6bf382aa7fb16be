//! Writing `replicas` through the scale subresource, as `kubectl scale` and
//! HPAs do, and only if it still holds the value the writer decided from: a
//! person's or another component's change made meanwhile wins.

use kube::api::{Patch, PatchParams};
use kube::Api;
use modelcache_crds::ModelDeployment;

/// Why replicas were not changed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// `spec.replicas` no longer held the expected value (not an error for callers
    /// that only wanted it raised or lowered from what they saw).
    #[error("replicas changed meanwhile")]
    Changed,
    #[error("patching the scale subresource: {0}")]
    Api(#[source] kube::Error),
    #[error("building the patch: {0}")]
    Patch(#[source] serde_json::Error),
}

/// Sets `replicas` of `name` from `from` to `to`.
pub async fn set_replicas(
    api: &Api<ModelDeployment>,
    name: &str,
    from: i32,
    to: i32,
) -> Result<(), ScaleError> {
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/spec/replicas", "value": from},
        {"op": "replace", "path": "/spec/replicas", "value": to},
    ]))
    .map_err(ScaleError::Patch)?;
    match api
        .patch_scale(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        // A failed `test` is 422 (Invalid) from kube-apiserver.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => Err(ScaleError::Changed),
        Err(e) => Err(ScaleError::Api(e)),
    }
}
