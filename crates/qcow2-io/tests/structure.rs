//! Structure checks over the workspace's sources, run in CI:
//!
//! - the module graph has no circles: within each crate, no file imports
//!   (through `use`, or a `crate::`/`super::` path) from a file that
//!   imports from it, directly or around a longer loop;
//! - the header has one writer: only `qcow2-io`'s `header_writer.rs` writes
//!   header bytes (`qcow2-format` defines their layout).
//!
//! The graph is read from the sources as text: a file is a module, its
//! edges are the modules its `crate::`, `super::` and `self::` paths lead
//! to, with names a module re-exports (`pub use`) followed to the module
//! that defines them. Re-exports themselves, `mod` declarations, comments
//! and `#[cfg(test)]` modules are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path inside one crate (`[]` is the crate root).
type ModPath = Vec<String>;

struct Crate {
    name: String,
    /// Each file's module path and its source, comments and tests removed.
    files: BTreeMap<ModPath, String>,
    /// Names each module re-exports, and the absolute path they name.
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("lib" | "main" | "mod")
    ) {
        parts.pop();
    }
    if parts.first().map(String::as_str) == Some("bin") {
        parts.clear();
    }
    parts
}

/// The source without comments and without the `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree names (`a::{b, c::{d, e}}` gives `a::b`,
/// `a::c::d`, `a::c::e`), each split at `::`.
fn expand(tree: &str) -> Vec<ModPath> {
    let tree = without_renames(tree);
    let Some(open) = tree.find('{') else {
        return vec![tree
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()];
    };
    let prefix: ModPath = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand(p).into_iter().map(|mut rest| {
                if rest.first().map(String::as_str) == Some("self") {
                    rest.remove(0);
                }
                let mut full = prefix.clone();
                full.extend(rest);
                full
            })
        })
        .collect()
}

/// A `use` tree with whitespace and renames (`as NAME`) removed.
fn without_renames(tree: &str) -> String {
    let mut out = String::new();
    let mut tokens = tree.split_whitespace();
    while let Some(token) = tokens.next() {
        if token == "as" {
            let alias = tokens.next().unwrap_or("");
            out.extend(
                alias
                    .chars()
                    .skip_while(|c| c.is_alphanumeric() || *c == '_'),
            );
        } else {
            out.push_str(token);
        }
    }
    out
}

/// `use` statements of `code`: (public re-export?, tree).
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let starts_item = before
            .chars()
            .last()
            .is_none_or(|c| c.is_whitespace() || c == ';' || c == '{' || c == '}');
        let after = &rest[at + 4..];
        let Some(end) = after.find(';') else { break };
        if starts_item {
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let public = before[line_start..].trim_start().starts_with("pub");
            out.push((public, after[..end].to_owned()));
            rest = &after[end + 1..];
        } else {
            rest = after;
        }
    }
    out
}

/// `module`'s relative path made absolute (`crate::`, `super::`, `self::`),
/// or `None` for another crate's path.
fn absolute(module: &ModPath, path: &ModPath) -> Option<ModPath> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        "crate" => Some(rest.to_vec()),
        "self" => {
            let mut base = module.clone();
            base.extend(rest.iter().cloned());
            Some(base)
        }
        "super" => {
            let mut base = module.clone();
            // In `a/b.rs` and in `a/b/mod.rs` alike, `super` is `a`.
            base.pop();
            let mut rest = rest;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        _ => None,
    }
}

impl Crate {
    fn load(dir: &Path) -> Self {
        let src = dir.join("src");
        let mut paths = Vec::new();
        rs_files(&src, &mut paths);
        let mut files = BTreeMap::new();
        for file in &paths {
            let code = code_of(&fs::read_to_string(file).unwrap());
            files.insert(module_path(&src, file), code);
        }
        let mut reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>> = BTreeMap::new();
        for (module, code) in &files {
            for (public, tree) in use_statements(code) {
                if !public {
                    continue;
                }
                for path in expand(&tree) {
                    let path = match path.first().map(String::as_str) {
                        Some("crate" | "super" | "self") => path,
                        // `pub use child::Name` is relative to the module.
                        Some(head)
                            if files
                                .contains_key(&[module.clone(), vec![head.into()]].concat()) =>
                        {
                            [vec!["self".to_owned()], path].concat()
                        }
                        _ => continue,
                    };
                    if let (Some(target), Some(name)) = (absolute(module, &path), path.last()) {
                        reexports
                            .entry(module.clone())
                            .or_default()
                            .insert(name.clone(), target);
                    }
                }
            }
        }
        Self {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            files,
            reexports,
        }
    }

