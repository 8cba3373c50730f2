//! The delegation model's pure types: tasks, purposes, risk tiers and the
//! claims of a delegation token.
//!
//! A delegation token is an ES256 JWT minted by the broker for one hop. Its
//! `sub` is the initiating identity (a human, from an OIDC ID token); its
//! `act` nests the actors with the current one outermost (RFC 8693 §4.1),
//! each carrying the scope, expiry and token id it held, so a verifier can
//! check offline that the chain never widened and never outlived its parent.
//! `cnf.x5t#S256` binds the token to the task certificate of the current
//! actor (RFC 8705).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::scope::Scope;
use crate::spiffe_id::SpiffeId;

/// Why a delegation value is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    #[error("task id {input:?} is not of the form task-<32 lowercase hex>")]
    TaskId { input: String },
    #[error("purpose {input:?} must be a lowercase name ([a-z][a-z0-9_.-]*, at most 64 bytes)")]
    Purpose { input: String },
    #[error(
        "risk tier {input:?} is unknown; expected one of read, write, delete, purchase, export"
    )]
    RiskTier { input: String },
}

macro_rules! string_newtype_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::from_str(&s).map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), self.0)
            }
        }
    };
}

/// A task's identifier: `task-` followed by 32 lowercase hex digits. It plays
/// the role of the transaction id of OAuth transaction tokens.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(String);

impl TaskId {
    /// Builds an id from 16 random bytes supplied by the caller (no I/O here).
    pub fn from_random(bytes: [u8; 16]) -> Self {
        Self(format!("task-{}", hex::encode(bytes)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TaskId {
    type Err = DelegationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.strip_prefix("task-").is_some_and(|h| {
            h.len() == 32
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(DelegationError::TaskId {
                input: s.to_owned(),
            })
        }
    }
}
string_newtype_serde!(TaskId);

/// A business purpose from the broker's declared catalogue, e.g. `support.case-research`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Purpose(String);

impl Purpose {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Purpose {
    type Err = DelegationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        let ok = s.len() <= 64
            && matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
            && chars.all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(DelegationError::Purpose {
                input: s.to_owned(),
            })
        }
    }
}
string_newtype_serde!(Purpose);

/// How much harm a tool call can do, in increasing order. Read-only tools
/// (summarise, classify) may log less; every other tier is always
/// re-evaluated and logged in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RiskTier {
    Read,
    Write,
    Delete,
    Purchase,
    Export,
}

impl RiskTier {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskTier::Read => "read",
            RiskTier::Write => "write",
            RiskTier::Delete => "delete",
            RiskTier::Purchase => "purchase",
            RiskTier::Export => "export",
        }
    }
    /// True for the tiers that must always be re-evaluated and fully logged.
    pub fn is_sensitive(self) -> bool {
        self != RiskTier::Read
    }
}

impl FromStr for RiskTier {
    type Err = DelegationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "read" => RiskTier::Read,
            "write" => RiskTier::Write,
            "delete" => RiskTier::Delete,
            "purchase" => RiskTier::Purchase,
            "export" => RiskTier::Export,
            _ => {
                return Err(DelegationError::RiskTier {
                    input: s.to_owned(),
                });
            }
        })
    }
}

impl fmt::Display for RiskTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One actor in the `act` chain (RFC 8693 §4.1): the current actor is the
/// outermost; `act` holds the one that delegated to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: SpiffeId,
    /// The id of the token this actor held.
    pub jti: String,
    /// The scope this actor held.
    pub scope: Scope,
    /// When this actor's token expired (unix seconds).
    pub exp: u64,
    /// The audiences (tool servers) this actor's token was valid for: an
    /// actor's audience is a subset of its delegator's, like its scope.
    pub aud: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain from the current actor (first) back to the root agent (last).
    pub fn chain(&self) -> Vec<&Actor> {
        let mut out = vec![self];
        let mut cur = self;
        while let Some(next) = cur.act.as_deref() {
            out.push(next);
            cur = next;
        }
        out
    }
}

/// The parent token a hop was minted from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub jti: String,
    /// base64url (no padding) SHA-256 of the parent's compact JWS.
    pub hash: String,
}

/// RFC 8705 confirmation: the SHA-256 thumbprint of the bound certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// The task part of a delegation token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    pub id: TaskId,
    pub purpose: Purpose,
    pub risk_ceiling: RiskTier,
    pub max_depth: u32,
    /// Issuer of the initiating identity's ID token.
    pub initiator_iss: String,
}

/// The claims of a delegation token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationClaims {
    /// The broker's SPIFFE ID.
    pub iss: String,
    /// The initiating identity (the OIDC subject).
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    /// Current actor outermost; its `scope`, `exp`, `jti` and `aud` equal the token's own.
    pub act: Actor,
    pub task: TaskClaims,
    /// The scope this token grants (equals `act.scope`).
    pub scope: Scope,
    /// 0 for the root agent, +1 per hop.
    pub depth: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// Why this hop was granted, as the delegating agent stated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    pub cnf: Confirmation,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let t = TaskId::from_random([0xab; 16]);
        assert_eq!(t.as_str().parse::<TaskId>().unwrap(), t);
        assert!("task-XYZ".parse::<TaskId>().is_err());
        assert!("support.case-research".parse::<Purpose>().is_ok());
        assert!("Support".parse::<Purpose>().is_err());
        assert_eq!("export".parse::<RiskTier>().unwrap(), RiskTier::Export);
        assert!("nuke".parse::<RiskTier>().is_err());
        assert!(RiskTier::Read < RiskTier::Write && RiskTier::Purchase < RiskTier::Export);
    }

    #[test]
    fn actor_chain_order() {
        let scope = Scope::parse(&["tool:crm:read"]).unwrap();
        let root = Actor {
            sub: SpiffeId::parse("spiffe://td/planner").unwrap(),
            jti: "a".into(),
            scope: scope.clone(),
            exp: 10,
            aud: vec!["crm".into()],
            act: None,
        };
        let cur = Actor {
            sub: SpiffeId::parse("spiffe://td/researcher").unwrap(),
            jti: "b".into(),
            scope,
            exp: 9,
            aud: vec!["crm".into()],
            act: Some(Box::new(root)),
        };
        let chain: Vec<_> = cur.chain().iter().map(|a| a.sub.as_str()).collect();
        assert_eq!(chain, vec!["spiffe://td/researcher", "spiffe://td/planner"]);
        let json = serde_json::to_value(&cur).unwrap();
        assert_eq!(json["act"]["sub"], "spiffe://td/planner");
    }
}
