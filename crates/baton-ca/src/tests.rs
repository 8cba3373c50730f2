//! Behaviour of the CA as its callers see it: issuance rules, persistence,
//! bundle encodings and JWT-SVID validation.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, SanType,
};
use serde_json::{Value, json};
use x509_parser::extensions::GeneralName;

use crate::jwt::{JwtError, validate_jwt_svid};
use crate::x509::parse_cert;
use crate::*;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    td().id(path).unwrap()
}

fn mem_ca(ca_ttl: Duration) -> Ca {
    init();
    let mut cfg = CaConfig::new(td());
    cfg.ca_ttl = ca_ttl;
    Ca::load_or_create(cfg, now()).unwrap()
}

/// A CSR that asks for everything an attacker would want.
fn greedy_csr(key: &KeyPair) -> Vec<u8> {
    let mut p = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    p.subject_alt_names
        .push(SanType::URI("spiffe://other.org/admin".try_into().unwrap()));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.serialize_request(key).unwrap().der().to_vec()
}

#[test]
fn ca_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ca>();
    assert_send_sync::<WorkloadKey>();
    assert_send_sync::<TrustBundle>();
}

#[test]
fn leaf_ignores_csr_requests_and_follows_the_svid_profile() {
    // CA lives 1 h, caller asks for 10 h: the leaf must stop with the CA.
    let ca = mem_ca(Duration::from_secs(3600));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = greedy_csr(&key);
    let wid = id("/agent/a1");
    let svid = ca
        .sign_x509_svid(&csr, &wid, Duration::from_secs(36_000), &[], now())
        .unwrap();
    assert_eq!(svid.cert_chain_der.len(), 1);
    assert_eq!(svid.not_after, ca.authority_not_after());

    let leaf = parse_cert(&svid.cert_chain_der[0]).unwrap();
    let ca_der = ca.bundle().x509_authorities[0].clone();
    let ca_cert = parse_cert(&ca_der).unwrap();
    leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(wid.as_str())]
    );

    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");

    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(!bc.value.ca);

    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing);

    // AKI of the leaf is the CA's SKI.
    let mut aki = None;
    let mut ca_ski = None;
    let mut leaf_ski = false;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_) => leaf_ski = true,
            _ => {}
        }
    }
    for ext in ca_cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) =
            ext.parsed_extension()
        {
            ca_ski = Some(k.0.to_vec());
        }
    }
    assert!(leaf_ski);
    assert!(aki.is_some());
    assert_eq!(aki, ca_ski);

    // NotBefore back-dated by 10 s.
    let info = leaf_info(&svid.cert_chain_der).unwrap();
    assert_eq!(info.not_before, now() - Duration::from_secs(10));
    assert_eq!(info.not_after, svid.not_after);
    assert_eq!(info.spiffe_id, wid);
    assert_eq!(info.serial_hex, svid.serial_hex);
    assert!(leaf.tbs_certificate.serial.bits() <= 127);

    // Two issuances for the same key get distinct random serials.
    let again = ca
        .sign_x509_svid(&csr, &wid, Duration::from_secs(60), &[], now())
        .unwrap();
    assert_ne!(again.serial_hex, svid.serial_hex);
    assert_eq!(again.not_after, now() + Duration::from_secs(60));
}