    /// The file module an absolute path leads to.
    fn resolve(&self, path: &[String], hops: usize) -> ModPath {
        let mut module: ModPath = Vec::new();
        for (i, segment) in path.iter().enumerate() {
            let mut deeper = module.clone();
            deeper.push(segment.clone());
            if self.files.contains_key(&deeper) {
                module = deeper;
                continue;
            }
            if hops < 8 {
                if let Some(target) = self.reexports.get(&module).and_then(|r| r.get(segment)) {
                    let mut full = target.clone();
                    full.extend(path[i + 1..].iter().cloned());
                    return self.resolve(&full, hops + 1);
                }
            }
            break;
        }
        module
    }

    /// Edges: each file module and the file modules it imports from.
    fn edges(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
        for (module, code) in &self.files {
            let mut paths: Vec<ModPath> = Vec::new();
            let mut body = code.clone();
            for (public, tree) in use_statements(code) {
                body = body.replacen(&tree, "", 1);
                if !public {
                    paths.extend(expand(&tree));
                }
            }
            for word in body.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("crate::")
                    || word.starts_with("super::")
                    || word.starts_with("self::")
                {
                    paths.push(
                        word.split("::")
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    );
                }
            }
            let targets = edges.entry(module.clone()).or_default();
            for path in paths {
                // `use child::Item` names a child module relatively.
                let path = match path.first() {
                    Some(head)
                        if self
                            .files
                            .contains_key(&[module.clone(), vec![head.clone()]].concat()) =>
                    {
                        [vec!["self".to_owned()], path].concat()
                    }
                    _ => path,
                };
                let Some(absolute) = absolute(module, &path) else {
                    continue;
                };
                let target = self.resolve(&absolute, 0);
                if &target != module {
                    targets.insert(target);
                }
            }
        }
        edges
    }
}

/// One circle of `edges`, if there is any.
fn find_circle(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        node: &ModPath,
        edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next) {
                Some(1) => {
                    let from = stack.iter().position(|m| m == next).unwrap();
                    let mut circle = stack[from..].to_vec();
                    circle.push(next.clone());
                    return Some(circle);
                }
                Some(_) => {}
                None => {
                    if let Some(circle) = visit(next, edges, state, stack) {
                        return Some(circle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node) {
            let mut stack = Vec::new();
            if let Some(circle) = visit(node, edges, &mut state, &mut stack) {
                return Some(circle);
            }
        }
    }
    None
}

fn show(path: &ModPath) -> String {
    if path.is_empty() {
        "crate".into()
    } else {
        path.join("::")
    }
}

#[test]
fn no_crate_has_an_import_circle() {
    let crates = workspace().join("crates");
    let mut checked = 0;
    let mut total_edges = 0;
    for entry in fs::read_dir(&crates).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("src").is_dir() {
            continue;
        }
        let krate = Crate::load(&dir);
        let edges = krate.edges();
        total_edges += edges.values().map(BTreeSet::len).sum::<usize>();
        if let Some(circle) = find_circle(&edges) {
            panic!(
                "import circle in {}: {}",
                krate.name,
                circle.iter().map(show).collect::<Vec<_>>().join(" -> ")
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} crates found");
    assert!(total_edges >= 50, "only {total_edges} import edges read");
}

/// The reader finds a planted circle, so a pass above means something.
#[test]
fn a_planted_circle_is_found() {
    let mut files = BTreeMap::new();
    files.insert(vec![], "mod a;\nmod b;\npub use a::Thing;\n".to_owned());
    files.insert(
        vec!["a".to_owned()],
        "use crate::b::{Other, more::{X}};\npub struct Thing;".to_owned(),
    );
    files.insert(
        vec!["b".to_owned()],
        "use crate::Thing;\npub struct Other;".to_owned(),
    );
    let krate = Crate {
        name: "planted".into(),
        reexports: BTreeMap::from([(
            vec![],
            BTreeMap::from([("Thing".to_owned(), vec!["a".to_owned(), "Thing".to_owned()])]),
        )]),
        files,
    };
    let circle = find_circle(&krate.edges()).expect("the planted circle");
    assert_eq!(circle.len(), 3, "{circle:?}");
    assert_eq!(
        expand("crate::{a::{B, C as D}, e}"),
        vec![
            vec!["crate", "a", "B"],
            vec!["crate", "a", "C"],
            vec!["crate", "e"]
        ]
        .into_iter()
        .map(|p| p.into_iter().map(str::to_owned).collect::<ModPath>())
        .collect::<Vec<_>>()
    );
}

/// Non-test code of every source file in the workspace's crates, by path.
fn all_sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(workspace().join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        rs_files(&src, &mut files);
        for file in files {
            let code = code_of(&fs::read_to_string(&file).unwrap());
            out.push((file, code));
        }
    }
    out
}

/// Whether whitespace-free `code` calls `write_at(..., 0)`.
fn writes_at_zero(code: &str) -> bool {
    code.match_indices("write_at(").any(|(at, call)| {
        let args = &code[at + call.len()..];
        let mut depth = 0;
        for (i, ch) in args.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' if depth == 0 => return args[..i].ends_with(",0"),
                ')' => depth -= 1,
                _ => {}
            }
        }
        false
    })
}

