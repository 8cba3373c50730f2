//! `Ca::sign_x509_svid` on arbitrary CSR bytes, and `leaf_info` on what
//! it issues: never a panic.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use baton_ca::{Ca, CaConfig, leaf_info};
use baton_core::SpiffeId;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_700_000_000;

fn setup() -> Option<(Ca, SpiffeId)> {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let ca = Ca::load_or_create(CaConfig::new("example.org".parse().ok()?), now).ok()?;
    Some((ca, SpiffeId::parse("spiffe://example.org/agents/a").ok()?))
}

fuzz_target!(|data: &[u8]| {
    static FX: OnceLock<Option<(Ca, SpiffeId)>> = OnceLock::new();
    let Some((ca, id)) = FX.get_or_init(setup) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    if let Ok(svid) = ca.sign_x509_svid(data, id, Duration::from_secs(60), &[], now) {
        assert!(leaf_info(&svid.cert_chain_der).is_ok());
    }
    let _ = leaf_info(&[data.to_vec()]);
});
