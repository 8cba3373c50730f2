//! The limits a broker cannot beat on this machine, measured in the same
//! run as the broker: a bare P-256 signature, and the CA's whole job per
//! certificate (CSR parse + self-signature verify + build + sign the leaf).

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use baton_ca::{Ca, CaConfig};
use baton_core::{SpiffeId, TrustDomain};

/// Operations per second of `op`, run on this thread for about `dur`.
fn rate(dur: Duration, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        // Check the clock every 64 operations, not every one.
        for _ in 0..64 {
            op()?;
        }
        n += 64;
        let el = start.elapsed();
        if el >= dur {
            return Ok(n as f64 / el.as_secs_f64());
        }
    }
}

/// Raw ECDSA P-256 (SHA-256) signatures per second on one core.
pub fn p256_sign_rate(dur: Duration) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow!("P-256 key generation failed"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow!("P-256 key load failed"))?;
    // About the size of a leaf's TBSCertificate.
    let msg = [0x5a_u8; 400];
    rate(dur, || {
        key.sign(&rng, &msg)
            .map(drop)
            .map_err(|_| anyhow!("P-256 sign failed"))
    })
}

/// `Ca::sign_x509_svid` calls per second on one core, cycling over `csrs`.
pub fn csr_verify_sign_rate(
    ca: &Ca,
    id: &SpiffeId,
    csrs: &[Vec<u8>],
    dur: Duration,
) -> anyhow::Result<f64> {
    let mut i = 0usize;
    let ttl = Duration::from_secs(3600);
    rate(dur, || {
        let csr = csrs.get(i % csrs.len()).context("empty CSR pool")?;
        i = i.wrapping_add(1);
        ca.sign_x509_svid(csr, id, ttl, &[], SystemTime::now())?;
        Ok(())
    })
}

/// The same on `threads` threads at once: the limit on the cores used.
pub fn csr_verify_sign_rate_parallel(
    td: &TrustDomain,
    id: &SpiffeId,
    csrs: &[Vec<u8>],
    dur: Duration,
    threads: usize,
) -> anyhow::Result<f64> {
    let ca = new_ca(td)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| csr_verify_sign_rate(&ca, id, csrs, dur)))
            .collect();
        let mut total = 0.0;
        for h in handles {
            total += h.join().map_err(|_| anyhow!("limit thread died"))??;
        }
        Ok(total)
    })
}

/// A throwaway in-memory CA like the broker's.
pub fn new_ca(td: &TrustDomain) -> anyhow::Result<Ca> {
    Ok(Ca::load_or_create(
        CaConfig::new(td.clone()),
        SystemTime::now(),
    )?)
}
