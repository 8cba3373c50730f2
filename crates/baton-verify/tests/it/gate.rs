//! The tool gate: scope, risk ceiling, policy, and what gets reported.

use std::sync::{Arc, Mutex};

use baton_core::{Permission, RiskTier};
use baton_verify::{
    CallContext, CallDenied, CallPolicy, PolicyDecision, Reporter, TokenVerifier, ToolGate,
    ToolSpec, VerifiedDelegation,
};

use crate::common::*;

fn tool(name: &str, tier: RiskTier, requires: &str) -> ToolSpec {
    ToolSpec {
        name: name.into(),
        tier,
        resource: "dataset:crm".into(),
        requires: Permission::parse(requires).unwrap(),
    }
}

fn delegation(f: &Fixture) -> VerifiedDelegation {
    TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.token(), &f.peer(), NOW)
        .unwrap()
}

/// What the policy was asked: tool, chain, depth, tier, initiator.
type Seen = (String, Vec<String>, u32, RiskTier, String);

/// Allows everything except `crm.export`, and records what it was asked.
#[derive(Default)]
struct TestPolicy {
    seen: Mutex<Vec<Seen>>,
    broken: bool,
}

impl CallPolicy for TestPolicy {
    fn decide(&self, req: &CallContext<'_>) -> PolicyDecision {
        self.seen.lock().unwrap().push((
            req.tool.to_owned(),
            req.chain.iter().map(|s| s.to_string()).collect(),
            req.depth,
            req.risk,
            req.initiator.to_owned(),
        ));
        if self.broken {
            return PolicyDecision {
                allowed: true,
                policy_ids: vec![],
                errors: vec!["entity attribute missing".into()],
                approval: false,
            };
        }
        if req.tool == "crm.forbidden" {
            PolicyDecision {
                allowed: false,
                policy_ids: vec!["forbid-crm-forbidden".into()],
                errors: vec![],
                approval: false,
            }
        } else {
            PolicyDecision {
                allowed: true,
                policy_ids: vec!["permit-crm".into()],
                errors: vec![],
                approval: req.tool == "crm.export",
            }
        }
    }
}

fn gate_with_spool(policy: Arc<dyn CallPolicy>) -> (ToolGate, Reporter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    (ToolGate::new(policy, Some(reporter.clone())), reporter, dir)
}

#[test]
fn allows_the_good_call_and_reports_it_in_full() {
    let f = Fixture::new();
    let policy = Arc::new(TestPolicy::default());
    let (gate, reporter, _dir) = gate_with_spool(policy.clone());
    let d = delegation(&f);
    let spec = tool("crm.update", RiskTier::Write, "tool:crm.update:write");
    let call = gate.authorize(&d, &spec, b"{\"id\":42}", NOW).unwrap();
    assert_eq!(call.task_id(), &f.task);
    assert_eq!(call.agent(), &f.summarizer);
    assert_eq!(call.policy_ids(), &["permit-crm".to_owned()]);
    // The policy saw the whole chain, current actor first.
    let seen = policy.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].1,
        vec![
            f.summarizer.to_string(),
            f.researcher.to_string(),
            f.planner.to_string()
        ]
    );
    assert_eq!((seen[0].2, seen[0].3), (2, RiskTier::Write));
    assert_eq!(seen[0].4, "alice@example.com");

    // Sensitive: spooled before the tool runs.
    let spooled = reporter.pending_reports();
    assert_eq!(spooled.len(), 1);
    let r = &spooled[0];
    assert_eq!(r.report_id, call.report_id());
    assert_eq!(r.decision, "allow");
    assert_eq!(r.token_jti, "jti-hop2");
    assert_eq!(r.scope_used, vec!["tool:crm.update:write".to_owned()]);
    assert_eq!(r.input_digest, hex_sha256(b"{\"id\":42}"));
    assert_eq!(r.justification.as_deref(), Some("summarize the case notes"));
    assert!(r.output_digest.is_none());

    let first_id = call.report_id().to_owned();
    call.finish(b"ok").unwrap();
    let spooled = reporter.pending_reports();
    assert_eq!(spooled.len(), 2);
    assert_eq!(
        spooled[1].output_digest.as_deref(),
        Some(hex_sha256(b"ok").as_str())
    );
    assert_eq!(
        spooled[1].reason.as_deref(),
        Some(format!("completes {first_id}").as_str())
    );
    assert_ne!(spooled[1].report_id, first_id);
}

