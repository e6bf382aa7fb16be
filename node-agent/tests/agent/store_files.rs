//! Untrusted files: the malformed corpus is refused with typed errors that name
//! the file (and nothing panics); PyTorch archives are read without executing
//! them; search, identity and loading behave as a user expects.

use crate::common::fixtures;
use candle_core::{DType, Device};
use modelcache_agent::store::{self, search::find_models, StoreError};
use std::path::{Path, PathBuf};

#[test]
fn malformed_corpus_is_refused_with_clear_errors() {
    let dir = fixtures().join("malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus has {} files", files.len());
    for f in files {
        let result = std::panic::catch_unwind(|| store::open_weights(&f));
        let err = match result {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("{} was accepted", f.display()),
            Err(_) => panic!("{} panicked the reader", f.display()),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with(&f.display().to_string()),
            "error does not name the file: {msg}"
        );
        assert!(
            !msg.contains("stack backtrace") && !msg.contains("  0: "),
            "backtrace in message: {msg}"
        );
        assert!(
            matches!(
                err,
                StoreError::Safetensors { .. } | StoreError::Pickle { .. }
            ),
            "{}: unexpected error kind {err:?}",
            f.display()
        );
        // The probe gives the same answer, not a crash.
        assert!(store::probe(&f).is_err());
    }
}

#[test]
fn specific_malformed_messages() {
    let dir = fixtures().join("malformed");
    let msg = |n: &str| store::open_weights(&dir.join(n)).unwrap_err().to_string();
    assert!(msg("header-too-large.safetensors").contains("exceeds the 100000000-byte limit"));
    assert!(msg("trailing-bytes.safetensors").contains("truncated or trailing data"));
    assert!(msg("short.safetensors").contains("shorter than the 8-byte header length"));
    assert!(msg("overlap.safetensors").contains("header"));
    assert!(msg("pickle-not-a-zip.ckpt").contains("legacy non-zip pickles are not supported"));
}

#[test]
fn pickle_with_code_is_refused_and_never_run() {
    let p = fixtures().join("pickle/evil.ckpt");
    let err = store::open_weights(&p).unwrap_err();
    assert!(matches!(err, StoreError::UnsafePickle { .. }), "{err:?}");
    assert!(err.to_string().contains("system"), "{err}");
}

#[test]
fn pickle_checkpoint_reads_tensors_and_global_step() {
    let p = fixtures().join("pickle/valid.ckpt");
    let index = store::open_weights(&p).unwrap();
    assert_eq!(index.global_step, Some(220000));
    assert_eq!(index.tensors.len(), 3);
    assert_eq!(
        index.shape("model.diffusion_model.input_blocks.0.0.weight"),
        Some(&[2usize, 4, 1, 1][..])
    );
    let tensors = store::load::load_all(&index, &Device::Cpu, DType::F32).unwrap();
    let w = tensors["model.diffusion_model.input_blocks.0.0.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(w, (0..8).map(|i| i as f32).collect::<Vec<_>>());
    let r = store::probe(&p).unwrap();
    assert_eq!(r.base, Some(modelcache_crds::BaseModel::Sd1));
}

#[test]
fn safetensors_load_matches_file_and_casts_floats() {
    let p = fixtures().join("tiny-sd1/text_encoder/model.safetensors");
    let index = store::open_weights(&p).unwrap();
    let f32s = store::load::load_all(&index, &Device::Cpu, DType::F32).unwrap();
    let f16s = store::load::load_all(&index, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(f32s.len(), index.tensors.len());
    let name = "embeddings.token_embedding.weight";
    assert_eq!(f32s[name].dims(), &[196, 32]);
    assert_eq!(f16s[name].dtype(), DType::F16);
    let bytes: usize = f16s
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    assert_eq!(
        bytes as u64,
        index.bytes_at(modelcache_crds::Precision::F16)
    );
}

#[test]
fn search_finds_folders_and_files_but_nothing_inside_models() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("a/unet")).unwrap();
    std::fs::write(root.join("a/model_index.json"), "{}").unwrap();
    std::fs::write(root.join("a/unet/x.safetensors"), "").unwrap();
    std::fs::write(root.join("b.ckpt"), "").unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    std::fs::write(root.join(".hidden/c.safetensors"), "").unwrap();
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::write(root.join("d/e/f.pt"), "").unwrap();
    std::fs::write(root.join("d/readme.txt"), "").unwrap();
    // A symlink loop and a link that leaves the root.
    std::os::unix::fs::symlink(root.join("d"), root.join("d/e/loop")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.safetensors"), "").unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();

    let found = find_models(root);
    let rel: Vec<_> = found
        .models
        .iter()
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .collect();
    assert_eq!(
        rel,
        vec![
            PathBuf::from("a"),
            PathBuf::from("b.ckpt"),
            PathBuf::from("d/e/f.pt")
        ]
    );
    assert!(found
        .skipped
        .iter()
        .any(|(p, why)| p.ends_with("escape") && why.contains("outside")));
}

#[test]
fn search_of_missing_root_reports_it() {
    let found = find_models(Path::new("/nonexistent/models"));
    assert!(found.models.is_empty());
    assert_eq!(found.skipped.len(), 1);
}

#[test]
fn identity_is_stable_cached_and_changes_with_content() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(m.join("unet")).unwrap();
    std::fs::write(m.join("model_index.json"), "{}").unwrap();
    std::fs::write(m.join("unet/w.safetensors"), "abc").unwrap();
    let h1 = store::identity::sha256(&m, Some(state.path())).unwrap();
    assert_eq!(h1.len(), 64);
    assert!(
        std::fs::read_dir(state.path().join("hashes"))
            .unwrap()
            .count()
            == 1,
        "cached outside the model folder"
    );
    assert_eq!(store::identity::sha256(&m, None).unwrap(), h1);
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(m.join("unet/w.safetensors"), "abd").unwrap();
    assert_ne!(store::identity::sha256(&m, Some(state.path())).unwrap(), h1);
    // A single file hashes like sha256sum.
    let f = dir.path().join("x.bin");
    std::fs::write(&f, "hello\n").unwrap();
    assert_eq!(
        store::identity::sha256(&f, None).unwrap(),
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    );
}

