//! Merging two or three models tensor by tensor, streaming so
//! that memory stays near one tensor per input, with the formula InvokeAI
//! meant for `add_difference` (it silently ran a weighted sum instead).

use super::error::{Result, StoreError};
use super::index::TensorIndex;
use super::load::read_bytes;
use super::{component_weights, open_weights, probe, read_json};
use modelcache_crds::{ModelVariant, Precision};
use safetensors::Dtype;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How two or three models are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `(1 − α)·θ0 + α·θ1`
    WeightedSum,
    /// Smoothstep: `θ0 + (θ1 − θ0)·α²(3 − 2α)`
    Sigmoid,
    /// Inverse smoothstep: `θ0 + (θ1 − θ0)·(0.5 − sin(asin(1 − 2α)/3))`
    InvSigmoid,
    /// `θ0 + (θ1 − θ2)·(1 − α)` (three models)
    AddDifference,
}

/// A merge method name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown merge method {0:?}; expected weighted-sum, sigmoid, inv-sigmoid or add-difference"
)]
pub struct UnknownMethod(pub String);

impl std::str::FromStr for Method {
    type Err = UnknownMethod;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownMethod> {
        match s.replace('-', "_").as_str() {
            "weighted_sum" => Ok(Method::WeightedSum),
            "sigmoid" => Ok(Method::Sigmoid),
            "inv_sigmoid" => Ok(Method::InvSigmoid),
            "add_difference" | "add_diff" => Ok(Method::AddDifference),
            _ => Err(UnknownMethod(s.to_string())),
        }
    }
}

/// The interpolation factor a method uses for `alpha`.
pub fn factor(method: Method, alpha: f64) -> f64 {
    match method {
        Method::WeightedSum => alpha,
        Method::Sigmoid => alpha * alpha * (3.0 - 2.0 * alpha),
        Method::InvSigmoid => 0.5 - ((1.0 - 2.0 * alpha).asin() / 3.0).sin(),
        Method::AddDifference => 1.0 - alpha,
    }
}

/// One merged value.
pub fn merge_value(method: Method, f: f64, a: f32, b: f32, c: f32) -> f32 {
    let (a, b, c) = (a as f64, b as f64, c as f64);
    (match method {
        Method::WeightedSum => (1.0 - f) * a + f * b,
        Method::Sigmoid | Method::InvSigmoid => a + (b - a) * f,
        Method::AddDifference => a + (b - c) * f,
    }) as f32
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn from_f32(v: &[f32], p: Precision) -> Vec<u8> {
    match p {
        Precision::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Precision::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Precision::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn st_dtype(p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::BF16 => Dtype::BF16,
    }
}

/// What to merge.
pub struct MergeRequest<'a> {
    pub inputs: &'a [PathBuf],
    pub out: &'a Path,
    pub method: Method,
    pub alpha: f64,
    pub precision: Precision,
    /// Merge models of different bases or incompatible layouts anyway.
    pub force: bool,
}

/// Counts of what a merge did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub merged: usize,
    pub copied: usize,
    pub skipped_components: Vec<String>,
}

