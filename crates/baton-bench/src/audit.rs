//! The audit log under concurrent appenders (issue 11): each append returns
//! its receipt only once its event is durable (fsynced, power-loss
//! durability, as the broker opens its log); concurrent appends are group
//! committed under one signed checkpoint per batch. Measured per appender
//! count: appends/s, events per signed checkpoint, process CPU per append.
//! Then a log of `--verify-events` events written the same way is verified
//! from its file with every checkpoint signature checked, next to the
//! same-run floor of that many P-256 verifications on this machine's cores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use baton_audit::{AuditEvent, AuditKeys, AuditLog};

use crate::stats;

/// PERFORMANCE.md / issue 11: appends with receipts per second.
const APPEND_TARGET: f64 = 50_000.0;
/// Issue 11: verify of 1M events, every checkpoint signature, seconds.
const VERIFY_1M_TARGET_S: f64 = 10.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each appender count appends for.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Appender thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 16, 64, 256])]
    appenders: Vec<u64>,
    /// Events of the log verified at the end (0: skip), appended by the
    /// largest appender count.
    #[arg(long, default_value_t = 1_000_000)]
    verify_events: u64,
    /// Seconds each same-run limit (P-256 sign, verify) is measured for.
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
}

struct Round {
    appenders: u64,
    appended: u64,
    elapsed: Duration,
    checkpoints: u64,
    cpu: Option<Duration>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.appended as f64 / self.elapsed.as_secs_f64()
    }
}

/// Appends from `appenders` threads until `stop` says so or `max` events
/// are in; every receipt is checked to name its own event.
fn append_round(
    log: &AuditLog,
    events: &[AuditEvent],
    appenders: u64,
    dur: Option<Duration>,
    max: u64,
) -> anyhow::Result<Round> {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let tx0 = log.transactions();
    let cpu0 = stats::process_cpu();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..appenders)
            .map(|_| {
                let (next, stop) = (&next, &stop);
                s.spawn(move || -> anyhow::Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= max {
                            break;
                        }
                        let e = events
                            .get((i % events.len() as u64) as usize)
                            .context("no events")?;
                        let r = log.append(e)?;
                        if r.checkpoint.size <= r.index {
                            bail!("receipt {} outside its checkpoint", r.index);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        if let Some(dur) = dur {
            while start.elapsed() < dur && !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        }
        for h in handles {
            h.join().map_err(|_| anyhow!("append thread died"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let elapsed = start.elapsed();
    let appended = log.size()?;
    Ok(Round {
        appenders,
        appended,
        elapsed,
        checkpoints: log.transactions() - tx0,
        cpu: cpu0
            .zip(stats::process_cpu())
            .map(|(a, b)| b.saturating_sub(a) / appended.max(1) as u32),
    })
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| run_blocking(a))
}

fn run_blocking(a: Args) -> anyhow::Result<()> {
    let nproc = stats::cores();
    let limit = Duration::from_secs_f64(a.limit_seconds);
    let sign = crate::limits::p256_sign_rate(limit)?;
    let verify = crate::delegation::p256_verify_rate(limit)?;
    println!("# baton-bench audit (nproc {nproc})");
    println!("limits, one core: P-256 sign {sign:.0}/s, verify {verify:.0}/s");

    let at = stats::unix_now();
    let events: Vec<AuditEvent> = (0..64u64)
        .map(|i| crate::delegation::hop_events(i, at))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();

    let mut rounds = Vec::new();
    for &n in &a.appenders {
        let dir = tempfile::tempdir()?;
        let log = AuditLog::open(&dir.path().join("audit.db"), AuditKeys::generate()?)?;
        let r = append_round(
            &log,
            &events,
            n.max(1),
            Some(Duration::from_secs_f64(a.seconds)),
            u64::MAX,
        )?;
        println!(
            "append+receipt, {:>3} appenders: {:>8.0}/s ({:.2} of the 50k/s target); {:.1} events per signed checkpoint; CPU per append {}",
            r.appenders,
            r.rate(),
            r.rate() / APPEND_TARGET,
            r.appended as f64 / r.checkpoints.max(1) as f64,
            r.cpu
                .map_or("n/a".into(), |c| format!("{:.1} us", stats::micros(c))),
        );
        rounds.push(r);
    }

    let mut verify_json = serde_json::Value::Null;
    if a.verify_events > 0 {
        let appenders = a.appenders.iter().copied().max().unwrap_or(256).max(1);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.db");
        let keys = AuditKeys::generate()?;
        let public_key = keys.public_key().to_vec();
        let log = AuditLog::open(&path, keys)?;
        let w = append_round(&log, &events, appenders, None, a.verify_events)?;
        drop(log);
        let start = Instant::now();
        let report = AuditLog::verify_file(&path, &public_key)?;
        let took = start.elapsed();
        if report.size != a.verify_events {
            bail!(
                "verified {} events, appended {}",
                report.size,
                a.verify_events
            );
        }
        let per_1m = took.as_secs_f64() * 1e6 / report.size as f64;
        let floor_1m = 1e6 / (verify * nproc as f64);
        println!(
            "verify_file of {} events ({} appended by {appenders} appenders at {:.0}/s): every signature ({} checkpoints) {:.2} s = {per_1m:.2} s per 1M ({:.2} of the 10 s target); one P-256 verify per event on {nproc} cores would take {floor_1m:.1} s per 1M",
            report.size,
            report.size,
            w.rate(),
            report.signatures,
            took.as_secs_f64(),
            per_1m / VERIFY_1M_TARGET_S,
        );
        verify_json = serde_json::json!({
            "events": report.size,
            "appenders": appenders,
            "append_rate": w.rate(),
            "signatures": report.signatures,
            "seconds": took.as_secs_f64(),
            "seconds_per_1m": per_1m,
            "floor_one_verify_per_event_1m": floor_1m,
        });
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "audit",
            "nproc": nproc,
            "p256_sign_per_s": sign,
            "p256_verify_per_s": verify,
            "rounds": rounds.iter().map(|r| serde_json::json!({
                "appenders": r.appenders,
                "appended": r.appended,
                "per_s": r.rate(),
                "events_per_checkpoint": r.appended as f64 / r.checkpoints.max(1) as f64,
                "cpu_per_append_us": r.cpu.map(stats::micros),
            })).collect::<Vec<_>>(),
            "verify": verify_json,
        })
    );
    Ok(())
}
