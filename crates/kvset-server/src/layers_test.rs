//! Keeps the crate's imports pointing one way (see the layer table in `lib.rs`).
//!
//! Every source file belongs to a unit (a top-level module, or one service or task) and every
//! unit to a layer. A file may name (`crate::…`) only units of lower layers, its own unit, and
//! — for a service or task — the parent module (`service`, `tasks`) that holds their shared
//! helpers. Leaves and pipeline modules may use others of their own layer, as long as the
//! whole import graph stays free of cycles.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;

/// Each unit and its layer, bottom (1) to top (6).
const LAYERS: &[(&str, u8)] = &[
    ("channels", 1),
    ("devcerts", 1),
    ("tls", 2),
    ("auth", 2),
    ("cluster_id", 1),
    ("config", 1),
    ("errors", 1),
    ("identity", 1),
    ("logging", 1),
    ("metrics", 1),
    ("pb", 1),
    ("query", 1),
    ("watch_types", 1),
    ("timeline", 1),
    ("batcher", 2),
    ("forward", 2),
    ("network", 2),
    ("read_index", 2),
    ("lessor", 2),
    ("watch_hub", 2),
    ("recovery", 2),
    ("member", 3),
    ("gateway", 4),
    ("service", 4),
    ("service::cluster", 4),
    ("service::etcd", 4),
    ("service::kv", 4),
    ("service::ops", 4),
    ("service::raft", 4),
    ("tasks", 4),
    ("tasks::compactor", 4),
    ("tasks::leases", 4),
    ("tasks::membership", 4),
    ("tasks::quota", 4),
    ("tasks::raft_metrics", 4),
    ("tasks::replicas", 4),
    ("server", 5),
    ("node", 6),
    // Tests only: decoders of every layer under property tests.
    ("fuzz", 6),
];

/// Modules whose children are units of their own.
const PARENTS: &[&str] = &["service", "tasks"];

fn layer(unit: &str) -> Option<u8> {
    LAYERS.iter().find(|(u, _)| *u == unit).map(|(_, l)| *l)
}

/// The unit a file under `src/` belongs to (`None` for the crate root and this test).
fn unit_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let stem = |s: &str| s.trim_end_matches(".rs").trim_end_matches("_test").to_string();
    match parts.as_slice() {
        [file] if file == "lib.rs" || file == "layers_test.rs" => None,
        [file] => Some(stem(file)),
        [dir, file] if PARENTS.contains(&dir.as_str()) && file == "mod.rs" => Some(dir.clone()),
        [dir, file] if PARENTS.contains(&dir.as_str()) => Some(format!("{dir}::{}", stem(file))),
        [dir, child, ..] if PARENTS.contains(&dir.as_str()) => Some(format!("{dir}::{child}")),
        [dir, ..] => Some(dir.clone()),
        [] => None,
    }
}

/// The paths of a use-tree starting at `s` (after `crate::`), with nested groups written out:
/// `{a::b, c::{d, e}}` gives `a::b`, `c::d`, `c::e`.
fn use_tree(s: &str) -> Vec<String> {
    fn tree(s: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_' || s[*i] == b':') {
            *i += 1;
        }
        let path = format!("{prefix}{}", String::from_utf8_lossy(&s[start..*i]));
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
        if *i < s.len() && s[*i] == b'{' {
            *i += 1;
            loop {
                while *i < s.len() && (s[*i].is_ascii_whitespace() || s[*i] == b',') {
                    *i += 1;
                }
                if *i >= s.len() || s[*i] == b'}' {
                    *i += 1;
                    return;
                }
                let before = *i;
                tree(s, i, &path, out);
                if *i == before {
                    *i += 1; // `*`, `self` as the whole item, or anything else: skip it
                }
            }
        }
        out.push(path);
    }
    let mut out = Vec::new();
    tree(s.as_bytes(), &mut 0, "", &mut out);
    out
}

