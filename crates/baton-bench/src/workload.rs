//! `baton-bench workload`: the node daemon's Workload API, served from its
//! cache. Broker and daemon run in this process, like `baton dev`; the
//! caller is this process too, attested by its uid.
//!
//! Measures FetchX509SVID time to first response (sequential calls, each a
//! fresh stream on one connection, and each on a fresh connection), then
//! opens S streams, each on its own connection as S workloads would, awaits
//! the first message of every one, and reports the process RSS. The RSS
//! covers broker, daemon and clients together: an upper bound for the daemon.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use serde_json::json;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::cluster::{self, Broker};
use crate::stats::{self, micros, percentile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent streams to open, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Sequential FetchX509SVID calls for the latency figures.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Seconds to wait for all streams' first messages before giving up.
    #[arg(long, default_value_t = 60)]
    stream_timeout: u64,
}

type Client = SpiffeWorkloadApiClient<Channel>;

/// Opens a FetchX509SVID stream and awaits its first message; returns the
/// time that took and the open stream.
async fn first_response(
    client: &mut Client,
) -> anyhow::Result<(Duration, Streaming<baton_proto::workload::X509svidResponse>)> {
    let req = cluster::x509_request();
    let start = Instant::now();
    let mut stream = client.fetch_x509svid(req).await?.into_inner();
    let msg = stream
        .message()
        .await?
        .context("stream ended before its first message")?;
    let took = start.elapsed();
    if msg.svids.is_empty() {
        bail!("first message holds no SVID");
    }
    Ok((took, stream))
}

struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self {
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or_default(),
            n: v.len(),
        }
    }
    fn line(&self, what: &str) -> String {
        format!(
            "{what}: n={} p50 {:.0} us, p99 {:.0} us, max {:.0} us; p99 is {:.2} of the 1 ms target",
            self.n,
            micros(self.p50),
            micros(self.p99),
            micros(self.max),
            self.p99.as_secs_f64() / 1e-3
        )
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "n": self.n,
            "p50_us": micros(self.p50),
            "p99_us": micros(self.p99),
            "max_us": micros(self.max),
            "p99_ratio_to_1ms_target": self.p99.as_secs_f64() / 1e-3,
        })
    }
}

async fn sequential_same_channel(channel: &Channel, n: usize) -> anyhow::Result<Latency> {
    let mut client = Client::new(channel.clone());
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(first_response(&mut client).await?.0);
    }
    Ok(Latency::of(v))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let token = broker.join_token().await?;
    let uid = cluster::own_uid()?;
    broker
        .create_entry(
            "/bench/workload",
            &token.node_id,
            &format!("unix:uid:{uid}"),
        )
        .await?;

    let socket = broker.dir.path().join("agent.sock");
    let agent = cluster::Agent::start(
        &broker,
        &token,
        socket.clone(),
        baton_agent::DEFAULT_SYNC_INTERVAL,
    )
    .await?;
    let ready = &agent.ready;

    // The daemon syncs once before it serves, so the SVID is normally
    // cached already; if that first sync was slow, retry briefly.
    let channel = cluster::connect_uds(ready.socket_path.clone()).await?;
    let mut client = Client::new(channel.clone());
    let mut attempts = 0;
    loop {
        attempts += 1;
        match first_response(&mut client).await {
            Ok(_) => break,
            Err(e) if attempts < 100 => {
                eprintln!("SVID not served yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("the daemon never served the SVID")),
        }
    }

    // Warm-up, then the measured calls.
    sequential_same_channel(&channel, 200.min(a.calls)).await?;
    let same_channel = sequential_same_channel(&channel, a.calls).await?;
    let fresh_n = (a.calls / 4).max(1);
    let mut fresh = Vec::with_capacity(fresh_n);
    for _ in 0..fresh_n {
        let start = Instant::now();
        let mut c = Client::new(cluster::connect_uds(socket.clone()).await?);
        first_response(&mut c).await?;
        fresh.push(start.elapsed());
    }
    let fresh_conn = Latency::of(fresh);

    // S streams, each on its own connection, all awaited to their first message.
    let rss_before = stats::rss_kib();
    let start = Instant::now();
    let opens = (0..a.streams).map(|_| {
        let socket = socket.clone();
        async move {
            let mut c = Client::new(cluster::connect_uds(socket).await?);
            let (_, stream) = first_response(&mut c).await?;
            Ok::<_, anyhow::Error>((c, stream))
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(a.stream_timeout),
        futures::future::join_all(opens),
    )
    .await;
    let open_time = start.elapsed();
    let (held, first_error) = match &results {
        Ok(rs) => (
            rs.iter().filter(|r| r.is_ok()).count(),
            rs.iter()
                .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))),
        ),
        Err(_) => (0, Some(format!("timed out after {} s", a.stream_timeout))),
    };
    let rss_after = stats::rss_kib();
    // While they are held: does a new caller still get a fast answer?
    let under_load = sequential_same_channel(&channel, (a.calls / 4).max(1)).await?;
    drop(results);

    let per_stream = rss_before
        .zip(rss_after)
        .filter(|_| held > 0)
        .map(|(b, a)| (a.saturating_sub(b)) as f64 * 1024.0 / held as f64);
    println!("# baton-bench workload (nproc {})", stats::cores());
    println!(
        "{}",
        same_channel.line("FetchX509SVID first response, fresh stream on one connection")
    );
    println!(
        "{}",
        fresh_conn.line("FetchX509SVID first response, fresh connection each call")
    );
    println!(
        "{}",
        under_load.line(&format!(
            "FetchX509SVID first response with {held} streams held"
        ))
    );
    println!(
        "streams: {held}/{} received their first message in {:.2} s{}; process RSS {} KiB before, {} KiB with them held (~{} bytes per stream, client side included: an upper bound)",
        a.streams,
        open_time.as_secs_f64(),
        first_error
            .as_deref()
            .map_or(String::new(), |e| format!(" (first error: {e})")),
        rss_before.map_or("n/a".into(), |v| v.to_string()),
        rss_after.map_or("n/a".into(), |v| v.to_string()),
        per_stream.map_or("n/a".into(), |v| format!("{v:.0}")),
    );
    println!(
        "{}",
        json!({
            "bench": "workload",
            "unix_time": stats::unix_now(),
            "nproc": stats::cores(),
            "fetch_fresh_stream": same_channel.json(),
            "fetch_fresh_connection": fresh_conn.json(),
            "fetch_with_streams_held": under_load.json(),
            "streams_requested": a.streams,
            "streams_held": held,
            "streams_open_s": open_time.as_secs_f64(),
            "first_stream_error": first_error,
            "rss_kib_before_streams": rss_before,
            "rss_kib_with_streams": rss_after,
            "rss_bytes_per_stream_upper_bound": per_stream,
        })
    );
    agent.stop().await;
    Ok(())
}
