//! Request spans: one per task start, hop, redeem and tool-call report,
//! continuing the caller's W3C `traceparent`, and the trace id that the
//! audit events of the request record.
//!
//! The broker only creates spans and records their attributes
//! (`baton.task_id`, `baton.jti`, `baton.actor`, `baton.outcome`); whether
//! they are exported (OTLP) is the binary's choice of subscriber. Without an
//! OpenTelemetry layer the spans are plain `tracing` spans (their fields
//! show in the logs) and a received `traceparent` still reaches the audit
//! event.

use std::cell::Cell;

use baton_audit::AuditEvent;
use baton_core::{TraceId, TraceParent};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::BrokerError;

/// A request's span and the trace its audit events name.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub span: Span,
    pub trace_id: Option<TraceId>,
}

/// A span for one request (fields `baton.task_id`, `baton.jti`,
/// `baton.actor` and `baton.outcome` declared empty, filled as it goes).
/// Exported so a front end opens its requests' spans the same way.
#[macro_export]
macro_rules! request_span {
    ($name:literal) => {
        tracing::info_span!(
            $name,
            otel.kind = "server",
            baton.task_id = tracing::field::Empty,
            baton.jti = tracing::field::Empty,
            baton.actor = tracing::field::Empty,
            baton.outcome = tracing::field::Empty,
        )
    };
}
pub use crate::request_span;

impl RequestTrace {
    /// Makes `span` a child of the caller's span when `traceparent` parses
    /// (an invalid one is ignored, as W3C Trace Context asks: the request
    /// starts a new trace). The audit trace id is the caller's, else the
    /// span's own when an OpenTelemetry layer traces it.
    pub fn start(span: Span, traceparent: Option<&str>) -> Self {
        let parent = traceparent.and_then(|raw| match raw.parse::<TraceParent>() {
            Ok(tp) => Some(tp),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring an invalid traceparent header");
                None
            }
        });
        if let Some(tp) = parent {
            let remote = SpanContext::new(
                OtelTraceId::from_bytes(tp.trace_id.to_bytes()),
                SpanId::from_bytes(tp.parent_id),
                TraceFlags::new(tp.flags),
                true,
                TraceState::default(),
            );
            // Fails only without an OpenTelemetry layer: nothing to continue.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let trace_id = parent.map(|tp| tp.trace_id).or_else(|| {
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            sc.is_valid()
                .then(|| TraceId::from_bytes(sc.trace_id().to_bytes()).ok())
                .flatten()
        });
        Self { span, trace_id }
    }

    /// `work` inside the span, with this request's trace id for the audit
    /// events it appends (see [`current_trace_id`]).
    pub fn scoped<T>(&self, work: impl FnOnce() -> T) -> T {
        // INVARIANT: `work` runs synchronously on this thread (the blocking
        // pool's closures), so the thread-local cannot leak to another request.
        let previous = CURRENT.with(|c| c.replace(self.trace_id));
        let out = self.span.in_scope(work);
        CURRENT.with(|c| c.set(previous));
        out
    }

    /// Records how the request ended (`ok` or the error's code).
    pub fn outcome<T>(&self, result: &Result<T, BrokerError>) {
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.span.record("baton.outcome", code);
    }
}

thread_local! {
    static CURRENT: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// The trace id of the request whose work runs on this thread, if any.
pub(crate) fn current_trace_id() -> Option<TraceId> {
    CURRENT.with(Cell::get)
}

/// Puts what an audit event names (task, actor, token) on the current span.
pub(crate) fn record_event(event: &AuditEvent) {
    let span = Span::current();
    span.record("baton.task_id", tracing::field::display(&event.task_id));
    if let Some(actor) = &event.actor {
        span.record("baton.actor", tracing::field::display(actor));
    }
    if let Some(jti) = event.token_jti.as_ref().or(event.parent_jti.as_ref()) {
        span.record("baton.jti", jti.as_str());
    }
}

/// Times an audit append for [`baton_ops::Metrics::audit_append`].
pub(crate) fn timed_append<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let started = std::time::Instant::now();
    let r = f();
    baton_ops::metrics().audit_append(r.is_ok(), started.elapsed().as_secs_f64());
    r
}
