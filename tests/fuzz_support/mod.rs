//! Shared pieces of the `fuzz_*` property tests (included by path from
//! each crate's `tests/fuzz_*.rs`): a bounded proptest configuration that
//! `PROPTEST_CASES` can raise, and mutation strategies that turn a valid
//! input into a near-valid one.

#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` per property unless `PROPTEST_CASES` is set (then that many),
/// so CI stays fast and a long run is one environment variable away.
pub fn config(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    // Failing inputs are kept as regression unit tests by hand; do not write
    // proptest-regressions files into the source tree.
    c.failure_persistence = None;
    c
}

/// Fragments that parsers tend to mishandle.
pub const NASTY: &[&str] = &[
    "%",
    "%2e",
    "%00",
    "..",
    ".",
    "/",
    "//",
    "/../",
    ":",
    "::",
    "@",
    "?",
    "#",
    " ",
    "\t",
    "\n",
    "\0",
    "é",
    "\u{202e}",
    "😀",
    "\u{fffd}",
    "\\",
    "\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    "*",
    "-",
    "_",
    "0",
    "-1",
    "007",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "NaN",
    "null",
    "true",
    "=",
    "==",
    "+",
    ",",
    ".*",
    "A",
    "Z",
];

/// One edit of a string.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flip bits of the byte at (index mod len), keeping the result UTF-8 lossily.
    Flip(usize, u8),
    /// Keep only the first (n mod len+1) bytes.
    Truncate(usize),
    /// Insert a fragment at a char boundary.
    Insert(usize, String),
    /// Remove (n mod 8)+1 chars starting at a char boundary.
    Remove(usize, usize),
    /// Repeat the whole input (n mod 4)+2 times.
    Repeat(usize),
    /// Swap the case of every ASCII letter.
    SwapCase,
}

pub fn edit() -> impl Strategy<Value = Edit> {
    let fragment = prop_oneof![
        proptest::sample::select(NASTY).prop_map(str::to_owned),
        "\\PC{1,4}",
        any::<u64>().prop_map(|n| n.to_string()),
        (1usize..400).prop_map(|n| "a".repeat(n)),
    ];
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Edit::Flip(i, m)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), fragment).prop_map(|(i, f)| Edit::Insert(i, f)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, n)| Edit::Remove(i, n)),
        any::<usize>().prop_map(Edit::Repeat),
        Just(Edit::SwapCase),
    ]
}

fn boundary(s: &str, i: usize) -> usize {
    let mut at = i % (s.len() + 1);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

pub fn apply(s: &str, e: &Edit) -> String {
    match e {
        Edit::Flip(i, m) => {
            let mut b = s.as_bytes().to_vec();
            if !b.is_empty() {
                let at = i % b.len();
                b[at] ^= m;
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        Edit::Truncate(n) => s[..boundary(s, *n)].to_owned(),
        Edit::Insert(i, f) => {
            let at = boundary(s, *i);
            format!("{}{f}{}", &s[..at], &s[at..])
        }
        Edit::Remove(i, n) => {
            let at = boundary(s, *i);
            let rest: String = s[at..].chars().skip(n % 8 + 1).collect();
            format!("{}{rest}", &s[..at])
        }
        Edit::Repeat(n) => s.repeat(n % 4 + 2),
        Edit::SwapCase => s
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
    }
}

/// A string that is `valid` after 1 to `max` edits.
pub fn mutated(valid: String, max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(edit(), 1..=max)
        .prop_map(move |edits| edits.iter().fold(valid.clone(), |s, e| apply(&s, e)))
}

/// Byte-level edits of binary input (DER, signatures).
#[derive(Debug, Clone)]
pub enum ByteEdit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u8),
                Just(0x80),
                Just(0x81),
                Just(0x82),
                Just(0xff),
                any::<u8>()
            ]
        )
            .prop_map(|(i, v)| ByteEdit::Set(i, v)),
        any::<usize>().prop_map(ByteEdit::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| ByteEdit::Insert(i, v)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| ByteEdit::Remove(i, n)),
    ]
}

pub fn apply_bytes(b: &[u8], e: &ByteEdit) -> Vec<u8> {
    let mut b = b.to_vec();
    match e {
        ByteEdit::Flip(i, m) if !b.is_empty() => {
            let at = i % b.len();
            b[at] ^= m;
        }
        ByteEdit::Set(i, v) if !b.is_empty() => {
            let at = i % b.len();
            b[at] = *v;
        }
        ByteEdit::Truncate(n) => b.truncate(n % (b.len() + 1)),
        ByteEdit::Insert(i, v) => {
            let at = i % (b.len() + 1);
            b.splice(at..at, v.iter().copied());
        }
        ByteEdit::Remove(i, n) if !b.is_empty() => {
            let at = i % b.len();
            let end = (at + n).min(b.len());
            b.drain(at..end);
        }
        _ => {}
    }
    b
}