#[test]
fn a_call_whose_record_the_log_would_refuse_is_refused_and_its_refusal_recorded() {
    let f = Fixture::new();
    let (gate, reporter, _dir) = gate_with_spool(Arc::new(TestPolicy::default()));
    let d = delegation(&f);
    let with_resource = |resource: String| ToolSpec {
        resource,
        ..tool("crm.update", RiskTier::Write, "tool:crm.update:write")
    };
    let max = baton_core::report_bounds::MAX_RESOURCE;
    for bad in ["a".repeat(max + 1), "case/1\ncase/2".to_owned()] {
        let err = gate
            .authorize(&d, &with_resource(bad), b"{}", NOW)
            .unwrap_err();
        assert!(
            matches!(
                err,
                CallDenied::Unrecordable {
                    field: "resource",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // Each refusal is recorded, without the text at fault.
    let spooled = reporter.pending_reports();
    assert_eq!(spooled.len(), 2);
    assert!(spooled.iter().all(|r| r.decision == "deny"));
    assert_eq!(
        spooled[0].resource,
        format!("(unrecordable: {} bytes)", max + 1)
    );
    // A call refused anyway is recorded with the first refusal's reason,
    // without the text at fault.
    let foreign = ToolSpec {
        resource: "a".repeat(max + 1),
        ..tool("hr.payroll", RiskTier::Read, "tool:hr.payroll:read")
    };
    let err = gate.authorize(&d, &foreign, b"{}", NOW).unwrap_err();
    assert!(matches!(err, CallDenied::OutOfScope { .. }), "{err:?}");
    let spooled = reporter.pending_reports();
    assert_eq!(spooled.len(), 3);
    assert_eq!(
        spooled[2].resource,
        format!("(unrecordable: {} bytes)", max + 1)
    );
    assert!(
        spooled[2]
            .reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("out_of_scope"),
        "{:?}",
        spooled[2].reason
    );
    // Control: at the bound, allowed and recorded as it is.
    let call = gate
        .authorize(&d, &with_resource("a".repeat(max)), b"{}", NOW)
        .unwrap();
    let spooled = reporter.pending_reports();
    assert_eq!(spooled.len(), 4);
    assert_eq!(spooled[3].report_id, call.report_id());
    assert_eq!(spooled[3].resource.len(), max);
    call.finish(b"ok").unwrap();
}

fn hex_sha256(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b))
}

#[test]
fn read_tier_reports_once_at_finish_or_drop() {
    let f = Fixture::new();
    let (gate, reporter, _dir) = gate_with_spool(Arc::new(TestPolicy::default()));
    let d = delegation(&f);
    let spec = tool("crm.search", RiskTier::Read, "tool:crm.search:read");
    let call = gate.authorize(&d, &spec, b"q", NOW).unwrap();
    assert_eq!(reporter.pending(), 0, "read tier: nothing before finish");
    call.finish(b"results").unwrap();
    let r = reporter.pending_reports();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].output_digest.as_deref(),
        Some(hex_sha256(b"results").as_str())
    );
    assert!(r[0].justification.is_none());
    // Dropped without finish: still one record, without output.
    drop(gate.authorize(&d, &spec, b"q2", NOW).unwrap());
    // A drop does not wait for the spool (it may run on an async worker).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while reporter.pending() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let r = reporter.pending_reports();
    assert_eq!(r.len(), 2);
    assert!(r[1].output_digest.is_none());
    assert_eq!(r[1].reason.as_deref(), Some("finished without output"));
}

