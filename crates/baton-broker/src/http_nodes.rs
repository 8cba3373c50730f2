//! Node administration routes on the admin socket (behind its uid check):
//!
//! - `GET /v1/admin/nodes`: every node with a record;
//! - `GET /v1/admin/node?id=<spiffe-id>`: one node;
//! - `POST /v1/admin/nodes/{evict,ban,unban}` with `{"node_id", "reason"?}`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use warp::Filter;
use warp::reply::Response;

use crate::delegation::Delegation;
use crate::http_reply::{answer, json_body, parse_body, respond};
use crate::nodes::Removal;
use crate::service::{Broker, BrokerError};

fn with<T: Clone + Send + Sync + 'static>(
    v: T,
) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || v.clone())
}

struct NodeQuery {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeBody {
    node_id: String,
    #[serde(default)]
    reason: Option<String>,
}

/// The node routes of the admin socket.
pub fn admin_routes(
    broker: Arc<Broker>,
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let list = warp::path!("v1" / "admin" / "nodes")
        .and(warp::get())
        .and(with(broker.clone()))
        .and_then(|broker: Arc<Broker>| async move {
            answer(move || {
                broker
                    .nodes()
                    .list_node_views()
                    .map(|nodes| serde_json::json!({ "nodes": nodes }))
            })
            .await
        });
    let show = warp::path!("v1" / "admin" / "node")
        .and(warp::get())
        .and(with(broker.clone()))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and_then(|broker: Arc<Broker>, query: String| async move {
            answer(move || parse_query(&query).and_then(|q| broker.nodes().node_view(&q.id))).await
        });
    let action = warp::path!("v1" / "admin" / "nodes" / String)
        .and(warp::post())
        .and(with(broker))
        .and(with(d))
        .and(json_body())
        .and_then(
            |verb: String, broker: Arc<Broker>, d: Arc<Delegation>, body: Bytes| async move {
                let result = async {
                    let req = parse_body::<NodeBody>(&body)?;
                    let how = match verb.as_str() {
                        "evict" => Removal::Evict,
                        "ban" => Removal::Ban,
                        "unban" => return broker.nodes().unban_node(&req.node_id),
                        other => {
                            return Err(BrokerError::NotFound(format!(
                                "no node action \"{}\": use evict, ban or unban",
                                other.escape_debug()
                            )));
                        }
                    };
                    let reason = req.reason.unwrap_or_else(|| match how {
                        Removal::Evict => "node evicted by an operator".into(),
                        Removal::Ban => "node banned by an operator".into(),
                    });
                    broker
                        .nodes()
                        .remove(
                            d.revoker(),
                            d.task_store(),
                            &req.node_id,
                            how,
                            &reason,
                            crate::oidc::unix_now(),
                        )
                        .await
                }
                .await;
                respond(result)
            },
        );
    list.or(show).unify().or(action).unify()
}

/// `id=<percent-encoded SPIFFE ID>`.
fn parse_query(raw: &str) -> Result<NodeQuery, BrokerError> {
    let mut id = None;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "id" {
            return Err(BrokerError::BadRequest {
                field: Some("id"),
                message: format!(
                    "unknown query parameter \"{}\"; use ?id=<node SPIFFE ID>",
                    k.escape_debug()
                ),
            });
        }
        id = Some(percent_decode(v).ok_or_else(|| BrokerError::BadRequest {
            field: Some("id"),
            message: "the id query parameter is not valid percent-encoded UTF-8".into(),
        })?);
    }
    id.map(|id| NodeQuery { id })
        .ok_or_else(|| BrokerError::BadRequest {
            field: Some("id"),
            message: "missing ?id=<node SPIFFE ID>".into(),
        })
}

/// A query value: `+` is a space, `%XX` a byte; a `%` without two hex
/// digits after it, or a result that is not UTF-8, is refused.
fn percent_decode(s: &str) -> Option<String> {
    let escapes_well_formed = s.split('%').skip(1).all(|rest| {
        rest.get(..2)
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if !escapes_well_formed {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_decoded_and_checked() {
        let q = parse_query("id=spiffe%3A%2F%2Fexample.org%2Fbaton%2Fnode%2Fn1").unwrap();
        assert_eq!(q.id, "spiffe://example.org/baton/node/n1");
        assert!(parse_query("").is_err());
        assert!(parse_query("x=1").is_err());
        assert!(parse_query("id=%zz").is_err());
        assert!(parse_query("id=abc%2").is_err());
        assert!(parse_query("id=%ff%fe").is_err(), "not UTF-8");
        assert_eq!(parse_query("id=a+b%2Bc").unwrap().id, "a b+c");
    }
}
