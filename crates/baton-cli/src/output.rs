//! Printing results: tables for people, JSON for scripts. Results go to
//! stdout, diagnostics to stderr.
//!
//! Every write to stdout goes through [`raw`]: when the reader went away
//! (`baton entry list | head -1`), the process ends quietly with exit code
//! 0, as Unix tools do, instead of panicking as `println!` would.

use std::io::Write;

use baton_core::Entry;
use serde::Serialize;

/// Prints `s` and a newline. What the broker answers carries text callers
/// wrote (agents, tool servers): each line of it is shown with its control
/// and invisible characters escaped, so none can move the cursor, draw a
/// line, or reorder what the operator reads.
pub fn line(s: &str) {
    raw(&format!("{}\n", shown(s)));
}

/// `s` line by line, each with its control and invisible characters
/// escaped ([`baton_core::text::controls_escaped`]); the line breaks kept.
pub fn shown(s: &str) -> String {
    s.split('\n')
        .map(baton_core::text::controls_escaped)
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON text with the control and invisible characters its encoder leaves
/// as they are (C1 controls, bidi overrides, zero-width and tag
/// characters: they only occur inside strings) written as `\uXXXX`
/// escapes: the same JSON value, safe on a terminal.
fn json_shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && baton_core::text::is_unsafe_to_show(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{:04x}", u));
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn raw(s: &str) {
    bytes(s.as_bytes());
}

/// Writes to stdout; a closed pipe ends the process quietly (exit 0),
/// another write error is reported once and ends it with a failure.
pub fn bytes(b: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(b).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "error: cannot write the output: {e}");
        std::process::exit(i32::from(crate::cli::EXIT_FAILURE));
    }
}

pub fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => raw(&format!("{}\n", json_shown(&s))),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot encode output: {e}");
        }
    }
}

pub fn entry_table(entries: &[Entry]) {
    if entries.is_empty() {
        line("no entries");
        return;
    }
    let mut out = String::new();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("Entry ID:   {}\n", e.id));
        out.push_str(&format!("SPIFFE ID:  {}\n", e.spiffe_id));
        out.push_str(&format!("Parent ID:  {}\n", e.parent_id));
        for s in &e.selectors {
            out.push_str(&format!("Selector:   {s}\n"));
        }
        out.push_str(&format!("X509 TTL:   {}s\n", e.x509_ttl_secs));
        out.push_str(&format!("JWT TTL:    {}s\n", e.jwt_ttl_secs));
        for d in &e.dns_names {
            out.push_str(&format!("DNS name:   {d}\n"));
        }
    }
    raw(&shown(&out));
}

/// A unix time for people: RFC 3339, and how far from now (`-` for 0,
/// which the API uses for "none").
pub fn when(secs: u64) -> String {
    if secs == 0 {
        return "-".to_owned();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let stamp = humantime::format_rfc3339_seconds(at);
    let now = std::time::SystemTime::now();
    let rel = |d: std::time::Duration| {
        humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
    };
    match now.duration_since(at) {
        Ok(past) => format!("{stamp} ({} ago)", rel(past)),
        Err(e) => format!("{stamp} (in {})", rel(e.duration())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{json_shown, shown};

    /// Caller text in a table or in JSON reaches the terminal escaped, and
    /// JSON stays the same value. The control: plain text is unchanged.
    #[test]
    fn caller_text_is_shown_escaped_in_tables_and_json() {
        assert_eq!(shown("a\nb ünï"), "a\nb ünï");
        assert_eq!(shown("x\u{1b}[2J\ny\u{202e}z"), "x\\u{1b}[2J\ny\\u{202e}z");
        let v = serde_json::json!({"tool": "inv\u{202e}fdp\u{85}\u{e0041}", "n": "plain"});
        let text = serde_json::to_string_pretty(&v).unwrap();
        let safe = json_shown(&text);
        assert!(
            !safe
                .chars()
                .any(|c| c != '\n' && baton_core::text::is_unsafe_to_show(c)),
            "{safe}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), v);
    }
}