#[test]
fn a_streamed_or_failed_call_is_recorded_with_the_upstreams_answer() {
    let f = Fixture::new();
    let (gate, reporter, _dir) = gate_with_spool(Arc::new(TestPolicy::default()));
    let d = delegation(&f);
    // Listing asks without recording: allowed and refused tools alike.
    let search = tool("crm.search", RiskTier::Read, "tool:crm.search:read");
    assert!(gate.permits(&d, &search, NOW));
    assert!(!gate.permits(
        &d,
        &tool("hr.payroll", RiskTier::Read, "tool:hr.payroll:read"),
        NOW
    ));
    assert!(!gate.permits(
        &d,
        &tool("crm.forbidden", RiskTier::Read, "tool:crm.search:read"),
        NOW
    ));
    assert_eq!(reporter.pending(), 0, "permits recorded something");

    // A read call streamed on: the digest of what went by, status, latency.
    let mut call = gate.authorize(&d, &search, b"q", NOW).unwrap();
    call.set_upstream(200, 12);
    let mut digest = call.output_digest();
    digest.update(b"stream");
    digest.update(b"ed");
    call.finish_digest(digest).unwrap();
    let r = reporter.pending_reports();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].output_digest.as_deref(),
        Some(hex_sha256(b"streamed").as_str())
    );
    assert_eq!(
        (r[0].upstream_status, r[0].latency_ms),
        (Some(200), Some(12))
    );

    // A sensitive call whose upstream failed: the allow record before, and
    // a completion record saying it failed, without an output digest.
    let update = tool("crm.update", RiskTier::Write, "tool:crm.update:write");
    let call = gate.authorize(&d, &update, b"u", NOW).unwrap();
    let first = call.report_id().to_owned();
    call.failed("the upstream did not answer").unwrap();
    let r = reporter.pending_reports();
    assert_eq!(r.len(), 3);
    assert!(r[2].output_digest.is_none());
    assert_eq!(
        r[2].reason.as_deref(),
        Some(format!("failed: the upstream did not answer; completes {first}").as_str())
    );
}

