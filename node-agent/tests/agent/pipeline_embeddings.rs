//! Textual inversion: `<name>` in a prompt stands for the embedding's vectors.
//! Checked independently of the implementation: an embedding whose vectors are
//! the text encoder's own rows for "red" and "cat" must encode "a <name>"
//! exactly as "a red cat" is encoded, in each file format (A1111 `.pt` and
//! `.safetensors`, diffusers `learned_embeds.bin`).

use candle_core::{DType, Device, IndexOp, Tensor};
use modelcache_agent::cache::{CacheConfig, DiskLoader, ModelCache};
use modelcache_agent::pipeline::tokenizer::ClipTokenizer;
use modelcache_agent::pipeline::{self, DiffusersModel, GenerateParams};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    crate::common::fixtures().join("tiny-sd1")
}

/// The text encoder's embedding rows of the tokens of `words` (no BOS/EOS).
fn rows(words: &str) -> Tensor {
    token_rows(&fixture(), "text_encoder", "tokenizer", words)
}

/// [`rows`] of one text encoder of the model in `dir`, through its tokenizer.
fn token_rows(dir: &std::path::Path, encoder: &str, tokenizer: &str, words: &str) -> Tensor {
    let tok = ClipTokenizer::load(&dir.join(tokenizer), 77).unwrap();
    // BOS, the words' tokens, EOS, padding: EOS is what follows BOS alone.
    let eos = tok.encode("").unwrap()[1];
    let ids = tok.encode(words).unwrap();
    let body: Vec<u32> = ids[1..].iter().copied().take_while(|&i| i != eos).collect();
    let weights =
        candle_core::safetensors::load(dir.join(encoder).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let table = weights
        .iter()
        .find(|(k, _)| k.ends_with("token_embedding.weight"))
        .map(|(_, v)| v.to_dtype(DType::F32).unwrap())
        .unwrap();
    table
        .index_select(&Tensor::new(body.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap()
}

fn encode(prompt: &str, embeddings: Vec<(String, PathBuf)>) -> Result<Tensor, String> {
    let model = DiffusersModel::open(&fixture()).unwrap();
    let cache = ModelCache::new(
        CacheConfig::cpu(64 << 20, 64 << 20),
        Box::new(DiskLoader),
        None,
    );
    let p = GenerateParams {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        embeddings,
        ..Default::default()
    };
    pipeline::encode_text(&cache, &model, &p).map_err(|e| e.to_string())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_file_format_encodes_like_the_words_it_was_made_from() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = rows("red cat");
    assert!(vectors.dim(0).unwrap() >= 2, "a multi-vector embedding");
    let plain = encode("a red cat", vec![]).unwrap();
    let formats: [(&str, HashMap<String, Tensor>); 3] = [
        (
            "diffusers",
            HashMap::from([("<rc>".to_string(), vectors.clone())]),
        ),
        (
            "a1111",
            HashMap::from([("string_to_param.*".to_string(), vectors.clone())]),
        ),
        (
            "v3",
            HashMap::from([("emb_params".to_string(), vectors.clone())]),
        ),
    ];
    for (format, tensors) in formats {
        let path = dir.path().join(format).join("rc.safetensors");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let with_ti = encode("a <rc>", vec![("rc".into(), path)]).unwrap();
        assert_eq!(with_ti.dims(), plain.dims());
        assert_eq!(
            max_diff(&with_ti, &plain),
            0.0,
            "{format}: a <rc> must encode as a red cat"
        );
    }
}

#[test]
fn a_single_vector_and_the_negative_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let cat = rows("cat");
    let path = dir.path().join("kitty.safetensors");
    // A 1-D vector is one token.
    let one = cat.i(0).unwrap();
    candle_core::safetensors::save(&HashMap::from([("kitty".to_string(), one)]), &path).unwrap();
    let emb = vec![("kitty".to_string(), path)];
    let a = encode("a red <kitty>", emb.clone()).unwrap();
    let b = encode("a red cat", vec![]).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    // Unknown triggers stay text; an embedding in the negative prompt works too.
    let m = DiffusersModel::open(&fixture()).unwrap();
    let cache = ModelCache::new(
        CacheConfig::cpu(64 << 20, 64 << 20),
        Box::new(DiskLoader),
        None,
    );
    let p = |neg: &str, e: Vec<(String, PathBuf)>| GenerateParams {
        prompt: "a <nothing>".into(),
        negative_prompt: neg.into(),
        embeddings: e,
        ..Default::default()
    };
    let x = pipeline::encode_text(&cache, &m, &p("<kitty>", emb)).unwrap();
    let y = pipeline::encode_text(&cache, &m, &p("cat", vec![])).unwrap();
    assert_eq!(max_diff(&x, &y), 0.0);
}

#[test]
fn a_width_mismatch_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.safetensors");
    let t = Tensor::zeros((2, 1024), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("emb_params".to_string(), t)]), &path).unwrap();
    let err = encode("a <wide>", vec![("wide".into(), path)]).unwrap_err();
    assert!(
        err.contains("trained for token dimension 1024") && err.contains("\"wide\""),
        "{err}"
    );
}

