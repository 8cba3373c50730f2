//! The workload side: the node daemon generates each workload's key and
//! asks the broker to certify it with a CSR, so private keys never leave
//! the node.

use std::fmt;

use baton_core::SpiffeId;
use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::CaError;

/// A workload's P-256 private key. `Debug` never prints it.
pub struct WorkloadKey {
    key: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(\"...\")")
    }
}

impl WorkloadKey {
    /// A fresh random P-256 key.
    pub fn generate() -> Result<Self, CaError> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Loads a P-256 key from unencrypted PKCS#8 DER (the Workload API's
    /// `x509_svid_key` encoding).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CaError> {
        Ok(Self {
            key: KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(der),
                &PKCS_ECDSA_P256_SHA256,
            )?,
        })
    }

    /// Unencrypted PKCS#8 DER. Secret: never log it.
    pub fn pkcs8_der(&self) -> &[u8] {
        self.key.serialized_der()
    }

    /// The uncompressed public point (`0x04 || x || y`).
    pub fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// A CSR signed by this key, naming `spiffe_id` as its URI SAN. The CA
    /// ignores what a CSR asks for and decides the SVID's contents itself;
    /// the SAN is there for humans reading the CSR.
    pub fn csr_der(&self, spiffe_id: &SpiffeId) -> Result<Vec<u8>, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(spiffe_id.as_str())?)];
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}