#[test]
fn denies_out_of_scope_over_ceiling_and_policy_denied_and_reports_denials() {
    let f = Fixture::new();
    let (gate, reporter, _dir) = gate_with_spool(Arc::new(TestPolicy::default()));
    let d = delegation(&f);

    let err = gate
        .authorize(
            &d,
            &tool("hr.payroll", RiskTier::Read, "tool:hr.payroll:read"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CallDenied::OutOfScope {
            required: Permission::parse("tool:hr.payroll:read").unwrap()
        }
    );

    // Delete is above the task's ceiling (write), even though a scope
    // covering it would be needed too: the ceiling is checked on its own.
    let mut c = f.claims();
    let wide = scope(&[
        "tool:crm.search:read",
        "tool:crm.update:write",
        "tool:crm.update:delete",
    ]);
    c.act.act.as_mut().unwrap().scope = scope(&["tool:crm.*:*"]);
    c.scope = wide.clone();
    c.act.scope = wide;
    let d2 = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.sign(&c), &f.peer(), NOW)
        .unwrap();
    let err = gate
        .authorize(
            &d2,
            &tool("crm.update", RiskTier::Delete, "tool:crm.update:delete"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CallDenied::OverCeiling {
            tier: RiskTier::Delete,
            ceiling: RiskTier::Write
        }
    );

    let mut c = f.claims();
    let s = scope(&["tool:crm.forbidden:read"]);
    c.scope = s.clone();
    c.act.scope = s;
    let d3 = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.sign(&c), &f.peer(), NOW)
        .unwrap();
    let err = gate
        .authorize(
            &d3,
            &tool("crm.forbidden", RiskTier::Read, "tool:crm.forbidden:read"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CallDenied::PolicyDenied {
            policy_ids: vec!["forbid-crm-forbidden".into()]
        }
    );

    // Past the token's expiry, the witness no longer authorizes anything.
    let err = gate
        .authorize(
            &d,
            &tool("crm.search", RiskTier::Read, "tool:crm.search:read"),
            b"",
            NOW + 300,
        )
        .unwrap_err();
    assert!(matches!(err, CallDenied::Expired { .. }));

    let reports = reporter.pending_reports();
    assert_eq!(reports.len(), 4);
    assert!(reports.iter().all(|r| r.decision == "deny"));
    let reasons: Vec<&str> = reports
        .iter()
        .map(|r| r.reason.as_deref().unwrap())
        .collect();
    assert!(reasons[0].starts_with("out_of_scope"));
    assert!(reasons[1].starts_with("over_ceiling"));
    assert!(reasons[2].starts_with("policy_denied"));
    assert_eq!(
        reports[2].policy_ids,
        vec!["forbid-crm-forbidden".to_owned()]
    );
    assert!(reasons[3].starts_with("expired"));
}

#[test]
fn policy_errors_fail_closed() {
    let f = Fixture::new();
    let policy = Arc::new(TestPolicy {
        broken: true,
        ..TestPolicy::default()
    });
    let gate = ToolGate::new(policy, None);
    let d = delegation(&f);
    let err = gate
        .authorize(
            &d,
            &tool("crm.search", RiskTier::Read, "tool:crm.search:read"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, CallDenied::PolicyError { .. }));
    // A closure is a policy too.
    let deny_all = |_: &CallContext<'_>| PolicyDecision::default();
    let gate = ToolGate::new(Arc::new(deny_all), None);
    assert!(matches!(
        gate.authorize(
            &d,
            &tool("crm.search", RiskTier::Read, "tool:crm.search:read"),
            b"",
            NOW
        ),
        Err(CallDenied::PolicyDenied { .. })
    ));
}

#[test]
fn sensitive_call_is_denied_when_the_spool_cannot_record_it() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let reporter = Reporter::open(&spool, TestSender::new(true)).unwrap();
    let gate = ToolGate::new(Arc::new(TestPolicy::default()), Some(reporter.clone()));
    let d = delegation(&f);
    // The spool directory is replaced by a file: no segment can be made.
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::write(&spool, b"").unwrap();
    let err = gate
        .authorize(
            &d,
            &tool("crm.update", RiskTier::Write, "tool:crm.update:write"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, CallDenied::AuditUnavailable(_)), "{err:?}");
    // A read call goes ahead (its record is best effort).
    let call = gate
        .authorize(
            &d,
            &tool("crm.search", RiskTier::Read, "tool:crm.search:read"),
            b"",
            NOW,
        )
        .unwrap();
    assert!(call.finish(b"").is_err());
    assert_eq!(reporter.pending(), 0);
    // Once the spool is writable again, records are durable again.
    std::fs::remove_file(&spool).unwrap();
    std::fs::create_dir(&spool).unwrap();
    gate.authorize(
        &d,
        &tool("crm.update", RiskTier::Write, "tool:crm.update:write"),
        b"",
        NOW,
    )
    .unwrap()
    .finish(b"")
    .unwrap();
    // The read call happened: its record is written once the spool
    // works again, before the write's two; the refused write's allow
    // record never is.
    let kept = reporter.pending_reports();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert_eq!(kept[0].tool, "crm.search");
    assert!(kept[1..].iter().all(|r| r.tool == "crm.update"));
    assert_eq!(spool_lines(&spool), 3);
}

#[cfg(feature = "cedar")]
#[test]
fn cedar_engine_decides_through_the_gate() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    let engine = baton_policy::Engine::load_dir(&dir).unwrap();
    let gate = ToolGate::new(Arc::new(engine), None);

    // The researcher holds a one-hop token (planner → researcher).
    let f = Fixture::new();
    let mut c = f.claims();
    let hop1 = *c.act.act.take().unwrap();
    c.act = hop1;
    c.jti = c.act.jti.clone();
    c.exp = c.act.exp;
    c.scope = c.act.scope.clone();
    c.depth = 1;
    c.parent.as_mut().unwrap().jti = "jti-root".into();
    c.cnf.x5t_s256 = baton_ca::cert_thumbprint(f.researcher_svid.leaf());
    let d = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.sign(&c), &f.researcher_svid.peer(), NOW)
        .unwrap();

    let call = gate
        .authorize(
            &d,
            &tool("crm.search", RiskTier::Read, "tool:crm.search:read"),
            b"q",
            NOW,
        )
        .unwrap();
    assert_eq!(call.policy_ids(), &["research.read-tools".to_owned()]);
    call.finish(b"").unwrap();

    // In scope and under the ceiling, but research agents only read.
    let err = gate
        .authorize(
            &d,
            &tool("crm.update", RiskTier::Write, "tool:crm.update:write"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert!(
        matches!(&err, CallDenied::PolicyDenied { policy_ids } if policy_ids.iter().any(|p| p == "research.read-only")),
        "{err:?}"
    );

    // A tool the schema does not know: the engine errs, the gate denies.
    let err = gate
        .authorize(
            &d,
            &tool("crm.mystery", RiskTier::Read, "tool:crm.search:read"),
            b"",
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, CallDenied::PolicyError { .. }), "{err:?}");
}

