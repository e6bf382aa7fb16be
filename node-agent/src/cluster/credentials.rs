//! How the agent reaches a deployment's `spec.model.source`: the endpoint
//! and region from the spec, the keys from the Secret it names (in the
//! agents' namespace, and only one labelled for this use, so that a
//! deployment cannot have the agents send an unrelated Secret to an
//! endpoint of its choosing) or from the agent's own environment.

use crate::fetch::Access;
use k8s_openapi::api::core::v1::Secret;
use modelcache_crds::RemoteSource;

/// The label a Secret must carry for the agents to use it as source credentials.
pub const CREDENTIALS_LABEL: &str = "modelcache.io/source-credentials";

/// Keys read from a credentials Secret.
pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const HF_TOKEN: &str = "HF_TOKEN";

/// Why credentials could not be had. Names Secrets and keys, never values.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("spec.model.source.secretName {0:?} is not labelled {CREDENTIALS_LABEL}=\"true\"; the agents use only Secrets labelled for source credentials")]
    NotLabelled(String),
    #[error("spec.model.source.secretName {0:?} has none of {AWS_ACCESS_KEY_ID} with {AWS_SECRET_ACCESS_KEY}, or {HF_TOKEN}")]
    Empty(String),
    #[error("spec.model.source.secretName {name:?}: key {key} is not UTF-8")]
    NotText { name: String, key: &'static str },
    #[error("spec.model.source.secretName {name:?}: {message}")]
    Get { name: String, message: String },
}

/// The access to `source`: its endpoint and region, with the keys of
/// `secret` (already fetched from the agents' namespace) or, without one,
/// `env_token` for the default Hugging Face hub only (the S3 client reads
/// the agent's `AWS_*` variables itself).
pub fn access(
    source: &RemoteSource,
    secret: Option<&Secret>,
    env_token: Option<String>,
) -> Result<Access, CredentialsError> {
    let mut access = Access {
        endpoint: source.endpoint.clone(),
        region: source.region.clone(),
        ..Access::default()
    };
    let Some(secret) = secret else {
        // The agent's own token goes only where it was meant for.
        if source.endpoint.is_none() {
            access.token = env_token;
        }
        return Ok(access);
    };
    let name = source.secret_name.clone().unwrap_or_default();
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(CREDENTIALS_LABEL))
        .is_some_and(|v| v == "true");
    if !labelled {
        return Err(CredentialsError::NotLabelled(name));
    }
    let value = |key: &'static str| -> Result<Option<String>, CredentialsError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.clone().into_bytes())
            });
        bytes
            .map(|b| {
                String::from_utf8(b)
                    .map(|s| s.trim().to_string())
                    .map_err(|_| CredentialsError::NotText {
                        name: name.clone(),
                        key,
                    })
            })
            .transpose()
    };
    access.access_key_id = value(AWS_ACCESS_KEY_ID)?;
    access.secret_access_key = value(AWS_SECRET_ACCESS_KEY)?;
    access.token = value(HF_TOKEN)?;
    let s3 = access.access_key_id.is_some() && access.secret_access_key.is_some();
    if !s3 && access.token.is_none() {
        return Err(CredentialsError::Empty(name));
    }
    Ok(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn source(secret: Option<&str>, endpoint: Option<&str>) -> RemoteSource {
        RemoteSource {
            url: "s3://models/sd15".into(),
            endpoint: endpoint.map(Into::into),
            region: Some("eu-west-1".into()),
            secret_name: secret.map(Into::into),
        }
    }

    fn secret(labelled: bool, data: &[(&str, &[u8])]) -> Secret {
        let mut s = Secret::default();
        if labelled {
            s.metadata.labels = Some([(CREDENTIALS_LABEL.to_string(), "true".to_string())].into());
        }
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        );
        s
    }

    #[test]
    fn keys_come_from_a_labelled_secret_and_errors_never_show_them() {
        let src = source(Some("s3-keys"), Some("http://seaweed:8333"));
        let s = secret(
            true,
            &[
                (AWS_ACCESS_KEY_ID, b"AKIDEXAMPLE\n"),
                (AWS_SECRET_ACCESS_KEY, b"hunter2-secret"),
            ],
        );
        let a = access(&src, Some(&s), None).unwrap();
        assert_eq!(a.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(a.endpoint.as_deref(), Some("http://seaweed:8333"));
        assert_eq!(a.region.as_deref(), Some("eu-west-1"));
        assert!(!format!("{a:?}").contains("hunter2"));

        let unlabelled = secret(false, &[(AWS_SECRET_ACCESS_KEY, b"hunter2-secret")]);
        let e = access(&src, Some(&unlabelled), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not labelled") && !e.contains("hunter2"), "{e}");
        let half = secret(true, &[(AWS_SECRET_ACCESS_KEY, b"hunter2-secret")]);
        let e = access(&src, Some(&half), None).unwrap_err().to_string();
        assert!(e.contains("has none of") && !e.contains("hunter2"), "{e}");
        let binary = secret(true, &[(HF_TOKEN, &[0xff, 0xfe])]);
        let e = access(&src, Some(&binary), None).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn the_agents_own_token_goes_only_to_the_default_hub() {
        let token = || Some("hf_agent".to_string());
        let a = access(&source(None, None), None, token()).unwrap();
        assert_eq!(a.token.as_deref(), Some("hf_agent"));
        let a = access(&source(None, Some("https://mirror.example")), None, token()).unwrap();
        assert_eq!(a.token, None);
    }
}