#[test]
fn lifetime_is_capped_by_max_svid_ttl_and_dns_names_are_added() {
    init();
    let mut cfg = CaConfig::new(td());
    cfg.max_svid_ttl = Duration::from_secs(600);
    let ca = Ca::load_or_create(cfg, now()).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let wid = id("/web");
    let svid = ca
        .sign_x509_svid(
            &key.csr_der(&wid).unwrap(),
            &wid,
            Duration::from_secs(3600),
            &["web.internal".to_owned()],
            now(),
        )
        .unwrap();
    assert_eq!(svid.not_after, now() + Duration::from_secs(600));
    let leaf = parse_cert(&svid.cert_chain_der[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![
            GeneralName::URI(wid.as_str()),
            GeneralName::DNSName("web.internal")
        ]
    );
    let bad = ca.sign_x509_svid(
        &key.csr_der(&wid).unwrap(),
        &wid,
        Duration::from_secs(60),
        &["bad name!".to_owned()],
        now(),
    );
    assert!(
        matches!(bad, Err(CaError::InvalidDnsName { .. })),
        "{bad:?}"
    );
}

#[test]
fn csr_with_broken_signature_is_rejected() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let key = WorkloadKey::generate().unwrap();
    let wid = id("/w");
    let mut csr = key.csr_der(&wid).unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let err = ca
        .sign_x509_svid(&csr, &wid, Duration::from_secs(60), &[], now())
        .unwrap_err();
    assert!(matches!(err, CaError::CsrBadSignature), "{err:?}");

    let err = ca
        .sign_x509_svid(b"not a csr", &wid, Duration::from_secs(60), &[], now())
        .unwrap_err();
    assert!(matches!(err, CaError::CsrParse(_)), "{err:?}");
}

#[test]
fn non_p256_csr_is_rejected_clearly() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let err = ca
        .sign_x509_svid(&csr, &id("/w"), Duration::from_secs(60), &[], now())
        .unwrap_err();
    assert!(
        matches!(err, CaError::CsrUnsupportedAlgorithm(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("P-256"));
}

#[test]
fn foreign_and_root_ids_are_rejected() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let key = WorkloadKey::generate().unwrap();
    let other = SpiffeId::parse("spiffe://other.org/w").unwrap();
    let csr = key.csr_der(&other).unwrap();
    let err = ca
        .sign_x509_svid(&csr, &other, Duration::from_secs(60), &[], now())
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err:?}");
    let err = ca
        .sign_jwt_svid(&other, &["x".to_owned()], Duration::from_secs(60), now())
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err:?}");

    let root = SpiffeId::parse("spiffe://example.org").unwrap();
    let err = ca
        .sign_x509_svid(&csr, &root, Duration::from_secs(60), &[], now())
        .unwrap_err();
    assert!(
        matches!(err, CaError::TrustDomainIdNotAllowed(_)),
        "{err:?}"
    );
}

#[test]
fn expired_authority_refuses_to_issue() {
    let ca = mem_ca(Duration::from_secs(3600));
    let key = WorkloadKey::generate().unwrap();
    let wid = id("/w");
    let later = now() + Duration::from_secs(7200);
    let err = ca
        .sign_x509_svid(
            &key.csr_der(&wid).unwrap(),
            &wid,
            Duration::from_secs(60),
            &[],
            later,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::AuthorityExpired { .. }), "{err:?}");
}

fn disk_cfg(dir: &std::path::Path) -> CaConfig {
    let mut cfg = CaConfig::new(td());
    cfg.key_dir = Some(dir.join("ca"));
    cfg
}

#[test]
fn persistence_reloads_the_same_authority_with_private_key_files() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    let b = Ca::load_or_create(disk_cfg(tmp.path()), now() + Duration::from_secs(60)).unwrap();
    assert_eq!(a.bundle().x509_authorities, b.bundle().x509_authorities);
    assert_eq!(a.bundle().jwt_authorities, b.bundle().jwt_authorities);
    assert_eq!(a.jwt_key_id(), b.jwt_key_id());
    let dir = tmp.path().join("ca");
    let keys: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    assert_eq!(keys.len(), 2, "one X.509 and one JWT key: {keys:?}");
    for f in keys {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f:?}");
    }
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    // No temporary files left behind.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(!name.to_string_lossy().ends_with(".tmp"), "{name:?}");
    }
    // A JWT signed before the restart validates with the reloaded bundle.
    let (tok, _) = a
        .sign_jwt_svid(
            &id("/w"),
            &["aud".to_owned()],
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
    validate_jwt_svid(tok.expose(), "aud", &[b.bundle()], now()).unwrap();
}

