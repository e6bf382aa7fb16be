//! The one-way layering rule of docs/architecture.md, checked on source text.
//!
//! The document holds one fenced block per crate, ` ```layers <crate>/src `,
//! with one line per layer, lowest first, naming that layer's top-level
//! modules. A module may use `crate::` paths into its own module and into
//! modules of lower layers only. Every `crate::` path counts (in `use` lines,
//! groups such as `use crate::{a, b}` included, and inline in code), and so
//! does a `super::` chain that climbs to the crate root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers of one crate: its source folder and each module's layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layers {
    pub src: String,
    pub layer_of: BTreeMap<String, usize>,
}

/// Reads every ` ```layers <src> ` block of a markdown document.
pub fn parse(markdown: &str) -> Vec<Layers> {
    let mut out = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(src) = line.trim().strip_prefix("```layers ") else {
            continue;
        };
        let mut layer_of = BTreeMap::new();
        for (i, l) in lines.by_ref().take_while(|l| l.trim() != "```").enumerate() {
            for m in l.split_whitespace() {
                layer_of.insert(m.to_string(), i);
            }
        }
        out.push(Layers {
            src: src.trim().to_string(),
            layer_of,
        });
    }
    out
}

/// One rule broken, as the failure message shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// The top-level modules a source text names through `crate::` (or a
/// `super::` chain that reaches the crate root from `module_path`), each with
/// the byte offset where it is named. Comment lines are skipped.
fn targets(text: &str, module_path: &[String]) -> Vec<(usize, String)> {
    // Blank out comment lines, keeping offsets.
    let code: String = text
        .split_inclusive('\n')
        .map(|l| {
            if l.trim_start().starts_with("//") {
                " ".repeat(l.len() - 1) + if l.ends_with('\n') { "\n" } else { " " }
            } else {
                l.to_string()
            }
        })
        .collect();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let word_before = |at: usize| {
        code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    };
    let mut out = Vec::new();
    // `crate::x`, and `crate::{x, y::{z}}` over any number of lines.
    for (at, _) in code.match_indices("crate::") {
        if word_before(at) {
            continue; // `modelcache_crate::`, not ours
        }
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push((at, ident(rest)));
            continue;
        };
        let (mut depth, mut start) = (0, 0);
        for (k, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push((at, ident(&group[start..k])));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push((at, ident(&group[start..k])));
                    start = k + 1;
                }
                _ => {}
            }
        }
    }
    // `super::super::x` climbing out of a nested module to the root; inline
    // modules (`mod tests { … }`) add a level each.
    let inline = inline_modules(&code);
    for (at, _) in code.match_indices("super::") {
        if word_before(at) {
            continue; // the middle of a chain
        }
        let mut rest = &code[at..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        let depth = module_path.len()
            + inline
                .iter()
                .filter(|(a, b)| (*a..*b).contains(&at))
                .count();
        if ups >= depth {
            out.push((at, ident(rest)));
        }
    }
    out.retain(|(_, t)| !t.is_empty() && t != "self");
    out
}

