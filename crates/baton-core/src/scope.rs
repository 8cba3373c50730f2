//! Permissions and scopes, with the subset relation that makes delegation
//! attenuate: a hop may hand on a scope only if it is a subset of its own.
//!
//! A permission is `<kind>:<resource>:<action>`:
//! - `kind`: lowercase word, e.g. `tool`, `dataset`, `system`;
//! - `resource`: dot-separated lowercase segments, e.g. `crm.search`; the
//!   last segment may be `*`, covering every resource under that prefix
//!   (`crm.*` covers `crm.search` and `crm.search.fast`, not `crm` itself);
//! - `action`: lowercase word, e.g. `read`, `write`, or `*` for any action.
//!
//! `p` covers `q` when the kinds are equal, `p`'s resource equals `q`'s or is
//! a wildcard prefix of it, and `p`'s action equals `q`'s or is `*`. A scope
//! `A` is a subset of `B` when every permission of `A` is covered by some
//! permission of `B`. Coverage is reflexive and transitive, so attenuation
//! composes across hops.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a permission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("permission {input:?} must have three parts, kind:resource:action")]
    Shape { input: String },
    #[error("permission {input:?}: kind must be a lowercase word ([a-z][a-z0-9_-]*)")]
    Kind { input: String },
    #[error(
        "permission {input:?}: resource must be dot-separated lowercase segments ([a-z0-9_-]+), with an optional final `*`"
    )]
    Resource { input: String },
    #[error("permission {input:?}: action must be a lowercase word or `*`")]
    Action { input: String },
    #[error("a scope must hold at least one permission")]
    Empty,
}

fn is_word(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// One permission, e.g. `tool:crm.search:read`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Permission {
    kind: String,
    resource: String,
    action: String,
}

impl Permission {
    pub fn parse(input: &str) -> Result<Self, ScopeError> {
        let parts: Vec<&str> = input.split(':').collect();
        let [kind, resource, action] = parts.as_slice() else {
            return Err(ScopeError::Shape {
                input: input.to_owned(),
            });
        };
        if !is_word(kind) {
            return Err(ScopeError::Kind {
                input: input.to_owned(),
            });
        }
        let segs: Vec<&str> = resource.split('.').collect();
        let last = segs.len() - 1;
        let ok = segs
            .iter()
            .enumerate()
            .all(|(i, s)| is_segment(s) || (i == last && *s == "*" && last > 0));
        if !ok {
            return Err(ScopeError::Resource {
                input: input.to_owned(),
            });
        }
        if !(is_word(action) || *action == "*") {
            return Err(ScopeError::Action {
                input: input.to_owned(),
            });
        }
        Ok(Self {
            kind: (*kind).to_owned(),
            resource: (*resource).to_owned(),
            action: (*action).to_owned(),
        })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }
    pub fn resource(&self) -> &str {
        &self.resource
    }
    pub fn action(&self) -> &str {
        &self.action
    }

    /// True when holding `self` grants `other`.
    pub fn covers(&self, other: &Permission) -> bool {
        if self.kind != other.kind {
            return false;
        }
        let resource_ok = match self.resource.strip_suffix(".*") {
            Some(prefix) => other
                .resource
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.')),
            None => self.resource == other.resource,
        };
        let action_ok = self.action == "*" || self.action == other.action;
        resource_ok && action_ok
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.resource, self.action)
    }
}

impl fmt::Debug for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permission({self})")
    }
}

