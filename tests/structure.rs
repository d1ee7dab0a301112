//! The crate's structure, checked from its source: no file imports a file that imports it back
//! (directly or through others), and the engine floor (backend, keys as values, settings,
//! core, guard, lease, renewal, `Locks`) imports nothing of HTTP.
//!
//! Each `crate::…`, `super::…` and `$crate::…` path in a source file (in `use` items or inline;
//! comments and `#[cfg(test)] mod tests` left out) is resolved to the file that defines the item,
//! following `pub use` re-exports, so that a facade such as `key/mod.rs` re-exporting its
//! submodules' items is not counted as a dependency of the files that name items through it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The engine floor: these files know nothing of HTTP.
const ENGINE: &[&str] = &[
    "backend/mod.rs",
    "backend/cluster.rs",
    "backend/contract.rs",
    "backend/commands.rs",
    "backend/memory.rs",
    "backend/redis.rs",
    "backend/redlock.rs",
    "backend/sentinel.rs",
    "backend/failure.rs",
    "backend/tls.rs",
    "key/error.rs",
    "key/lock_key.rs",
    "settings.rs",
    "core.rs",
    "acquire.rs",
    "deadline.rs",
    "guard.rs",
    "lease.rs",
    "renewal.rs",
    "locks.rs",
    "telemetry.rs",
    "backend/wakeups.rs",
    "backend/subscriber.rs",
    "backend/cluster_subscriber.rs",
    "wait/mod.rs",
    "wait/queue.rs",
    "wait/estimate.rs",
];

/// Crates an engine file must not use.
const HTTP_CRATES: &[&str] = &[
    "http",
    "http_body",
    "axum",
    "hyper",
    "tower_service",
    "tower_layer",
];

struct Source {
    /// Module path segments below the crate root (`["key", "template"]`).
    module: Vec<String>,
    /// The code without comments and without its test module.
    code: String,
}

