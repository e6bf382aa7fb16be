//! LoRA-family adapters (LoRA, LoCon, LoHA, LoKR, IA3, full diffs): the weight
//! delta of each layer type and
//! its application to a model's weights.
//!
//! Mechanism: a **patched copy**. The adapted model is a new tensor map that
//! shares every untouched tensor with the cached base model (candle tensors are
//! reference-counted) and holds `W0 + Σ weight·scale·ΔW` for the patched ones.
//! The cached weights are never written, so concurrent requests with different
//! adapters cannot see each other's, and the base stays bit-for-bit intact
//! without a restore step or an exclusive lock.

use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};

/// Why an adapter cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA layer {layer}: unknown format (leaves: {leaves})")]
    UnknownFormat { layer: String, leaves: String },
    #[error("LoRA layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error("LoRA key {0:?} has no '.' separating layer and leaf")]
    BadKey(String),
    #[error("{0}")]
    Candle(String),
}

impl From<candle_core::Error> for LoraError {
    fn from(e: candle_core::Error) -> Self {
        LoraError::Candle(crate::store::error::candle_message(&e))
    }
}

type Result<T> = std::result::Result<T, LoraError>;

/// The layers of one adapter file, grouped by layer key (the part before the first `.`).
pub struct Adapter {
    layers: BTreeMap<String, HashMap<String, Tensor>>,
}

impl Adapter {
    /// Groups a flat tensor map (`layer.leaf` → tensor) by layer, after bringing
    /// diffusers/PEFT and Stability SDXL keys to kohya's layout. The tensors
    /// stay the cache's, at the dtype the cache charged for them; each layer
    /// is widened to f32 only while its delta is computed.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let tensors = super::lora_keys::normalize(tensors.clone())
            .map_err(|e| LoraError::Candle(e.to_string()))?;
        let mut layers: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
        for (k, t) in &tensors {
            let (layer, leaf) = k
                .split_once('.')
                .ok_or_else(|| LoraError::BadKey(k.clone()))?;
            layers
                .entry(layer.to_string())
                .or_default()
                .insert(leaf.to_string(), t.clone());
        }
        Ok(Adapter { layers })
    }

    pub fn layer_keys(&self) -> impl Iterator<Item = &str> {
        self.layers.keys().map(String::as_str)
    }
}

fn flat2(t: &Tensor) -> Result<Tensor> {
    let d0 = t.dim(0)?;
    Ok(t.reshape((d0, t.elem_count() / d0))?)
}

fn scalar(t: Option<&Tensor>) -> Result<Option<f64>> {
    Ok(match t {
        Some(t) => Some(
            t.flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .first()
                .copied()
                .unwrap_or(0.0),
        ),
        None => None,
    })
}

/// Kronecker product of two 2-D (or 4-D with W1 expanded) tensors.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = if b.rank() == 4 && a.rank() == 2 {
        (a.unsqueeze(2)?.unsqueeze(3)?, b.clone())
    } else {
        (a.clone(), b.clone())
    };
    let ad = a.dims().to_vec();
    let bd = b.dims().to_vec();
    // Outer product over every axis, then merge axis pairs: out[i*bi + k, …] = a[i] * b[k].
    let n = ad.len();
    let mut a_shape = Vec::new();
    let mut b_shape = Vec::new();
    for i in 0..n {
        a_shape.extend([ad[i], 1]);
        b_shape.extend([1, bd[i]]);
    }
    let prod = a.reshape(a_shape)?.broadcast_mul(&b.reshape(b_shape)?)?;
    let out: Vec<usize> = (0..n).map(|i| ad[i] * bd[i]).collect();
    Ok(prod.reshape(out)?)
}

/// A weight rebuilt from its Tucker decomposition, as LyCORIS stores
/// convolutions: `W[p, r, k, l] = Σ_ij T[i, j, k, l] · A[i, p] · B[j, r]`,
/// that is `Aᵀ · T[.., .., k, l] · B` at every kernel position.
fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let m = t.permute((2, 3, 0, 1))?.reshape((kh * kw, r1, r2))?;
    let w = a
        .t()?
        .unsqueeze(0)?
        .broadcast_matmul(&m)?
        .broadcast_matmul(&b.unsqueeze(0)?)?; // [kh*kw, out, in]
    let (_, o, i) = w.dims3()?;
    Ok(w.reshape((kh, kw, o, i))?.permute((2, 3, 0, 1))?)
}

