//! `baton-bench cfssl`: the peer. Drives a running `cfssl serve` at
//! `/api/v1/cfssl/sign` with pre-generated P-256 CSRs, the same way
//! `issuance` drives the broker (C clients, keep-alive, N seconds), and
//! counts the successful signatures. `bench/issuance.sh` starts cfssl.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Deserialize;
use serde_json::json;

use crate::stats;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of `cfssl serve`, like http://127.0.0.1:8888.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Distinct CSRs generated before the run and reused in a cycle.
    #[arg(long, default_value_t = 2000)]
    pool: usize,
    /// PID of the cfssl server, to report its CPU time per certificate.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Deserialize)]
struct SignAnswer {
    success: bool,
    #[serde(default)]
    errors: Vec<serde_json::Value>,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A P-256 CSR for a plain hostname: cfssl 1.2 cannot carry a URI SAN.
fn csr_pem(i: usize) -> anyhow::Result<String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![format!("w{i}.bench.test")])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("w{i}.bench.test"));
    params.distinguished_name = dn;
    Ok(pem(
        "CERTIFICATE REQUEST",
        params.serialize_request(&key)?.der(),
    ))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.concurrency == 0 || a.seconds == 0 || a.pool == 0 {
        bail!("--concurrency, --seconds and --pool must be positive");
    }
    let pool = a.pool;
    let bodies: Vec<Bytes> = tokio::task::spawn_blocking(move || {
        (0..pool)
            .map(|i| {
                Ok(Bytes::from(serde_json::to_vec(
                    &json!({ "certificate_request": csr_pem(i)? }),
                )?))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let bodies = Arc::new(bodies);
    let url = format!("{}/api/v1/cfssl/sign", a.url.trim_end_matches('/'));

    // One request first, so a misconfigured peer fails loudly.
    let probe = reqwest::Client::builder().no_proxy().build()?;
    let first = bodies.first().cloned().context("empty CSR pool")?;
    let answer: SignAnswer = probe
        .post(&url)
        .header("content-type", "application/json")
        .body(first)
        .send()
        .await?
        .json()
        .await?;
    if !answer.success {
        bail!("cfssl refused the probe CSR: {:?}", answer.errors);
    }

    let server_stat = a.server_pid.map(|p| format!("/proc/{p}/stat"));
    let server_cpu0 = server_stat.as_deref().and_then(stats::cpu_of);
    let cpu0 = stats::process_cpu();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.seconds);
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|k| {
            let client = reqwest::Client::builder().no_proxy().build();
            let url = url.clone();
            let bodies = Arc::clone(&bodies);
            tokio::spawn(async move {
                let client = client?;
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut i = k;
                while Instant::now() < deadline {
                    let body = bodies.get(i % bodies.len()).cloned().unwrap_or_default();
                    i = i.wrapping_add(7);
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let bytes = resp.bytes().await?;
                    match serde_json::from_slice::<SignAnswer>(&bytes) {
                        Ok(a) if a.success => ok += 1,
                        _ => {
                            failed += 1;
                            if failed == 1 {
                                eprintln!("cfssl sign failed: {}", String::from_utf8_lossy(&bytes));
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>((ok, failed))
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for t in tasks {
        let (o, f) = t.await??;
        ok += o;
        failed += f;
    }
    let elapsed = start.elapsed();
    let client_cpu = stats::process_cpu()
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a));
    let server_cpu = server_stat
        .as_deref()
        .and_then(stats::cpu_of)
        .zip(server_cpu0)
        .map(|(b, a)| b.saturating_sub(a));
    let rate = ok as f64 / elapsed.as_secs_f64();
    let per_cert =
        |cpu: Option<Duration>| cpu.filter(|_| ok > 0).map(|c| stats::micros(c) / ok as f64);
    println!(
        "cfssl /api/v1/cfssl/sign, {} clients, {} s: {ok} certs, {failed} failures: {rate:.0} certs/s; server CPU {} per cert, driver CPU {} per cert",
        a.concurrency,
        a.seconds,
        per_cert(server_cpu).map_or("n/a".into(), |v| format!("{v:.0} us")),
        per_cert(client_cpu).map_or("n/a".into(), |v| format!("{v:.0} us")),
    );
    println!(
        "{}",
        json!({
            "bench": "cfssl",
            "unix_time": stats::unix_now(),
            "nproc": stats::cores(),
            "seconds": a.seconds,
            "concurrency": a.concurrency,
            "certs": ok,
            "failures": failed,
            "elapsed_s": elapsed.as_secs_f64(),
            "certs_per_s": rate,
            "server_cpu_us_per_cert": per_cert(server_cpu),
            "driver_cpu_us_per_cert": per_cert(client_cpu),
        })
    );
    Ok(())
}
