//! Fixtures: a real in-memory CA, X509-SVIDs from it, and delegation
//! tokens minted by it (valid ones, and ones with one defect each).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_ca::{Ca, CaConfig, JwtAuthority, WorkloadKey};
use baton_core::api::ToolCallReport;
use baton_core::{
    Actor, Confirmation, DelegationClaims, ParentRef, Purpose, RiskTier, Scope, SpiffeId,
    TaskClaims, TaskId, TrustDomain,
};
use baton_verify::{JwtBundles, PeerCert, ReportBatch, ReportSender, SendError, SendFuture};
use serde_json::Value;

pub const NOW: u64 = 1_700_000_000;
pub const AUDIENCE: &str = "crm-tool";

pub fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn scope(items: &[&str]) -> Scope {
    Scope::parse(items).unwrap()
}

/// An X509-SVID: its leaf DER and PKCS#8 key.
pub struct Svid {
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
}

impl Svid {
    pub fn leaf(&self) -> &[u8] {
        &self.chain[0]
    }
    pub fn peer(&self) -> PeerCert {
        PeerCert::from_verified_leaf(self.leaf().to_vec()).unwrap()
    }
}

pub struct Fixture {
    pub td: TrustDomain,
    pub ca: Ca,
    pub bundles: JwtBundles,
    pub planner: SpiffeId,
    pub researcher: SpiffeId,
    pub summarizer: SpiffeId,
    /// The current actor's certificate (the summarizer's task SVID).
    pub summarizer_svid: Svid,
    /// Another certificate for the same SPIFFE ID.
    pub summarizer_other_svid: Svid,
    pub researcher_svid: Svid,
    pub task: TaskId,
    /// A second trusted broker key whose signatures tests control fully
    /// (to sign payloads `DelegationClaims` cannot express).
    pub test_key: TestKey,
    /// The unix time the fixture was made for ([`NOW`] unless `new_at`).
    pub now: u64,
}

/// A P-256 key published in the fixture's bundle under kid `test-kid`.
pub struct TestKey {
    pair: EcdsaKeyPair,
}

impl TestKey {
    fn generate() -> Self {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Self {
            pair: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref()).unwrap(),
        }
    }

    pub fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            kid: "test-kid".into(),
            public_key: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// A delegation token over exactly `payload`, with a valid signature.
    pub fn sign(&self, payload: &Value) -> String {
        let header =
            serde_json::json!({"alg": "ES256", "kid": "test-kid", "typ": "baton-delegation+jwt"});
        let unsigned = join(&header, payload, "");
        let message = unsigned.trim_end_matches('.');
        let sig = self
            .pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
            .unwrap();
        // Canonical low-S, as the broker signs (verifiers refuse the twin).
        let mut sig = sig.as_ref().to_vec();
        if !baton_ca::is_low_s(&sig) {
            negate_s(&mut sig);
        }
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(&sig))
    }
}

/// `s := n - s` for a P-256 `r || s` signature: the other valid signature.
pub fn negate_s(sig: &mut [u8]) {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let s = &mut sig[32..];
    let mut borrow = 0i16;
    for (out, n) in s.iter_mut().rev().zip(N.iter().rev()) {
        let mut v = i16::from(*n) - i16::from(*out) - borrow;
        borrow = i16::from(v < 0);
        if v < 0 {
            v += 256;
        }
        *out = v as u8;
    }
}

