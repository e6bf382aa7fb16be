//! Writing `replicas` through the scale subresource, as `kubectl scale` and
//! the HorizontalPodAutoscaler do, and only if it still holds the value the
//! writer decided from: a change made meanwhile by a person or another
//! component wins.
//!
//! It reads the Scale and writes it back with its resourceVersion (the HPA's
//! way) rather than a JSON patch that tests the old value: the API server
//! leaves zero replicas out of a Scale, so a test of `/spec/replicas` against
//! 0 could never pass.

use kube::api::PostParams;
use kube::Api;
use modelcache_crds::ModelDeployment;

/// Why replicas were not changed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// `spec.replicas` no longer held the expected value, or changed between
    /// the read and the write.
    #[error("replicas changed meanwhile")]
    Changed,
    #[error("the scale subresource: {0}")]
    Api(#[source] kube::Error),
}

/// Sets `replicas` of `name` from `from` to `to`.
pub async fn set_replicas(
    api: &Api<ModelDeployment>,
    name: &str,
    from: i32,
    to: i32,
) -> Result<(), ScaleError> {
    let mut scale = api.get_scale(name).await.map_err(ScaleError::Api)?;
    let spec = scale.spec.get_or_insert_with(Default::default);
    if spec.replicas.unwrap_or(0) != from {
        return Err(ScaleError::Changed);
    }
    spec.replicas = Some(to);
    match api
        .replace_scale(name, &PostParams::default(), &scale)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(ScaleError::Changed),
        Err(e) => Err(ScaleError::Api(e)),
    }
}
