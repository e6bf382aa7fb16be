//! Validation of custom resources against a CRD, the way kube-apiserver does it:
//! defaults, the structural openAPIV3Schema (types, enums, ranges, lengths,
//! patterns, required and unknown fields) and the `x-kubernetes-validations`
//! CEL rules (evaluated by kube-rs' `kube-cel`).
//!
//! Used by the tests that check the examples and by the end-to-end API
//! emulation, so both refuse bad resources with the messages a user would see
//! from a real API server (`spec.replicas: Invalid value: 1001: spec.replicas in
//! body should be less than or equal to 1000`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_cel::{CompiledSchema, ErrorKind};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;

/// One invalid field, formatted like the API server's `field.Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted path of the field (`spec.model.path`).
    pub path: String,
    /// API server reason: FieldValueInvalid, FieldValueRequired, …
    pub reason: &'static str,
    /// The whole message, as the API server prints it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a CRD cannot be used for validation.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("CRD {crd} has no version {version}")]
    NoSuchVersion { crd: String, version: String },
    #[error("CRD {crd} version {version} has no openAPIV3Schema")]
    NoSchema { crd: String, version: String },
    #[error("cannot serialize the schema of CRD {crd}: {source}")]
    Serialize {
        crd: String,
        source: serde_json::Error,
    },
    #[error("CRD {crd} has CEL rules that do not compile: {errors}")]
    Cel { crd: String, errors: String },
    #[error("CRD {crd} has an invalid pattern {pattern:?}: {source}")]
    Pattern {
        crd: String,
        pattern: String,
        source: regex::Error,
    },
}

/// A compiled validator for one version of one CRD.
pub struct CrdValidator {
    kind: String,
    group: String,
    schema: Value,
    compiled: CompiledSchema,
    patterns: Patterns,
}

impl CrdValidator {
    /// Prepares the schema of `version` of `crd`; fails when a CEL rule or a
    /// pattern in it does not compile, so a broken CRD is caught once, up front.
    pub fn new(crd: &CustomResourceDefinition, version: &str) -> Result<Self, SchemaError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let v = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .ok_or_else(|| SchemaError::NoSuchVersion {
                crd: name.clone(),
                version: version.into(),
            })?;
        let schema = v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| SchemaError::NoSchema {
                crd: name.clone(),
                version: version.into(),
            })?;
        let schema = serde_json::to_value(schema).map_err(|source| SchemaError::Serialize {
            crd: name.clone(),
            source,
        })?;
        let mut patterns = Patterns::new();
        compile_patterns(&schema, &name, &mut patterns)?;
        let compiled = kube_cel::compile_schema(&schema);
        if compiled.has_errors() {
            let errors = compiled
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(SchemaError::Cel { crd: name, errors });
        }
        Ok(CrdValidator {
            kind: crd.spec.names.kind.clone(),
            group: crd.spec.group.clone(),
            schema,
            compiled,
            patterns,
        })
    }

    /// The schema defaults applied to `object`, as the API server stores it.
    pub fn apply_defaults(&self, object: &Value) -> Value {
        kube_cel::apply_defaults(&self.schema, object)
    }

    /// Validates an object (after defaulting), and with `old` the CEL transition
    /// rules of an update. Returns every invalid field.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let defaulted = self.apply_defaults(object);
        let mut errors = Vec::new();
        if let Value::Object(map) = &defaulted {
            // apiVersion, kind and metadata are checked by the API machinery, not the CRD schema.
            let mut body = map.clone();
            for k in ["apiVersion", "kind", "metadata"] {
                body.remove(k);
            }
            check(
                &self.schema,
                &Value::Object(body),
                "",
                &self.patterns,
                &mut errors,
            );
        } else {
            check(&self.schema, &defaulted, "", &self.patterns, &mut errors);
        }
        if !errors.is_empty() {
            // CEL rules over ill-typed data only add confusing follow-on errors.
            return errors;
        }
        if let Err(cel) = kube_cel::validate_compiled(&self.compiled, &defaulted, old) {
            for e in cel.iter() {
                let path = if e.field_path.is_empty() {
                    "<root>".to_string()
                } else {
                    e.field_path.clone()
                };
                // The API server shows a scalar's value, and nothing for an
                // object, whose path at the root is `<nil>`.
                let message = match (&e.kind, value_at(&defaulted, &e.field_path)) {
                    (ErrorKind::ValidationFailure, Some(v)) if !v.is_object() && !v.is_array() => {
                        format!("{path}: Invalid value: {}: {}", show(v), e.message)
                    }
                    (ErrorKind::ValidationFailure, _) => {
                        let path = if e.field_path.is_empty() {
                            "<nil>"
                        } else {
                            &path
                        };
                        format!("{path}: Invalid value: {}", e.message)
                    }
                    _ => format!("{path}: Internal error: {}", e.message),
                };
                errors.push(FieldError {
                    path,
                    reason: "FieldValueInvalid",
                    message,
                });
            }
        }
        errors
    }

    /// The API server's message for a refused object:
    /// `ModelDeployment.modelcache.io "x" is invalid: [a, b]`.
    pub fn invalid_message(&self, name: &str, errors: &[FieldError]) -> String {
        let list = errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>();
        let body = if list.len() == 1 {
            list[0].to_string()
        } else {
            format!("[{}]", list.join(", "))
        };
        format!(
            "{}.{} \"{}\" is invalid: {}",
            self.kind, self.group, name, body
        )
    }
}

/// The schema's `pattern`s, compiled once.
type Patterns = HashMap<String, regex::Regex>;

