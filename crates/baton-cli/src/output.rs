//! Printing results: tables for people, JSON for scripts. Results go to
//! stdout, diagnostics to stderr.
//!
//! Every write to stdout goes through [`raw`]: when the reader went away
//! (`baton entry list | head -1`), the process ends quietly with exit code
//! 0, as Unix tools do, instead of panicking as `println!` would.

use std::io::Write;

use baton_core::Entry;
use serde::Serialize;

pub fn line(s: &str) {
    raw(&format!("{s}\n"));
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
        Ok(s) => line(&s),
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
    raw(&out);
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
