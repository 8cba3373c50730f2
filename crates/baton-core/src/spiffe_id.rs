//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID standard
//! (`standards/SPIFFE-ID.md`) describes them.
//!
//! A value of [`SpiffeId`] or [`TrustDomain`] is always valid: the only way
//! to build one is through a parser that checks every rule and reports the
//! first one broken as a distinct [`SpiffeIdError`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme of every SPIFFE ID, with its separator.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest trust domain name we accept, in bytes (the standard's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID we accept, in bytes (the standard asks for support up to this).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or a trust domain name.
///
/// Each rule of the standard has its own variant so that a caller (and an
/// operator reading the message) knows exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain after \"spiffe://\"")]
    MissingTrustDomain,
    #[error("trust domain name is empty")]
    EmptyTrustDomain,
    #[error("trust domain is {len} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong { len: usize },
    #[error(
        "trust domain contains {found:?} at byte {at}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar { found: char, at: usize },
    #[error("SPIFFE ID must not contain a port")]
    Port,
    #[error("SPIFFE ID must not contain user info ('@')")]
    UserInfo,
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    #[error("SPIFFE ID must not be percent-encoded ('%')")]
    PercentEncoded,
    #[error("SPIFFE ID path has an empty segment (\"//\") at byte {at}")]
    EmptySegment { at: usize },
    #[error("SPIFFE ID path has a '.' or '..' segment at byte {at}")]
    DotSegment { at: usize },
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
    #[error(
        "SPIFFE ID path contains {found:?} at byte {at}; only letters, digits, '.', '-' and '_' are allowed in segments"
    )]
    BadPathChar { found: char, at: usize },
    #[error("SPIFFE ID is {len} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong { len: usize },
    #[error("SPIFFE ID path must start with '/'")]
    PathWithoutSlash,
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`, not `spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name, 0)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`; also the key
    /// of this domain in Workload API bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// Builds `spiffe://<td><path>`, checking `path` by the same rules as the parser.
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
///
/// The path is empty for the trust domain's own ID, else it starts with `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // INVARIANT: `full` is `spiffe://` + `td` + `path`, and all three obey the standard.
    full: String,
    td: TrustDomain,
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, reporting the first rule it breaks.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Query, fragment and percent-encoding are refused wherever they appear.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let td_end = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_end];
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if td.contains('@') {
            return Err(SpiffeIdError::UserInfo);
        }
        if td.contains(':') {
            return Err(SpiffeIdError::Port);
        }
        validate_trust_domain(td, SCHEME_PREFIX.len())?;
        let path = &rest[td_end..];
        validate_path(path, SCHEME_PREFIX.len() + td_end)?;
        Ok(Self {
            full: s.to_owned(),
            td: TrustDomain(td.to_owned()),
            path_start: SCHEME_PREFIX.len() + td_end,
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    /// True for the trust domain's own ID (`spiffe://example.org`), which
    /// no workload SVID may carry.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True when `self` is in trust domain `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.td == td
    }
}

fn validate_trust_domain(td: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    for (i, c) in td.char_indices() {
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
        if !ok {
            return Err(SpiffeIdError::BadTrustDomainChar {
                found: c,
                at: offset + i,
            });
        }
    }
    Ok(())
}

fn validate_path(path: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(body) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::PathWithoutSlash);
    };
    if body.is_empty() || body.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    let mut at = offset + 1;
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment { at });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment { at });
        }
        for (i, c) in segment.char_indices() {
            let ok = c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if !ok {
                return Err(SpiffeIdError::BadPathChar {
                    found: c,
                    at: at + i,
                });
            }
        }
        at += segment.len() + 1;
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://a-b_c.9/x/Y.z/w-_",
            "spiffe://td/.../a",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/web");
        assert!(!id.is_trust_domain_id());
        assert!(
            SpiffeId::parse("spiffe://example.org")
                .unwrap()
                .is_trust_domain_id()
        );
    }

    #[test]
    fn each_rule_has_its_own_error() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:/example.org", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///a", MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                BadTrustDomainChar { found: 'E', at: 9 },
            ),
            ("spiffe://example.org:443/a", Port),
            ("spiffe://user@example.org/a", UserInfo),
            ("spiffe://example.org/a?x=1", Query),
            ("spiffe://example.org/a#frag", Fragment),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://example.org//a", EmptySegment { at: 21 }),
            ("spiffe://example.org/a/./b", DotSegment { at: 23 }),
            ("spiffe://example.org/..", DotSegment { at: 21 }),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a/", TrailingSlash),
            (
                "spiffe://example.org/a b",
                BadPathChar { found: ' ', at: 22 },
            ),
            (
                "spiffe://example.org/a/é",
                BadPathChar {
                    found: 'é', at: 23
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
        let long_td = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{long_td}")),
            Err(TrustDomainTooLong { len: 256 })
        );
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert!(matches!(SpiffeId::parse(&long), Err(TooLong { .. })));
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2030))).is_ok());
    }

    #[test]
    fn trust_domain_rules() {
        assert!(TrustDomain::new("example.org").is_ok());
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::EmptyTrustDomain));
        assert_eq!(
            TrustDomain::new("spiffe://example.org"),
            Err(SpiffeIdError::BadTrustDomainChar { found: ':', at: 6 })
        );
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id_string(), "spiffe://example.org");
        assert_eq!(td.id("/a/b").unwrap().as_str(), "spiffe://example.org/a/b");
        assert!(td.id("/a//b").is_err());
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/a\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://td/a\"");
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://td/a/\"").unwrap_err();
        assert!(err.to_string().contains("must not end with '/'"), "{err}");
    }

    fn td_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }
    fn path_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9._-]{1,12}", 0..6).prop_map(|segs| {
            segs.into_iter()
                .filter(|s| s != "." && s != "..")
                .map(|s| format!("/{s}"))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(td in td_strategy(), path in path_strategy()) {
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id.clone());
            prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,80}") {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn anything_accepted_round_trips(s in "spiffe://[a-zA-Z0-9./%:@?#_-]{0,40}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
            }
        }
    }
}