/// Bytes that are `valid` after 1 to `max` byte edits.
pub fn mutated_bytes(valid: Vec<u8>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(byte_edit(), 1..=max)
        .prop_map(move |edits| edits.iter().fold(valid.clone(), |b, e| apply_bytes(&b, e)))
}

/// JSON edits that keep it JSON: replace a value somewhere by a hostile one.
pub fn hostile_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1.5)),
        "\\PC{0,24}".prop_map(Value::String),
        proptest::sample::select(NASTY).prop_map(|s| Value::String(s.to_owned())),
        (1usize..3000).prop_map(|n| Value::String("a".repeat(n))),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_#0-9]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON path edit: which member (by index, mod the count) to replace, or
/// to delete, or a new member to add, applied at some depth.
#[derive(Debug, Clone)]
pub enum JsonEdit {
    Replace(Vec<usize>, serde_json::Value),
    Delete(Vec<usize>),
    Add(Vec<usize>, String, serde_json::Value),
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let path = proptest::collection::vec(any::<usize>(), 0..4);
    prop_oneof![
        (path.clone(), hostile_json()).prop_map(|(p, v)| JsonEdit::Replace(p, v)),
        path.clone().prop_map(JsonEdit::Delete),
        (path, "[a-z_#]{1,10}", hostile_json()).prop_map(|(p, k, v)| JsonEdit::Add(p, k, v)),
    ]
}

fn child(v: &mut serde_json::Value, i: usize) -> Option<&mut serde_json::Value> {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            let n = m.len();
            m.values_mut().nth(i % n)
        }
        serde_json::Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            a.get_mut(i % n)
        }
        _ => None,
    }
}

/// Walks `path` (indexes mod the size of each object/array) and applies the edit
/// at the container reached.
pub fn apply_json(v: &serde_json::Value, e: &JsonEdit) -> serde_json::Value {
    let mut out = v.clone();
    let (path, last) = match e {
        JsonEdit::Replace(p, _) | JsonEdit::Delete(p) | JsonEdit::Add(p, _, _) => {
            match p.split_last() {
                Some((l, rest)) => (rest.to_vec(), *l),
                None => (Vec::new(), 0),
            }
        }
    };
    edit_at(&mut out, &path, last, e);
    out
}

fn edit_at(cur: &mut serde_json::Value, path: &[usize], last: usize, e: &JsonEdit) {
    use serde_json::Value;
    if let Some((i, rest)) = path.split_first() {
        let descend = match &*cur {
            Value::Object(m) if !m.is_empty() => m
                .values()
                .nth(i % m.len())
                .is_some_and(|c| c.is_object() || c.is_array()),
            Value::Array(a) if !a.is_empty() => a
                .get(i % a.len())
                .is_some_and(|c| c.is_object() || c.is_array()),
            _ => false,
        };
        if descend && let Some(c) = child(cur, *i) {
            return edit_at(c, rest, last, e);
        }
    }
    match (e, &mut *cur) {
        (JsonEdit::Replace(_, new), c) => match child(c, last) {
            Some(slot) => *slot = new.clone(),
            None => *c = new.clone(),
        },
        (JsonEdit::Delete(_), Value::Object(m)) if !m.is_empty() => {
            let n = m.len();
            if let Some(k) = m.keys().nth(last % n).cloned() {
                m.remove(&k);
            }
        }
        (JsonEdit::Delete(_), Value::Array(a)) if !a.is_empty() => {
            let n = a.len();
            a.remove(last % n);
        }
        (JsonEdit::Add(_, k, new), Value::Object(m)) => {
            m.insert(k.clone(), new.clone());
        }
        (JsonEdit::Add(_, _, new), Value::Array(a)) => a.push(new.clone()),
        _ => {}
    }
}

/// A JSON document that is `valid` after 1 to `max` structural edits.
pub fn mutated_json(
    valid: serde_json::Value,
    max: usize,
) -> impl Strategy<Value = serde_json::Value> {
    proptest::collection::vec(json_edit(), 1..=max)
        .prop_map(move |edits| edits.iter().fold(valid.clone(), |v, e| apply_json(&v, e)))
}

/// `depth` nested arrays or objects around `inner` (serde_json refuses more
/// than 128 levels; parsers must turn that into an error, not a stack overflow).
pub fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}