#[test]
fn readable_key_file_is_refused() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    let key = std::fs::read_dir(tmp.path().join("ca"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("x509-") && name.ends_with(".key")
        })
        .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap_err();
    assert!(
        matches!(err, CaError::InsecureKeyFile { mode: 0o644, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("chmod 600"));
}

#[test]
fn expired_persisted_authority_is_replaced() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = disk_cfg(tmp.path());
    cfg.ca_ttl = Duration::from_secs(3600);
    let a = Ca::load_or_create(cfg.clone(), now()).unwrap();
    let later = now() + Duration::from_secs(7200);
    let b = Ca::load_or_create(cfg.clone(), later).unwrap();
    assert_ne!(a.bundle().x509_authorities, b.bundle().x509_authorities);
    assert!(b.authority_not_after() > later);
    // The JWT key has the same lifetime and was replaced too.
    assert_ne!(a.jwt_key_id(), b.jwt_key_id());
    // And the replacement is what the next start loads.
    let c = Ca::load_or_create(cfg, later).unwrap();
    assert_eq!(b.bundle().x509_authorities, c.bundle().x509_authorities);
}

#[test]
fn cert_not_matching_its_key_is_a_clear_error() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    let id = a.active_x509_id();
    let other = mem_ca(DEFAULT_CA_TTL);
    std::fs::write(
        tmp.path().join("ca").join(format!("x509-{id}.der")),
        &other.bundle().x509_authorities[0],
    )
    .unwrap();
    let err = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap_err();
    assert!(matches!(err, CaError::CorruptStore { .. }), "{err:?}");
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn legacy_key_directory_is_imported_as_the_active_authority() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    std::fs::create_dir_all(&dir).unwrap();
    // What an earlier version wrote: one root, one JWT key, no journal.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.not_before = time::OffsetDateTime::from_unix_timestamp(1_699_990_000).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://example.org").unwrap(),
    )];
    let cert = params.self_signed(&key).unwrap();
    let write600 = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write600("x509-authority.key", key.serialized_der());
    write600("x509-authority.der", cert.der());
    let jwt = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .unwrap();
    write600("jwt-authority.key", jwt.as_ref());
    let ca = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    assert_eq!(ca.bundle().x509_authorities, vec![cert.der().to_vec()]);
    assert!(!dir.join("x509-authority.key").exists());
    // And the journal is what the next start reads.
    let again = Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    assert_eq!(again.bundle(), ca.bundle());
}

#[test]
fn persisted_authority_of_another_trust_domain_is_an_error() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    Ca::load_or_create(disk_cfg(tmp.path()), now()).unwrap();
    let mut cfg = disk_cfg(tmp.path());
    cfg.trust_domain = TrustDomain::new("other.org").unwrap();
    let err = Ca::load_or_create(cfg, now()).unwrap_err();
    assert!(
        matches!(err, CaError::TrustDomainMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn bundle_json_has_spiffe_field_names_and_round_trips() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let bundle = ca.bundle();
    let v = bundle.to_spiffe_json();
    let obj = v.as_object().unwrap();
    let mut top: Vec<&str> = obj.keys().map(String::as_str).collect();
    top.sort_unstable();
    assert_eq!(top, ["keys", "spiffe_refresh_hint", "spiffe_sequence"]);
    assert_eq!(v["spiffe_sequence"], json!(bundle.sequence));
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);

    let x = keys[0].as_object().unwrap();
    let mut names: Vec<&str> = x.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["crv", "kty", "use", "x", "x5c", "y"]);
    assert_eq!(x["use"], "x509-svid");
    assert_eq!(x["kty"], "EC");
    assert_eq!(x["crv"], "P-256");

    let j = keys[1].as_object().unwrap();
    let mut names: Vec<&str> = j.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["crv", "kid", "kty", "use", "x", "y"]);
    assert_eq!(j["use"], "jwt-svid");
    assert_eq!(j["kid"], ca.jwt_key_id());

    let back = TrustBundle::from_spiffe_json(&td(), &v).unwrap();
    assert_eq!(back, bundle);

    // Text round trip too (what travels over the wire).
    let text = serde_json::to_string(&v).unwrap();
    let reparsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        TrustBundle::from_spiffe_json(&td(), &reparsed).unwrap(),
        bundle
    );
}

