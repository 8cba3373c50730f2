//! Fuzz-style property tests for baton-ca's parsers of outside bytes: CSRs
//! (`Ca::sign_x509_svid`), received certificate chains (`leaf_info`,
//! `Ca::signer_of`), JWT-SVIDs (`jwt::validate_jwt_svid`), SPIFFE bundle
//! JSON (`TrustBundle::from_spiffe_json`), PEM bundles
//! (`TrustBundle::from_pem`) and renewal proofs
//! (`possession::verify_renew_proof`).
//!
//! Each gets arbitrary input and mutations of a valid value, must never
//! panic, and what it accepts must be consistent. Bounded for CI;
//! `PROPTEST_CASES=100000` runs longer (see `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_ca::jwt::validate_jwt_svid;
use baton_ca::possession::{sign_renew_proof, verify_renew_proof};
use baton_ca::{Ca, CaConfig, JwtAuthority, TrustBundle, WorkloadKey, leaf_info};
use baton_core::{SpiffeId, TrustDomain};
use fuzz_support::*;
use proptest::prelude::*;
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000;
const AUDIENCE: &str = "crm-tool";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

struct Fixture {
    td: TrustDomain,
    ca: Ca,
    id: SpiffeId,
    key: WorkloadKey,
    csr: Vec<u8>,
    leaf: Vec<u8>,
    jwt_svid: String,
    /// The CA's bundle plus `test_key` under kid `test-kid`.
    bundles: Vec<TrustBundle>,
    test_key: EcdsaKeyPair,
    proof: Vec<u8>,
}

/// One CA for the whole binary: creating keys is the slow part.
fn fx() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        baton_ca::init();
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td.clone()), at(NOW - 60)).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/agents/a").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr_der(&id).unwrap();
        let issued = ca
            .sign_x509_svid(&csr, &id, Duration::from_secs(3600), &[], at(NOW))
            .unwrap();
        let (jwt, _) = ca
            .sign_jwt_svid(&id, &[AUDIENCE.into()], Duration::from_secs(300), at(NOW))
            .unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let test_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let mut bundle = ca.bundle();
        bundle.jwt_authorities.push(JwtAuthority {
            kid: "test-kid".into(),
            public_key: test_key.public_key().as_ref().to_vec(),
        });
        let proof = sign_renew_proof(key.pkcs8_der(), "tok", NOW).unwrap();
        Fixture {
            td,
            ca,
            id,
            csr,
            leaf: issued.cert_chain_der[0].clone(),
            jwt_svid: jwt.expose().to_owned(),
            bundles: vec![bundle],
            test_key,
            key,
            proof,
        }
    })
}

/// A compact JWS over exactly `header` and `payload`, signed by the
/// fixture's test key (so claim checks past the signature get exercised).
fn sign(header: &Value, payload: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let sig = fx()
        .test_key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), token.as_bytes())
        .unwrap();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    token
}

fn valid_claims() -> Value {
    json!({"sub": "spiffe://example.org/agents/a", "aud": [AUDIENCE], "exp": NOW + 300, "iat": NOW})
}

fn check_jwt(token: &str) {
    let f = fx();
    for now in [at(NOW), at(0), at(u64::from(u32::MAX) * 4)] {
        if let Ok(v) = validate_jwt_svid(token, AUDIENCE, &f.bundles, now) {
            assert!(v.expires_at > now);
            assert!(v.spiffe_id.is_member_of(&f.td));
        }
    }
    let _ = validate_jwt_svid(token, "", &[], at(NOW));
}

fn check_csr(der: &[u8], dns: &[String], ttl: u64, now: SystemTime) {
    let f = fx();
    if let Ok(svid) =
        f.ca.sign_x509_svid(der, &f.id, Duration::from_secs(ttl), dns, now)
    {
        let info = leaf_info(&svid.cert_chain_der).unwrap();
        assert_eq!(info.spiffe_id, f.id);
        assert_eq!(info.serial_hex, svid.serial_hex);
    }
}

