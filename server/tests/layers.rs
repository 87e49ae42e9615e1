//! The server's modules import one another in one direction only: each uses
//! only the modules listed after it in [`ORDER`], the order `lib.rs`'s crate
//! doc describes. A new import against that order (and so any cycle) fails here.

use std::{collections::BTreeSet, path::Path};

/// From the socket up; `lib.rs` and `main.rs` are the roots and may use anything.
const ORDER: &[&str] = &[
    "listener",
    "routes",
    "statics",
    "service",
    "handshake",
    "connection",
    "pubsub",
    "pubsub::auth",
    "hooks",
    "peer",
    "state",
    "topics",
    "shares",
    "engine",
    "engine::memory",
    "engine::idle",
    "engine::redis",
    "limits",
    "config",
    "config_file",
    "origin",
    "outbox",
    "shutdown",
    "metrics",
    "message",
    "frame",
    "response",
    "write_timeout",
    "message_reader",
];

/// The crate modules `source` refers to (`crate::x`, `use crate::{x, y::z}`),
/// outside comments and the unit tests.
fn imports(source: &str) -> BTreeSet<String> {
    let code: String = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..i].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..i].trim()));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = BTreeSet::new();
    for (rank, module) in ORDER.iter().enumerate() {
        let file = match module.split_once("::") {
            Some((dir, leaf)) => src.join(dir).join(format!("{leaf}.rs")),
            None if src.join(module).is_dir() => src.join(module).join("mod.rs"),
            None => src.join(format!("{module}.rs")),
        };
        let source = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for import in imports(&source) {
            let Some(at) = ORDER.iter().position(|m| *m == import || m.strip_prefix("pubsub::") == Some(&import))
            else {
                continue; // an item of the crate root (`crate::ServerConfig`…), not a module
            };
            assert!(at > rank, "{module} imports {import}, which is not below it in the layer order");
        }
        seen.insert(file);
    }
    let mut all: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    all.extend(std::fs::read_dir(src.join("pubsub")).unwrap().map(|e| e.unwrap().path()));
    for file in all.into_iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        let name = file.file_name().unwrap().to_str().unwrap();
        if name != "lib.rs" && name != "main.rs" {
            assert!(seen.contains(&file), "{} is missing from the layer order", file.display());
        }
    }
}
