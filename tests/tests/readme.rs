//! The README's first command block must keep working: every `cargo run -p
//! PKG` in it has to name a package whose `cargo run` picks one binary (the
//! agent once grew benchmark binaries and the README's main command stopped
//! running), and the test command must be the one `.ci/run` calls.

use modelcache_tests::{repo, run};
use std::process::Command;

/// The first ```sh block of the README, one command per line.
fn first_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md starts with a ```sh block");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn the_main_command_runs_one_binary_and_ci_runs_the_test_command() {
    let commands = first_commands();
    assert_eq!(
        commands.len(),
        2,
        "the main job and the tests: {commands:?}"
    );
    let (ok, metadata) = run(Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo()));
    assert!(ok, "{metadata}");
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    let runs: Vec<&str> = commands
        .iter()
        .filter(|c| c.starts_with("cargo run"))
        .filter_map(|c| c.split_whitespace().skip_while(|w| *w != "-p").nth(1))
        .collect();
    assert!(!runs.is_empty(), "no `cargo run -p` in {commands:?}");
    for package in runs {
        let p = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == package)
            .unwrap_or_else(|| panic!("no package {package}"));
        let bins: Vec<&str> = p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        let default = p["default_run"].as_str();
        assert!(
            bins.len() == 1 || default.is_some_and(|d| bins.contains(&d)),
            "`cargo run -p {package}` cannot choose among {bins:?}: set default-run"
        );
    }
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == commands[1]),
        ".ci/run does not run the README's test command {:?}",
        commands[1]
    );
}

#[test]
fn the_readme_names_every_module_of_the_layer_tables() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let doc = std::fs::read_to_string(repo().join("docs/architecture.md")).unwrap();
    let tables = modelcache_tests::layers::parse(&doc);
    assert!(!tables.is_empty(), "docs/architecture.md has layer tables");
    let missing: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.layer_of
                .keys()
                .filter(|m| !readme.contains(&format!("`{m}`")))
                .map(move |m| format!("{} {m}", t.src))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README's \"How it fits together\" does not name {missing:?}"
    );
}