/// A revocation source whose freshness the test sets.
struct Feed(std::sync::atomic::AtomicBool);

impl baton_verify::RevocationFreshness for Feed {
    fn is_fresh(&self, _now: u64) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_stale_revocation_feed_denies_sensitive_tiers_and_read_as_configured() {
    let f = Fixture::new();
    let d = delegation(&f);
    let feed = Arc::new(Feed(std::sync::atomic::AtomicBool::new(false)));
    let write = tool("crm.update", RiskTier::Write, "tool:crm.update:write");
    let read = tool("crm.search", RiskTier::Read, "tool:crm.search:read");

    // Read-only tools allowed while stale; writes never.
    let lenient = ToolGate::new(Arc::new(TestPolicy::default()), None)
        .with_revocation_freshness(feed.clone(), true);
    assert!(lenient.authorize(&d, &read, b"", NOW).is_ok());
    let err = lenient.authorize(&d, &write, b"", NOW).unwrap_err();
    assert!(
        matches!(
            err,
            CallDenied::RevocationStale {
                tier: RiskTier::Write
            }
        ),
        "{err}"
    );

    // The strict default denies every tier while stale.
    let strict = ToolGate::new(Arc::new(TestPolicy::default()), None)
        .with_revocation_freshness(feed.clone(), false);
    assert!(matches!(
        strict.authorize(&d, &read, b"", NOW),
        Err(CallDenied::RevocationStale { .. })
    ));

    // Fresh again: both pass.
    feed.0.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(strict.authorize(&d, &read, b"", NOW).is_ok());
    assert!(strict.authorize(&d, &write, b"", NOW).is_ok());
}

/// Revoked ids, as a revocation feed would hold them.
struct Revoked(Mutex<Vec<String>>);

impl baton_verify::RevocationCheck for Revoked {
    fn is_revoked(&self, id: &str, _task: &baton_core::TaskId) -> bool {
        self.0.lock().unwrap().iter().any(|r| r == id)
    }
}

#[test]
fn a_revoked_peer_certificate_is_refused_at_the_gate() {
    let f = Fixture::new();
    let peer = f.peer();
    let serial = peer.serial_hex().to_owned();
    assert!(!serial.is_empty());
    assert!(
        serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{serial}"
    );
    let d = TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.token(), &peer, NOW)
        .unwrap();
    assert_eq!(d.peer_serial(), serial);
    let read = tool("crm.search", RiskTier::Read, "tool:crm.search:read");
    let revoked = Arc::new(Revoked(Mutex::new(vec!["0abc".into()])));
    let gate =
        ToolGate::new(Arc::new(TestPolicy::default()), None).with_revocation(revoked.clone());
    // Another serial is revoked: the call goes through.
    assert!(gate.authorize(&d, &read, b"", NOW).is_ok());
    // The peer's own certificate is revoked (its node was evicted): refused,
    // though the token itself is not revoked.
    revoked.0.lock().unwrap().push(serial.clone());
    let err = gate.authorize(&d, &read, b"", NOW).unwrap_err();
    assert_eq!(err, CallDenied::PeerRevoked { serial });
    assert_eq!(err.code(), "peer_revoked");
}

