//! A workload gets its identity through an unmodified SPIFFE client.

use std::time::{Duration, SystemTime};

use spiffe::{WorkloadApiClient, X509Source};

use crate::harness::{Cluster, Options, TD, wait_for_async};

async fn client(c: &Cluster) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(c.endpoint()).await.unwrap()
}

/// Polls the Workload API until the default SVID carries `want`.
async fn wait_for_svid(c: &Cluster, want: &str) -> spiffe::X509Svid {
    let client = client(c).await;
    wait_for_async("an X509-SVID", Duration::from_secs(30), || async {
        match client.fetch_x509_svid().await {
            Ok(svid) if svid.spiffe_id().to_string() == want => Some(svid),
            _ => None,
        }
    })
    .await
}

fn verify_chain(leaf_der: &[u8], bundle: &[spiffe::cert::Certificate]) {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    let ok = bundle.iter().any(|ca| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca.as_bytes()).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok() && leaf.issuer() == ca.subject()
    });
    assert!(ok, "SVID does not chain to any authority in the bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_x509_and_jwt_svids() {
    let c = Cluster::start(Options::default());
    let id = format!("spiffe://{TD}/agents/planner");
    c.register("/agents/planner", &["--dns-name", "planner.internal"]);

    // X509Source: the crate's high-level client validates the SVID itself.
    let _ = wait_for_svid(&c, &id).await;
    let source = X509Source::builder()
        .endpoint(c.endpoint())
        .build()
        .await
        .unwrap();
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), id);
    let bundles = source.bundle_set().unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("bundle for our trust domain");
    verify_chain(svid.leaf().as_bytes(), bundle.authorities());

    // The leaf follows the X509-SVID rules.
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id.as_str()]);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);

    // JWT-SVID for an audience, validated by the agent and independently.
    let client = client(&c).await;
    let token = client.fetch_jwt_token(["crm-tool"], None).await.unwrap();
    let validated = client.validate_jwt_token("crm-tool", &token).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), id);
    assert!(
        client
            .validate_jwt_token("other-audience", &token)
            .await
            .is_err()
    );

    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let jwt_bundle = jwt_bundles.get(&td).expect("JWT bundle");
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let kid = header.kid.expect("kid");
    let key = jwt_bundle.find_jwt_authority(&kid).expect("key for kid");
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_slice(key.jwk_json()).unwrap();
    let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["crm-tool"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
    assert_eq!(data.claims["sub"], id);
    assert!(data.claims["jti"].is_string());
    assert!(data.claims["iat"].is_number());
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delivers_rotated_svid_before_expiry() {
    let c = Cluster::start(Options::default());
    let id = format!("spiffe://{TD}/agents/short-lived");
    c.register("/agents/short-lived", &["--x509-ttl", "30s"]);
    let first = wait_for_svid(&c, &id).await;
    let (_, leaf) = x509_parser::parse_x509_certificate(first.leaf().as_bytes()).unwrap();
    let first_serial = leaf.raw_serial().to_vec();
    let not_after = leaf.validity().not_after.timestamp();

    let client = client(&c).await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    use futures::StreamExt;
    let rotated = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let svid = stream.next().await.expect("stream ended").unwrap();
            let (_, l) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
            if l.raw_serial() != first_serial.as_slice() {
                return (svid.clone(), SystemTime::now());
            }
        }
    })
    .await
    .expect("no rotation within 60s");
    let received_at = rotated
        .1
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        received_at < not_after,
        "rotated SVID arrived at {received_at}, after the old one expired at {not_after}"
    );
    assert_eq!(rotated.0.spiffe_id().to_string(), id);
}