#[test]
fn only_the_header_writer_writes_header_bytes() {
    // qcow2-alloc's HeaderFields serves users of that crate alone; no
    // file of qcow2-io may use it (checked below).
    let owners = [
        Path::new("qcow2-io/src/header_writer.rs"),
        Path::new("qcow2-format/src/header.rs"),
        Path::new("qcow2-alloc/src/header_fields.rs"),
    ];
    let forbidden = [
        "REFCOUNT_TABLE_FIELDS_OFFSET",
        "encode_refcount_table_fields",
        "header.encode()",
        "Header::encode",
    ];
    let mut scanned = 0;
    for (file, code) in all_sources() {
        scanned += 1;
        if owners.iter().any(|o| file.ends_with(o)) {
            continue;
        }
        let compact: String = code.split_whitespace().collect();
        assert!(
            !(file.to_string_lossy().contains("qcow2-io/src/") && compact.contains("HeaderFields")),
            "{} uses qcow2-alloc's HeaderFields: qcow2-io writes its header through HeaderWriter",
            file.display()
        );
        for token in forbidden {
            assert!(
                !compact.contains(token),
                "{} uses {token}: header bytes are written by HeaderWriter only",
                file.display()
            );
        }
        assert!(
            !writes_at_zero(&compact),
            "{} writes at offset 0 (the header): use HeaderWriter",
            file.display()
        );
    }
    assert!(scanned > 50, "only {scanned} source files read");
    assert!(writes_at_zero("storage.write_at(&bytes,0).map_err(x)?;"));
    assert!(!writes_at_zero(
        "storage.read_at(&mut m,0)?;storage.write_at(&b,f(0))?;"
    ));
}