/// ΔW of one layer before scaling, and its rank (for `alpha / rank`).
/// `w0` is the original weight (IA3 scales it).
pub fn layer_delta(
    layer: &str,
    leaves: &HashMap<String, Tensor>,
    w0: &Tensor,
) -> Result<(Tensor, Option<f64>)> {
    let get = |k: &str| leaves.get(k);
    let err = |reason: &str| LoraError::Layer {
        layer: layer.into(),
        reason: reason.into(),
    };
    if let (Some(up), Some(down)) = (get("lora_up.weight"), get("lora_down.weight")) {
        let rank = down.dim(0)? as f64;
        let delta = match get("lora_mid.weight") {
            None => flat2(up)?.matmul(&flat2(down)?)?,
            Some(mid) => {
                // ΔW[i,j,w,h] = Σ_{m,n} M[m,n,w,h] · U[i,m] · D[n,j]
                let (u, d) = (flat2(up)?, flat2(down)?);
                let (r1, r2, kh, kw) = mid.dims4()?;
                let m = mid.permute((2, 3, 0, 1))?.reshape((kh * kw, r1, r2))?;
                let t = u
                    .unsqueeze(0)?
                    .broadcast_matmul(&m)?
                    .broadcast_matmul(&d.unsqueeze(0)?)?; // [kh*kw, out, in]
                let (_, o, i) = t.dims3()?;
                t.reshape((kh, kw, o, i))?.permute((2, 3, 0, 1))?
            }
        };
        return Ok((delta, Some(rank)));
    }
    if let (Some(a1), Some(b1), Some(a2), Some(b2)) = (
        get("hada_w1_a"),
        get("hada_w1_b"),
        get("hada_w2_a"),
        get("hada_w2_b"),
    ) {
        let rank = b1.dim(0)? as f64;
        let w = match (get("hada_t1"), get("hada_t2")) {
            (None, None) => (a1.matmul(b1)? * a2.matmul(b2)?)?,
            (Some(t1), Some(t2)) => (tucker(t1, a1, b1)? * tucker(t2, a2, b2)?)?,
            _ => {
                return Err(err(
                    "LoHA with one Tucker core (hada_t1 or hada_t2) but not both",
                ))
            }
        };
        return Ok((w, Some(rank)));
    }
    if get("lokr_w1").is_some() || get("lokr_w1_b").is_some() {
        let w1 = match get("lokr_w1") {
            Some(w) => w.clone(),
            None => get("lokr_w1_a")
                .ok_or_else(|| err("lokr_w1_b without lokr_w1_a"))?
                .matmul(get("lokr_w1_b").ok_or_else(|| err("no lokr_w1"))?)?,
        };
        let w2 = match get("lokr_w2") {
            Some(w) => w.clone(),
            None => {
                let a = get("lokr_w2_a").ok_or_else(|| err("no lokr_w2 or lokr_w2_a"))?;
                let b = get("lokr_w2_b").ok_or_else(|| err("no lokr_w2_b"))?;
                match get("lokr_t2") {
                    Some(t2) => tucker(t2, a, b)?,
                    None => a.matmul(b)?,
                }
            }
        };
        let rank = match (get("lokr_w1_b"), get("lokr_w2_b")) {
            (Some(b), _) | (None, Some(b)) => Some(b.dim(0)? as f64),
            _ => None,
        };
        return Ok((kron(&w1, &w2)?, rank));
    }
    if let Some(diff) = get("diff") {
        if leaves.len() > 1 {
            return Err(err(
                "a full-weight (diff) layer with other leaves (alpha, …) is not supported",
            ));
        }
        return Ok((diff.clone(), None));
    }
    if let (Some(w), Some(on_input)) = (get("weight"), get("on_input")) {
        let on_input = scalar(Some(on_input))?.unwrap_or(0.0) != 0.0;
        let w = if on_input {
            w.flatten_all()?
        } else {
            w.flatten_all()?.reshape(((), 1))?
        };
        let w0 = w0.to_dtype(DType::F32)?;
        return Ok((w0.broadcast_mul(&w)?, None));
    }
    let mut names: Vec<&String> = leaves.keys().collect();
    names.sort();
    Err(LoraError::UnknownFormat {
        layer: layer.into(),
        leaves: names
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `alpha / rank` when both are present and non-zero, else 1 (as InvokeAI does).
pub fn scale(leaves: &HashMap<String, Tensor>, rank: Option<f64>) -> Result<f64> {
    let alpha = scalar(leaves.get("alpha"))?;
    Ok(match (alpha, rank) {
        (Some(a), Some(r)) if a != 0.0 && r != 0.0 => a / r,
        _ => 1.0,
    })
}

/// The kohya layer key of a weight tensor: `prefix` + the module path with `_`
/// for `.` (`down_blocks.0.attentions.0.proj_in.weight` → `lora_unet_down_blocks_0_attentions_0_proj_in`).
pub fn kohya_key(prefix: &str, tensor_name: &str) -> Option<String> {
    let module = tensor_name.strip_suffix(".weight")?;
    Some(format!("{prefix}{}", module.replace('.', "_")))
}

/// A copy of `base` with `adapters` applied to the layers whose keys start with
/// `prefix` (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`). Layers of
/// other prefixes are ignored; a layer that names no module of the model is an error.
pub fn apply(
    base: &HashMap<String, Tensor>,
    prefix: &str,
    adapters: &[(&Adapter, f64)],
) -> Result<HashMap<String, Tensor>> {
    let mut by_kohya: HashMap<String, &str> = HashMap::new();
    for name in base.keys() {
        if let Some(k) = kohya_key(prefix, name) {
            by_kohya.insert(k, name.as_str());
        }
        // Models saved without the `text_model.` prefix still match kohya keys that have it.
        if prefix.starts_with("lora_te") && !name.starts_with("text_model.") {
            if let Some(k) = kohya_key(&format!("{prefix}text_model_"), name) {
                by_kohya.insert(k, name.as_str());
            }
        }
    }
    let mut deltas: HashMap<&str, Tensor> = HashMap::new();
    for (adapter, weight) in adapters {
        if *weight == 0.0 {
            continue;
        }
        for (layer, leaves) in adapter.layers.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let Some(&target) = by_kohya.get(layer.as_str()) else {
                return Err(LoraError::Layer {
                    layer: layer.clone(),
                    reason:
                        "names no weight of this model (is the adapter for another base model?)"
                            .into(),
                });
            };
            let w0 = &base[target];
            let leaves = leaves
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            let (delta, rank) = layer_delta(layer, &leaves, w0)?;
            let delta = (delta * (weight * scale(&leaves, rank)?))?;
            let delta = if delta.dims() == w0.dims() {
                delta
            } else if delta.elem_count() == w0.elem_count() {
                delta.reshape(w0.dims())?
            } else {
                return Err(LoraError::Layer {
                    layer: layer.clone(),
                    reason: format!(
                        "delta of shape {:?} does not fit weight {:?}",
                        delta.dims(),
                        w0.dims()
                    ),
                });
            };
            let sum = match deltas.remove(target) {
                Some(prev) => (prev + delta)?,
                None => delta,
            };
            deltas.insert(target, sum);
        }
    }
    let mut out = base.clone();
    for (name, delta) in deltas {
        let w0 = &base[name];
        let patched =
            (w0.to_dtype(DType::F32)? + delta.to_device(w0.device())?)?.to_dtype(w0.dtype())?;
        out.insert(name.to_string(), patched);
    }
    Ok(out)
}

/// Bytes that applying `adapters` to `base` allocates: each patched copy, plus
/// the float32 delta computed for it.
pub fn patch_bytes(
    base: &HashMap<String, Tensor>,
    prefix: &str,
    adapters: &[(&Adapter, f64)],
) -> u64 {
    let mut by_kohya: HashMap<String, &Tensor> = HashMap::new();
    for (name, t) in base {
        if let Some(k) = kohya_key(prefix, name) {
            by_kohya.insert(k, t);
        }
        if prefix.starts_with("lora_te") && !name.starts_with("text_model.") {
            if let Some(k) = kohya_key(&format!("{prefix}text_model_"), name) {
                by_kohya.insert(k, t);
            }
        }
    }
    let mut targets: HashMap<*const Tensor, &Tensor> = HashMap::new();
    for (adapter, weight) in adapters {
        if *weight == 0.0 {
            continue;
        }
        for layer in adapter.layers.keys().filter(|k| k.starts_with(prefix)) {
            if let Some(t) = by_kohya.get(layer.as_str()) {
                targets.insert(*t as *const Tensor, t);
            }
        }
    }
    targets
        .values()
        .map(|t| t.elem_count() as u64 * (t.dtype().size_in_bytes() as u64 + 4))
        .sum()
}

/// Applies to a device model's tensors and returns a VarBuilder over the result.
pub fn var_builder(
    base: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    prefix: &str,
    adapters: &[(&Adapter, f64)],
) -> Result<candle_nn::VarBuilder<'static>> {
    let tensors = if adapters.is_empty() {
        base.clone()
    } else {
        apply(base, prefix, adapters)?
    };
    Ok(candle_nn::VarBuilder::from_tensors(tensors, dtype, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn leaves(items: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn v2(x: &Tensor) -> Vec<Vec<f32>> {
        x.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn lora_formula_scale_and_restore() {
        // U=[[1],[2]], D=[[3,4]], alpha 2, rank 1, weight 0.5 → [[3,4],[6,8]].
        let l = leaves(&[
            ("lora_up.weight", t(&[1., 2.], &[2, 1])),
            ("lora_down.weight", t(&[3., 4.], &[1, 2])),
            ("alpha", t(&[2.], &[])),
        ]);
        let base: HashMap<String, Tensor> = [("m.weight".to_string(), t(&[0.; 4], &[2, 2]))].into();
        let adapter = Adapter {
            layers: [("p_m".to_string(), l)].into(),
        };
        let out = apply(&base, "p_", &[(&adapter, 0.5)]).unwrap();
        assert_eq!(v2(&out["m.weight"]), [[3., 4.], [6., 8.]]);
        assert_eq!(
            v2(&base["m.weight"]),
            [[0., 0.], [0., 0.]],
            "base untouched"
        );
        // alpha 0 or absent → scale 1.
        let l0 = leaves(&[("alpha", t(&[0.], &[]))]);
        assert_eq!(scale(&l0, Some(4.0)).unwrap(), 1.0);
        assert_eq!(scale(&HashMap::new(), Some(4.0)).unwrap(), 1.0);
    }

    #[test]
    fn locon_1x1_conv_is_reshaped() {
        let l = leaves(&[
            ("lora_up.weight", t(&[1., 0., 0., 1.], &[2, 2, 1, 1])),
            ("lora_down.weight", t(&[1., 2., 3., 4.], &[2, 2, 1, 1])),
        ]);
        let w0 = t(&[0.; 4], &[2, 2, 1, 1]);
        let base: HashMap<String, Tensor> = [("c.weight".to_string(), w0)].into();
        let adapter = Adapter {
            layers: [("x_c".to_string(), l)].into(),
        };
        let out = apply(&base, "x_", &[(&adapter, 1.0)]).unwrap();
        assert_eq!(out["c.weight"].dims(), &[2, 2, 1, 1]);
        assert_eq!(
            out["c.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1., 2., 3., 4.]
        );
    }

    #[test]
    fn loha_lokr_ia3_full() {
        let w0 = t(&[1., 2., 3., 4.], &[2, 2]);
        // LoHA: (A1@B1) ⊙ (A2@B2)
        let l = leaves(&[
            ("hada_w1_a", t(&[1., 0., 0., 1.], &[2, 2])),
            ("hada_w1_b", t(&[1., 2., 3., 4.], &[2, 2])),
            ("hada_w2_a", t(&[2., 0., 0., 2.], &[2, 2])),
            ("hada_w2_b", t(&[1., 1., 1., 1.], &[2, 2])),
        ]);
        let (d, rank) = layer_delta("l", &l, &w0).unwrap();
        assert_eq!(
            (v2(&d), rank),
            (vec![vec![2., 4.], vec![6., 8.]], Some(2.0))
        );
        // LoKR: kron([[1,0],[0,2]], [[1,1]]) = [[1,1,0,0],[0,0,2,2]]
        let l = leaves(&[
            ("lokr_w1", t(&[1., 0., 0., 2.], &[2, 2])),
            ("lokr_w2", t(&[1., 1.], &[1, 2])),
        ]);
        let (d, _) = layer_delta("l", &l, &t(&[0.; 8], &[2, 4])).unwrap();
        assert_eq!(v2(&d), [[1., 1., 0., 0.], [0., 0., 2., 2.]]);
        // IA3
        let l = leaves(&[
            ("weight", t(&[10., 100.], &[2])),
            ("on_input", t(&[0.], &[])),
        ]);
        assert_eq!(
            v2(&layer_delta("l", &l, &w0).unwrap().0),
            [[10., 20.], [300., 400.]]
        );
        let l = leaves(&[
            ("weight", t(&[10., 100.], &[2])),
            ("on_input", t(&[1.], &[])),
        ]);
        assert_eq!(
            v2(&layer_delta("l", &l, &w0).unwrap().0),
            [[10., 200.], [30., 400.]]
        );
        // Full, and Full with alpha (refused), and unknown leaves.
        let l = leaves(&[("diff", w0.clone())]);
        assert_eq!(v2(&layer_delta("l", &l, &w0).unwrap().0), v2(&w0));
        let l = leaves(&[("diff", w0.clone()), ("alpha", t(&[1.], &[]))]);
        assert!(layer_delta("l", &l, &w0).is_err());
        let l = leaves(&[("mystery", w0.clone())]);
        assert!(layer_delta("l", &l, &w0)
            .unwrap_err()
            .to_string()
            .contains("unknown format"));
    }

    #[test]
    fn tucker_cores_rebuild_loha_and_lokr_convolutions() {
        // T [2, 2, 1, 2], A [2, out 3], B [2, in 2]: check against the sum itself.
        let tv = [1., 2., 3., 4., -1., 0.5, 2., -2.];
        let av = [1., 0., 2., 0., 1., -1.];
        let bv = [3., 1., 0., 2.];
        let (tc, a, b) = (t(&tv, &[2, 2, 1, 2]), t(&av, &[2, 3]), t(&bv, &[2, 2]));
        let want = |p: usize, r: usize, l: usize| -> f32 {
            let mut s = 0.0;
            for i in 0..2 {
                for j in 0..2 {
                    s += tv[i * 4 + j * 2 + l] * av[i * 3 + p] * bv[j * 2 + r];
                }
            }
            s
        };
        let w = tucker(&tc, &a, &b).unwrap();
        assert_eq!(w.dims(), [3, 2, 1, 2]);
        let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for p in 0..3 {
            for r in 0..2 {
                for l in 0..2 {
                    assert_eq!(got[p * 4 + r * 2 + l], want(p, r, l), "{p} {r} {l}");
                }
            }
        }
        let loha = leaves(&[
            ("hada_w1_a", a.clone()),
            ("hada_w1_b", b.clone()),
            ("hada_t1", tc.clone()),
            ("hada_w2_a", a.clone()),
            ("hada_w2_b", b.clone()),
            ("hada_t2", tc.clone()),
        ]);
        let w0 = t(&[0.; 12], &[3, 2, 1, 2]);
        let (d, rank) = layer_delta("l", &loha, &w0).unwrap();
        let squared: Vec<f32> = got.iter().map(|v| v * v).collect();
        assert_eq!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap(), squared);
        assert_eq!(rank, Some(2.0));
        let lokr = leaves(&[
            ("lokr_w1", t(&[2.], &[1, 1])),
            ("lokr_w2_a", a),
            ("lokr_w2_b", b),
            ("lokr_t2", tc),
        ]);
        let (d, _) = layer_delta("l", &lokr, &w0).unwrap();
        let doubled: Vec<f32> = got.iter().map(|v| 2.0 * v).collect();
        assert_eq!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap(), doubled);
    }

    #[test]
    fn two_adapters_add_and_ia3_uses_the_original_weight() {
        let base: HashMap<String, Tensor> =
            [("m.weight".to_string(), t(&[1., 2., 3., 4.], &[2, 2]))].into();
        let ia3 = Adapter {
            layers: [(
                "p_m".to_string(),
                leaves(&[("weight", t(&[1., 1.], &[2])), ("on_input", t(&[0.], &[]))]),
            )]
            .into(),
        };
        let full = Adapter {
            layers: [(
                "p_m".to_string(),
                leaves(&[("diff", t(&[10.; 4], &[2, 2]))]),
            )]
            .into(),
        };
        let out = apply(&base, "p_", &[(&full, 1.0), (&ia3, 1.0)]).unwrap();
        // W0 + diff + W0 ⊙ 1 (from the original W0, not the patched one)
        assert_eq!(v2(&out["m.weight"]), [[12., 14.], [16., 18.]]);
    }

    #[test]
    fn key_resolution() {
        assert_eq!(
            kohya_key(
                "lora_unet_",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
            )
            .as_deref(),
            Some("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
        );
        let base: HashMap<String, Tensor> = [("a.weight".to_string(), t(&[0.; 4], &[2, 2]))].into();
        let l = leaves(&[("diff", t(&[1.; 4], &[2, 2]))]);
        let adapter = Adapter {
            layers: [("lora_unet_missing".to_string(), l)].into(),
        };
        assert!(apply(&base, "lora_unet_", &[(&adapter, 1.0)])
            .unwrap_err()
            .to_string()
            .contains("names no weight"));
    }
}