/// `text` with the file-level `super::` paths of a file at `relative` written from the crate
/// root (`crate::…`), so they are checked like the others. Only unindented lines count: an
/// indented `super::` is inside an inline module (`mod tests`) and names this file's module.
fn absolute_super(relative: &Path, text: &str) -> String {
    let mut module: Vec<String> =
        relative.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let indented = line.starts_with(char::is_whitespace);
        let mut rest = line;
        while let (false, Some(at)) = (indented, rest.find("super::")) {
            out.push_str(&rest[..at]);
            let mut ups = 0;
            while rest[at..].get(ups * 7..).is_some_and(|r| r.starts_with("super::")) {
                ups += 1;
            }
            let base = &module[..module.len().saturating_sub(ups)];
            out.push_str("crate::");
            base.iter().for_each(|m| out.push_str(&format!("{m}::")));
            rest = &rest[at + ups * 7..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

/// The units a source text names through `crate::` paths, grouped imports included.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        for path in use_tree(rest) {
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let Some(first) = segments.first() else { continue };
            let unit = match segments.get(1) {
                Some(second) if PARENTS.contains(first) && layer(&format!("{first}::{second}")).is_some() => {
                    format!("{first}::{second}")
                }
                _ => first.to_string(),
            };
            out.insert(unit);
        }
    }
    out
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).expect("under src");
            if let Some(unit) = unit_of(relative) {
                let text = absolute_super(relative, &std::fs::read_to_string(&path).expect("read source"));
                out.push((relative.display().to_string(), unit, text));
            }
        }
    }
}

/// Every violation of the layer rules in the files of `src`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, src, &mut files);
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, unit, text) in &files {
        let Some(mine) = layer(unit) else {
            problems.push(format!("{file}: unit `{unit}` has no layer in LAYERS"));
            continue;
        };
        for target in references(text) {
            if &target == unit {
                continue;
            }
            let Some(theirs) = layer(&target) else {
                problems.push(format!("{file}: names `crate::{target}`, which has no layer"));
                continue;
            };
            let parent = unit.split_once("::").map(|(p, _)| p);
            let ok = theirs < mine || (theirs == mine && (mine <= 2 || parent == Some(target.as_str())));
            if !ok {
                problems.push(format!(
                    "{file}: `{unit}` (layer {mine}) imports `{target}` (layer {theirs}): imports must point down"
                ));
            }
            graph.entry(unit.clone()).or_default().insert(target);
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        problems.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    problems
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn layers_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(problems.is_empty(), "layer violations:\n{}", problems.join("\n"));
}

#[test]
fn the_check_catches_an_upward_import_a_sibling_service_and_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("service")).unwrap();
    std::fs::write(src.join("errors.rs"), "use crate::member::LocalMember;\n").unwrap();
    std::fs::write(src.join("member.rs"), "use crate::errors::KvError;\n").unwrap();
    std::fs::write(src.join("service/kv.rs"), "use crate::service::cluster::status;\n").unwrap();
    std::fs::write(src.join("service/cluster.rs"), "use crate::service::observe;\n").unwrap();
    let problems = violations(src);
    let joined = problems.join("\n");
    assert!(joined.contains("`errors` (layer 1) imports `member` (layer 3)"), "{joined}");
    assert!(joined.contains("`service::kv` (layer 4) imports `service::cluster`"), "{joined}");
    assert!(joined.contains("import cycle"), "{joined}");
    assert!(!joined.contains("service/cluster.rs"), "a service may use its parent module: {joined}");
}

#[test]
fn the_check_reads_grouped_imports_and_super_paths() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("service/etcd")).unwrap();
    std::fs::write(src.join("metrics.rs"), "use crate::{config::Config, watch_hub::{Hub, Event}};\n")
        .unwrap();
    std::fs::write(
        src.join("config.rs"),
        "use super::member::LocalMember;\nmod tests {\n    use super::Config;\n}\n",
    )
    .unwrap();
    std::fs::write(
        src.join("service/etcd/kv.rs"),
        "use super::super::kv::convert;\nuse super::EtcdService;\n",
    )
    .unwrap();
    let joined = violations(src).join("\n");
    assert!(joined.contains("`metrics` (layer 1) imports `watch_hub` (layer 2)"), "{joined}");
    assert!(joined.contains("`config` (layer 1) imports `member` (layer 3)"), "{joined}");
    assert!(joined.contains("`service::etcd` (layer 4) imports `service::kv`"), "{joined}");
    assert!(!joined.contains("imports `config`"), "an indented super:: is the file's own module: {joined}");
    assert_eq!(use_tree("{a::b, c::{d, e}, self};"), ["a::b", "c::d", "c::e", "self"]);
}
