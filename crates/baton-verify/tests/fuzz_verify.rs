//! Fuzz-style property tests for the tool server's parsers of outside
//! bytes: `TokenVerifier::verify` on arbitrary strings, on mutations of a
//! valid delegation token, and on validly signed tokens whose payload is
//! mutated JSON (so the strict claim decoding and the chain checks behind
//! the signature get exercised too); and `PeerCert::from_verified_leaf`
//! on arbitrary DER.
//!
//! Never a panic; what verifies is consistent with the claims. Bounded for
//! CI; `PROPTEST_CASES=100000` runs longer (see `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_ca::{Ca, CaConfig, JwtAuthority, WorkloadKey};
use baton_core::{
    Actor, Confirmation, DelegationClaims, ParentRef, RiskTier, Scope, SpiffeId, TaskClaims,
    TaskId, TrustDomain,
};
use baton_verify::{JwtBundles, PeerCert, TokenVerifier};
use fuzz_support::*;
use proptest::prelude::*;
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000;
const AUDIENCE: &str = "crm-tool";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

struct Fixture {
    bundles: JwtBundles,
    leaf: Vec<u8>,
    peer: PeerCert,
    token: String,
    claims: Value,
    test_key: EcdsaKeyPair,
}

fn fx() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td), at(NOW - 60)).unwrap();
        let planner = SpiffeId::parse("spiffe://example.org/agents/planner").unwrap();
        let agent = SpiffeId::parse("spiffe://example.org/agents/summarizer").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let leaf = ca
            .sign_x509_svid(
                &key.csr_der(&agent).unwrap(),
                &agent,
                Duration::from_secs(3600),
                &[],
                at(NOW),
            )
            .unwrap()
            .cert_chain_der
            .remove(0);
        let peer = PeerCert::from_verified_leaf(leaf.clone()).unwrap();
        let scope = Scope::parse(&["tool:crm.search:read"]).unwrap();
        let root = Actor {
            sub: planner,
            jti: "jti-root".into(),
            scope: Scope::parse(&["tool:crm.*:*"]).unwrap(),
            exp: NOW + 900,
            aud: vec![AUDIENCE.into(), "other".into()],
            act: None,
        };
        let claims = DelegationClaims {
            iss: "spiffe://example.org/baton/broker".into(),
            sub: "alice@example.com".into(),
            aud: vec![AUDIENCE.into()],
            exp: NOW + 300,
            iat: NOW - 5,
            jti: "jti-hop1".into(),
            act: Actor {
                sub: agent,
                jti: "jti-hop1".into(),
                scope: scope.clone(),
                exp: NOW + 300,
                aud: vec![AUDIENCE.into()],
                act: Some(Box::new(root)),
            },
            task: TaskClaims {
                id: TaskId::from_random([0x5a; 16]),
                purpose: "support.case-research".parse().unwrap(),
                risk_ceiling: RiskTier::Write,
                max_depth: 200,
                initiator_iss: "https://idp.example.com".into(),
            },
            scope,
            depth: 1,
            parent: Some(ParentRef {
                jti: "jti-root".into(),
                hash: baton_ca::token_hash("parent"),
            }),
            justification: Some("why".into()),
            cnf: Confirmation {
                x5t_s256: baton_ca::cert_thumbprint(&leaf),
            },
        };
        let token = ca
            .sign_delegation_token(&claims)
            .unwrap()
            .expose()
            .to_owned();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let test_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let mut bundle = ca.bundle();
        bundle.jwt_authorities.push(JwtAuthority {
            kid: "test-kid".into(),
            public_key: test_key.public_key().as_ref().to_vec(),
        });
        Fixture {
            bundles: JwtBundles::new([bundle]),
            leaf,
            peer,
            token,
            claims: serde_json::to_value(&claims).unwrap(),
            test_key,
        }
    })
}

/// `s := n - s`: the low-S twin, so signed payloads reach claim decoding.
fn to_low_s(sig: &mut [u8]) {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    if baton_ca::is_low_s(sig) {
        return;
    }
    let mut borrow = 0i16;
    for (out, n) in sig[32..].iter_mut().rev().zip(N.iter().rev()) {
        let mut v = i16::from(*n) - i16::from(*out) - borrow;
        borrow = i16::from(v < 0);
        if v < 0 {
            v += 256;
        }
        *out = u8::try_from(v).unwrap();
    }
}