fn sources() -> BTreeMap<String, Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &mut files);
    let mut sources = BTreeMap::new();
    for file in files {
        let relative = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if relative.ends_with("/tests.rs") {
            continue; // a test module in its own file
        }
        let mut module: Vec<String> = relative
            .trim_end_matches(".rs")
            .split('/')
            .map(str::to_owned)
            .collect();
        if module
            .last()
            .is_some_and(|last| last == "mod" || last == "lib")
        {
            module.pop();
        }
        let code = strip(&fs::read_to_string(&file).unwrap());
        sources.insert(relative, Source { module, code });
    }
    sources
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The code of a file without comments (line comments, doc comments) and without the
/// `#[cfg(test)] mod tests` module that ends it.
fn strip(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                // A trailing comment (`code; // why`); paths never contain `// `.
                line.split(" // ").next().unwrap_or("")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a file names: `use` trees expanded, and inline `crate::`/`super::`/`$crate::`
/// paths. Relative to the crate root (`["key", "LockKey"]`).
fn paths(source: &Source, modules: &BTreeMap<Vec<String>, String>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let code = &source.code;
    // `use` items (possibly spanning lines, with nested braces).
    let mut rest = code.as_str();
    while let Some(at) = find_use(rest) {
        let item = &rest[at..];
        let end = item.find(';').unwrap_or(item.len());
        for path in expand(&use_tree(&item[..end])) {
            if let Some(path) = absolute(&source.module, &path) {
                found.push(path);
            } else if let Some(first) = path.first() {
                // `use child::Item` names a submodule of this module.
                let mut child = source.module.clone();
                child.push(first.clone());
                if modules.contains_key(&child) {
                    child.extend(path[1..].iter().cloned());
                    found.push(child);
                }
            }
        }
        rest = &item[end..];
    }
    // Inline paths.
    for start in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(start) {
            let before = rest[..at].chars().next_back();
            let path: String = rest[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            rest = &rest[at + start.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$')
                || path.ends_with("::")
            {
                // Part of a longer path (`$crate::`, `foo::crate`), or the prefix of a use
                // tree (`use super::{…}`, read above).
                continue;
            }
            let segments: Vec<String> = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if let Some(path) = absolute(&source.module, &segments) {
                found.push(path);
            }
        }
    }
    let mut rest = code.as_str();
    while let Some(at) = rest.find("$crate::") {
        let path: String = rest[at + 1..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let segments: Vec<String> = path
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(path) = absolute(&source.module, &segments) {
            found.push(path);
        }
        rest = &rest[at + 8..];
    }
    found
}

/// Where the next `use` item starts (at the start of a line, possibly `pub`/`pub(crate)`).
fn find_use(code: &str) -> Option<usize> {
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        for prefix in ["use ", "pub use ", "pub(crate) use "] {
            if trimmed.starts_with(prefix) {
                return Some(offset + indent);
            }
        }
        offset += line.len();
    }
    None
}

/// The tree of a `use` item (`pub use a::{b, c as d}` → `a::{b,c@d}`): no visibility, no
/// whitespace, renames marked with `@`.
fn use_tree(item: &str) -> String {
    item.trim_start_matches("pub(crate) ")
        .trim_start_matches("pub ")
        .trim_start_matches("use ")
        .replace(" as ", "@")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// The paths of a use tree such as `crate::a::{b,c::{d,e@f}}` (see [`use_tree`]).
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn go(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        if let Some(open) = tree.find('{') {
            let head: Vec<String> = tree[..open]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let mut prefix = prefix.to_vec();
            prefix.extend(head);
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&prefix, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            go(&prefix, &inner[start..], out);
        } else if !tree.is_empty() {
            let mut path = prefix.to_vec();
            let tree = tree.split('@').next().unwrap_or(tree);
            path.extend(
                tree.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
            if path.last().is_some_and(|last| last == "self") {
                path.pop();
            }
            out.push(path);
        }
    }
    let mut out = Vec::new();
    go(&[], tree, &mut out);
    out
}

/// `path`, named in `module`, from the crate root; `None` for other crates.
fn absolute(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    match first.as_str() {
        "crate" | "$crate" => Some(path[1..].to_vec()),
        "super" => {
            let mut base = module.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        "self" => {
            let mut base = module.to_vec();
            base.extend(path[1..].iter().cloned());
            Some(base)
        }
        _ => None,
    }
}

/// The file of each module path.
fn module_files(sources: &BTreeMap<String, Source>) -> BTreeMap<Vec<String>, String> {
    sources
        .iter()
        .map(|(file, source)| (source.module.clone(), file.clone()))
        .collect()
}

/// The file that defines what `path` names, following re-exports; `None` for the crate root
/// itself or a name not found.
fn resolve(
    sources: &BTreeMap<String, Source>,
    modules: &BTreeMap<Vec<String>, String>,
    path: &[String],
    depth: usize,
) -> Option<String> {
    if depth > 8 {
        return None;
    }
    // The longest prefix that is a module file.
    let mut module_len = path.len();
    while module_len > 0 && !modules.contains_key(&path[..module_len]) {
        module_len -= 1;
    }
    let file = modules.get(&path[..module_len])?;
    let Some(item) = path.get(module_len) else {
        return Some(file.clone()); // the module itself
    };
    let source = &sources[file];
    // Re-exported here? Follow it.
    let mut rest = source.code.as_str();
    while let Some(at) = find_use(rest) {
        let use_item = &rest[at..];
        let end = use_item.find(';').unwrap_or(use_item.len());
        let text = &use_item[..end];
        if text.starts_with("pub") {
            for exported in expand(&use_tree(text)) {
                if exported.last() == Some(item) {
                    let target = if exported.first().is_some_and(|s| {
                        s == "crate" || s == "super" || s == "self" || s == "$crate"
                    }) {
                        absolute(&source.module, &exported)?
                    } else {
                        // A child module of this one (`pub use template::KeyTemplate`).
                        let mut target = source.module.clone();
                        target.extend(exported.iter().cloned());
                        target
                    };
                    if modules.contains_key(&target[..target.len().saturating_sub(1)])
                        || modules.contains_key(&target[..])
                    {
                        return resolve(sources, modules, &target, depth + 1);
                    }
                    return None; // another crate's item
                }
            }
        }
        rest = &use_item[end..];
    }
    Some(file.clone())
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources = sources();
    let modules = module_files(&sources);
    let mut graph = BTreeMap::new();
    for (file, source) in &sources {
        let mut edges = BTreeSet::new();
        for path in paths(source, &modules) {
            if let Some(target) = resolve(&sources, &modules, &path, 0)
                && target != *file
                && target != "lib.rs"
            {
                // `mod x;` declarations are not imports; a parent re-exporting a child is
                // resolved through to the child's items, not counted as importing it back.
                edges.insert(target);
            }
        }
        graph.insert(file.clone(), edges);
    }
    graph
}

/// Strongly connected components of more than one file (or a file importing itself).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, recursive (the graph is small).
    struct Tarjan<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, node: &'g str) {
            self.index.insert(node, self.next);
            self.low.insert(node, self.next);
            self.next += 1;
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flatten() {
                let next = next.as_str();
                if !self.graph.contains_key(next) {
                    continue;
                }
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !tarjan.index.contains_key(node.as_str()) {
            tarjan.visit(node);
        }
    }
    tarjan.found
}

#[test]
fn no_source_file_imports_a_file_that_imports_it_back() {
    let graph = graph();
    let cycles = cycles(&graph);
    let described: Vec<String> = cycles
        .iter()
        .map(|cycle| {
            let edges: Vec<String> = cycle
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| cycle.contains(to))
                        .map(move |to| format!("{from} -> {to}"))
                })
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles: {described:#?}");
}

#[test]
fn the_engine_imports_nothing_of_http() {
    let graph = graph();
    let sources = sources();
    for file in ENGINE {
        let edges = graph
            .get(*file)
            .unwrap_or_else(|| panic!("{file} is not a source file any more: update ENGINE"));
        for to in edges {
            assert!(
                ENGINE.contains(&to.as_str()),
                "the engine file {file} imports the adapter file {to}"
            );
        }
        let code = &sources[*file].code;
        for krate in HTTP_CRATES {
            assert!(
                !names_crate(code, krate),
                "the engine file {file} uses the crate `{krate}`"
            );
        }
    }
}

/// Whether `code` names the crate `krate` in a path (`http::…`, `&http::…`, `<axum::…`), not
/// as the tail of a longer path (`crate::http::…`, `my_http::…`).
fn names_crate(code: &str, krate: &str) -> bool {
    let needle = format!("{krate}::");
    code.match_indices(&needle).any(|(at, _)| {
        !code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

#[test]
fn the_checker_sees_cycles_and_follows_re_exports() {
    let mut graph = BTreeMap::new();
    graph.insert("a.rs".to_owned(), BTreeSet::from(["b.rs".to_owned()]));
    graph.insert("b.rs".to_owned(), BTreeSet::from(["c.rs".to_owned()]));
    graph.insert("c.rs".to_owned(), BTreeSet::from(["a.rs".to_owned()]));
    graph.insert("d.rs".to_owned(), BTreeSet::from(["a.rs".to_owned()]));
    assert_eq!(cycles(&graph), vec![vec!["a.rs", "b.rs", "c.rs"]]);

    assert_eq!(
        expand(&use_tree("use crate::a::{b, c::{d, e as f}, self}")),
        vec![
            vec!["crate", "a", "b"],
            vec!["crate", "a", "c", "d"],
            vec!["crate", "a", "c", "e"],
            vec!["crate", "a"],
        ]
    );
    let sources = sources();
    let modules = module_files(&sources);
    let lock_layer = resolve(&sources, &modules, &["LockLayer".to_owned()], 0);
    assert_eq!(lock_layer.as_deref(), Some("layer.rs"));
    let graph = self::graph();
    assert!(
        graph["service.rs"].contains("future.rs"),
        "{:?}",
        graph["service.rs"]
    );
}

/// `cargo test --test structure -- --ignored --nocapture` prints each file's imports.
#[test]
#[ignore = "prints the import graph"]
fn print_the_import_graph() {
    for (file, edges) in graph() {
        println!(
            "{file} -> {}",
            edges.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
}
