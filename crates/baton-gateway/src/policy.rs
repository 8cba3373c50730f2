//! The call policy a request is decided by: the one of the routing it
//! started with.
//!
//! Routes (which tool, tier and approval setting a request is) and the
//! Cedar policies (whether that tool may be called, and whether only with a
//! human's approval) are read together and replaced together on reload
//! ([`crate::gateway::Routing`] holds both). A request runs inside
//! [`under`] with its routing's policy; the tool gate's policy is
//! [`InForce`], which decides by that one. So no request is ever decided by
//! new routes with old policies or the other way round: moving an approval
//! requirement from a policy into a route cannot let a call through
//! unapproved, even for a moment.

use std::sync::Arc;

use baton_verify::{CallContext, CallPolicy, PolicyDecision};

tokio::task_local! {
    static IN_FORCE: Arc<dyn CallPolicy>;
}

/// Runs `f` with `policy` as the policy [`InForce`] decides by.
pub(crate) async fn under<F: std::future::Future>(policy: Arc<dyn CallPolicy>, f: F) -> F::Output {
    IN_FORCE.scope(policy, f).await
}

/// The tool gate's policy: the one of the request being decided. Outside
/// a request (nothing should ask there) it fails closed: every call is
/// refused with a policy error and may need approval.
pub(crate) struct InForce;

impl CallPolicy for InForce {
    fn decide(&self, c: &CallContext<'_>) -> PolicyDecision {
        IN_FORCE
            .try_with(|p| p.decide(c))
            .unwrap_or_else(|_| PolicyDecision {
                allowed: false,
                errors: vec!["no call policy is in force for this request".to_owned()],
                ..PolicyDecision::default()
            })
    }

    fn may_require_approval(&self, tool: &str) -> bool {
        IN_FORCE
            .try_with(|p| p.may_require_approval(tool))
            .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl CallPolicy for Fixed {
        fn decide(&self, _: &CallContext<'_>) -> PolicyDecision {
            PolicyDecision {
                allowed: self.0,
                ..PolicyDecision::default()
            }
        }

        fn may_require_approval(&self, _: &str) -> bool {
            !self.0
        }
    }

    /// Outside a request nothing is allowed; inside, the request's own
    /// policy decides, whatever another request runs under.
    #[tokio::test]
    async fn a_request_is_decided_by_its_own_policy_and_nothing_else_is_allowed() {
        assert!(InForce.may_require_approval("t"));
        let allow: Arc<dyn CallPolicy> = Arc::new(Fixed(true));
        let deny: Arc<dyn CallPolicy> = Arc::new(Fixed(false));
        let (a, d) = tokio::join!(
            under(allow, async {
                tokio::task::yield_now().await;
                InForce.may_require_approval("t")
            }),
            under(deny, async {
                tokio::task::yield_now().await;
                InForce.may_require_approval("t")
            }),
        );
        assert!(!a, "the allowing policy's request");
        assert!(d, "the denying policy's request");
    }
}