#[test]
fn a_call_the_policy_allows_only_with_approval_needs_one_named() {
    let f = Fixture::new();
    let (gate, reporter, _dir) = gate_with_spool(Arc::new(TestPolicy::default()));
    let d = delegation(&f);
    let export = tool("crm.export", RiskTier::Write, "tool:crm.update:write");
    // Checked: allowed, with approval.
    let checked = gate.check(&d, &export, NOW).unwrap();
    assert!(checked.needs_approval);
    assert_eq!(checked.policy_ids, vec!["permit-crm".to_owned()]);
    // A server that cannot hold calls refuses it, and records the refusal.
    let err = gate.authorize(&d, &export, b"x", NOW).unwrap_err();
    assert!(
        matches!(err, CallDenied::ApprovalRequired { .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), "approval_required");
    let r = reporter.pending_reports();
    assert_eq!(r.last().unwrap().decision, "deny");
    assert!(
        r.last()
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .starts_with("approval_required")
    );
    // With the approval it used, it goes on and its record names it; the
    // recorded fields are in every record of the call.
    let fields = std::collections::BTreeMap::from([("input:/a".to_owned(), "1".to_owned())]);
    let tp: baton_core::trace_context::TraceParent =
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
    let notes = baton_verify::CallNotes {
        approval: Some("ap_1".to_owned()),
        recorded: fields,
        traceparent: Some(tp),
    };
    let mut call = gate
        .authorize_approved(&d, &export, b"x", NOW, notes)
        .unwrap();
    call.record_output(std::collections::BTreeMap::from([(
        "output:/b".to_owned(),
        "2".to_owned(),
    )]));
    call.finish(b"y").unwrap();
    let r = reporter.pending_reports();
    let n = r.len();
    assert_eq!(r[n - 2].reason.as_deref(), Some("approved in ap_1"));
    assert_eq!(r[n - 2].recorded.len(), 1);
    assert_eq!(r[n - 1].recorded.len(), 2);
    // Both records carry the caller's trace context.
    for rec in &r[n - 2..] {
        assert_eq!(
            rec.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
    // A call no policy holds needs none.
    let update = tool("crm.update", RiskTier::Write, "tool:crm.update:write");
    assert!(!gate.check(&d, &update, NOW).unwrap().needs_approval);
    assert!(gate.authorize(&d, &update, b"u", NOW).is_ok());
}

/// Allows with whatever policy ids it is given.
struct ManyIds(Vec<String>);

impl CallPolicy for ManyIds {
    fn decide(&self, _req: &CallContext<'_>) -> PolicyDecision {
        PolicyDecision {
            allowed: true,
            policy_ids: self.0.clone(),
            errors: vec![],
            approval: false,
        }
    }
}

/// A call's record lists its deciding policies within the log's bounds
/// whatever the operator named them or however many matched: 65 permits,
/// or one `@id` of 300 bytes or with a newline, are recorded as at most 64
/// ids (the last saying how many more), each within bounds. Before, the
/// ids were added after the record's bounds were checked: a read call
/// then ran with no record (the broker would refuse it), a sensitive one
/// was refused as if the audit log were down. The control: 64 short ids
/// are recorded as they are.
#[test]
fn a_calls_deciding_policies_are_recorded_within_bounds() {
    let f = Fixture::new();
    let d = delegation(&f);
    let read = tool("crm.search", RiskTier::Read, "tool:crm.search:read");
    let write = tool("crm.update", RiskTier::Write, "tool:crm.update:write");
    let many: Vec<String> = (0..65).map(|i| format!("permit-{i}")).collect();
    let odd = vec!["p".repeat(300), "line\nbreak".to_owned()];
    let fits: Vec<String> = (0..64).map(|i| format!("permit-{i}")).collect();
    for (ids, expect_len) in [(many, 64), (odd, 2), (fits.clone(), 64)] {
        let (gate, reporter, _dir) = gate_with_spool(Arc::new(ManyIds(ids.clone())));
        let call = gate.authorize(&d, &write, b"{}", NOW).unwrap();
        let spooled = reporter.pending_reports();
        let r = spooled.last().unwrap();
        assert!(r.check_bounds().is_ok(), "{:?}", r.policy_ids);
        assert_eq!(r.policy_ids.len(), expect_len);
        call.finish(b"ok").unwrap();
        let call = gate.authorize(&d, &read, b"{}", NOW).unwrap();
        call.finish(b"ok").unwrap();
        let spooled = reporter.pending_reports();
        assert!(spooled.iter().all(|r| r.check_bounds().is_ok()));
        assert_eq!(spooled.len(), 3, "every call recorded");
        if ids == fits {
            assert_eq!(spooled[2].policy_ids, fits, "control");
        }
    }
}
