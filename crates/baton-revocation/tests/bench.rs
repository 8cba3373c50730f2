//! `cargo test -p baton-revocation --release --test bench -- --ignored --nocapture`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::time::Instant;

use baton_revocation::{RedisStore, RevocationStore, Target, system_now};
use common::{RedisServer, rec, task};
use redis::Value;

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::Nil => 0,
        other => panic!("{other:?}"),
    }
}

fn info_field(v: &Value, name: &str) -> i64 {
    let text = match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => panic!("{other:?}"),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_cascade_memory_commands() {
    let srv = RedisServer::start();
    let s = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    let now = system_now();
    s.seed(&[], now).await.unwrap();
    let n = 10_000usize;
    let used = |v: &Value| info_field(v, "used_memory");
    let stats = |v: &Value| info_field(v, "total_commands_processed");
    let mem0 = used(&s.raw(redis::cmd("INFO").arg("memory")).await.unwrap());
    let cmd0 = stats(&s.raw(redis::cmd("INFO").arg("stats")).await.unwrap());
    let t0 = Instant::now();
    // A tree: root, then each node i has parent (i-1)/4 (fan-out 4), one task,
    // 50 agents, one node.
    for i in 0..n {
        let parent = if i == 0 {
            None
        } else {
            Some(format!("tok{:05}", (i - 1) / 4))
        };
        let r = rec(
            &format!("tok{i:05}"),
            Some(task(1)),
            &format!("agent/a{}", i % 50),
            parent.as_deref(),
            now + 3600,
        );
        s.register(&r, now).await.unwrap();
    }
    let reg = t0.elapsed();
    let cmd1 = stats(&s.raw(redis::cmd("INFO").arg("stats")).await.unwrap());
    let mem1 = used(&s.raw(redis::cmd("INFO").arg("memory")).await.unwrap());
    let rec_bytes = int(&s
        .raw(redis::cmd("MEMORY").arg("USAGE").arg("{bt}:cred:tok05000"))
        .await
        .unwrap());
    let kids_bytes = int(&s
        .raw(
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg("{bt}:children:tok00100"),
        )
        .await
        .unwrap());
    let t1 = Instant::now();
    let out = s
        .revoke(&Target::Subtree("tok00000".into()), "bench", now)
        .await
        .unwrap();
    let cascade = t1.elapsed();
    assert_eq!(out.len(), n);
    let mem2 = used(&s.raw(redis::cmd("INFO").arg("memory")).await.unwrap());
    let deny_bytes = int(&s
        .raw(redis::cmd("MEMORY").arg("USAGE").arg("{bt}:revoked-index"))
        .await
        .unwrap());
    // Redis counts the commands a script runs, plus the EVALSHA itself and
    // one `INFO stats`; the client makes one round trip per registration.
    let per_reg = (cmd1 - cmd0 - 1) as f64 / n as f64;
    println!(
        "registrations: {n} in {reg:?} ({:.1} µs each, sequential round trips)",
        reg.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "server commands per registration: {per_reg:.2} (one client round trip: EVALSHA, the rest run inside the script)"
    );
    println!(
        "cascade revocation of a {n}-credential subtree: {:.1} ms",
        cascade.as_secs_f64() * 1e3
    );
    println!(
        "bytes per live credential (used_memory delta / n, all keys incl. index sets): {}",
        (mem1 - mem0) / n as i64
    );
    println!(
        "MEMORY USAGE of one record hash: {rec_bytes} B; of a 4-member children set: {kids_bytes} B"
    );
    println!(
        "bytes per revoked id (used_memory delta / n: deny key + index member + stream share): {}",
        (mem2 - mem1) / n as i64
    );
    println!(
        "MEMORY USAGE of the deny set (revoked-index): {deny_bytes} B, {:.0} B per id",
        deny_bytes as f64 / n as f64
    );
}