#[test]
fn bundle_json_errors_name_the_key_and_field_and_unknown_uses_are_ignored() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let mut v = ca.bundle().to_spiffe_json();
    v["keys"][0]["x5c"] = json!(["%%%"]);
    let err = TrustBundle::from_spiffe_json(&td(), &v).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::BundleKey {
                index: 0,
                field: "x5c",
                ..
            }
        ),
        "{err:?}"
    );

    let mut v = ca.bundle().to_spiffe_json();
    v["keys"][1]["y"] = json!("AAAA");
    let err = TrustBundle::from_spiffe_json(&td(), &v).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::BundleKey {
                index: 1,
                field: "y",
                ..
            }
        ),
        "{err:?}"
    );

    let mut v = ca.bundle().to_spiffe_json();
    v["keys"][0]["x"] = v["keys"][1]["x"].clone();
    let err = TrustBundle::from_spiffe_json(&td(), &v).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::BundleKey {
                index: 0,
                field: "x",
                ..
            }
        ),
        "{err:?}"
    );

    let mut v = ca.bundle().to_spiffe_json();
    v["keys"][1]["use"] = json!("wit-svid");
    let b = TrustBundle::from_spiffe_json(&td(), &v).unwrap();
    assert!(b.jwt_authorities.is_empty());
    assert_eq!(b.x509_authorities.len(), 1);

    let err = TrustBundle::from_spiffe_json(&td(), &json!({"spiffe_sequence": 1})).unwrap_err();
    assert!(matches!(err, CaError::Bundle(_)), "{err:?}");
}

#[test]
fn jwks_and_der_and_pem_encodings() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let bundle = ca.bundle();
    let jwks: Value = serde_json::from_slice(&bundle.jwks_json()).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], ca.jwt_key_id());
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert!(keys[0].get("x5c").is_none());
    assert_eq!(jwks["spiffe_sequence"], bundle.sequence);

    assert_eq!(
        bundle.x509_authorities_concat_der(),
        bundle.x509_authorities[0]
    );

    let pem = bundle.to_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    let back = TrustBundle::from_pem(&td(), &pem).unwrap();
    assert_eq!(back.x509_authorities, bundle.x509_authorities);
    assert!(back.jwt_authorities.is_empty());
    assert!(matches!(
        TrustBundle::from_pem(&td(), "nothing here"),
        Err(CaError::Pem(_))
    ));
}

#[test]
fn broker_serving_identity_is_an_svid_with_localhost_sans() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let (chain, key) = ca
        .broker_serving_identity(&["localhost".to_owned()], Duration::from_secs(3600), now())
        .unwrap();
    let info = leaf_info(&chain).unwrap();
    assert_eq!(info.spiffe_id, id(BROKER_ID_PATH));
    let leaf = parse_cert(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.value
            .general_names
            .contains(&GeneralName::DNSName("localhost"))
    );
    assert!(
        san.value
            .general_names
            .contains(&GeneralName::IPAddress(&[127, 0, 0, 1]))
    );
    let wk = WorkloadKey::from_pkcs8(key.expose()).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        wk.public_key_raw()
    );
    assert_eq!(format!("{key:?}"), "PrivateKeyBytes(\"...\")");
}

#[test]
fn debug_output_never_shows_keys() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let wk = WorkloadKey::generate().unwrap();
    assert_eq!(format!("{wk:?}"), "WorkloadKey(\"...\")");
    let dbg = format!("{ca:?}");
    assert!(dbg.contains("example.org"));
    assert!(!dbg.to_lowercase().contains("private"));
    let (tok, _) = ca
        .sign_jwt_svid(&id("/w"), &["a".to_owned()], Duration::from_secs(60), now())
        .unwrap();
    assert!(!format!("{tok:?}").contains(tok.expose()));
}