#[test]
fn probe_reads_only_header_bytes() {
    use crate::common::rchar;
    let p = fixtures().join("tiny-sd1-single.safetensors");
    let before = rchar();
    let r = store::probe(&p).unwrap();
    let read = rchar() - before;
    assert!(
        read < 200_000,
        "probe read {read} bytes of a {}-byte file",
        r.file_bytes
    );
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs a `modelcache-agent` command; its exit code and stderr, or `None`
/// when it had not finished within 30 s (then it is killed).
fn agent_cli(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_modelcache-agent"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::common::wait_exit(child, std::time::Duration::from_secs(30))
}

#[test]
fn fifos_and_devices_named_like_models_are_skipped_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    crate::common::copy_dir(&fixtures().join("tiny-sd1"), &root.join("tiny"));
    mkfifo(&root.join("pipe.safetensors"));
    // A FIFO inside a model folder taints the whole model.
    crate::common::copy_dir(&fixtures().join("tiny-sd1"), &root.join("tainted"));
    mkfifo(&root.join("tainted/unet/extra.safetensors"));
    let found = find_models(&root);
    let models: Vec<_> = found
        .models
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(models, ["tiny"], "{found:?}");
    let why = |name: &str| {
        found
            .skipped
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    assert!(
        why("pipe.safetensors").contains("not a regular file"),
        "{found:?}"
    );
    assert!(
        why("tainted").contains("unet/extra.safetensors is not a regular file"),
        "{found:?}"
    );

    // The commands answer at once instead of hanging.
    let (code, err) = agent_cli(&["probe".as_ref(), root.join("pipe.safetensors").as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a regular file (a FIFO)"), "{err}");
    let (code, err) = agent_cli(&["search".as_ref(), root.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("pipe.safetensors: not a regular file"),
        "{err}"
    );
    let (code, err) = agent_cli(&["hash".as_ref(), "/dev/zero".as_ref()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a regular file (a device)"), "{err}");
}

#[test]
fn files_linking_out_of_the_root_are_neither_served_nor_copied() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.json"), "{\"secret\": 1}").unwrap();
    // A model folder whose weights link out of the root.
    crate::common::copy_dir(&fixtures().join("tiny-sd1"), &root.join("linked"));
    let weights = root.join("linked/unet/diffusion_pytorch_model.safetensors");
    std::fs::rename(&weights, outside.join("unet.safetensors")).unwrap();
    std::os::unix::fs::symlink(outside.join("unet.safetensors"), &weights).unwrap();
    let found = find_models(&root);
    assert!(found.models.is_empty(), "{found:?}");
    assert!(
        found.skipped[0]
            .1
            .contains("unet/diffusion_pytorch_model.safetensors links outside"),
        "{found:?}"
    );

    // A single-file checkpoint whose neighbouring tokenizer links out of the
    // root converts without copying the outside file.
    let ck = root.join("ck.safetensors");
    std::fs::copy(fixtures().join("tiny-sd1-single.safetensors"), &ck).unwrap();
    std::fs::create_dir_all(root.join("tokenizer")).unwrap();
    std::os::unix::fs::symlink(
        outside.join("secret.json"),
        root.join("tokenizer/vocab.json"),
    )
    .unwrap();
    let config = dir.path().join("config");
    crate::common::copy_configs(&config);
    let out = dir.path().join("converted");
    let err = modelcache_agent::store::convert::convert_main(
        &modelcache_agent::store::convert::ConvertRequest {
            checkpoint: &ck,
            out_dir: &out,
            config_dir: Some(&config),
            tokenizer_dir: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tokenizer/vocab.json") && err.contains("links outside"),
        "{err}"
    );
    assert!(!out.exists(), "a failed conversion leaves nothing");
}
