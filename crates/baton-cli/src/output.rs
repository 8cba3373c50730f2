//! Printing results: tables for people, JSON for scripts. Results go to
//! stdout, diagnostics to stderr.

#![allow(clippy::print_stdout)]

use baton_core::Entry;
use serde::Serialize;

pub fn line(s: &str) {
    println!("{s}");
}

pub fn raw(s: &str) {
    print!("{s}");
}

pub fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

pub fn entry_table(entries: &[Entry]) {
    if entries.is_empty() {
        println!("no entries");
        return;
    }
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("Entry ID:   {}", e.id);
        println!("SPIFFE ID:  {}", e.spiffe_id);
        println!("Parent ID:  {}", e.parent_id);
        for s in &e.selectors {
            println!("Selector:   {s}");
        }
        println!("X509 TTL:   {}s", e.x509_ttl_secs);
        println!("JWT TTL:    {}s", e.jwt_ttl_secs);
        for d in &e.dns_names {
            println!("DNS name:   {d}");
        }
    }
}