impl FromStr for Permission {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Permission {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A non-empty set of permissions. Serialized as a sorted list of strings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scope(BTreeSet<Permission>);

impl Scope {
    /// Parses each permission; refuses an empty scope.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, ScopeError> {
        let set = items
            .iter()
            .map(|s| Permission::parse(s.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if set.is_empty() {
            return Err(ScopeError::Empty);
        }
        Ok(Self(set))
    }

    pub fn permissions(&self) -> impl Iterator<Item = &Permission> {
        self.0.iter()
    }

    /// The first `n` permissions (in order), for a record that keeps at
    /// most that many of a scope a caller asked for.
    pub fn first(&self, n: usize) -> Scope {
        Scope(self.0.iter().take(n.max(1)).cloned().collect())
    }

    /// True when every permission of `self` is covered by `other`.
    pub fn is_subset_of(&self, other: &Scope) -> bool {
        self.0.iter().all(|p| other.0.iter().any(|q| q.covers(p)))
    }

    /// The permissions of `self` that `other` does not cover (why a hop widens).
    pub fn not_covered_by(&self, other: &Scope) -> Vec<&Permission> {
        self.0
            .iter()
            .filter(|p| !other.0.iter().any(|q| q.covers(p)))
            .collect()
    }

    /// True when the scope grants `p`.
    pub fn allows(&self, p: &Permission) -> bool {
        self.0.iter().any(|q| q.covers(p))
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_strings().join(" "))
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        Self::parse(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Permission {
        Permission::parse(s).unwrap()
    }
    fn scope(items: &[&str]) -> Scope {
        Scope::parse(items).unwrap()
    }

    #[test]
    fn parse_rules() {
        assert!(Permission::parse("tool:crm.search:read").is_ok());
        assert!(Permission::parse("dataset:crm:read").is_ok());
        assert!(Permission::parse("tool:crm.*:*").is_ok());
        assert!(matches!(
            Permission::parse("tool:crm"),
            Err(ScopeError::Shape { .. })
        ));
        assert!(matches!(
            Permission::parse("Tool:crm:read"),
            Err(ScopeError::Kind { .. })
        ));
        assert!(matches!(
            Permission::parse("tool:*:read"),
            Err(ScopeError::Resource { .. })
        ));
        assert!(matches!(
            Permission::parse("tool:crm..x:read"),
            Err(ScopeError::Resource { .. })
        ));
        assert!(matches!(
            Permission::parse("tool:crm.*.x:read"),
            Err(ScopeError::Resource { .. })
        ));
        assert!(matches!(
            Permission::parse("tool:crm:READ"),
            Err(ScopeError::Action { .. })
        ));
        assert_eq!(Scope::parse::<&str>(&[]), Err(ScopeError::Empty));
    }

    #[test]
    fn coverage() {
        assert!(p("tool:crm.*:read").covers(&p("tool:crm.search:read")));
        assert!(p("tool:crm.*:read").covers(&p("tool:crm.search.fast:read")));
        assert!(!p("tool:crm.*:read").covers(&p("tool:crm:read")));
        assert!(!p("tool:crm.*:read").covers(&p("tool:crmx.search:read")));
        assert!(p("tool:crm.search:*").covers(&p("tool:crm.search:write")));
        assert!(!p("tool:crm.search:read").covers(&p("tool:crm.search:write")));
        assert!(!p("dataset:crm:read").covers(&p("tool:crm:read")));
    }

    #[test]
    fn subset() {
        let parent = scope(&["tool:crm.*:read", "dataset:crm:read"]);
        assert!(scope(&["tool:crm.search:read"]).is_subset_of(&parent));
        assert!(parent.is_subset_of(&parent));
        let wider = scope(&["tool:crm.search:read", "tool:crm.search:write"]);
        assert!(!wider.is_subset_of(&parent));
        assert_eq!(
            wider.not_covered_by(&parent),
            vec![&p("tool:crm.search:write")]
        );
    }

    fn perm_strategy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["tool", "dataset"]),
            prop::sample::select(vec![
                "crm",
                "crm.search",
                "crm.*",
                "hr",
                "hr.*",
                "crm.search.fast",
            ]),
            prop::sample::select(vec!["read", "write", "*"]),
        )
            .prop_map(|(k, r, a)| format!("{k}:{r}:{a}"))
    }

    proptest! {
        #[test]
        fn subset_is_transitive(
            a in prop::collection::vec(perm_strategy(), 1..4),
            b in prop::collection::vec(perm_strategy(), 1..4),
            c in prop::collection::vec(perm_strategy(), 1..4),
        ) {
            let (a, b, c) = (Scope::parse(&a).unwrap(), Scope::parse(&b).unwrap(), Scope::parse(&c).unwrap());
            if a.is_subset_of(&b) && b.is_subset_of(&c) {
                prop_assert!(a.is_subset_of(&c));
            }
            prop_assert!(a.is_subset_of(&a));
        }

        #[test]
        fn round_trip(a in prop::collection::vec(perm_strategy(), 1..5)) {
            let s = Scope::parse(&a).unwrap();
            let json = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), s);
        }
    }
}
