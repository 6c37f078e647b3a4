//! JSON exactly as qemu-img prints it, so that a textual diff of our
//! `--output json` against qemu-img's is empty where the content agrees.
//!
//! qemu-img builds a QDict and prints it with its JSON writer: object
//! members come out in the order of the QDict's hash buckets (QEMU's
//! `tdb_hash` of the key, modulo 512 buckets; within a bucket the member
//! added last first), pretty-printed with four spaces per level, and every
//! non-ASCII character escaped as `\uXXXX`. Values are built here as
//! `serde_json::Value` in QAPI's field order (insertion order is kept), and
//! printed in QEMU's order.

use std::fmt::Write;

use serde_json::Value;

use crate::output::say;

const QDICT_BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` (qobject/qdict.c).
fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// `value` pretty-printed as qemu-img prints it (no trailing newline).
pub fn to_qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

/// The members of `map` in the order qemu-img prints them.
fn qemu_order(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (i, k, v))
        .collect();
    // Bucket order; inside a bucket the later insertion first.
    members.sort_by_key(|&(i, k, _)| (tdb_hash(k) % QDICT_BUCKETS, std::cmp::Reverse(i)));
    members.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// Prints the members of the object `value` as qemu-img's human output
/// prints format-specific data: `key with spaces: value`, nested objects
/// and lists indented by four spaces a level, list items as `[i]:`.
pub fn print_human(value: &Value, depth: usize) {
    let indent = " ".repeat(4 * depth);
    match value {
        Value::Object(map) => {
            for (key, item) in qemu_order(map) {
                let key = key.replace('-', " ");
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        say!("{indent}{key}:");
                        print_human(item, depth + 1);
                    }
                    other => say!("{indent}{key}: {}", scalar(other)),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                say!("{indent}[{i}]:");
                print_human(item, depth + 1);
            }
        }
        other => say!("{indent}{}", scalar(other)),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', 4 * depth));
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (n, (key, item)) in qemu_order(map).into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (' '..='~').contains(&c) => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn orders_members_like_qemu_img() {
        // Key order of `qemu-img check --output json` on QEMU 10.
        let v = json!({
            "filename": "u.qcow2",
            "format": "qcow2",
            "check-errors": 0,
            "image-end-offset": 90112,
            "total-clusters": 256,
            "allocated-clusters": 32,
            "fragmented-clusters": 16,
            "compressed-clusters": 16,
        });
        let text = to_qemu_json(&v);
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"'))
            .map(|l| &l[..l.find('"').unwrap()])
            .collect();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "check-errors",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
    }

    #[test]
    fn prints_empty_containers_and_escapes_as_qemu_does() {
        let v = json!({"data": {}, "children": [], "name": "a\u{e9}\"b"});
        assert_eq!(
            to_qemu_json(&v),
            "{\n    \"name\": \"a\\u00E9\\\"b\",\n    \"children\": [\n    ],\n    \"data\": {\n    }\n}"
        );
    }
}