/// The public declarations of one crate, one per line, sorted: every
/// `pub` item, field, variant (`Enum::Variant`) and method signature
/// (`Type::`-prefixed) outside tests, whitespace collapsed. Moving code
/// between files changes nothing here. Items `pub` inside private modules
/// are listed too, so the list is a superset of what callers can reach.
fn public_declarations(crate_dir: &Path) -> Vec<String> {
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut out = Vec::new();
    for file in files {
        let code = code_of(&fs::read_to_string(&file).unwrap());
        let mut pending: Option<(String, String)> = None;
        // Inside a public enum: its name and the line that closes it.
        let mut in_enum: Option<(String, String)> = None;
        // The type of the `impl` block a line is in, if any.
        let mut impl_type = String::new();
        for line in code.lines() {
            let trimmed = line.trim();
            if line.starts_with("impl") {
                let head = line.split('{').next().unwrap_or("");
                let head = head.rsplit(" for ").next().unwrap_or(head);
                impl_type = head
                    .trim_start_matches("impl")
                    .trim_start_matches(|c| c != ' ')
                    .split(['<', ' '])
                    .find(|w| !w.is_empty())
                    .unwrap_or("")
                    .to_owned();
            } else if line.starts_with('}') {
                impl_type.clear();
            }
            if let Some((name, close)) = &in_enum {
                if line == close {
                    in_enum = None;
                } else if trimmed.starts_with(|c: char| c.is_ascii_uppercase())
                    && line.len() - line.trim_start().len() == close.len() + 3
                {
                    let variant: String = trimmed
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.push(format!("variant {name}::{variant}"));
                }
            }
            if let Some((_, sig)) = pending.as_mut() {
                sig.push(' ');
                sig.push_str(trimmed);
            } else if trimmed.starts_with("pub ") {
                let owner = if line.starts_with("    pub fn ") && !impl_type.is_empty() {
                    format!("{impl_type}::")
                } else {
                    String::new()
                };
                pending = Some((owner, trimmed.to_owned()));
            } else {
                continue;
            }
            let (owner, sig) = pending.as_ref().unwrap();
            let end = if sig.starts_with("pub use ") {
                sig.find(';')
            } else {
                sig.find(['{', ';'])
            }
            .or_else(|| {
                // A field or variant ends at its comma.
                (sig.ends_with(',') && !sig.contains('(')).then(|| sig.len() - 1)
            });
            if let Some(end) = end {
                let text: Vec<&str> = sig[..end].split_whitespace().collect();
                let text = text.join(" ");
                if sig.starts_with("pub enum ") && sig[end..].starts_with('{') {
                    let indent = line.len() - line.trim_start().len();
                    let name = text["pub enum ".len()..]
                        .split(['<', ' '])
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    in_enum = Some((name, format!("{}}}", " ".repeat(indent))));
                }
                if let Some(tree) = text.strip_prefix("pub use ") {
                    // Re-exports by the names they give, not the paths
                    // they come from (internal modules may move).
                    for path in expand(tree) {
                        if let Some(name) = path.last() {
                            out.push(format!("pub use {name}"));
                        }
                    }
                } else {
                    out.push(format!("{owner}{text}"));
                }
                pending = None;
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The public API of the crates we publish matches `docs/public-api/`, so
/// every change to it is a deliberate one: run with `QCOW2_UPDATE_API=1`
/// to rewrite the snapshot, and review the diff as the API change it is.
#[test]
fn public_api_matches_the_snapshot() {
    let root = workspace();
    let update = std::env::var_os("QCOW2_UPDATE_API").is_some();
    let mut stale = Vec::new();
    for name in [
        "qcow2-format",
        "qcow2-alloc",
        "qcow2-dedup",
        "qcow2-io",
        "qcow2-nbd",
    ] {
        let now = public_declarations(&root.join("crates").join(name)).join("\n") + "\n";
        assert!(
            now.lines().count() > 10,
            "{name}: too few declarations read"
        );
        let snapshot = root.join("docs/public-api").join(format!("{name}.txt"));
        if update {
            fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
            fs::write(&snapshot, &now).unwrap();
            continue;
        }
        let recorded = fs::read_to_string(&snapshot).unwrap_or_default();
        if recorded != now {
            let old: BTreeSet<&str> = recorded.lines().collect();
            let new: BTreeSet<&str> = now.lines().collect();
            let gone: Vec<&&str> = old.difference(&new).collect();
            let added: Vec<&&str> = new.difference(&old).collect();
            stale.push(format!("{name}: removed {gone:#?}\nadded {added:#?}"));
        }
    }
    assert!(
        stale.is_empty(),
        "the public API changed; if that is meant, run the tests with QCOW2_UPDATE_API=1 \
         and commit docs/public-api/:\n{}",
        stale.join("\n")
    );
}

/// Refcounts have one owner: in `qcow2-io` only the allocator touches the
/// `Refcounts` type (the dedup table takes clusters through the
/// `ClusterSource` the allocator implements), and `qcow2-dedup` never
/// names it outside its tests.
#[test]
fn only_the_allocator_owns_the_refcounts() {
    let mut scanned = 0;
    for (file, code) in all_sources() {
        let in_io = file.components().any(|c| c.as_os_str() == "qcow2-io");
        let in_dedup = file.components().any(|c| c.as_os_str() == "qcow2-dedup");
        if !(in_io || in_dedup) || file.ends_with("qcow2-io/src/allocator.rs") {
            continue;
        }
        scanned += 1;
        for token in [
            "Refcounts::",
            "Refcounts,",
            "Refcounts}",
            "&mut Refcounts",
            "qcow2_alloc::rebuild_refcounts",
            "rebuild_refcounts,",
            "rebuild_refcounts}",
        ] {
            assert!(
                !code
                    .split_whitespace()
                    .collect::<String>()
                    .contains(&token.replace(' ', "")),
                "{} uses {token}: refcounts change through the allocator only",
                file.display()
            );
        }
    }
    assert!(scanned > 20, "only {scanned} files read");
}

/// Guest mappings have one owner: only the metadata module (and the block
/// map itself) changes the block map; the dedup state returns the
/// changes it wants instead of making them.
#[test]
fn only_the_metadata_changes_the_block_map() {
    let mutators = [
        "map.set_mapping(",
        "map.set_entry(",
        "map.set_l1_raw(",
        "map.update_entries_in_place(",
        "map.replace_l1(",
        "map.extend_l1(",
        "map.write_back(",
    ];
    let mut scanned = 0;
    for (file, code) in all_sources() {
        let path = file.to_string_lossy().replace('\\', "/");
        if !path.contains("qcow2-io/src/")
            || path.contains("qcow2-io/src/metadata/")
            || path.ends_with("qcow2-io/src/block_map.rs")
        {
            continue;
        }
        scanned += 1;
        let compact: String = code.split_whitespace().collect();
        for token in mutators {
            assert!(
                !compact.contains(token),
                "{} calls {token}: mapping changes go through Metadata",
                file.display()
            );
        }
    }
    assert!(scanned > 20, "only {scanned} files read");
}

/// Code stays in small pieces: no function of any crate is longer than 80
/// lines, and no file of `qcow2-io` has more than 600 lines of code
/// (tests apart).
#[test]
fn functions_and_files_stay_small() {
    let mut functions = 0;
    for (file, code) in all_sources() {
        let lines: Vec<&str> = code.lines().collect();
        let path = file.to_string_lossy().replace('\\', "/");
        if path.contains("qcow2-io/src/") {
            assert!(
                lines.len() <= 600,
                "{} has {} lines of code (at most 600)",
                file.display(),
                lines.len()
            );
        }
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let body = trimmed
                .strip_prefix("pub ")
                .or_else(|| trimmed.strip_prefix("pub(crate) "))
                .or_else(|| trimmed.strip_prefix("pub(super) "))
                .unwrap_or(trimmed);
            let Some(name) = body.strip_prefix("fn ") else {
                continue;
            };
            // A declaration without a body (in a trait) ends at `;`.
            let signature_end = lines[i..]
                .iter()
                .position(|l| l.contains('{') || l.trim_end().ends_with(';'))
                .map(|k| lines[i + k]);
            if signature_end.is_some_and(|l| !l.contains('{')) {
                continue;
            }
            let indent = &line[..line.len() - trimmed.len()];
            let close = format!("{indent}}}");
            let Some(length) = lines[i..].iter().position(|l| *l == close) else {
                continue;
            };
            functions += 1;
            let name: String = name
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            assert!(
                length < 80,
                "{}: fn {name} is {} lines long (at most 80)",
                file.display(),
                length + 1
            );
        }
    }
    assert!(functions > 500, "only {functions} functions measured");
}

/// The methods an `impl TYPE {` block of `code` declares.
fn methods_of(code: &str, type_name: &str) -> usize {
    let opening = format!("impl {type_name} {{");
    let mut count = 0;
    let mut inside = false;
    for line in code.lines() {
        if line == opening {
            inside = true;
        } else if inside && line == "}" {
            inside = false;
        } else if inside {
            let trimmed = line.trim_start();
            let body = trimmed
                .strip_prefix("pub(crate) ")
                .or_else(|| trimmed.strip_prefix("pub(super) "))
                .or_else(|| trimmed.strip_prefix("pub "))
                .unwrap_or(trimmed);
            if line.len() - trimmed.len() == 4 && body.starts_with("fn ") {
                count += 1;
            }
        }
    }
    count
}

#[test]
fn image_is_a_facade_and_metadata_stays_thin() {
    let sources = all_sources();
    let io: Vec<_> = sources
        .iter()
        .filter(|(file, _)| file.to_string_lossy().contains("qcow2-io/src/"))
        .collect();
    let image_files: Vec<_> = io
        .iter()
        .filter(|(_, code)| code.lines().any(|l| l == "impl Image {"))
        .map(|(file, _)| file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        image_files.len() <= 4,
        "impl Image in {} files (at most 4): {image_files:?}",
        image_files.len()
    );
    let (_, image) = io
        .iter()
        .find(|(file, _)| file.ends_with("image.rs"))
        .expect("image.rs");
    let start =
        image.find("pub struct Image {").expect("Image declared") + "pub struct Image {".len();
    let fields = &image[start..start + image[start..].find("\n}").unwrap()];
    assert!(
        !fields.contains("pub(crate)") && !fields.contains("pub "),
        "Image has non-private fields: {fields}"
    );
    let metadata: usize = io
        .iter()
        .filter(|(file, _)| file.to_string_lossy().contains("/metadata/"))
        .map(|(_, code)| methods_of(code, "Metadata"))
        .sum();
    assert!(
        (10..=30).contains(&metadata),
        "Metadata has {metadata} methods (at most 30; fewer than 10 means this count broke)"
    );
}