pub fn issue(ca: &Ca, who: &SpiffeId, now: u64) -> Svid {
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_der(who).unwrap();
    let svid = ca
        .sign_x509_svid(&csr, who, Duration::from_secs(3600), &[], at(now))
        .unwrap();
    Svid {
        chain: svid.cert_chain_der,
        key: key.pkcs8_der().to_vec(),
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self::new_at(NOW)
    }

    /// Certificates and tokens valid around unix time `now` (TLS tests use
    /// the real clock, which rustls checks certificates against).
    pub fn new_at(now: u64) -> Self {
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td.clone()), at(now - 60)).unwrap();
        let test_key = TestKey::generate();
        let mut bundle = ca.bundle();
        bundle.jwt_authorities.push(test_key.authority());
        let bundles = JwtBundles::new([bundle]);
        let planner = id("spiffe://example.org/agents/planner");
        let researcher = id("spiffe://example.org/agents/researcher");
        let summarizer = id("spiffe://example.org/agents/summarizer");
        Self {
            summarizer_svid: issue(&ca, &summarizer, now),
            summarizer_other_svid: issue(&ca, &summarizer, now),
            researcher_svid: issue(&ca, &researcher, now),
            td,
            ca,
            bundles,
            planner,
            researcher,
            summarizer,
            task: TaskId::from_random([0x5a; 16]),
            test_key,
            now,
        }
    }

    /// A valid two-hop token (planner → researcher → summarizer), depth 2,
    /// bound to the summarizer's certificate.
    pub fn claims(&self) -> DelegationClaims {
        let root = Actor {
            sub: self.planner.clone(),
            jti: "jti-root".into(),
            scope: scope(&["tool:crm.*:*", "dataset:crm:read"]),
            exp: self.now + 900,
            aud: vec![AUDIENCE.into(), "other-tool".into(), "third-tool".into()],
            act: None,
        };
        let hop1 = Actor {
            sub: self.researcher.clone(),
            jti: "jti-hop1".into(),
            scope: scope(&["tool:crm.*:read", "tool:crm.update:write"]),
            exp: self.now + 600,
            aud: vec![AUDIENCE.into(), "other-tool".into()],
            act: Some(Box::new(root)),
        };
        let leaf_scope = scope(&["tool:crm.search:read", "tool:crm.update:write"]);
        let hop2 = Actor {
            sub: self.summarizer.clone(),
            jti: "jti-hop2".into(),
            scope: leaf_scope.clone(),
            exp: self.now + 300,
            aud: vec![AUDIENCE.into(), "other-tool".into()],
            act: Some(Box::new(hop1)),
        };
        DelegationClaims {
            iss: format!("spiffe://{}/baton/broker", self.td.as_str()),
            sub: "alice@example.com".into(),
            aud: vec![AUDIENCE.into(), "other-tool".into()],
            exp: self.now + 300,
            iat: self.now - 5,
            jti: "jti-hop2".into(),
            act: hop2,
            task: TaskClaims {
                id: self.task.clone(),
                purpose: "support.case-research".parse::<Purpose>().unwrap(),
                risk_ceiling: RiskTier::Write,
                max_depth: 3,
                initiator_iss: "https://idp.example.com".into(),
            },
            scope: leaf_scope,
            depth: 2,
            parent: Some(ParentRef {
                jti: "jti-hop1".into(),
                hash: baton_ca::token_hash("the parent token"),
            }),
            justification: Some("summarize the case notes".into()),
            cnf: Confirmation {
                x5t_s256: baton_ca::cert_thumbprint(self.summarizer_svid.leaf()),
            },
        }
    }

    pub fn sign(&self, claims: &DelegationClaims) -> String {
        self.ca
            .sign_delegation_token(claims)
            .unwrap()
            .expose()
            .to_owned()
    }

    pub fn token(&self) -> String {
        self.sign(&self.claims())
    }

    pub fn peer(&self) -> PeerCert {
        self.summarizer_svid.peer()
    }
}

/// Splits a compact JWS into its decoded header and payload and its raw
/// signature part.
pub fn split(token: &str) -> (Value, Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let payload = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    (header, payload, parts[2].to_owned())
}

pub fn join(header: &Value, payload: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        sig
    )
}

/// A sender standing in for the broker: up or down, and recording every
/// batch it accepted.
#[derive(Default)]
pub struct TestSender {
    pub up: std::sync::atomic::AtomicBool,
    pub received: Mutex<Vec<ToolCallReport>>,
    pub attempts: std::sync::atomic::AtomicUsize,
    /// Report ids the broker answers with a `refused` receipt.
    pub refuse: Mutex<Vec<String>>,
    /// Report ids that make any batch holding them too large (HTTP 413).
    pub too_large: Mutex<Vec<String>>,
    /// Batches of more records than this are too large (0: no limit), as
    /// behind a proxy with a body limit.
    pub most: std::sync::atomic::AtomicUsize,
}

impl TestSender {
    pub fn new(up: bool) -> Arc<Self> {
        let s = Self::default();
        s.up.store(up, std::sync::atomic::Ordering::SeqCst);
        Arc::new(s)
    }
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn received(&self) -> Vec<ToolCallReport> {
        self.received.lock().unwrap().clone()
    }
    pub fn attempts(&self) -> usize {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ReportSender for TestSender {
    fn send<'a>(&'a self, batch: &'a ReportBatch) -> SendFuture<'a> {
        Box::pin(async move {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SendError::Unreachable("connection refused (test)".into()));
            }
            let too_large = self.too_large.lock().unwrap().clone();
            let most = self.most.load(std::sync::atomic::Ordering::SeqCst);
            if batch
                .reports
                .iter()
                .any(|r| too_large.contains(&r.report_id))
                || (most > 0 && batch.reports.len() > most)
            {
                return Err(SendError::Status {
                    status: 413,
                    body: "payload too large (test)".into(),
                });
            }
            let refuse = self.refuse.lock().unwrap().clone();
            let mut delivered = baton_verify::Delivered::default();
            for r in &batch.reports {
                if refuse.contains(&r.report_id) {
                    delivered.refused.push(baton_verify::Refusal {
                        report_id: r.report_id.clone(),
                        code: "invalid_request".into(),
                        message: "resource is over 1024 bytes (test)".into(),
                    });
                } else {
                    self.received.lock().unwrap().push(r.clone());
                }
            }
            Ok(delivered)
        })
    }
}

/// Records on disk in the spool at `dir`: lines of every spool file.
pub fn spool_lines(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().into_string().unwrap();
            name.starts_with("tool-calls") && name.ends_with(".jsonl")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
        .sum()
}
