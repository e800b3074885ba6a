//! Keeps ARCHITECTURE.md's crate graph true: the table between its `crate-graph` markers must list
//! exactly the fracture crates each library crate and the binary depend on (normal dependencies),
//! as `cargo metadata` reports them, and every arrow must point up the table (no cycles, no layer
//! reaching below itself).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The table: crate → its fracture dependencies, in the table's order.
fn stated() -> Vec<(String, BTreeSet<String>)> {
    let text = std::fs::read_to_string(fracture_testkit::workspace_root().join("ARCHITECTURE.md")).unwrap();
    let begin = text
        .find("<!-- crate-graph:begin -->")
        .expect("ARCHITECTURE.md has the crate-graph markers");
    let end = text.find("<!-- crate-graph:end -->").unwrap();
    text[begin..end]
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
            let [name, deps] = cells.as_slice() else {
                return None;
            };
            if !name.starts_with("fracture-") {
                return None;
            }
            let deps = deps
                .split(',')
                .map(str::trim)
                .filter(|d| d.starts_with("fracture-"))
                .map(String::from)
                .collect();
            Some((name.to_string(), deps))
        })
        .collect()
}

/// `cargo metadata`: crate → its fracture dependencies (normal, not dev or build).
fn actual() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(fracture_testkit::workspace_root())
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|n| n.starts_with("fracture-"))
                .map(String::from)
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn architecture_md_states_the_crate_graph_cargo_builds() {
    let stated = stated();
    let actual = actual();
    assert!(stated.len() >= 10, "the table lists {} crates", stated.len());
    for (name, deps) in &stated {
        let real = actual
            .get(name)
            .unwrap_or_else(|| panic!("ARCHITECTURE.md lists {name}, which is not a workspace crate"));
        assert_eq!(
            deps, real,
            "{name}: ARCHITECTURE.md states {deps:?}, Cargo.toml has {real:?}"
        );
    }
    // Every published crate is in the table (the tools, tests and examples are not).
    let listed: BTreeSet<&str> = stated.iter().map(|(n, _)| n.as_str()).collect();
    for name in actual.keys() {
        let tooling = ["fracture-testkit", "fracture-benches", "fracture-examples"].contains(&name.as_str());
        if name.starts_with("fracture-") && !tooling {
            assert!(
                listed.contains(name.as_str()),
                "{name} is missing from ARCHITECTURE.md's crate graph"
            );
        }
    }
    // Layers: each crate depends only on crates listed above it.
    for (i, (name, deps)) in stated.iter().enumerate() {
        let above: BTreeSet<&String> = stated[..i].iter().map(|(n, _)| n).collect();
        for d in deps {
            assert!(
                above.contains(d),
                "{name} depends on {d}, which is not above it in the table"
            );
        }
    }
}
