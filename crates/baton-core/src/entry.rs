//! Registration entries: which SPIFFE ID a workload gets, on which node,
//! when its attested selectors match.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::selector::{Selector, SelectorError};
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// Longest SVID lifetime an entry may ask for (the CA caps it further).
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Default X509-SVID lifetime (SPIRE's default, one hour).
pub const DEFAULT_X509_TTL_SECS: u64 = 3600;
/// Default JWT-SVID lifetime (SPIRE's default, five minutes).
pub const DEFAULT_JWT_TTL_SECS: u64 = 300;

/// Identifier of a registration entry (a UUID in lowercase hyphenated form).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct EntryId(String);

impl EntryId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Parses an id, which must be a hyphenated UUID.
    pub fn parse(s: &str) -> Result<Self, EntryError> {
        let uuid = uuid::Uuid::try_parse(s).map_err(|_| EntryError::BadId {
            input: s.to_owned(),
        })?;
        Ok(Self(uuid.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

/// Why a registration entry (or a field of one) is invalid. Each variant
/// names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry id {input:?} is not a UUID")]
    BadId { input: String },
    #[error("field `{field}`: {source}")]
    SpiffeId {
        field: &'static str,
        #[source]
        source: SpiffeIdError,
    },
    #[error("field `spiffe_id`: a workload cannot be given the trust domain's own ID; add a path")]
    TrustDomainIdForWorkload,
    #[error("field `parent_id`: {parent} is in trust domain {parent_td}, but spiffe_id is in {td}")]
    TrustDomainMismatch {
        parent: String,
        parent_td: String,
        td: String,
    },
    #[error("field `selectors`: at least one selector is required")]
    NoSelectors,
    #[error("field `selectors`: {0}")]
    Selector(#[from] SelectorError),
    #[error(
        "field `selectors`: {selectors} name only the caller's executable, which any process can run after it connects (exec keeps its pid); add unix:uid:<n> or unix:gid:<n> so that the identity is bound to a kernel credential"
    )]
    NoCredentialSelector { selectors: String },
    #[error("field `{field}`: must be between 1 and {MAX_TTL_SECS} seconds, got {got}")]
    Ttl { field: &'static str, got: u64 },
    #[error("field `dns_names`: {name:?} is not a valid DNS name")]
    DnsName { name: String },
}

/// A validated DNS name for an SVID's extra SANs.
pub fn validate_dns_name(name: &str) -> Result<(), EntryError> {
    let bad = || EntryError::DnsName {
        name: name.to_owned(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let body = name.strip_prefix("*.").unwrap_or(name);
    for label in body.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// What an operator submits to create an entry. Fields are raw strings so
/// that every problem can be reported against its field; [`NewEntry::validate`]
/// turns it into an [`Entry`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEntry {
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    #[serde(default = "default_x509_ttl")]
    pub x509_ttl_secs: u64,
    #[serde(default = "default_jwt_ttl")]
    pub jwt_ttl_secs: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
}

fn default_x509_ttl() -> u64 {
    DEFAULT_X509_TTL_SECS
}
fn default_jwt_ttl() -> u64 {
    DEFAULT_JWT_TTL_SECS
}

impl NewEntry {
    /// Checks every field and builds the entry with a fresh id.
    pub fn validate(&self) -> Result<Entry, EntryError> {
        let spiffe_id =
            SpiffeId::parse(&self.spiffe_id).map_err(|source| EntryError::SpiffeId {
                field: "spiffe_id",
                source,
            })?;
        if spiffe_id.is_trust_domain_id() {
            return Err(EntryError::TrustDomainIdForWorkload);
        }
        let parent_id =
            SpiffeId::parse(&self.parent_id).map_err(|source| EntryError::SpiffeId {
                field: "parent_id",
                source,
            })?;
        if parent_id.trust_domain() != spiffe_id.trust_domain() {
            return Err(EntryError::TrustDomainMismatch {
                parent: parent_id.to_string(),
                parent_td: parent_id.trust_domain().to_string(),
                td: spiffe_id.trust_domain().to_string(),
            });
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        let mut selectors = self
            .selectors
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        if !crate::selector::binds_credential(&selectors) {
            return Err(EntryError::NoCredentialSelector {
                selectors: selectors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for (field, got) in [
            ("x509_ttl_secs", self.x509_ttl_secs),
            ("jwt_ttl_secs", self.jwt_ttl_secs),
        ] {
            if got == 0 || got > MAX_TTL_SECS {
                return Err(EntryError::Ttl { field, got });
            }
        }
        for name in &self.dns_names {
            validate_dns_name(name)?;
        }
        Ok(Entry {
            id: EntryId::random(),
            spiffe_id,
            parent_id,
            selectors,
            x509_ttl_secs: self.x509_ttl_secs,
            jwt_ttl_secs: self.jwt_ttl_secs,
            dns_names: self.dns_names.clone(),
        })
    }
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: EntryId,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    pub selectors: Vec<Selector>,
    pub x509_ttl_secs: u64,
    pub jwt_ttl_secs: u64,
    pub dns_names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_entry() -> NewEntry {
        NewEntry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/baton/node/n1".into(),
            selectors: vec!["unix:uid:1000".into(), "unix:uid:1000".into()],
            x509_ttl_secs: 60,
            jwt_ttl_secs: 60,
            dns_names: vec!["web.internal".into()],
        }
    }

    #[test]
    fn validates_and_dedups() {
        let e = new_entry().validate().unwrap();
        assert_eq!(e.selectors, vec![Selector::uid(1000)]);
        assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/web");
    }

    #[test]
    fn names_the_field_at_fault() {
        let mut e = new_entry();
        e.spiffe_id = "spiffe://example.org/a/".into();
        let err = e.validate().unwrap_err();
        assert!(err.to_string().starts_with("field `spiffe_id`"), "{err}");

        let mut e = new_entry();
        e.parent_id = "spiffe://other.org/n".into();
        assert!(matches!(
            e.validate(),
            Err(EntryError::TrustDomainMismatch { .. })
        ));

        let mut e = new_entry();
        e.selectors = vec![];
        assert_eq!(e.validate(), Err(EntryError::NoSelectors));

        let mut e = new_entry();
        e.selectors = vec!["unix:uid:abc".into()];
        assert!(matches!(e.validate(), Err(EntryError::Selector(_))));

        // Only the executable: any process may exec it after connecting.
        let mut e = new_entry();
        e.selectors = vec!["unix:path:/usr/bin/agent".into()];
        let err = e.validate().unwrap_err();
        assert!(matches!(err, EntryError::NoCredentialSelector { .. }));
        assert!(err.to_string().contains("unix:uid"), "{err}");
        e.selectors.push("unix:gid:7".into());
        assert!(e.validate().is_ok(), "control: with a gid it is accepted");

        let mut e = new_entry();
        e.x509_ttl_secs = 0;
        assert_eq!(
            e.validate(),
            Err(EntryError::Ttl {
                field: "x509_ttl_secs",
                got: 0
            })
        );

        let mut e = new_entry();
        e.dns_names = vec!["bad_name".into()];
        assert!(matches!(e.validate(), Err(EntryError::DnsName { .. })));

        let mut e = new_entry();
        e.spiffe_id = "spiffe://example.org".into();
        assert_eq!(e.validate(), Err(EntryError::TrustDomainIdForWorkload));
    }

    #[test]
    fn entry_id_parse() {
        assert!(EntryId::parse("not-a-uuid").is_err());
        let id = EntryId::random();
        assert_eq!(EntryId::parse(id.as_str()).unwrap(), id);
    }
}
