//! Workload selectors: the facts a node daemon attests about a caller and
//! that a registration entry must all match.
//!
//! The text form is `unix:<key>:<value>`, e.g. `unix:uid:1000`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The kinds of selector the Unix workload attestor produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorKind {
    /// The caller's effective user id.
    UnixUid,
    /// The caller's effective group id.
    UnixGid,
    /// Absolute path of the caller's executable (`/proc/<pid>/exe`).
    UnixPath,
    /// Lowercase hex SHA-256 of the caller's executable.
    UnixSha256,
}

impl SelectorKind {
    /// The text prefix of this kind, e.g. `unix:uid`.
    pub fn prefix(self) -> &'static str {
        match self {
            SelectorKind::UnixUid => "unix:uid",
            SelectorKind::UnixGid => "unix:gid",
            SelectorKind::UnixPath => "unix:path",
            SelectorKind::UnixSha256 => "unix:sha256",
        }
    }
    const ALL: [SelectorKind; 4] = [
        SelectorKind::UnixUid,
        SelectorKind::UnixGid,
        SelectorKind::UnixPath,
        SelectorKind::UnixSha256,
    ];
}

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "selector {input:?} has an unknown type; expected one of unix:uid:<n>, unix:gid:<n>, unix:path:</abs/path>, unix:sha256:<64 hex>"
    )]
    UnknownKind { input: String },
    #[error("selector {input:?} has an empty value")]
    EmptyValue { input: String },
    #[error("selector {input:?}: {kind} must be a decimal number that fits in 32 bits")]
    NotAnId { input: String, kind: &'static str },
    #[error("selector {input:?}: unix:path must be an absolute path without NUL bytes")]
    BadPath { input: String },
    #[error("selector {input:?}: unix:sha256 must be 64 lowercase hex digits")]
    BadDigest { input: String },
}

/// One validated selector.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: SelectorKind,
    value: String,
}

