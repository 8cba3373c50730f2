//! Strict decoding of delegation-token claims: the same shape as
//! `baton_core::DelegationClaims`, but refusing unknown members at every
//! level and duplicate members, in one pass over the payload bytes.

use baton_core::{
    Actor, Confirmation, DelegationClaims, ParentRef, Purpose, RiskTier, Scope, SpiffeId,
    TaskClaims, TaskId,
};
use serde::Deserialize;

use crate::error::TokenError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictClaims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: u64,
    iat: u64,
    jti: String,
    act: StrictActor,
    task: StrictTask,
    scope: Scope,
    depth: u32,
    #[serde(default)]
    parent: Option<StrictParent>,
    #[serde(default)]
    justification: Option<String>,
    cnf: StrictCnf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictActor {
    sub: SpiffeId,
    jti: String,
    scope: Scope,
    exp: u64,
    aud: Vec<String>,
    #[serde(default)]
    act: Option<Box<StrictActor>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictTask {
    id: TaskId,
    purpose: Purpose,
    risk_ceiling: RiskTier,
    max_depth: u32,
    initiator_iss: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictParent {
    jti: String,
    hash: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictCnf {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

impl From<StrictActor> for Actor {
    fn from(a: StrictActor) -> Self {
        Actor {
            sub: a.sub,
            jti: a.jti,
            scope: a.scope,
            exp: a.exp,
            aud: a.aud,
            act: a.act.map(|inner| Box::new(Actor::from(*inner))),
        }
    }
}

/// Only `iss`, read before the signature is checked to pick the bundle.
#[derive(Deserialize)]
struct IssOnly {
    #[serde(default)]
    iss: Option<String>,
}

/// The payload's `iss`.
pub(crate) fn issuer(payload: &[u8]) -> Result<String, TokenError> {
    let only: IssOnly = serde_json::from_slice(payload)
        .map_err(|_| TokenError::Malformed("payload is not a JSON object with a string \"iss\""))?;
    only.iss
        .ok_or_else(|| TokenError::InvalidClaims("missing claim \"iss\"".into()))
}

/// Decodes the claims; an unknown member anywhere is `UnknownClaim`, any
/// other mismatch (missing claim, wrong type, invalid value, duplicate) is
/// `InvalidClaims`.
pub(crate) fn claims(payload: &[u8]) -> Result<DelegationClaims, TokenError> {
    let c: StrictClaims = serde_json::from_slice(payload).map_err(|e| {
        let msg = e.to_string();
        // serde's `unknown_field` error: "unknown field `name`, expected ...".
        match msg
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
        {
            Some((name, _)) => TokenError::UnknownClaim(name.to_owned()),
            None => TokenError::InvalidClaims(msg),
        }
    })?;
    Ok(DelegationClaims {
        iss: c.iss,
        sub: c.sub,
        aud: c.aud,
        exp: c.exp,
        iat: c.iat,
        jti: c.jti,
        act: c.act.into(),
        task: TaskClaims {
            id: c.task.id,
            purpose: c.task.purpose,
            risk_ceiling: c.task.risk_ceiling,
            max_depth: c.task.max_depth,
            initiator_iss: c.task.initiator_iss,
        },
        scope: c.scope,
        depth: c.depth,
        parent: c.parent.map(|p| ParentRef {
            jti: p.jti,
            hash: p.hash,
        }),
        justification: c.justification,
        cnf: Confirmation {
            x5t_s256: c.cnf.x5t_s256,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_the_broker_signs() {
        let scope = Scope::parse(&["tool:crm.search:read"]).unwrap();
        let c = DelegationClaims {
            iss: "spiffe://td/baton/broker".into(),
            sub: "alice".into(),
            aud: vec!["a".into()],
            exp: 10,
            iat: 1,
            jti: "j".into(),
            act: Actor {
                sub: SpiffeId::parse("spiffe://td/b").unwrap(),
                jti: "j".into(),
                scope: scope.clone(),
                exp: 10,
                aud: vec!["a".into()],
                act: Some(Box::new(Actor {
                    sub: SpiffeId::parse("spiffe://td/a").unwrap(),
                    jti: "i".into(),
                    scope: scope.clone(),
                    exp: 10,
                    aud: vec!["a".into()],
                    act: None,
                })),
            },
            task: TaskClaims {
                id: TaskId::from_random([1; 16]),
                purpose: "p".parse().unwrap(),
                risk_ceiling: RiskTier::Read,
                max_depth: 1,
                initiator_iss: "https://idp".into(),
            },
            scope,
            depth: 1,
            parent: Some(ParentRef {
                jti: "i".into(),
                hash: "h".into(),
            }),
            justification: Some("why".into()),
            cnf: Confirmation {
                x5t_s256: "t".into(),
            },
        };
        let bytes = serde_json::to_vec(&c).unwrap();
        assert_eq!(claims(&bytes).unwrap(), c);
        assert_eq!(issuer(&bytes).unwrap(), "spiffe://td/baton/broker");

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["act"]["act"]["may_act"] = serde_json::json!("x");
        assert_eq!(
            claims(&serde_json::to_vec(&v).unwrap()).unwrap_err(),
            TokenError::UnknownClaim("may_act".into())
        );
        let dup = String::from_utf8(bytes.clone())
            .unwrap()
            .replacen("{", "{\"exp\":99999,", 1);
        assert!(matches!(
            claims(dup.as_bytes()).unwrap_err(),
            TokenError::InvalidClaims(m) if m.contains("duplicate")
        ));
    }
}
