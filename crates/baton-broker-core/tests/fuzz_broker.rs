//! Fuzz-style property tests for the broker's parsers of outside bytes:
//! OIDC ID-token verification (`OidcVerifier::verify`, arbitrary strings,
//! mutations of a valid token, validly signed tokens with mutated claims),
//! issuer JWKS documents (`OidcIssuer::from_jwks`), the dev issuer behind
//! `POST /v1/admin/dev/id-token`, and the admin-socket handlers that take
//! request bodies and path ids (`generate_join_token`, `create_entry`,
//! `get_entry`, `delete_entry`) and the node attestation (`attest`: join
//! token and CSR), with bodies parsed the way the routes parse them.
//!
//! (The bodies' JSON decoding itself is fuzzed in
//! `baton-core/tests/fuzz_core.rs`.) Bounded for CI; `PROPTEST_CASES`
//! runs longer (see `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_broker_core::oidc::{DevIssuer, OidcError, OidcIssuer, OidcVerifier};
use baton_broker_core::revocation::{RevokeTarget, Revoker};
use baton_broker_core::store::SqliteStore;
use baton_broker_core::{Broker, IssuancePolicy, LogIssuance};
use baton_ca::{Ca, CaConfig, WorkloadKey};
use baton_core::api::{AttestRequest, JoinTokenRequest};
use baton_core::{NewEntry, Secret, SpiffeId, TrustDomain};
use fuzz_support::*;
use proptest::prelude::*;
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000;
const ISSUER: &str = "https://idp.example.com";
const AUD: &str = "baton";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

struct Fixture {
    dev: DevIssuer,
    dev_token: String,
    verifier: OidcVerifier,
    /// An ES256 key published in `jwks` under kid `k1` for issuer [`ISSUER`].
    key: EcdsaKeyPair,
    jwks: Value,
    broker: Broker,
    revoker: Revoker,
    csr: Vec<u8>,
}

fn fx() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let dev = DevIssuer::generate().unwrap();
        let dev_token = dev.mint("alice@example.com", 600, NOW).unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let raw = key.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]});
        let verifier = OidcVerifier::new(vec![
            dev.issuer().unwrap(),
            OidcIssuer::from_jwks(ISSUER, AUD, &jwks.to_string()).unwrap(),
        ]);
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td), at(NOW - 60)).unwrap();
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let broker = Broker::new(
            Arc::new(ca),
            store.clone(),
            Arc::new(LogIssuance),
            IssuancePolicy::default(),
        );
        let revoker = Revoker::new(Arc::new(baton_revocation::MemoryStore::new()), store);
        let id = SpiffeId::parse("spiffe://example.org/baton/node/n1").unwrap();
        let csr = WorkloadKey::generate().unwrap().csr_der(&id).unwrap();
        Fixture {
            dev,
            dev_token,
            verifier,
            key,
            jwks,
            broker,
            revoker,
            csr,
        }
    })
}

fn sign(header: &Value, claims: &[u8]) -> String {
    let mut t = URL_SAFE_NO_PAD.encode(header.to_string());
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let sig = fx()
        .key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), t.as_bytes())
        .unwrap();
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    t
}

fn valid_claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": AUD, "exp": NOW + 60, "iat": NOW})
}

fn check_id_token(token: &str) {
    for now in [NOW, 0, u64::MAX] {
        if let Ok(who) = fx().verifier.verify(token, now) {
            assert!(!who.sub.is_empty());
            assert!(who.iss == ISSUER || who.iss == baton_broker_core::oidc::DEV_ISSUER);
        }
    }
}

fn check_admin_body(bytes: &[u8]) {
    let b = &fx().broker;
    if let Ok(req) = serde_json::from_slice::<JoinTokenRequest>(bytes) {
        for now in [at(NOW), at(0), at(i64::MAX as u64)] {
            if let Ok(t) = b.generate_join_token(&req, now) {
                assert!(!t.token.expose().is_empty());
            }
        }
    }
    if let Ok(new) = serde_json::from_slice::<NewEntry>(bytes)
        && let Ok(e) = b.create_entry(&new)
    {
        assert_eq!(b.get_entry(e.id.as_str()).unwrap(), e);
        b.delete_entry(e.id.as_str()).unwrap();
    }
    if let Ok(req) = serde_json::from_slice::<AttestRequest>(bytes) {
        let _ = baton_broker_core::requests::attest(b, &fx().revoker, &req, at(NOW));
    }
    let _ = serde_json::from_slice::<RevokeTarget>(bytes);
    let _ = serde_json::from_slice::<baton_broker_core::secrets::LeaseBody>(bytes);
}

#[test]
fn fuzz_seeds_are_valid() {
    let f = fx();
    assert_eq!(
        f.verifier.verify(&f.dev_token, NOW).unwrap().sub,
        "alice@example.com"
    );
    let own = sign(
        &json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}),
        valid_claims().to_string().as_bytes(),
    );
    assert_eq!(f.verifier.verify(&own, NOW).unwrap().sub, "alice");
}