impl Selector {
    /// Parses `unix:<key>:<value>`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let kind = SelectorKind::ALL
            .into_iter()
            .find(|k| {
                input
                    .strip_prefix(k.prefix())
                    .is_some_and(|r| r.starts_with(':'))
            })
            .ok_or_else(|| SelectorError::UnknownKind {
                input: input.to_owned(),
            })?;
        let value = &input[kind.prefix().len() + 1..];
        Self::new(kind, value).map_err(|e| match e {
            // Report the whole input, not just the value.
            SelectorError::EmptyValue { .. } => SelectorError::EmptyValue {
                input: input.to_owned(),
            },
            other => other,
        })
    }

    /// Builds a selector of `kind` from its value.
    pub fn new(kind: SelectorKind, value: &str) -> Result<Self, SelectorError> {
        let input = || format!("{}:{value}", kind.prefix());
        if value.is_empty() {
            return Err(SelectorError::EmptyValue { input: input() });
        }
        match kind {
            SelectorKind::UnixUid | SelectorKind::UnixGid => {
                let ok = value.bytes().all(|b| b.is_ascii_digit())
                    && value.parse::<u32>().is_ok()
                    && (value == "0" || !value.starts_with('0'));
                if !ok {
                    return Err(SelectorError::NotAnId {
                        input: input(),
                        kind: kind.prefix(),
                    });
                }
            }
            SelectorKind::UnixPath => {
                if !value.starts_with('/') || value.contains('\0') {
                    return Err(SelectorError::BadPath { input: input() });
                }
            }
            SelectorKind::UnixSha256 => {
                let ok = value.len() == 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !ok {
                    return Err(SelectorError::BadDigest { input: input() });
                }
            }
        }
        Ok(Self {
            kind,
            value: value.to_owned(),
        })
    }

    /// `unix:uid:<uid>`.
    pub fn uid(uid: u32) -> Self {
        Self {
            kind: SelectorKind::UnixUid,
            value: uid.to_string(),
        }
    }

    /// `unix:gid:<gid>`.
    pub fn gid(gid: u32) -> Self {
        Self {
            kind: SelectorKind::UnixGid,
            value: gid.to_string(),
        }
    }

    pub fn kind(&self) -> SelectorKind {
        self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl SelectorKind {
    /// Whether this is a kernel credential of the caller (`unix:uid`,
    /// `unix:gid`): taken by the kernel when the caller connects, and not
    /// changed by an exec of a (non-setuid) program. `unix:path` and
    /// `unix:sha256` are not: they describe whatever the connecting pid
    /// runs when it is attested, and a process can connect, hand the
    /// socket to a child, and exec another program (the one an entry
    /// names) while the child speaks on it.
    pub fn is_credential(self) -> bool {
        matches!(self, SelectorKind::UnixUid | SelectorKind::UnixGid)
    }
}

/// Whether `selectors` pin the caller's uid or gid (see
/// [`SelectorKind::is_credential`]): an entry must, so that its identity
/// cannot be taken by any process that execs the program it names.
pub fn binds_credential(selectors: &[Selector]) -> bool {
    selectors.iter().any(|s| s.kind().is_credential())
}

/// True when every selector an entry requires is among those attested, and
/// the entry pins a kernel credential (an entry stored before that rule,
/// naming only the executable, matches no caller).
pub fn entry_matches(required: &[Selector], attested: &[Selector]) -> bool {
    binds_credential(required) && required.iter().all(|r| attested.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            Selector::parse("unix:uid:1000").unwrap(),
            Selector::uid(1000)
        );
        assert_eq!(Selector::parse("unix:gid:0").unwrap(), Selector::gid(0));
        assert_eq!(
            Selector::parse("unix:path:/usr/bin/agent").unwrap().value(),
            "/usr/bin/agent"
        );
        let digest = "a".repeat(64);
        assert_eq!(
            Selector::parse(&format!("unix:sha256:{digest}"))
                .unwrap()
                .kind(),
            SelectorKind::UnixSha256
        );
    }

    #[test]
    fn rejects_bad_selectors_specifically() {
        assert!(matches!(
            Selector::parse("k8s:ns:default"),
            Err(SelectorError::UnknownKind { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:uidd:1"),
            Err(SelectorError::UnknownKind { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:uid:"),
            Err(SelectorError::EmptyValue { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:uid:-1"),
            Err(SelectorError::NotAnId { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:uid:4294967296"),
            Err(SelectorError::NotAnId { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:uid:007"),
            Err(SelectorError::NotAnId { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:path:bin/x"),
            Err(SelectorError::BadPath { .. })
        ));
        assert!(matches!(
            Selector::parse("unix:sha256:ABC"),
            Err(SelectorError::BadDigest { .. })
        ));
    }

    #[test]
    fn matching_requires_all() {
        let attested = vec![Selector::uid(1), Selector::gid(2)];
        assert!(entry_matches(&[Selector::uid(1)], &attested));
        assert!(entry_matches(
            &[Selector::uid(1), Selector::gid(2)],
            &attested
        ));
        assert!(!entry_matches(
            &[Selector::uid(1), Selector::gid(3)],
            &attested
        ));
        assert!(!entry_matches(&[], &attested));
    }

    #[test]
    fn an_entry_naming_only_the_executable_matches_nobody() {
        let digest = "ab".repeat(32);
        let exe = [
            Selector::parse("unix:path:/usr/bin/agent").unwrap(),
            Selector::parse(&format!("unix:sha256:{digest}")).unwrap(),
        ];
        let attested = [
            Selector::uid(1),
            Selector::gid(2),
            exe[0].clone(),
            exe[1].clone(),
        ];
        // Every selector is attested, but any uid could exec that file.
        assert!(!entry_matches(&exe, &attested));
        // Control: the same with the uid pinned matches.
        let pinned = [Selector::uid(1), exe[0].clone(), exe[1].clone()];
        assert!(entry_matches(&pinned, &attested));
        assert!(entry_matches(
            &[Selector::gid(2), exe[0].clone()],
            &attested
        ));
    }

    proptest! {
        #[test]
        fn round_trip(uid in any::<u32>(), path in "/[a-z/]{0,20}") {
            let s = Selector::uid(uid);
            prop_assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
            let p = Selector::new(SelectorKind::UnixPath, &path).unwrap();
            prop_assert_eq!(Selector::parse(&p.to_string()).unwrap(), p);
        }
    }
}