/// Merges one set of weight files (same keys) into `out`, one tensor at a time.
/// Tensors missing from another input, of other shapes, or not floating point
/// are copied from the first input.
fn merge_files(
    inputs: &[TensorIndex],
    out: &Path,
    req: &MergeRequest,
    report: &mut MergeReport,
) -> Result<()> {
    let first = &inputs[0];
    let f = factor(req.method, req.alpha);
    let plan: Vec<(usize, bool, Dtype, u64)> = first
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mergeable = t.is_float()
                && inputs[1..].iter().all(|x| {
                    x.get(&t.name)
                        .is_some_and(|o| o.shape == t.shape && o.is_float())
                });
            let dtype = if t.is_float() {
                st_dtype(req.precision)
            } else {
                t.dtype
            };
            let len = if t.is_float() {
                t.numel() * req.precision.element_bytes()
            } else {
                t.len
            };
            (i, mergeable, dtype, len)
        })
        .collect();
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (i, _, dtype, len) in &plan {
        let t = &first.tensors[*i];
        header.insert(t.name.clone(), serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| StoreError::invalid(out, e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let io = |e| StoreError::Io {
        path: out.to_path_buf(),
        source: e,
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&text).map_err(io)?;
    for (i, mergeable, _, _) in plan {
        let t = &first.tensors[i];
        let bad = |path: &Path| StoreError::Tensor {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            reason: "not a float tensor".into(),
        };
        let a = read_bytes(first, t)?;
        let bytes = if !t.is_float() {
            a
        } else if !mergeable {
            report.copied += 1;
            from_f32(
                &to_f32(&a, t.dtype).ok_or_else(|| bad(&first.path))?,
                req.precision,
            )
        } else {
            let a = to_f32(&a, t.dtype).ok_or_else(|| bad(&first.path))?;
            let other = |k: usize| -> Result<Vec<f32>> {
                let idx = &inputs[k];
                let m = idx.get(&t.name).ok_or_else(|| bad(&idx.path))?;
                to_f32(&read_bytes(idx, m)?, m.dtype).ok_or_else(|| bad(&idx.path))
            };
            let b = other(1)?;
            let c = if inputs.len() > 2 {
                other(2)?
            } else {
                vec![0.0; a.len()]
            };
            report.merged += 1;
            let merged: Vec<f32> = a
                .iter()
                .zip(&b)
                .zip(&c)
                .map(|((x, y), z)| merge_value(req.method, f, *x, *y, *z))
                .collect();
            from_f32(&merged, req.precision)
        };
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Merges 2 or 3 single-file checkpoints or diffusers folders (not mixed).
pub fn merge(req: &MergeRequest) -> Result<MergeReport> {
    let first = req
        .inputs
        .first()
        .ok_or_else(|| StoreError::invalid(req.out, "nothing to merge"))?;
    let n = req.inputs.len();
    if !(2..=3).contains(&n) {
        return Err(StoreError::invalid(
            first,
            format!("merge takes 2 or 3 models, got {n}"),
        ));
    }
    if (n == 3) != (req.method == Method::AddDifference) {
        return Err(StoreError::invalid(
            first,
            "add-difference takes exactly 3 models; the other methods take 2",
        ));
    }
    if !(0.0..=1.0).contains(&req.alpha) {
        return Err(StoreError::invalid(first, "alpha must be from 0 to 1"));
    }
    let probes = req
        .inputs
        .iter()
        .map(|p| probe(p))
        .collect::<Result<Vec<_>>>()?;
    for (p, r) in req.inputs.iter().zip(&probes) {
        if r.variant.is_some_and(|v| v != ModelVariant::Normal) && !req.force {
            return Err(StoreError::invalid(
                p,
                format!(
                    "is an {} model; merging is for normal models (--force to merge anyway)",
                    r.variant.map_or("", |v| v.as_str())
                ),
            ));
        }
        if r.format != probes[0].format {
            return Err(StoreError::invalid(p, "mixes a single-file checkpoint with a diffusers folder; convert the checkpoint first (modelcache-agent convert)"));
        }
        if r.base != probes[0].base && !req.force {
            return Err(StoreError::invalid(
                p,
                format!("has base {:?} but {} has {:?}; models of different bases do not merge meaningfully (--force to merge anyway)", r.base, first.display(), probes[0].base),
            ));
        }
    }
    let mut report = MergeReport::default();
    if first.is_file() {
        let indexes = req
            .inputs
            .iter()
            .map(|p| open_weights(p))
            .collect::<Result<Vec<_>>>()?;
        merge_files(&indexes, req.out, req, &mut report)?;
        return Ok(report);
    }
    // Diffusers folders: compatible indexes, then component by component.
    let strip = |v: serde_json::Value| -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter().filter(|(k, _)| !k.starts_with('_')).collect(),
            ),
            other => other,
        }
    };
    let index0 = read_json(&first.join("model_index.json"))?;
    for p in &req.inputs[1..] {
        if strip(read_json(&p.join("model_index.json"))?) != strip(index0.clone()) && !req.force {
            return Err(StoreError::invalid(p, format!("model_index.json differs from {}'s (other components); --force to merge anyway", first.display())));
        }
    }
    copy_tree_except_weights(first, req.out)?;
    let components: Vec<String> = index0
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, v)| !k.starts_with('_') && v.is_array())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    for c in components {
        let files: Vec<Vec<PathBuf>> = req
            .inputs
            .iter()
            .map(|p| component_weights(&p.join(&c)))
            .collect::<Result<_>>()?;
        if files[0].is_empty() {
            continue;
        }
        let same_shards = files.iter().all(|f| f.len() == files[0].len());
        for (k, file0) in files[0].iter().enumerate() {
            let out = req.out.join(&c).join(file0.file_name().unwrap_or_default());
            let indexes = if same_shards {
                files
                    .iter()
                    .map(|f| open_weights(&f[k]))
                    .collect::<Result<Vec<_>>>()?
            } else {
                vec![open_weights(file0)?]
            };
            let keys = |i: &TensorIndex| {
                i.names()
                    .map(str::to_string)
                    .collect::<std::collections::BTreeSet<_>>()
            };
            if indexes.len() < req.inputs.len()
                || indexes[1..].iter().any(|i| keys(i) != keys(&indexes[0]))
            {
                // Different layouts: keep the first model's component, as InvokeAI does.
                report.skipped_components.push(c.clone());
                merge_files(
                    &indexes[..1],
                    &out,
                    &MergeRequest {
                        inputs: &req.inputs[..1],
                        ..*req
                    },
                    &mut report,
                )?;
                continue;
            }
            merge_files(&indexes, &out, req, &mut report)?;
        }
    }
    Ok(report)
}

