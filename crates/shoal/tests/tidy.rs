//! Repository hygiene that reviews would otherwise have to catch: every
//! Rust module opens with a `//!` paragraph saying what it is for, and
//! ARCHITECTURE.md's code map names exactly the dependencies each crate's
//! manifest has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_has_a_doc_comment() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(&crates).unwrap() {
        let krate = krate.unwrap().path();
        for sub in ["src", "tests", "benches", "examples"] {
            if krate.join(sub).is_dir() {
                rust_files(&krate.join(sub), &mut files);
            }
        }
    }
    assert!(files.len() > 10, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a //! doc: {missing:#?}"
    );
}

/// Each crate's `shoal-*` dependencies under `[dependencies]`, from the
/// manifests.
fn manifest_edges(crates: &Path) -> BTreeMap<String, Vec<String>> {
    let mut edges = BTreeMap::new();
    for krate in std::fs::read_dir(crates).unwrap() {
        let manifest = krate.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let mut name = None;
        let mut deps = Vec::new();
        let mut section = "";
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[package]" && line.starts_with("name") {
                name = line.split('"').nth(1).map(str::to_owned);
            } else if section == "[dependencies]" && line.starts_with("shoal") {
                let dep = line.split(['.', ' ', '=']).next().unwrap();
                deps.push(dep.to_owned());
            }
        }
        deps.sort();
        edges.insert(name.expect("a package name"), deps);
    }
    edges
}

/// The code map's lines: `crate ─► dep, dep (why), …` or `a, b: no shoal-*
/// dependencies`.
fn documented_edges(architecture: &str) -> BTreeMap<String, Vec<String>> {
    let map = architecture
        .split("## Code map")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("ARCHITECTURE.md has a code map in a ``` block");
    let names = |text: &str| -> Vec<String> {
        text.split(", ")
            .map(|item| item.split(" (").next().unwrap().trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    };
    let mut edges = BTreeMap::new();
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        if let Some((krate, deps)) = line.split_once('─') {
            let deps = deps.trim_start_matches('►');
            let mut deps = names(deps.trim());
            deps.sort();
            let before = edges.insert(krate.trim().to_owned(), deps);
            assert!(before.is_none(), "{} is mapped twice", krate.trim());
        } else if let Some((leaves, _)) = line.split_once(": no shoal-* dependencies") {
            for leaf in names(leaves) {
                edges.insert(leaf, Vec::new());
            }
        } else {
            panic!("code map line not understood: {line:?}");
        }
    }
    edges
}

#[test]
fn the_code_map_matches_the_manifests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifests = manifest_edges(&root.join("crates"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let documented = documented_edges(&architecture);
    assert!(
        manifests.len() > 10,
        "found only {} crates",
        manifests.len()
    );
    for (krate, deps) in &manifests {
        assert_eq!(
            documented.get(krate),
            Some(deps),
            "ARCHITECTURE.md's code map line for {krate} must list exactly its shoal-* dependencies"
        );
    }
    let stale: Vec<&String> = documented
        .keys()
        .filter(|k| !manifests.contains_key(*k))
        .collect();
    assert!(
        stale.is_empty(),
        "the code map names crates that do not exist: {stale:?}"
    );
}