mod jwt_svid {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn setup() -> (Ca, String) {
        let ca = mem_ca(DEFAULT_CA_TTL);
        let (tok, exp) = ca
            .sign_jwt_svid(
                &id("/agent/a1"),
                &["https://tool.example".to_owned(), "other".to_owned()],
                Duration::from_secs(300),
                now(),
            )
            .unwrap();
        assert_eq!(exp, now() + Duration::from_secs(300));
        (ca, tok.expose().to_owned())
    }

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn sign_then_validate() {
        let (ca, tok) = setup();
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(tok.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": ca.jwt_key_id(), "typ": "JWT"})
        );
        let v = validate_jwt_svid(&tok, "https://tool.example", &[ca.bundle()], now()).unwrap();
        assert_eq!(v.spiffe_id, id("/agent/a1"));
        assert_eq!(v.expires_at, now() + Duration::from_secs(300));
        assert_eq!(v.claims["aud"], json!(["https://tool.example", "other"]));
        assert_eq!(v.claims["iat"], json!(1_700_000_000u64));
        let jti = v.claims["jti"].as_str().unwrap();
        assert_eq!(jti.len(), 32);
        assert!(jti.bytes().all(|b| b.is_ascii_hexdigit()));

        // TTL is capped by max_svid_ttl.
        let (_, exp) = ca
            .sign_jwt_svid(
                &id("/w"),
                &["a".to_owned()],
                Duration::from_secs(1 << 40),
                now(),
            )
            .unwrap();
        assert_eq!(exp, now() + DEFAULT_MAX_SVID_TTL);
        assert!(matches!(
            ca.sign_jwt_svid(&id("/w"), &[], Duration::from_secs(60), now()),
            Err(CaError::EmptyAudience)
        ));
    }

    #[test]
    fn wrong_audience() {
        let (ca, tok) = setup();
        let err = validate_jwt_svid(&tok, "nope", &[ca.bundle()], now()).unwrap_err();
        assert_eq!(
            err,
            JwtError::AudienceMismatch {
                expected: "nope".into()
            }
        );
    }

    #[test]
    fn expired_with_no_leeway() {
        let (ca, tok) = setup();
        let at_exp = now() + Duration::from_secs(300);
        let err = validate_jwt_svid(&tok, "other", &[ca.bundle()], at_exp).unwrap_err();
        assert!(
            matches!(err, JwtError::Expired { exp: 1_700_000_300 }),
            "{err:?}"
        );
        validate_jwt_svid(
            &tok,
            "other",
            &[ca.bundle()],
            at_exp - Duration::from_secs(1),
        )
        .unwrap();
    }