/// Regression: `POST /v1/admin/dev/id-token` with a huge `ttl_secs` made
/// `DevIssuer::mint` overflow `now + ttl_secs` (a panic in debug builds, a
/// wrapped, already-expired `exp` in release).
#[test]
fn fuzz_regression_dev_mint_huge_ttl_is_an_error() {
    let f = fx();
    for (ttl, now) in [(u64::MAX, NOW), (1, u64::MAX), (u64::MAX - NOW + 1, NOW)] {
        let err = f.dev.mint("alice", ttl, now).unwrap_err();
        assert!(
            matches!(&err, OidcError::Invalid(m) if m.contains("ttl_secs")),
            "{err}"
        );
    }
    f.dev.mint("alice", u64::MAX - NOW, NOW).unwrap();
}

#[test]
fn fuzz_attest_with_a_real_join_token_and_mutated_csrs() {
    let f = fx();
    let token = || {
        f.broker
            .generate_join_token(
                &JoinTokenRequest {
                    ttl_secs: 600,
                    node_id: None,
                },
                at(NOW),
            )
            .unwrap()
    };
    let attest = |req: &AttestRequest| {
        baton_broker_core::requests::attest(&f.broker, &f.revoker, req, at(NOW))
    };
    let mut runner = proptest::test_runner::TestRunner::new(config(64));
    runner
        .run(&mutated_bytes(f.csr.clone(), 4), |csr| {
            // A fresh token per case: a CSR that passes spends its token.
            let req = AttestRequest {
                join_token: token().token,
                csr_der: csr,
            };
            if let Ok(svid) = attest(&req) {
                assert!(!svid.cert_chain_der.is_empty());
            }
            Ok(())
        })
        .unwrap();
    let req = AttestRequest {
        join_token: Secret::new("nope"),
        csr_der: f.csr.clone(),
    };
    assert!(attest(&req).is_err());
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_id_token_arbitrary(s in "\\PC{0,200}") {
        check_id_token(&s);
    }

    #[test]
    fn fuzz_id_token_three_parts(parts in proptest::collection::vec("[A-Za-z0-9_=+/-]{0,100}", 3)) {
        check_id_token(&parts.join("."));
    }

    #[test]
    fn fuzz_id_token_mutated(s in Just(fx().dev_token.clone()).prop_flat_map(|v| mutated(v, 3))) {
        check_id_token(&s);
    }

    #[test]
    fn fuzz_id_token_resigned(
        header in mutated_json(json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}), 2),
        claims in mutated_json(valid_claims(), 3),
        keep_header in any::<bool>(),
    ) {
        let header = if keep_header { json!({"alg": "ES256", "kid": "k1"}) } else { header };
        check_id_token(&sign(&header, claims.to_string().as_bytes()));
    }

    #[test]
    fn fuzz_id_token_resigned_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_id_token(&sign(&json!({"alg": "ES256", "kid": "k1"}), &b));
    }

    #[test]
    fn fuzz_jwks(
        doc in prop_oneof![
            "\\PC{0,200}",
            Just(fx().jwks.to_string()).prop_flat_map(|v| mutated(v, 3)),
            Just(fx().jwks.clone()).prop_flat_map(|v| mutated_json(v, 3)).prop_map(|v| v.to_string()),
        ]
    ) {
        if let Ok(issuer) = OidcIssuer::from_jwks(ISSUER, AUD, &doc) {
            let v = OidcVerifier::new(vec![issuer]);
            let own = sign(&json!({"alg": "ES256", "kid": "k1"}), valid_claims().to_string().as_bytes());
            let _ = v.verify(&own, NOW);
            let rs = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#),
                URL_SAFE_NO_PAD.encode(valid_claims().to_string()),
                URL_SAFE_NO_PAD.encode([1u8; 256]),
            );
            let _ = v.verify(&rs, NOW);
        }
    }

    #[test]
    fn fuzz_dev_mint(user in "\\PC{0,40}", ttl in any::<u64>(), now in any::<u64>()) {
        if let Ok(t) = fx().dev.mint(&user, ttl, now) {
            check_id_token(&t);
        }
    }

    #[test]
    fn fuzz_admin_bodies(
        doc in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            hostile_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            Just(json!({"ttl_secs": 600, "node_id": "spiffe://example.org/baton/node/n1"}))
                .prop_flat_map(|v| mutated_json(v, 2))
                .prop_map(|v| serde_json::to_vec(&v).unwrap()),
            Just(json!({
                "spiffe_id": "spiffe://example.org/web",
                "parent_id": "spiffe://example.org/baton/node/n1",
                "selectors": ["unix:uid:1000"], "x509_ttl_secs": 60, "dns_names": ["web.internal"]
            }))
                .prop_flat_map(|v| mutated_json(v, 2))
                .prop_map(|v| serde_json::to_vec(&v).unwrap()),
            Just(json!({"join_token": "abc", "csr_der": "MIIBAQ=="}))
                .prop_flat_map(|v| mutated_json(v, 2))
                .prop_map(|v| serde_json::to_vec(&v).unwrap()),
            Just(json!({"task": "task-0123456789abcdef0123456789abcdef"}))
                .prop_flat_map(|v| mutated_json(v, 2))
                .prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    ) {
        check_admin_body(&doc);
    }

    #[test]
    fn fuzz_admin_entry_ids(
        id in prop_oneof![
            "\\PC{0,60}",
            Just("6f1c9a1e-2b1d-4b7e-9d7e-2f8a3c4d5e6f".to_owned()).prop_flat_map(|v| mutated(v, 3)),
        ]
    ) {
        let b = &fx().broker;
        let _ = b.get_entry(&id);
        let _ = b.delete_entry(&id);
    }
}