fn header() -> Value {
    json!({"alg": "ES256", "kid": "test-kid", "typ": "baton-delegation+jwt"})
}

/// A token over exactly `header` and `payload`, validly signed (low-S) by
/// a key the bundle trusts.
fn sign(header: &Value, payload: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let sig = fx()
        .test_key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), token.as_bytes())
        .unwrap();
    let mut sig = sig.as_ref().to_vec();
    to_low_s(&mut sig);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(&sig));
    token
}

fn check(token: &str) {
    let f = fx();
    let tool = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .with_cache_capacity(4);
    let broker = TokenVerifier::for_broker(
        f.bundles.clone(),
        std::sync::Arc::new(baton_verify::NoRevocation),
    )
    .with_cache_capacity(4);
    for now in [NOW, 0, u64::MAX] {
        for v in [&tool, &broker] {
            // Twice: the second call goes through the cache.
            for _ in 0..2 {
                if let Ok(d) = v.verify(token, &f.peer, now) {
                    assert!(now < d.expires_at());
                    assert_eq!(d.agent(), f.peer.spiffe_id());
                    assert_eq!(d.chain().len(), d.depth() as usize + 1);
                    assert_eq!(d.token_hash(), baton_ca::token_hash(token));
                }
            }
        }
    }
}

#[test]
fn fuzz_seed_token_verifies() {
    let f = fx();
    let tool = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into());
    tool.verify(&f.token, &f.peer, NOW).unwrap();
    let own = sign(&header(), f.claims.to_string().as_bytes());
    tool.verify(&own, &f.peer, NOW).unwrap();
}

#[test]
fn fuzz_deep_act_chains_are_errors_not_stack_overflows() {
    // A validly signed token whose `act` chain is nested past serde_json's
    // recursion limit, or just under it.
    let f = fx();
    for depth in [2usize, 60, 120, 124, 125, 126, 127, 128, 200, 5_000] {
        let mut act = f.claims["act"].clone();
        for i in 0..depth {
            let mut outer = f.claims["act"].clone();
            outer["jti"] = json!(format!("jti-{i}"));
            outer["act"] = act;
            act = outer;
        }
        let mut claims = f.claims.clone();
        claims["act"] = act;
        claims["depth"] = json!(depth + 1);
        check(&sign(&header(), claims.to_string().as_bytes()));
        // The raw text form, past any recursion limit.
        let deep = format!(
            r#"{{"iss":"spiffe://example.org/baton/broker","act":{}}}"#,
            nested(depth, r#"{"act":"#, "}", "null")
        );
        check(&sign(&header(), deep.as_bytes()));
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_token_arbitrary(s in "\\PC{0,200}") {
        check(&s);
    }

    #[test]
    fn fuzz_token_three_parts(parts in proptest::collection::vec("[A-Za-z0-9_=+/.-]{0,120}", 3)) {
        check(&parts.join("."));
    }

    #[test]
    fn fuzz_token_mutated(s in Just(fx().token.clone()).prop_flat_map(|v| mutated(v, 3))) {
        check(&s);
    }

    #[test]
    fn fuzz_token_resigned_claims(claims in Just(fx().claims.clone()).prop_flat_map(|v| mutated_json(v, 3))) {
        check(&sign(&header(), claims.to_string().as_bytes()));
    }

    #[test]
    fn fuzz_token_resigned_text(s in Just(fx().claims.to_string()).prop_flat_map(|v| mutated(v, 3))) {
        check(&sign(&header(), s.as_bytes()));
    }

    #[test]
    fn fuzz_token_resigned_header(h in Just(header()).prop_flat_map(|v| mutated_json(v, 2))) {
        check(&sign(&h, fx().claims.to_string().as_bytes()));
    }

    #[test]
    fn fuzz_token_resigned_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        check(&sign(&header(), &b));
    }

    #[test]
    fn fuzz_peer_cert(
        der in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..400),
            Just(fx().leaf.clone()).prop_flat_map(|v| mutated_bytes(v, 3)),
        ]
    ) {
        if let Ok(p) = PeerCert::from_verified_leaf(der.clone()) {
            prop_assert_eq!(p.leaf_der(), &der[..]);
            let _ = TokenVerifier::dangerous_without_revocation(fx().bundles.clone(), AUDIENCE.into())
                .verify(&fx().token, &p, NOW);
        }
    }
}