#[test]
fn the_api_finds_embeddings_under_the_models_folder_by_name() {
    use modelcache_agent::catalog::Catalog;
    let dir = tempfile::tempdir().unwrap();
    let emb = dir.path().join("models/embeddings");
    std::fs::create_dir_all(&emb).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("<rc>".to_string(), rows("red cat"))]),
        emb.join("rc.safetensors"),
    )
    .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("emb_params".to_string(), rows("cat"))]),
        emb.join("kitty.safetensors"),
    )
    .unwrap();
    let catalog = Catalog::scan(&dir.path().join("models"), &dir.path().join("state"), None);
    assert_eq!(
        catalog.embedding("rc").map(|e| e.rel_path),
        Some("embeddings/rc.safetensors".to_string())
    );
    assert!(catalog.embedding("kitty").is_some());
    assert!(catalog.embedding("nope").is_none());
    assert!(
        catalog.get("embeddings/rc").is_none(),
        "embeddings are not served as models"
    );
}

#[test]
fn sdxl_embeddings_give_each_text_encoder_its_own_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let model = DiffusersModel::open(&crate::common::fixtures().join("tiny-sdxl")).unwrap();
    let cache = crate::common::tiny_cache();
    let cond = |prompt: &str, embeddings: Vec<(String, PathBuf)>| {
        let p = GenerateParams {
            prompt: prompt.into(),
            negative_prompt: "a dog".into(),
            embeddings,
            ..Default::default()
        };
        pipeline::encode(&cache, &model, &p).map_err(|e| e.to_string())
    };
    let sdxl = crate::common::fixtures().join("tiny-sdxl");
    let clip_l = token_rows(&sdxl, "text_encoder", "tokenizer", "red cat");
    let clip_g = token_rows(&sdxl, "text_encoder_2", "tokenizer_2", "red cat");
    assert_ne!(clip_l.dims(), clip_g.dims(), "two widths");
    assert!(clip_l.dim(0).unwrap() >= 2 && clip_g.dim(0).unwrap() >= 2);
    let path = dir.path().join("rc.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([
            ("clip_l".to_string(), clip_l.clone()),
            ("clip_g".to_string(), clip_g),
        ]),
        &path,
    )
    .unwrap();
    let plain = cond("a red cat", vec![]).unwrap();
    let with_ti = cond("a <rc>", vec![("rc".into(), path.clone())]).unwrap();
    assert_eq!(max_diff(&with_ti.context, &plain.context), 0.0);
    let pooled = (plain.pooled.unwrap(), with_ti.pooled.unwrap());
    assert_eq!(max_diff(&pooled.0, &pooled.1), 0.0, "the pooled output too");
    // An SDXL embedding on an SD 1.x model, and a one-encoder embedding on SDXL.
    let err = encode("a <rc>", vec![("rc".into(), path)]).unwrap_err();
    assert!(err.contains("clip_l and clip_g"), "{err}");
    let one = dir.path().join("one.safetensors");
    candle_core::safetensors::save(&HashMap::from([("emb_params".to_string(), clip_l)]), &one)
        .unwrap();
    let err = cond("a <one>", vec![("one".into(), one)]).err().unwrap();
    assert!(err.contains("SDXL needs clip_l and clip_g"), "{err}");
}
