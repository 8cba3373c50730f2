//! `TokenVerifier::verify` on arbitrary strings, against a real CA's
//! bundle and a real peer certificate: never a panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use baton_ca::{Ca, CaConfig, WorkloadKey};
use baton_core::SpiffeId;
use baton_verify::{JwtBundles, PeerCert, TokenVerifier};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_700_000_000;

fn setup() -> Option<(TokenVerifier, PeerCert)> {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let ca = Ca::load_or_create(CaConfig::new("example.org".parse().ok()?), now).ok()?;
    let id = SpiffeId::parse("spiffe://example.org/agents/a").ok()?;
    let key = WorkloadKey::generate().ok()?;
    let svid = ca
        .sign_x509_svid(
            &key.csr_der(&id).ok()?,
            &id,
            Duration::from_secs(3600),
            &[],
            now,
        )
        .ok()?;
    let peer = PeerCert::from_verified_leaf(svid.cert_chain_der.first()?.clone()).ok()?;
    let verifier = TokenVerifier::new(JwtBundles::new([ca.bundle()]), "crm-tool".into());
    Some((verifier, peer))
}

fuzz_target!(|data: &[u8]| {
    static FX: OnceLock<Option<(TokenVerifier, PeerCert)>> = OnceLock::new();
    let Some((verifier, peer)) = FX.get_or_init(setup) else {
        return;
    };
    let token = String::from_utf8_lossy(data);
    let _ = verifier.verify(&token, peer, NOW);
});
