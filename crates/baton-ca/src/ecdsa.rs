//! Canonical (low-S) ES256 signatures.
//!
//! An ECDSA signature `(r, s)` has a twin `(r, n - s)` that verifies under
//! the same key and message. A JWS with the twin is a different string, so
//! anything keyed by a token's bytes (a revocation by its digest, a cache,
//! an audit reference) could be bypassed by re-encoding it. Baton signs
//! only low-S signatures (`s <= n / 2`) and its verifiers refuse the rest.

/// The order `n` of the P-256 group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `n / 2` (rounded down), big-endian.
const P256_HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// Whether a fixed-size ES256 signature (`r || s`, 64 bytes) is in low-S
/// form. Anything that is not 64 bytes is not.
pub fn is_low_s(sig: &[u8]) -> bool {
    match sig.get(32..) {
        Some(s) if sig.len() == 64 => s <= &P256_HALF_N[..],
        _ => false,
    }
}

/// Rewrites a fixed-size ES256 signature to its low-S twin if needed.
pub(crate) fn to_low_s(sig: &mut [u8]) {
    if sig.len() != 64 || is_low_s(sig) {
        return;
    }
    let Some(s) = sig.get_mut(32..) else { return };
    // s := n - s, big-endian with borrow; s < n holds for a valid signature.
    let mut borrow = 0u16;
    for (out, n) in s.iter_mut().rev().zip(P256_N.iter().rev()) {
        let sub = u16::from(*out) + borrow;
        let (v, b) = if u16::from(*n) >= sub {
            (u16::from(*n) - sub, 0)
        } else {
            (u16::from(*n) + 256 - sub, 1)
        };
        *out = u8::try_from(v).unwrap_or(0);
        borrow = b;
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };

    use super::*;

    #[test]
    fn twin_verifies_and_normalises() {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, kp.public_key().as_ref());
        let (mut low, mut high) = (0, 0);
        for i in 0..64u8 {
            let msg = [i; 8];
            let sig = kp.sign(&rng, &msg).unwrap().as_ref().to_vec();
            let mut canon = sig.clone();
            to_low_s(&mut canon);
            assert!(is_low_s(&canon));
            public.verify(&msg, &canon).unwrap();
            if is_low_s(&sig) {
                low += 1;
                assert_eq!(canon, sig);
            } else {
                high += 1;
                assert_ne!(canon, sig);
                // The twin of the twin is the original.
                let mut back = canon.clone();
                let s = back.get_mut(32..).unwrap();
                let mut borrow = 0i16;
                for (out, n) in s.iter_mut().rev().zip(P256_N.iter().rev()) {
                    let mut v = i16::from(*n) - i16::from(*out) - borrow;
                    borrow = i16::from(v < 0);
                    if v < 0 {
                        v += 256;
                    }
                    *out = v as u8;
                }
                assert_eq!(back, sig);
            }
        }
        assert!(low > 0 && high > 0, "low {low} high {high}");
        assert!(!is_low_s(&[0u8; 63]));
    }
}
