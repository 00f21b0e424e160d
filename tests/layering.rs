//! The module layering of `src/`, checked on the source: every
//! `crate::<module>` path (in `use` items, grouped `use crate::{…}` items
//! and inline paths) is an edge from the top-level module of the file it
//! appears in. Comments are ignored.
//!
//! Two sets of rules, both from the README's architecture section:
//! * named prohibitions (a stage that must not know another);
//! * a layer number per top-level module: a module imports only modules of
//!   a lower layer, so the graph has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level modules and their layer; imports go to lower layers only.
const LAYERS: &[(&str, u8)] = &[
    ("exit", 0),
    ("model", 0),
    ("headers", 0),
    ("sys", 0),
    ("config", 0),
    ("schema", 1),
    ("decode", 2),
    ("ring", 2),
    ("enrich", 2),
    ("export", 2),
    ("flow", 3),
    ("probe", 3),
    ("daemon", 4),
    ("cli", 5),
];

/// (importer, imported modules it must never use, why).
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "decode",
        &["sys", "export", "config", "probe"],
        "the decoder is pure: bytes in, events out",
    ),
    (
        "flow",
        &["sys", "export", "config", "probe"],
        "the flow engine is pure: events in, flows out",
    ),
    (
        "model",
        &[
            "probe", "ring", "decode", "flow", "enrich", "export", "daemon", "cli",
        ],
        "the data model depends on no stage",
    ),
    (
        "export",
        &["probe", "ring", "sys"],
        "export knows flows, not the kernel",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module names a line's `crate::` paths start with.
fn imported_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `$crate::` belongs to macros, `pub(crate)` has no `::`.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c == '$' || c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b, c::{Y, Z}}`: the first segment of each item
            // at depth one.
            let mut depth = 1;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        if !item.is_empty() {
                            out.push(std::mem::take(&mut item));
                        }
                        at_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && at_start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        out.push(std::mem::take(&mut item));
                        at_start = false;
                    }
                }
            }
            if !item.is_empty() {
                out.push(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// Edges between top-level modules: importer → {(imported, where)}.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        let top = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = fs::read_to_string(&f).expect("read source");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for m in imported_modules(line) {
                if m != top {
                    edges
                        .entry(top.clone())
                        .or_default()
                        .insert((m, format!("{}:{}", rel.display(), n + 1)));
                }
            }
        }
    }
    edges
}

/// The rule violations of a set of edges.
fn violations(edges: &BTreeMap<String, BTreeSet<(String, String)>>) -> Vec<String> {
    let layer = |m: &str| LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l);
    let mut bad = Vec::new();
    for (from, tos) in edges {
        let Some(lf) = layer(from) else {
            bad.push(format!(
                "module {from} has no layer: add it to LAYERS and the README"
            ));
            continue;
        };
        for (to, at) in tos {
            for (importer, banned, why) in FORBIDDEN {
                if importer == from && banned.contains(&to.as_str()) {
                    bad.push(format!("{at}: {from} imports {to} ({why})"));
                }
            }
            match layer(to) {
                Some(lt) if lt < lf => {}
                Some(lt) => bad.push(format!(
                    "{at}: {from} (layer {lf}) imports {to} (layer {lt}): imports go down only"
                )),
                None => bad.push(format!("{at}: {from} imports unknown module {to}")),
            }
        }
    }
    bad
}

#[test]
fn imports_follow_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let e = edges(&src);
    assert!(
        e.contains_key("daemon") && e["daemon"].iter().any(|(m, _)| m == "flow"),
        "the scan found no edges: the test would prove nothing"
    );
    let bad = violations(&e);
    assert!(bad.is_empty(), "layering violated:\n{}", bad.join("\n"));
}

#[test]
fn path_scanner_reads_every_form() {
    assert_eq!(imported_modules("use crate::model::Event;"), ["model"]);
    assert_eq!(
        imported_modules("use crate::{config::Config, flow, sys::{a, b}};"),
        ["config", "flow", "sys"]
    );
    assert_eq!(
        imported_modules("    let x = crate::export::proto::X; // crate::cli"),
        ["export"]
    );
    assert!(imported_modules("pub(crate) fn f() { $crate::x!() }").is_empty());
}

#[test]
fn a_forbidden_or_upward_edge_is_reported() {
    let mut e: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    e.entry("decode".into())
        .or_default()
        .insert(("sys".into(), "decode/mod.rs:1".into()));
    e.entry("model".into())
        .or_default()
        .insert(("flow".into(), "model.rs:1".into()));
    let bad = violations(&e);
    assert!(
        bad.iter().any(|b| b.contains("decode imports sys")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|b| b.contains("model imports flow")),
        "{bad:?}"
    );
    assert!(
        bad.iter().any(|b| b.contains("imports go down only")),
        "{bad:?}"
    );
}
