//! Admin routes a witness of the audit log needs (the verify, trace and
//! receipt routes are in [`crate::http_delegation`]):
//!
//! - `GET /v1/admin/audit/checkpoint`: the newest signed tree head and the
//!   log's checkpoint key, what `baton audit checkpoint` keeps;
//! - `GET /v1/admin/audit/consistency/{old_size}`: the newest signed tree
//!   head and the RFC 9162 consistency proof from `old_size` to it (`null`
//!   when the log is smaller than `old_size`: it was cut short), what
//!   `baton audit verify --since` and `baton audit verify-receipt` check
//!   themselves, trusting neither this answer nor the broker's own verdict.

use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use warp::Filter;
use warp::reply::Response;

use crate::delegation::Delegation;
use crate::http_reply::answer;
use crate::service::BrokerError;

fn with(
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Arc<Delegation>,), Error = Infallible> + Clone {
    warp::any().map(move || d.clone())
}

fn audit_error(e: baton_audit::AuditError) -> BrokerError {
    BrokerError::Hook(format!("audit log: {e}"))
}

/// The newest signed checkpoint, or a not-found for an empty log.
fn head(d: &Delegation) -> Result<baton_audit::SignedCheckpoint, BrokerError> {
    d.audit()
        .latest_checkpoint()
        .map_err(audit_error)?
        .ok_or_else(|| BrokerError::NotFound("the audit log is empty: no tree head yet".into()))
}

pub fn admin_routes(
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let checkpoint = warp::path!("v1" / "admin" / "audit" / "checkpoint")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|d: Arc<Delegation>| async move {
            answer(move || {
                head(&d).map(|cp| {
                    serde_json::json!({
                        "checkpoint": cp,
                        "public_key": B64.encode(d.audit().public_key()),
                    })
                })
            })
            .await
        });
    let consistency = warp::path!("v1" / "admin" / "audit" / "consistency" / u64)
        .and(warp::get())
        .and(with(d))
        .and_then(|old: u64, d: Arc<Delegation>| async move {
            // A consistency proof reads the log: on the blocking pool.
            answer(move || {
                head(&d).and_then(|cp| {
                    let proof = if old <= cp.size {
                        Some(
                            d.audit()
                                .consistency_proof(old, cp.size)
                                .map_err(audit_error)?,
                        )
                    } else {
                        None
                    };
                    Ok(serde_json::json!({
                        "checkpoint": cp,
                        "proof": proof,
                        "public_key": B64.encode(d.audit().public_key()),
                    }))
                })
            })
            .await
        });
    checkpoint.or(consistency).unify()
}