fn check_chain(chain: &[Vec<u8>]) {
    if let Ok(info) = leaf_info(chain) {
        // Whatever SPIFFE ID it reports is one the ID parser accepts.
        assert_eq!(
            SpiffeId::parse(info.spiffe_id.as_str()).unwrap(),
            info.spiffe_id
        );
    }
    if let Some(leaf) = chain.first() {
        let _ = Ca::signer_of(leaf);
        let _ = baton_ca::cert_thumbprint(leaf);
        let _ = verify_renew_proof(leaf, "tok", NOW, &fx().proof);
    }
}

fn check_bundle_json(v: &Value) {
    let f = fx();
    if let Ok(b) = TrustBundle::from_spiffe_json(&f.td, v) {
        // What parses re-encodes and parses to the same bundle.
        let again = TrustBundle::from_spiffe_json(&f.td, &b.to_spiffe_json()).unwrap();
        assert_eq!(again, b);
        let _ = b.to_pem();
        let _ = b.jwks_json();
    }
}

#[test]
fn fuzz_seeds_are_valid() {
    let f = fx();
    check_csr(&f.csr, &[], 60, at(NOW));
    leaf_info(std::slice::from_ref(&f.leaf)).unwrap();
    validate_jwt_svid(&f.jwt_svid, AUDIENCE, &f.bundles, at(NOW)).unwrap();
    let own = sign(
        &json!({"alg": "ES256", "kid": "test-kid", "typ": "JWT"}),
        valid_claims().to_string().as_bytes(),
    );
    // The test key's signature may be high-S: valid or refused as
    // non-canonical, never anything else.
    match validate_jwt_svid(&own, AUDIENCE, &f.bundles, at(NOW)) {
        Ok(_) | Err(baton_ca::jwt::JwtError::NonCanonicalSignature) => {}
        Err(e) => panic!("{e}"),
    }
    TrustBundle::from_spiffe_json(&f.td, &f.bundles[0].to_spiffe_json()).unwrap();
    verify_renew_proof(&f.leaf, "tok", NOW, &f.proof).unwrap();
    let pem = f.bundles[0].to_pem();
    assert_eq!(
        TrustBundle::from_pem(&f.td, &pem).unwrap().x509_authorities,
        f.bundles[0].x509_authorities
    );
}

