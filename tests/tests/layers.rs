//! The one-way layering of the agent's and the operator's modules, as
//! docs/architecture.md writes it: no module imports from a layer above its
//! own or beside it, and every module has a place in the table.

use modelcache_tests::{layers, repo};

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let doc = std::fs::read_to_string(repo().join("docs/architecture.md")).unwrap();
    let tables = layers::parse(&doc);
    let crates: Vec<&str> = tables.iter().map(|t| t.src.as_str()).collect();
    assert_eq!(
        crates,
        ["node-agent/src", "operator/src"],
        "docs/architecture.md has a layers block for each crate"
    );
    let mut violations = Vec::new();
    for table in &tables {
        violations.extend(layers::check(&repo().join(&table.src), table));
    }
    let shown: Vec<String> = violations
        .iter()
        .map(|v| {
            let file = v.file.strip_prefix(repo()).unwrap_or(&v.file);
            format!("{}:{}: {}", file.display(), v.line, v.message)
        })
        .collect();
    assert!(
        shown.is_empty(),
        "the layering of docs/architecture.md is broken:\n{}",
        shown.join("\n")
    );
}
