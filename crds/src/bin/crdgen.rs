//! Writes the CRD manifests into the Helm chart: `cargo run -p modelcache-crds --bin crdgen`.
//! With `--check`, exits 1 when the committed files differ from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifests = match modelcache_crds::crdgen::manifests() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = false;
    for (rel, yaml) in manifests {
        let path = root.join(rel);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                eprintln!("{rel} is out of date");
                stale = true;
            }
            continue;
        }
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {rel}");
    }
    if stale {
        eprintln!("run `cargo run -p modelcache-crds --bin crdgen` and commit the result");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