#[test]
fn fuzz_extreme_times_and_ttls() {
    let f = fx();
    for now in [
        0,
        1,
        NOW,
        u64::from(u32::MAX),
        253_402_300_799,
        253_402_300_800,
        i64::MAX as u64,
    ] {
        let Some(t) = UNIX_EPOCH.checked_add(Duration::from_secs(now)) else {
            continue;
        };
        for ttl in [0, 1, 59, 3600, u64::from(u32::MAX), u64::MAX] {
            check_csr(&f.csr, &[], ttl, t);
            let _ =
                f.ca.sign_jwt_svid(&f.id, &[AUDIENCE.into()], Duration::from_secs(ttl), t);
        }
        check_jwt(&f.jwt_svid);
        let _ = validate_jwt_svid(&f.jwt_svid, AUDIENCE, &f.bundles, t);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_csr_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_csr(&b, &[], 60, at(NOW));
    }

    #[test]
    fn fuzz_csr_mutated(b in Just(fx().csr.clone()).prop_flat_map(|v| mutated_bytes(v, 4))) {
        check_csr(&b, &[], 60, at(NOW));
    }

    #[test]
    fn fuzz_csr_dns_names_and_ttl(
        dns in proptest::collection::vec(
            prop_oneof![
                "\\PC{0,20}",
                "[a-z0-9.-]{1,70}",
                Just("web.internal".to_owned()).prop_flat_map(|v| mutated(v, 2)),
            ],
            0..3,
        ),
        ttl in any::<u64>(),
        now in any::<u64>(),
    ) {
        let now = UNIX_EPOCH.checked_add(Duration::from_secs(now)).unwrap_or(at(NOW));
        check_csr(&fx().csr, &dns, ttl, now);
    }

    #[test]
    fn fuzz_csr_requests_anything(
        sans in proptest::collection::vec("[ -~]{0,40}", 0..3),
    ) {
        // A well-signed CSR that asks for arbitrary URI SANs: the CA ignores
        // them and issues for the ID it was told.
        let mut params = rcgen::CertificateParams::default();
        for s in &sans {
            if let Ok(ia5) = rcgen::string::Ia5String::try_from(s.as_str()) {
                params.subject_alt_names.push(rcgen::SanType::URI(ia5));
            }
        }
        let key = rcgen::KeyPair::generate().unwrap();
        if let Ok(csr) = params.serialize_request(&key) {
            check_csr(csr.der(), &[], 60, at(NOW));
        }
    }

    #[test]
    fn fuzz_leaf_info_arbitrary(
        chain in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 0..3)
    ) {
        check_chain(&chain);
    }

    #[test]
    fn fuzz_leaf_info_mutated(b in Just(fx().leaf.clone()).prop_flat_map(|v| mutated_bytes(v, 4))) {
        check_chain(&[b]);
    }

    #[test]
    fn fuzz_jwt_svid_arbitrary(s in "\\PC{0,200}") {
        check_jwt(&s);
    }

    #[test]
    fn fuzz_jwt_svid_three_parts(
        parts in proptest::collection::vec("[A-Za-z0-9_=+/-]{0,80}", 3),
    ) {
        check_jwt(&parts.join("."));
    }

    #[test]
    fn fuzz_jwt_svid_mutated(s in Just(fx().jwt_svid.clone()).prop_flat_map(|v| mutated(v, 3))) {
        check_jwt(&s);
    }

    #[test]
    fn fuzz_jwt_svid_resigned_claims(
        header in mutated_json(json!({"alg": "ES256", "kid": "test-kid", "typ": "JWT"}), 2),
        claims in mutated_json(valid_claims(), 3),
        keep_header in any::<bool>(),
    ) {
        let header = if keep_header {
            json!({"alg": "ES256", "kid": "test-kid", "typ": "JWT"})
        } else {
            header
        };
        check_jwt(&sign(&header, claims.to_string().as_bytes()));
    }

    #[test]
    fn fuzz_jwt_svid_resigned_bytes(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_jwt(&sign(&json!({"alg": "ES256", "kid": "test-kid", "typ": "JWT"}), &payload));
    }

    #[test]
    fn fuzz_bundle_json_arbitrary(v in hostile_json()) {
        check_bundle_json(&v);
        check_bundle_json(&json!({"keys": [v]}));
    }

    #[test]
    fn fuzz_bundle_json_mutated(
        v in Just(fx().bundles[0].to_spiffe_json()).prop_flat_map(|v| mutated_json(v, 3))
    ) {
        check_bundle_json(&v);
    }

    #[test]
    fn fuzz_bundle_json_mutated_text(
        s in Just(fx().bundles[0].to_spiffe_json().to_string()).prop_flat_map(|v| mutated(v, 3))
    ) {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            check_bundle_json(&v);
        }
    }

    #[test]
    fn fuzz_bundle_pem(
        s in prop_oneof![
            "\\PC{0,200}",
            Just(fx().bundles[0].to_pem()).prop_flat_map(|v| mutated(v, 3)),
        ]
    ) {
        if let Ok(b) = TrustBundle::from_pem(&fx().td, &s) {
            prop_assert!(!b.x509_authorities.is_empty());
        }
    }

    #[test]
    fn fuzz_renew_proof(
        leaf in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            Just(fx().leaf.clone()).prop_flat_map(|v| mutated_bytes(v, 2)),
        ],
        sig in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            Just(fx().proof.clone()).prop_flat_map(|v| mutated_bytes(v, 2)),
        ],
        token in "\\PC{0,40}",
        iat in any::<u64>(),
    ) {
        let f = fx();
        let _ = verify_renew_proof(&leaf, &token, iat, &sig);
        let _ = verify_renew_proof(&f.leaf, &token, iat, &sig);
        let _ = sign_renew_proof(&leaf, &token, iat);
        prop_assert!(!baton_ca::is_low_s(&sig) || sig.len() == 64);
        let _ = f.key.pkcs8_der();
    }
}
