//! `baton-bench delegation`: the delegation path, each figure next to a
//! limit or target measured or stated in the same run.
//!
//! 1. One hop on loopback: `POST /v1/delegate` (mTLS with the planner's task
//!    SVID and its token) then `POST /v1/node/redeem` (node mTLS, a CSR made
//!    before the clock starts), sequentially, a fresh grant per hop, against
//!    an in-process broker whose datastore and audit log are files in a temp
//!    dir. No Redis: the broker has no revocation registration in Redis yet.
//! 2. `TokenVerifier::verify` at a tool server on the researcher tokens the
//!    hops minted: first sight and seen before, with a raw ES256 verification
//!    (aws-lc-rs, parsed key) measured in the same run as the reference.
//! 3. `Engine::authorize_call` with the example policies.
//! 4. `AuditLog` appends with receipts (file-backed), on one thread and on
//!    several, then `AuditLog::verify_file` with every checkpoint signature
//!    and with only the newest, scaled to a million events; the same-run
//!    limits are one P-256 signature and one P-256 verification.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_audit::{AuditEvent, AuditKeys, AuditLog, EventKind, SignatureCheck, VerifyOptions};
use baton_ca::{TrustBundle, WorkloadKey};
use baton_core::api::{
    DelegateRequest, HandoffGrant, RedeemRequest, StartTaskResponse, TaskCredential,
};
use baton_core::{Purpose, RiskTier, Scope, SpiffeId, TaskId};
use baton_policy::{CallRequest, Engine};
use baton_tls::ClientIdentity;
use baton_verify::{JwtBundles, PeerCert, TokenVerifier};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::cluster::{self, Broker};
use crate::limits;
use crate::stats::{self, micros, percentile};

pub(crate) const TRUST_DOMAIN: &str = "example.org";
pub(crate) const PLANNER: &str = "/agents/planner";
pub(crate) const RESEARCHER: &str = "/agents/researcher";
pub(crate) const PURPOSE: &str = "support.case-research";
pub(crate) const SCOPE: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
pub(crate) const AUDIENCE: &str = "crm";

/// Targets from PERFORMANCE.md.
pub(crate) const HOP_P99_TARGET: Duration = Duration::from_millis(2);
const SEEN_P99_TARGET: Duration = Duration::from_micros(50);
const AUDIT_APPENDS_TARGET: f64 = 20_000.0;
const AUDIT_VERIFY_1M_TARGET_S: f64 = 10.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measured hops (each a delegate + a redeem), after `--warmup` more.
    #[arg(long, default_value_t = 2000)]
    hops: usize,
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Keep the broker's datastore and audit log in memory instead of files
    /// (separates disk stalls from CPU in the hop's tail).
    #[arg(long)]
    in_memory: bool,
    /// Times each token is verified again after its first sight.
    #[arg(long, default_value_t = 10)]
    seen_rounds: usize,
    /// Cedar `authorize_call` calls.
    #[arg(long, default_value_t = 20_000)]
    cedar_calls: usize,
    /// Audit events appended on one thread; as many again on
    /// `--audit-threads` threads; then the whole log is verified.
    #[arg(long, default_value_t = 100_000)]
    audit_events: u64,
    #[arg(long, default_value_t = 4)]
    audit_threads: u64,
    /// Seconds for each same-run limit (sign and verify rates).
    #[arg(long, default_value_t = 2.0)]
    limit_seconds: f64,
}

/// p50 / p99 / max of a series.
struct Summary {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or_default(),
        }
    }

    fn text(&self) -> String {
        format!(
            "n={} p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            self.n,
            micros(self.p50),
            micros(self.p99),
            micros(self.max)
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "n": self.n,
            "p50_us": micros(self.p50),
            "p99_us": micros(self.p99),
            "max_us": micros(self.max),
        })
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

pub(crate) async fn post<Req: Serialize, Resp: DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    body: &Req,
) -> anyhow::Result<Resp> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "POST {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// What the hops produced, for the verification figures.
struct Minted {
    /// (researcher token, researcher leaf certificate).
    tokens: Vec<(String, Vec<u8>)>,
    bundle: TrustBundle,
    hop: Summary,
    delegate: Summary,
    redeem: Summary,
    cpu_per_hop: Option<Duration>,
    wall: Duration,
    csr_make: Duration,
}