/// The byte ranges of inline module bodies (`mod name { … }`), by brace counting.
fn inline_modules(code: &str) -> Vec<(usize, usize)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    for (at, _) in code.match_indices("mod ") {
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let rest = &code[at + 4..];
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let after = rest[name_len..].trim_start();
        if name_len == 0 || !after.starts_with('{') {
            continue; // `mod name;` lives in its own file
        }
        let open = code.len() - after.len();
        let mut depth = 0usize;
        for (i, b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push((open, i));
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Checks every `.rs` file under `root` (a crate's `src`) but the binaries
/// (`main.rs`, `bin/`) against `layers`; `lib` is the crate root's text,
/// whose `pub mod` lines must list exactly the modules of the table.
pub fn check(root: &Path, layers: &Layers) -> Vec<Violation> {
    let mut found = Vec::new();
    let lib = root.join("lib.rs");
    let declared: Vec<String> = std::fs::read_to_string(&lib)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    for m in &declared {
        if !layers.layer_of.contains_key(m) {
            found.push(Violation {
                file: lib.clone(),
                line: 0,
                message: format!("module `{m}` is in no layer of docs/architecture.md"),
            });
        }
    }
    for m in layers.layer_of.keys() {
        if !declared.contains(m) {
            found.push(Violation {
                file: lib.clone(),
                line: 0,
                message: format!("docs/architecture.md names `{m}`, which lib.rs does not declare"),
            });
        }
    }
    for file in rust_files(root) {
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if matches!(
            parts.first().map(String::as_str),
            Some("main" | "lib" | "bin")
        ) {
            continue;
        }
        // `api/mod.rs` is the module `api`; `api/error.rs` is `api::error`.
        let mut module_path = parts.clone();
        if module_path.last().is_some_and(|p| p == "mod") {
            module_path.pop();
        }
        let module = &module_path[0];
        let Some(&own) = layers.layer_of.get(module) else {
            continue; // reported above as undeclared or unlisted
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (at, target) in targets(&text, &module_path) {
            if &target == module {
                continue;
            }
            let message = match layers.layer_of.get(&target) {
                None => format!("`{module}` uses `crate::{target}`, which is in no layer"),
                Some(&t) if t > own => format!(
                    "`{module}` (layer {}) imports `{target}` (layer {}): an upward import",
                    own + 1,
                    t + 1
                ),
                Some(&t) if t == own => format!(
                    "`{module}` imports `{target}`, which is in the same layer ({})",
                    own + 1
                ),
                Some(_) => continue,
            };
            found.push(Violation {
                file: file.clone(),
                line: text[..at].matches('\n').count() + 1,
                message,
            });
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Layers {
        parse("text\n```layers x/src\nlow\nmid other\ntop\n```\n").remove(0)
    }

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    const LIB: &str = "pub mod low;\npub mod mid;\npub mod other;\npub mod top;\n";

    #[test]
    fn reads_the_table() {
        let t = table();
        assert_eq!(t.src, "x/src");
        assert_eq!(t.layer_of["low"], 0);
        assert_eq!((t.layer_of["mid"], t.layer_of["other"]), (1, 1));
        assert_eq!(t.layer_of["top"], 2);
    }

    #[test]
    fn finds_every_form_of_path() {
        let none: Vec<String> = Vec::new();
        let m = vec!["api".to_string(), "error".to_string()];
        let names =
            |text: &str| -> Vec<String> { targets(text, &m).into_iter().map(|(_, t)| t).collect() };
        assert_eq!(names("use crate::cache::X;"), ["cache"]);
        assert_eq!(
            names("use crate::{cache::{A, B}, memory, store::x};"),
            ["cache", "memory", "store"]
        );
        assert_eq!(
            names("use crate::{\n    cache::X,\n    memory,\n};"),
            ["cache", "memory"]
        );
        assert_eq!(names("let x = crate::device::id(&d);"), ["device"]);
        assert_eq!(names("// crate::daemon in a comment"), none);
        assert_eq!(names("use super::ApiError;"), none, "inside api");
        assert_eq!(names("use super::super::daemon;"), ["daemon"]);
        assert_eq!(names("use modelcache_crate::x;"), none);
        assert_eq!(
            names("mod tests {\n    use super::fixtures::*;\n    use super::super::x;\n}"),
            none,
            "inside an inline module of api::error, super::super is api"
        );
        let top = vec!["store".to_string()];
        let in_top =
            |t: &str| -> Vec<String> { targets(t, &top).into_iter().map(|(_, t)| t).collect() };
        assert_eq!(
            in_top("mod tests {\n    use super::super::daemon;\n}"),
            ["daemon"]
        );
        assert_eq!(targets("a\nb crate::x", &m)[0].0, 4);
    }

    #[test]
    fn fails_on_upward_and_sideways_imports_naming_file_and_line() {
        let dir = tree(&[
            ("lib.rs", LIB),
            ("low.rs", "pub fn f() {}\n"),
            ("mid/mod.rs", "use crate::low;\nuse crate::top::T;\n"),
            ("mid/inner.rs", "\nfn g() { crate::other::h() }\n"),
            ("other.rs", "use crate::low::f;\n"),
            ("top.rs", "use crate::{low, mid::X, other};\n"),
        ]);
        let v = check(dir.path(), &table());
        let shown: Vec<String> = v
            .iter()
            .map(|v| {
                format!(
                    "{}:{}",
                    v.file.strip_prefix(dir.path()).unwrap().display(),
                    v.line
                )
            })
            .collect();
        assert_eq!(shown, ["mid/inner.rs:2", "mid/mod.rs:2"], "{v:?}");
        assert!(v[1].message.contains("upward"), "{}", v[1]);
        assert!(v[0].message.contains("same layer"), "{}", v[0]);
    }

    #[test]
    fn every_module_must_be_placed() {
        let dir = tree(&[
            ("lib.rs", "pub mod low;\npub mod new;\n"),
            ("low.rs", ""),
            ("new.rs", ""),
        ]);
        let v = check(dir.path(), &table());
        let messages: Vec<&str> = v.iter().map(|v| v.message.as_str()).collect();
        assert!(
            messages.iter().any(|m| m.contains("`new` is in no layer")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("names `mid`")),
            "{messages:?}"
        );
    }
}
