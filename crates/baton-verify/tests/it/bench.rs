//! Micro-benchmark (ignored by default). Run with:
//! `cargo test --release -p baton-verify --test it -- --ignored --nocapture bench`

use std::time::Instant;

use baton_verify::TokenVerifier;

use crate::common::*;

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn bench_verify_first_sight_and_seen_before() {
    let f = Fixture::new();
    let peer = f.peer();
    let n = 2_000;
    let tokens: Vec<String> = (0..n).map(|_| f.token()).collect();

    let v = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into());
    let mut first = Vec::with_capacity(n);
    for t in &tokens {
        let start = Instant::now();
        v.verify(t, &peer, NOW).unwrap();
        first.push(start.elapsed().as_nanos());
    }
    let mut seen = Vec::with_capacity(n * 10);
    for _ in 0..10 {
        for t in &tokens {
            let start = Instant::now();
            v.verify(t, &peer, NOW).unwrap();
            seen.push(start.elapsed().as_nanos());
        }
    }
    let stats = v.stats();
    assert_eq!(stats.misses, n as u64);
    assert_eq!(stats.hits, (n * 10) as u64);

    // Reference: one raw ES256 verification with aws-lc-rs in the same run.
    let key = f.ca.bundle().jwt_authorities[0].public_key.clone();
    let parsed = aws_lc_rs::signature::ParsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        &key,
    )
    .unwrap();
    let t = &tokens[0];
    let (msg, sig) = t.rsplit_once('.').unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .unwrap();
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        parsed.verify_sig(msg.as_bytes(), &sig).unwrap();
        raw.push(start.elapsed().as_nanos());
    }

    let report = |name: &str, v: &mut Vec<u128>| {
        v.sort_unstable();
        let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
        println!(
            "{name:<28} n={:<6} p50={:>8} ns  p99={:>8} ns  max={:>8} ns",
            v.len(),
            p(0.5),
            p(0.99),
            v[v.len() - 1]
        );
        (p(0.5), p(0.99))
    };
    println!("token length: {} bytes, chain depth 2", tokens[0].len());
    let (raw_p50, raw_p99) = report("raw ES256 verify (aws-lc)", &mut raw);
    let (first_p50, first_p99) = report("verify, first sight", &mut first);
    let (_, seen_p99) = report("verify, seen before", &mut seen);
    println!(
        "first sight / raw ES256: p50 {:.2}x, p99 {:.2}x; seen-before p99 = {:.1} us (target < 50 us)",
        first_p50 as f64 / raw_p50 as f64,
        first_p99 as f64 / raw_p99 as f64,
        seen_p99 as f64 / 1000.0
    );
}