async fn hops(a: &Args) -> anyhow::Result<Minted> {
    let in_memory = a.in_memory;
    let broker = Broker::start_with(TRUST_DOMAIN, |cfg, dir| {
        cfg.dev_issuer = true;
        // File-backed datastore and audit log, as in production.
        if !in_memory {
            cfg.data_dir = Some(dir.join("data"));
        }
    })
    .await?;
    let td = broker.trust_domain().clone();
    let planner = td.id(PLANNER)?;
    let researcher = td.id(RESEARCHER)?;
    let (node_id, node_identity) = broker.attest_node().await?;
    let selector = format!("unix:uid:{}", cluster::own_uid()?);
    broker.create_entry(PLANNER, &node_id, &selector).await?;
    broker.create_entry(RESEARCHER, &node_id, &selector).await?;
    let node = broker.node_client(node_identity)?;
    let url = broker.url();
    let redeem_url = format!("{url}/v1/node/redeem");
    let delegate_url = format!("{url}/v1/delegate");

    let bundle_json: serde_json::Value = node
        .get(format!("{url}/v1/bundle"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let bundle = TrustBundle::from_spiffe_json(&td, &bundle_json)?;

    // The human starts the task; the node redeems the root grant for the planner.
    let scope = Scope::parse(SCOPE)?;
    let purpose: Purpose = PURPOSE.parse()?;
    let started: StartTaskResponse = broker
        .start_read_task(&planner, &purpose, &scope, AUDIENCE)
        .await?;
    let planner_key = WorkloadKey::generate()?;
    let planner_cred: TaskCredential = post(
        &node,
        &redeem_url,
        &RedeemRequest {
            grant: started.grant.grant,
            spiffe_id: planner.clone(),
            csr_der: planner_key.csr_der(&planner)?,
        },
    )
    .await?;
    let holder = broker.node_client(ClientIdentity::new(
        planner_cred.cert_chain_der,
        planner_key.pkcs8_der(),
    )?)?;
    let delegate_req = DelegateRequest {
        token: planner_cred.token,
        target: researcher.clone(),
        scope,
        purpose,
        audience: vec![AUDIENCE.into()],
        justification: "look up the customer's open cases".into(),
        ttl_secs: None,
    };

    // The node daemon's cost (a fresh key and CSR per credential) is paid
    // before the clock starts, as in the issuance benchmark.
    let total = a.warmup + a.hops;
    let t = Instant::now();
    let csrs: Vec<Vec<u8>> = (0..total)
        .map(|_| WorkloadKey::generate()?.csr_der(&researcher))
        .collect::<Result<_, _>>()?;
    let csr_make = t.elapsed() / total.max(1) as u32;

    let mut tokens = Vec::with_capacity(a.hops);
    let (mut d, mut r, mut h) = (
        Vec::with_capacity(a.hops),
        Vec::with_capacity(a.hops),
        Vec::with_capacity(a.hops),
    );
    let mut cpu0 = None;
    let mut start = Instant::now();
    for (i, csr) in csrs.into_iter().enumerate() {
        if i == a.warmup {
            cpu0 = stats::process_cpu();
            start = Instant::now();
        }
        let t0 = Instant::now();
        let grant: HandoffGrant = post(&holder, &delegate_url, &delegate_req).await?;
        let t1 = Instant::now();
        let cred: TaskCredential = post(
            &node,
            &redeem_url,
            &RedeemRequest {
                grant: grant.grant,
                spiffe_id: researcher.clone(),
                csr_der: csr,
            },
        )
        .await?;
        let t2 = Instant::now();
        if i >= a.warmup {
            d.push(t1 - t0);
            r.push(t2 - t1);
            h.push(t2 - t0);
            let leaf = cred
                .cert_chain_der
                .into_iter()
                .next()
                .context("redeem returned an empty chain")?;
            tokens.push((cred.token.expose().to_owned(), leaf));
        }
    }
    let wall = start.elapsed();
    let cpu_per_hop = cpu0
        .zip(stats::process_cpu())
        .map(|(a0, a1)| a1.saturating_sub(a0) / a.hops.max(1) as u32);
    Ok(Minted {
        tokens,
        bundle,
        hop: Summary::of(h),
        delegate: Summary::of(d),
        redeem: Summary::of(r),
        cpu_per_hop,
        wall,
        csr_make,
    })
}

struct VerifyFigures {
    first: Summary,
    seen: Summary,
    raw: Summary,
    raw_rate: f64,
    token_len: usize,
}

fn verify_bench(m: &Minted, rounds: usize) -> anyhow::Result<VerifyFigures> {
    let v = TokenVerifier::dangerous_without_revocation(
        JwtBundles::new([m.bundle.clone()]),
        AUDIENCE.into(),
    );
    let now = stats::unix_now();
    let presented: Vec<(&str, PeerCert)> = m
        .tokens
        .iter()
        .map(|(t, leaf)| Ok((t.as_str(), PeerCert::from_verified_leaf(leaf.clone())?)))
        .collect::<anyhow::Result<_>>()?;
    let mut first = Vec::with_capacity(presented.len());
    for (t, peer) in &presented {
        let s = Instant::now();
        v.verify(t, peer, now)?;
        first.push(s.elapsed());
    }
    let mut seen = Vec::with_capacity(presented.len() * rounds);
    for _ in 0..rounds {
        for (t, peer) in &presented {
            let s = Instant::now();
            v.verify(t, peer, now)?;
            seen.push(s.elapsed());
        }
    }
    let stats = v.stats();
    if stats.misses != presented.len() as u64 {
        bail!(
            "expected {} first sights, the verifier counted {} misses",
            presented.len(),
            stats.misses
        );
    }

    // Reference: one raw ES256 verification of the same tokens' signatures.
    let key = m
        .bundle
        .jwt_authorities
        .first()
        .context("the bundle has no JWT authority")?;
    let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public_key)
        .map_err(|_| anyhow!("cannot parse the JWT authority's key"))?;
    let signed: Vec<(&[u8], Vec<u8>)> = m
        .tokens
        .iter()
        .map(|(t, _)| {
            let (msg, sig) = t.rsplit_once('.').context("token has no signature")?;
            Ok((msg.as_bytes(), URL_SAFE_NO_PAD.decode(sig)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut raw = Vec::with_capacity(signed.len());
    for (msg, sig) in &signed {
        let s = Instant::now();
        parsed
            .verify_sig(msg, sig)
            .map_err(|_| anyhow!("raw ES256 verification failed"))?;
        raw.push(s.elapsed());
    }
    let start = Instant::now();
    let mut k = 0usize;
    while start.elapsed() < Duration::from_secs(1) {
        for (msg, sig) in signed.iter().take(64) {
            parsed
                .verify_sig(msg, sig)
                .map_err(|_| anyhow!("raw ES256 verification failed"))?;
            k += 1;
        }
    }
    let raw_rate = k as f64 / start.elapsed().as_secs_f64();
    Ok(VerifyFigures {
        first: Summary::of(first),
        seen: Summary::of(seen),
        raw: Summary::of(raw),
        raw_rate,
        token_len: m.tokens.first().map_or(0, |(t, _)| t.len()),
    })
}

struct CedarFigures {
    allow: Summary,
    deny: Summary,
}

fn cedar_bench(n: usize) -> anyhow::Result<CedarFigures> {
    let (schema, policies): (Vec<_>, Vec<_>) = baton_broker::EXAMPLE_POLICIES
        .iter()
        .map(|(name, src)| ((*name).to_owned(), (*src).to_owned()))
        .partition(|(name, _)| name.ends_with(".cedarschema"));
    let schema = schema
        .into_iter()
        .next()
        .map(|(_, s)| s)
        .context("no schema among the example policies")?;
    let engine = Engine::from_sources(&schema, &policies)?;
    let agent = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{RESEARCHER}"))?;
    let chain = [
        agent.clone(),
        SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{PLANNER}"))?,
    ];
    let purpose: Purpose = PURPOSE.parse()?;
    let scope = Scope::parse(SCOPE)?;
    let call = |tool: &'static str, risk: RiskTier| CallRequest {
        agent: &agent,
        chain: &chain,
        initiator: "alice",
        tool,
        resource: "dataset:crm",
        purpose: &purpose,
        scope: &scope,
        risk,
        depth: 1,
    };
    let allow_req = call("crm.search", RiskTier::Read);
    let deny_req = call("crm.update", RiskTier::Write);
    if !engine.authorize_call(&allow_req).allowed {
        bail!("the example policies refuse crm.search for the researcher");
    }
    if engine.authorize_call(&deny_req).allowed {
        bail!("the example policies allow crm.update for the researcher");
    }
    let time = |req: &CallRequest<'_>| {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            let d = engine.authorize_call(req);
            v.push(s.elapsed());
            std::hint::black_box(d);
        }
        Summary::of(v)
    };
    Ok(CedarFigures {
        allow: time(&allow_req),
        deny: time(&deny_req),
    })
}

struct AuditFigures {
    one_thread_rate: f64,
    threaded_rate: f64,
    cpu_per_append: Option<Duration>,
    events: u64,
    verify_every: Duration,
    verify_newest: Duration,
    signatures_every: u64,
}

/// The events of one hop as the broker writes them: granted, then redeemed.
pub(crate) fn hop_events(i: u64, at: u64) -> anyhow::Result<[AuditEvent; 2]> {
    // A few hops per task, as a planner fanning out would write them.
    let task = TaskId::from_random((u128::from(i / 4) + 1).to_be_bytes());
    let planner = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{PLANNER}"))?;
    let researcher = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{RESEARCHER}"))?;
    let mut hop = AuditEvent::new(EventKind::HopGranted, at, task.clone());
    hop.actor = Some(planner);
    hop.target = Some(researcher.clone());
    hop.purpose = Some(PURPOSE.parse()?);
    hop.scope = Some(Scope::parse(SCOPE)?);
    hop.depth = Some(1);
    hop.parent_jti = Some(format!("{i:032x}"));
    hop.justification = Some("look up the customer's open cases".into());
    hop.decision = Some("granted".into());
    hop.policy_ids = vec!["delegation.within-trust-domain".into()];
    let mut redeem = AuditEvent::new(EventKind::Redeemed, at, task);
    redeem.actor = Some(researcher.clone());
    redeem.target = Some(researcher);
    redeem.depth = Some(1);
    redeem.scope = hop.scope.clone();
    redeem.purpose = hop.purpose.clone();
    redeem.decision = Some("granted".into());
    redeem.token_jti = Some(format!("{:032x}", i + 1));
    Ok([hop, redeem])
}

fn audit_bench(n: u64, threads: u64) -> anyhow::Result<AuditFigures> {
    let dir = tempfile::tempdir()?;
    let keys = AuditKeys::generate()?;
    let public_key = keys.public_key().to_vec();
    let path = dir.path().join("audit.db");
    let log = AuditLog::open(&path, keys)?;
    let at = stats::unix_now();
    let events: Vec<AuditEvent> = (0..64u64)
        .map(|i| hop_events(i, at))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let event = |i: u64| events.get((i % events.len() as u64) as usize);

    let cpu0 = stats::process_cpu();
    let start = Instant::now();
    for i in 0..n {
        let e = event(i).context("no events")?;
        std::hint::black_box(log.append(e)?);
    }
    let one_thread_rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu_per_append = cpu0
        .zip(stats::process_cpu())
        .map(|(a, b)| b.saturating_sub(a) / n.max(1) as u32);

    let threads = threads.max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (log, event) = (&log, &event);
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (t..n).step_by(threads as usize) {
                        let e = event(i).context("no events")?;
                        std::hint::black_box(log.append(e)?);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("append thread died"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let threaded_rate = n as f64 / start.elapsed().as_secs_f64();
    drop(log);

    let start = Instant::now();
    let every = AuditLog::verify_file(&path, &public_key)?;
    let verify_every = start.elapsed();
    let start = Instant::now();
    let newest = AuditLog::verify_file_with(
        &path,
        &public_key,
        &VerifyOptions {
            signatures: SignatureCheck::Newest,
            kept: Vec::new(),
        },
    )?;
    let verify_newest = start.elapsed();
    if every.size != 2 * n || newest.size != 2 * n {
        bail!(
            "verified {} / {} events, appended {}",
            every.size,
            newest.size,
            2 * n
        );
    }
    Ok(AuditFigures {
        one_thread_rate,
        threaded_rate,
        cpu_per_append,
        events: every.size,
        verify_every,
        verify_newest,
        signatures_every: every.signatures,
    })
}

/// Raw P-256 verifications per second on one core.
pub(crate) fn p256_verify_rate(dur: Duration) -> anyhow::Result<f64> {
    use aws_lc_rs::signature::KeyPair as _;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .map_err(|_| anyhow!("P-256 key generation failed"))?;
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
    )
    .map_err(|_| anyhow!("P-256 key load failed"))?;
    let msg = [0x5a_u8; 200];
    let sig = pair
        .sign(&rng, &msg)
        .map_err(|_| anyhow!("P-256 sign failed"))?;
    let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
        .map_err(|_| anyhow!("P-256 public key parse failed"))?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            parsed
                .verify_sig(&msg, sig.as_ref())
                .map_err(|_| anyhow!("P-256 verify failed"))?;
        }
        n += 64;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let nproc = stats::cores();
    let limit_dur = Duration::from_secs_f64(a.limit_seconds);
    println!("# baton-bench delegation (nproc {nproc})");

    let m = hops(&a).await?;
    println!(
        "hop (delegate + redeem), sequential, keep-alive mTLS, {} store and audit, no Redis: {}; p99 is {:.2} of the 2 ms target",
        if a.in_memory {
            "in-memory"
        } else {
            "file-backed"
        },
        m.hop.text(),
        ratio(m.hop.p99, HOP_P99_TARGET)
    );
    println!("  POST /v1/delegate:     {}", m.delegate.text());
    println!("  POST /v1/node/redeem:  {}", m.redeem.text());
    println!(
        "  {} hops in {:.2} s ({:.0} hops/s); process CPU per hop (broker and both clients) {}; key+CSR per hop, made before the clock: {:.1} us",
        m.hop.n,
        m.wall.as_secs_f64(),
        m.hop.n as f64 / m.wall.as_secs_f64().max(1e-9),
        m.cpu_per_hop
            .map_or("n/a".into(), |c| format!("{:.0} us", micros(c))),
        micros(m.csr_make)
    );

    let v = tokio::task::block_in_place(|| verify_bench(&m, a.seen_rounds))?;
    println!(
        "token verify (researcher tokens, depth 1, {} bytes): first sight {}; seen before {}",
        v.token_len,
        v.first.text(),
        v.seen.text()
    );
    println!(
        "  raw ES256 verify (aws-lc-rs, parsed key) {} ({:.0}/s on one core); first sight / raw: p50 {:.2}x, p99 {:.2}x; seen-before p99 is {:.3} of the 50 us target",
        v.raw.text(),
        v.raw_rate,
        ratio(v.first.p50, v.raw.p50),
        ratio(v.first.p99, v.raw.p99),
        ratio(v.seen.p99, SEEN_P99_TARGET)
    );

    let c = tokio::task::block_in_place(|| cedar_bench(a.cedar_calls))?;
    println!(
        "Cedar authorize_call, example policies: allow (crm.search) {}; deny (crm.update) {}",
        c.allow.text(),
        c.deny.text()
    );
    println!(
        "  seen-before verify p99 + Cedar allow p99 = {:.1} us, {:.3} of the 50 us per-call budget",
        micros(v.seen.p99 + c.allow.p99),
        ratio(v.seen.p99 + c.allow.p99, SEEN_P99_TARGET)
    );

    let (sign_rate, verify_rate) = tokio::task::block_in_place(|| {
        Ok::<_, anyhow::Error>((
            limits::p256_sign_rate(limit_dur)?,
            p256_verify_rate(limit_dur)?,
        ))
    })?;
    let au = tokio::task::block_in_place(|| audit_bench(a.audit_events, a.audit_threads))?;
    let per_million = |d: Duration| d.as_secs_f64() * 1e6 / au.events.max(1) as f64;
    let every_1m = per_million(au.verify_every);
    let newest_1m = per_million(au.verify_newest);
    // 1M signature checks spread over every core: the floor for `Every`.
    let every_floor_1m = 1e6 / (verify_rate * nproc as f64);
    println!(
        "limits, same run, one core: P-256 sign {sign_rate:.0}/s, P-256 verify {verify_rate:.0}/s"
    );
    println!(
        "audit append with receipt, file-backed: 1 thread {:.0}/s ({:.2} of the 20k/s target, {:.2} of the sign limit; {} CPU per append), {} threads {:.0}/s ({:.2} of the target)",
        au.one_thread_rate,
        au.one_thread_rate / AUDIT_APPENDS_TARGET,
        au.one_thread_rate / sign_rate,
        au.cpu_per_append
            .map_or("n/a".into(), |c| format!("{:.1} us", micros(c))),
        a.audit_threads,
        au.threaded_rate,
        au.threaded_rate / AUDIT_APPENDS_TARGET,
    );
    println!(
        "audit verify_file of {} events: every signature ({}) {:.2} s = {every_1m:.1} s per 1M ({:.2} of the 10 s target; floor of 1M P-256 verifies on {nproc} cores {every_floor_1m:.1} s); newest signature only {:.2} s = {newest_1m:.1} s per 1M ({:.2} of the target)",
        au.events,
        au.signatures_every,
        au.verify_every.as_secs_f64(),
        every_1m / AUDIT_VERIFY_1M_TARGET_S,
        au.verify_newest.as_secs_f64(),
        newest_1m / AUDIT_VERIFY_1M_TARGET_S,
    );

    println!(
        "{}",
        json!({
            "bench": "delegation",
            "unix_time": stats::unix_now(),
            "nproc": nproc,
            "hop": {
                "pair": m.hop.json(),
                "delegate": m.delegate.json(),
                "redeem": m.redeem.json(),
                "p99_ratio_to_2ms_target": ratio(m.hop.p99, HOP_P99_TARGET),
                "hops_per_s": m.hop.n as f64 / m.wall.as_secs_f64().max(1e-9),
                "cpu_us_per_hop": m.cpu_per_hop.map(micros),
                "redis": false,
                "broker_state": if a.in_memory { "memory" } else { "files" },
            },
            "verify": {
                "token_bytes": v.token_len,
                "first_sight": v.first.json(),
                "seen_before": v.seen.json(),
                "raw_es256": v.raw.json(),
                "raw_es256_per_s": v.raw_rate,
                "first_over_raw_p50": ratio(v.first.p50, v.raw.p50),
                "first_over_raw_p99": ratio(v.first.p99, v.raw.p99),
                "seen_p99_ratio_to_50us_target": ratio(v.seen.p99, SEEN_P99_TARGET),
            },
            "cedar": {
                "allow": c.allow.json(),
                "deny": c.deny.json(),
                "seen_p99_plus_allow_p99_ratio_to_50us": ratio(v.seen.p99 + c.allow.p99, SEEN_P99_TARGET),
            },
            "limits": {
                "p256_sign_per_s": sign_rate,
                "p256_verify_per_s": verify_rate,
            },
            "audit": {
                "append_1_thread_per_s": au.one_thread_rate,
                "append_1_thread_ratio_to_20k": au.one_thread_rate / AUDIT_APPENDS_TARGET,
                "append_1_thread_ratio_to_sign_limit": au.one_thread_rate / sign_rate,
                "cpu_us_per_append_1_thread": au.cpu_per_append.map(micros),
                "append_threads": a.audit_threads,
                "append_threaded_per_s": au.threaded_rate,
                "append_threaded_ratio_to_20k": au.threaded_rate / AUDIT_APPENDS_TARGET,
                "events": au.events,
                "verify_every_s": au.verify_every.as_secs_f64(),
                "verify_every_s_per_1m": every_1m,
                "verify_every_ratio_to_10s": every_1m / AUDIT_VERIFY_1M_TARGET_S,
                "verify_every_floor_s_per_1m": every_floor_1m,
                "verify_newest_s": au.verify_newest.as_secs_f64(),
                "verify_newest_s_per_1m": newest_1m,
                "verify_newest_ratio_to_10s": newest_1m / AUDIT_VERIFY_1M_TARGET_S,
            },
        })
    );
    Ok(())
}