    #[test]
    fn tampered_payload() {
        let (ca, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["exp"] = json!(4_000_000_000u64);
        let forged = format!("{}.{}.{}", parts[0], b64json(&claims), parts[2]);
        let err = validate_jwt_svid(&forged, "other", &[ca.bundle()], now()).unwrap_err();
        assert_eq!(err, JwtError::BadSignature);
    }

    #[test]
    fn alg_none() {
        let (ca, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        let header = json!({"alg": "none", "kid": ca.jwt_key_id(), "typ": "JWT"});
        let forged = format!("{}.{}.", b64json(&header), parts[1]);
        let err = validate_jwt_svid(&forged, "other", &[ca.bundle()], now()).unwrap_err();
        assert_eq!(err, JwtError::AlgNone);
    }

    #[test]
    fn hs256_signed_with_the_public_key_as_secret() {
        let (ca, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let bundle = ca.bundle();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(ca.jwt_key_id().to_owned());
        let secret = jsonwebtoken::EncodingKey::from_secret(&bundle.jwt_authorities[0].public_key);
        let forged = jsonwebtoken::encode(&header, &claims, &secret).unwrap();
        let err = validate_jwt_svid(&forged, "other", &[bundle], now()).unwrap_err();
        assert_eq!(err, JwtError::SymmetricAlgorithm("HS256".into()));
    }

    #[test]
    fn unknown_kid() {
        let (ca, _) = setup();
        let stranger = mem_ca(DEFAULT_CA_TTL);
        let (tok, _) = stranger
            .sign_jwt_svid(&id("/w"), &["a".to_owned()], Duration::from_secs(60), now())
            .unwrap();
        let err = validate_jwt_svid(tok.expose(), "a", &[ca.bundle()], now()).unwrap_err();
        assert!(matches!(err, JwtError::UnknownKid { .. }), "{err:?}");
    }

    #[test]
    fn missing_kid_no_bundle_and_malformed() {
        let (ca, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        let header = json!({"alg": "ES256", "typ": "JWT"});
        let forged = format!("{}.{}.{}", b64json(&header), parts[1], parts[2]);
        assert_eq!(
            validate_jwt_svid(&forged, "other", &[ca.bundle()], now()).unwrap_err(),
            JwtError::MissingKid
        );
        assert!(matches!(
            validate_jwt_svid(&tok, "other", &[], now()).unwrap_err(),
            JwtError::NoBundle(_)
        ));
        assert!(matches!(
            validate_jwt_svid("a.b", "other", &[ca.bundle()], now()).unwrap_err(),
            JwtError::Malformed(_)
        ));
        let header = json!({"alg": "RS256", "kid": "k"});
        let forged = format!("{}.{}.{}", b64json(&header), parts[1], parts[2]);
        assert_eq!(
            validate_jwt_svid(&forged, "other", &[ca.bundle()], now()).unwrap_err(),
            JwtError::UnsupportedAlgorithm("RS256".into())
        );
    }
}

/// Rough issuance throughput; run with `--ignored --nocapture` in release.
#[test]
#[ignore = "timing, not correctness"]
fn issuance_throughput() {
    let ca = mem_ca(DEFAULT_CA_TTL);
    let key = WorkloadKey::generate().unwrap();
    let wid = id("/w");
    let csr = key.csr_der(&wid).unwrap();
    let n = 2000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        ca.sign_x509_svid(&csr, &wid, Duration::from_secs(3600), &[], now())
            .unwrap();
    }
    let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
    eprintln!("X509-SVID issuance: {per_sec:.0}/s on one core");
    let start = std::time::Instant::now();
    for _ in 0..n {
        ca.sign_jwt_svid(&wid, &["a".to_owned()], Duration::from_secs(60), now())
            .unwrap();
    }
    let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
    eprintln!("JWT-SVID signing: {per_sec:.0}/s on one core");
}

/// The `spiffe` crate (what Rust workloads use) accepts what we emit.
mod spiffe_interop {
    use super::*;

    #[test]
    fn x509_svid_and_key_parse_as_spiffe_svid() {
        let ca = mem_ca(DEFAULT_CA_TTL);
        let key = WorkloadKey::generate().unwrap();
        let wid = id("/agent/a1");
        let svid = ca
            .sign_x509_svid(
                &key.csr_der(&wid).unwrap(),
                &wid,
                Duration::from_secs(600),
                &[],
                now(),
            )
            .unwrap();
        let parsed =
            spiffe::X509Svid::parse_from_der(&svid.cert_chain_der.concat(), key.pkcs8_der())
                .unwrap();
        assert_eq!(parsed.spiffe_id().to_string(), wid.as_str());

        let td = spiffe::TrustDomain::new("example.org").unwrap();
        spiffe::X509Bundle::parse_from_der(td, &ca.bundle().x509_authorities_concat_der()).unwrap();
    }

    #[test]
    fn jwt_svid_validates_with_spiffe_against_our_jwks() {
        // The spiffe crate reads the wall clock, so sign at the wall clock.
        let wall = SystemTime::now();
        let ca = Ca::load_or_create(CaConfig::new(td()), wall).unwrap();
        let (tok, _) = ca
            .sign_jwt_svid(
                &id("/agent/a1"),
                &["svc".to_owned()],
                Duration::from_secs(300),
                wall,
            )
            .unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let bundle = spiffe::JwtBundle::from_jwt_authorities(td, &ca.bundle().jwks_json()).unwrap();
        let mut set = spiffe::JwtBundleSet::new();
        set.add_bundle(bundle);
        let svid = spiffe::JwtSvid::parse_and_validate(tok.expose(), &set, &["svc"]).unwrap();
        assert_eq!(
            svid.spiffe_id().to_string(),
            "spiffe://example.org/agent/a1"
        );
    }
}
