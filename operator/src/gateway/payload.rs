//! A request body as the gateway reads it: JSON (`/v1/images/generations`)
//! or a multipart form (`/v1/images/edits`). The gateway needs only its
//! `model`, which it rewrites to `namespace/name` for the agent, and its
//! `loras`, which adapter affinity hashes; every other field and file passes
//! through as sent.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use axum::http::{header, HeaderMap, HeaderValue, Request};
use hyper::body::Bytes;
use serde_json::Value;

/// Why a body cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("invalid JSON body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid multipart/form-data body: {0}")]
    Form(String),
}

/// One part of a form, kept as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// A body the gateway can rewrite and send on.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Value),
    Form(Vec<Part>),
}

/// Whether a request's headers announce a multipart form.
pub fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("multipart/form-data"))
}

impl Payload {
    /// Whether a JSON body carries images (control images, an image
    /// prompt): only such bodies may be larger than `--max-body-bytes`, as
    /// on the agents.
    pub fn carries_images(&self) -> bool {
        let Payload::Json(v) = self else {
            return false;
        };
        let controls = v["controlnet"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["image"].is_string()));
        controls || v["ip_adapter"]["image"].is_string()
    }

    /// Reads `bytes`, as a form when the headers say so, else as JSON.
    pub async fn read(headers: &HeaderMap, bytes: Bytes) -> Result<Payload, PayloadError> {
        if !is_form(headers) {
            return Ok(Payload::Json(serde_json::from_slice(&bytes)?));
        }
        let mut req = Request::new(Body::from(bytes));
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            req.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        }
        let form = |e: String| PayloadError::Form(e);
        let mut m = Multipart::from_request(req, &())
            .await
            .map_err(|e| form(e.body_text()))?;
        let mut parts = Vec::new();
        while let Some(field) = m.next_field().await.map_err(|e| form(e.body_text()))? {
            let name = field.name().unwrap_or_default().to_string();
            let filename = field.file_name().map(str::to_string);
            let content_type = field.content_type().map(str::to_string);
            let data = field.bytes().await.map_err(|e| form(e.body_text()))?;
            parts.push(Part {
                name,
                filename,
                content_type,
                data,
            });
        }
        Ok(Payload::Form(parts))
    }

    /// The `model` field, if it is text.
    pub fn model(&self) -> Option<String> {
        match self {
            Payload::Json(v) => v.get("model").and_then(Value::as_str).map(str::to_string),
            Payload::Form(parts) => parts
                .iter()
                .find(|p| p.name == "model" && p.filename.is_none())
                .and_then(|p| std::str::from_utf8(&p.data).ok())
                .map(|s| s.trim().to_string()),
        }
    }

    /// Replaces the `model` field.
    pub fn set_model(&mut self, model: &str) {
        match self {
            Payload::Json(v) => v["model"] = Value::String(model.to_string()),
            Payload::Form(parts) => {
                for p in parts.iter_mut().filter(|p| p.name == "model") {
                    p.data = Bytes::from(model.to_string());
                }
            }
        }
    }

    /// The fields balancing looks at, as JSON: only `loras` (a form's is a
    /// JSON text), so a request's prompt is not copied for it.
    pub fn balance_view(&self) -> Value {
        let loras = match self {
            Payload::Json(v) => v.get("loras").cloned(),
            Payload::Form(parts) => parts
                .iter()
                .find(|p| p.name == "loras")
                .and_then(|p| serde_json::from_slice::<Value>(&p.data).ok()),
        };
        serde_json::json!({ "loras": loras.unwrap_or(Value::Null) })
    }

    /// The body to send and its content type.
    pub fn encode(&self) -> Result<(HeaderValue, Bytes), serde_json::Error> {
        match self {
            Payload::Json(v) => Ok((
                HeaderValue::from_static("application/json"),
                Bytes::from(serde_json::to_vec(v)?),
            )),
            Payload::Form(parts) => {
                let boundary = boundary_for(parts);
                let mut out = Vec::new();
                for p in parts {
                    out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
                    let mut disposition = format!(
                        "Content-Disposition: form-data; name=\"{}\"",
                        quoted(&p.name)
                    );
                    if let Some(f) = &p.filename {
                        disposition.push_str(&format!("; filename=\"{}\"", quoted(f)));
                    }
                    out.extend_from_slice(disposition.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    if let Some(ct) = &p.content_type {
                        out.extend_from_slice(
                            format!("Content-Type: {}\r\n", quoted(ct)).as_bytes(),
                        );
                    }
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&p.data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
                let ct =
                    HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                        .unwrap_or_else(|_| HeaderValue::from_static("multipart/form-data"));
                Ok((ct, Bytes::from(out)))
            }
        }
    }
}

/// A boundary that occurs in no part, so that no file can end the form early.
fn boundary_for(parts: &[Part]) -> String {
    (0u64..)
        .map(|n| format!("modelcache-form-boundary-{n}"))
        .find(|b| {
            !parts
                .iter()
                .any(|p| p.data.windows(b.len()).any(|w| w == b.as_bytes()))
        })
        .unwrap_or_default()
}

/// A header parameter's text with the characters that would end it replaced.
fn quoted(s: &str) -> String {
    s.chars()
        .map(|c| {
            if matches!(c, '"' | '\r' | '\n' | '\\') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form_headers(ct: &HeaderValue) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.clone());
        h
    }

    #[tokio::test]
    async fn a_form_round_trips_with_its_model_rewritten_and_its_files_intact() {
        let image: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let form = Payload::Form(vec![
            Part {
                name: "model".into(),
                filename: None,
                content_type: None,
                data: Bytes::from("alpha"),
            },
            Part {
                name: "image".into(),
                filename: Some("a \"cat\".png".into()),
                content_type: Some("image/png".into()),
                data: Bytes::from(image.clone()),
            },
            Part {
                name: "loras".into(),
                filename: None,
                content_type: None,
                data: Bytes::from(r#"[{"path": "a.safetensors"}]"#),
            },
        ]);
        let (ct, bytes) = form.encode().unwrap();
        let mut read = Payload::read(&form_headers(&ct), bytes).await.unwrap();
        assert_eq!(read.model().as_deref(), Some("alpha"));
        read.set_model("ml/alpha");
        let (ct, bytes) = read.encode().unwrap();
        let again = Payload::read(&form_headers(&ct), bytes).await.unwrap();
        assert_eq!(again.model().as_deref(), Some("ml/alpha"));
        let Payload::Form(parts) = &again else {
            panic!("not a form")
        };
        assert_eq!(parts[1].data, image, "the file is passed on byte for byte");
        assert_eq!(parts[1].filename.as_deref(), Some("a _cat_.png"));
        assert_eq!(again.balance_view()["loras"][0]["path"], "a.safetensors");
    }

    #[tokio::test]
    async fn bodies_that_are_not_what_they_claim_are_refused() {
        let ct = HeaderValue::from_static("multipart/form-data; boundary=x");
        let e = Payload::read(&form_headers(&ct), Bytes::from("not a form"))
            .await
            .unwrap_err();
        assert!(matches!(e, PayloadError::Form(_)), "{e}");
        let e = Payload::read(&HeaderMap::new(), Bytes::from("{"))
            .await
            .unwrap_err();
        assert!(matches!(e, PayloadError::Json(_)), "{e}");
    }
}