/// Copies a diffusers folder's configs, tokenizers and scheduler (not its weights).
fn copy_tree_except_weights(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(StoreError::io(dst))?;
    for e in std::fs::read_dir(src).map_err(StoreError::io(src))? {
        let e = e.map_err(StoreError::io(src))?;
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            copy_tree_except_weights(&p, &dst.join(&name))?;
        } else if !p
            .extension()
            .is_some_and(|x| super::WEIGHT_SUFFIXES.iter().any(|w| x == *w))
        {
            std::fs::copy(&p, dst.join(&name)).map_err(StoreError::io(&p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_match_the_seed_examples() {
        let f = |m, a| factor(m, a);
        // weighted_sum α=0.8, θ0=0, θ1=10 → 8
        assert!(
            (merge_value(
                Method::WeightedSum,
                f(Method::WeightedSum, 0.8),
                0.0,
                10.0,
                0.0
            ) - 8.0)
                .abs()
                < 1e-6
        );
        // sigmoid α=0.25 → α'=0.15625 → 1.5625; α=0.5 → 5
        assert!((f(Method::Sigmoid, 0.25) - 0.15625).abs() < 1e-12);
        assert!(
            (merge_value(Method::Sigmoid, f(Method::Sigmoid, 0.5), 0.0, 10.0, 0.0) - 5.0).abs()
                < 1e-6
        );
        // inv_sigmoid α=0.25 → 0.326352; α=0.8 → 0.712859
        assert!((f(Method::InvSigmoid, 0.25) - 0.326352).abs() < 1e-6);
        assert!((f(Method::InvSigmoid, 0.8) - 0.712859).abs() < 1e-6);
        // add_difference θ0=1, θ1=5, θ2=3, α=0.25 → 2.5 (InvokeAI, as built, gave 2.0)
        assert!(
            (merge_value(
                Method::AddDifference,
                f(Method::AddDifference, 0.25),
                1.0,
                5.0,
                3.0
            ) - 2.5)
                .abs()
                < 1e-6
        );
        assert_eq!(
            "add-difference".parse::<Method>(),
            Ok(Method::AddDifference)
        );
    }
}