fn compile_patterns(schema: &Value, crd: &str, out: &mut Patterns) -> Result<(), SchemaError> {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(p)) = map.get("pattern") {
                let re = regex::Regex::new(p).map_err(|source| SchemaError::Pattern {
                    crd: crd.into(),
                    pattern: p.clone(),
                    source,
                })?;
                out.insert(p.clone(), re);
            }
            map.values().try_for_each(|v| compile_patterns(v, crd, out))
        }
        Value::Array(items) => items.iter().try_for_each(|v| compile_patterns(v, crd, out)),
        _ => Ok(()),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        // Go prints a float64 5.0 as 5.
        Value::Number(n) => n.as_f64().filter(|_| n.is_f64()).map_or(n.to_string(), num),
        other => other.to_string(),
    }
}

/// The value at a field path as the API server writes it (`spec.loras[0].path`).
fn value_at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            v = v.get(key)?;
        }
        for i in indexes.split('[').filter(|i| !i.is_empty()) {
            v = v.get(i.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(v)
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn invalid(errors: &mut Vec<FieldError>, path: &str, value: &Value, detail: String) {
    errors.push(FieldError {
        path: path.into(),
        reason: "FieldValueInvalid",
        message: format!("{path}: Invalid value: {}: {detail}", show(value)),
    });
}

/// The structural part of the API server's validation (k8s.io/apiextensions-apiserver
/// validation), with its message wording.
fn check(
    schema: &Value,
    value: &Value,
    path: &str,
    patterns: &Patterns,
    errors: &mut Vec<FieldError>,
) {
    let Value::Object(s) = schema else { return };
    let shown = if path.is_empty() { "<root>" } else { path };
    if value.is_null() && (s.get("nullable") == Some(&Value::Bool(true)) || s.get("type").is_none())
    {
        return;
    }
    let int_or_string = s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if let Some(Value::String(want)) = s.get("type") {
        let got = type_of(value);
        let ok = got == want.as_str() || (want == "number" && got == "integer") || int_or_string;
        if !ok {
            // The API server shows the type it found, not the value.
            invalid(
                errors,
                shown,
                &Value::String(got.into()),
                format!("{shown} in body must be of type {want}: \"{got}\""),
            );
            return;
        }
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(value) {
            let list = allowed
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            errors.push(FieldError {
                path: shown.into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "{shown}: Unsupported value: {}: supported values: {list}",
                    show(value)
                ),
            });
        }
    }
    if let Some(x) = value.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if x < min {
                invalid(
                    errors,
                    shown,
                    value,
                    format!(
                        "{shown} in body should be greater than or equal to {}",
                        num(min)
                    ),
                );
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if x > max {
                invalid(
                    errors,
                    shown,
                    value,
                    format!(
                        "{shown} in body should be less than or equal to {}",
                        num(max)
                    ),
                );
            }
        }
        if let Some(m) = s.get("multipleOf").and_then(Value::as_f64) {
            if m > 0.0 && (x / m).fract() != 0.0 {
                invalid(
                    errors,
                    shown,
                    value,
                    format!("{shown} in body should be a multiple of {}", num(m)),
                );
            }
        }
    }
    if let Some(text) = value.as_str() {
        let len = text.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if len < min {
                invalid(
                    errors,
                    shown,
                    value,
                    format!("{shown} in body should be at least {min} chars long"),
                );
            }
        }
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                let msg = format!("{shown}: Too long: may not be more than {max} bytes");
                errors.push(FieldError {
                    path: shown.into(),
                    reason: "FieldValueTooLong",
                    message: msg,
                });
            }
        }
        if let Some(Value::String(p)) = s.get("pattern") {
            // Compiled once in CrdValidator::new.
            if let Some(re) = patterns.get(p) {
                if !re.is_match(text) {
                    invalid(
                        errors,
                        shown,
                        value,
                        format!("{shown} in body should match '{p}'"),
                    );
                }
            }
        }
    }
    if let Value::Array(items) = value {
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > max {
                let msg = format!(
                    "{shown}: Too many: {}: must have at most {max} items",
                    items.len()
                );
                errors.push(FieldError {
                    path: shown.into(),
                    reason: "FieldValueTooMany",
                    message: msg,
                });
            }
        }
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                invalid(
                    errors,
                    shown,
                    value,
                    format!("{shown} in body should have at least {min} items"),
                );
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"), patterns, errors);
            }
        }
    }
    if let Value::Object(fields) = value {
        check_object(s, fields, path, patterns, errors);
    }
}

fn check_object(
    s: &Map<String, Value>,
    fields: &Map<String, Value>,
    path: &str,
    patterns: &Patterns,
    errors: &mut Vec<FieldError>,
) {
    let props = s.get("properties").and_then(Value::as_object);
    if let Some(Value::Array(required)) = s.get("required") {
        for r in required.iter().filter_map(Value::as_str) {
            if fields.get(r).is_none_or(Value::is_null) {
                let p = join(path, r);
                errors.push(FieldError {
                    path: p.clone(),
                    reason: "FieldValueRequired",
                    message: format!("{p}: Required value"),
                });
            }
        }
    }
    let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    for (k, v) in fields {
        let p = join(path, k);
        if let Some(sub) = props.and_then(|m| m.get(k)) {
            check(sub, v, &p, patterns, errors);
        } else if let Some(extra) = s.get("additionalProperties").filter(|a| a.is_object()) {
            check(extra, v, &p, patterns, errors);
        } else if !preserve
            && (props.is_some() || s.get("additionalProperties") == Some(&Value::Bool(false)))
        {
            // kubectl's default --validate=strict refuses these (a 400 from
            // the server's strict decoding); other clients see them dropped.
            errors.push(FieldError {
                path: p.clone(),
                reason: "FieldValueInvalid",
                message: format!("strict decoding error: unknown field \"{p}\""),
            });
        }
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}
