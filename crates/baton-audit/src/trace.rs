//! `baton audit trace TASK`: a task's events drawn as its delegation tree.
//!
//! The initiator and the root agent come from `TaskStarted`; each hop is
//! placed under the agent that asked for it (found by the parent token's
//! `jti` when recorded, else by the acting SPIFFE ID), and a granted hop's
//! target becomes a node under it that collects its own redeems, tool calls
//! and hops. Purpose changes, the task's end and a refused start
//! (`TaskRefused`: the admission policy said no) are task-wide.

use baton_core::{Purpose, RiskTier, Scope, SpiffeId, TaskId, TraceId};
use serde::Serialize;

use crate::event::{AuditRecord, EventKind};

/// A task's delegation tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub task_id: Option<TaskId>,
    pub started_at: Option<u64>,
    /// The log that recorded the start, when several brokers' logs are
    /// traced together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_in: Option<String>,
    /// The initiator in clear, unless redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator_hmac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// The agent the task was started for, with everything under it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<AgentNode>,
    /// Agents whose events could not be tied to the root's tree.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unattached: Vec<AgentNode>,
    /// Purpose changes and the task's end, in log order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub task_events: Vec<TaskEvent>,
    /// The W3C traces the task's requests belonged to, first seen first
    /// (each item names its own as `trace_id`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trace_ids: Vec<TraceId>,
}

/// One agent in the tree and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentNode {
    pub agent: Option<SpiffeId>,
    /// The delegation tokens it held (from `TaskStarted` and `Redeemed`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_jtis: Vec<String>,
    pub items: Vec<TraceItem>,
}

/// Something an agent did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TraceItem {
    Hop {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        target: Option<SpiffeId>,
        granted: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        decision: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<Scope>,
        #[serde(skip_serializing_if = "Option::is_none")]
        purpose: Option<Purpose>,
        #[serde(skip_serializing_if = "Option::is_none")]
        depth: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        justification_hmac: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        policy_ids: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<TraceId>,
        /// The target's own subtree, for a granted hop.
        #[serde(skip_serializing_if = "Option::is_none")]
        delegate: Option<AgentNode>,
    },
    Redeemed {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_jti: Option<String>,
        /// `granted`, or `refused` with its reason.
        #[serde(skip_serializing_if = "Option::is_none")]
        decision: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<TraceId>,
    },
    ToolCall {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        risk: Option<RiskTier>,
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<SpiffeId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        decision: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        policy_ids: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        justification: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        input_digest: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        output_digest: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<TraceId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        latency_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream_status: Option<u16>,
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        recorded: std::collections::BTreeMap<String, String>,
    },
}

/// A task-wide event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskEvent {
    PurposeChanged {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        actor: Option<SpiffeId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        purpose: Option<Purpose>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Ended {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        actor: Option<SpiffeId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator's revocation of some of the task's credentials.
    Revoked {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A call held for a human's approval, and the decision.
    Approval {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        /// `requested`, `approved` or `denied`.
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        actor: Option<SpiffeId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        risk: Option<RiskTier>,
        /// Who decided (clear text while it is held).
        #[serde(skip_serializing_if = "Option::is_none")]
        approver: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        approver_hmac: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The admission policy refused to start the task.
    StartRefused {
        index: u64,
        /// The log it is in, when several brokers' logs are traced together.
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
        at: u64,
        /// The root agent asked for.
        #[serde(skip_serializing_if = "Option::is_none")]
        root_agent: Option<SpiffeId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        risk: Option<RiskTier>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        policy_ids: Vec<String>,
    },
}

/// An agent node under construction; hop children are arena indexes.
struct NodeB {
    agent: Option<SpiffeId>,
    jtis: Vec<String>,
    items: Vec<(TraceItem, Option<usize>)>,
    /// For a granted hop's target: the delegator's token the hop was made
    /// with, so that its redeem (which names that token) lands on this
    /// node and not on another hop to the same agent.
    delegated_by: Option<String>,
    /// A redeem has been placed on this node.
    redeemed: bool,
}

/// The causal rank of an event within one second (see [`trace`]): the
/// start, then per depth `d` the hop to it (`2d`) and its redeem
/// (`2d + 1`), then what is done with the tokens, then the task's end.
fn causal_rank(e: &crate::event::AuditEvent) -> u64 {
    const LATER: u64 = u64::MAX - 8;
    let depth = e.depth.map(u64::from);
    match e.kind {
        EventKind::TaskStarted | EventKind::TaskRefused => 0,
        EventKind::HopGranted | EventKind::HopRefused => depth.map_or(LATER, |d| 2 * d),
        EventKind::Redeemed => depth.map_or(LATER + 1, |d| 2 * d + 1),
        EventKind::ApprovalRequested => LATER + 2,
        EventKind::ApprovalDecided => LATER + 3,
        EventKind::ToolCall => LATER + 4,
        EventKind::PurposeChanged => LATER + 5,
        EventKind::Revoked => LATER + 6,
        EventKind::TaskEnded => LATER + 7,
    }
}

/// Builds the tree of one task's records (as `events_for_task` returns them).
pub fn trace(records: &[AuditRecord]) -> Trace {
    let mut records: Vec<&AuditRecord> = records.iter().collect();
    let first_log = records.first().and_then(|r| r.log.clone());
    let several_logs = records.iter().any(|r| r.log != first_log);
    if several_logs {
        // No order across logs but time (seconds) and causality: within a
        // second, the start, each depth's hop before its redeem, the tool
        // calls made with the tokens, the task's end.
        records.sort_by(|a, b| {
            (a.event.at, causal_rank(&a.event), &a.log, a.index).cmp(&(
                b.event.at,
                causal_rank(&b.event),
                &b.log,
                b.index,
            ))
        });
    } else {
        records.sort_by_key(|r| r.index);
    }
    let mut t = Trace::default();
    let mut nodes: Vec<NodeB> = Vec::new();
    let mut root: Option<usize> = None;
    let mut tops: Vec<usize> = Vec::new();

    let new_node = |nodes: &mut Vec<NodeB>, agent: Option<SpiffeId>| {
        nodes.push(NodeB {
            agent,
            jtis: Vec::new(),
            items: Vec::new(),
            delegated_by: None,
            redeemed: false,
        });
        nodes.len() - 1
    };
    // The node an event belongs to: by token id, else by acting agent,
    // else the root for an event without actor, else a new unattached node.
    let owner = |nodes: &mut Vec<NodeB>,
                 tops: &mut Vec<usize>,
                 root: Option<usize>,
                 actor: Option<&SpiffeId>,
                 jti: Option<&String>| {
        if let Some(j) = jti
            && let Some(i) = nodes.iter().rposition(|n| n.jtis.contains(j))
        {
            return i;
        }
        if let Some(a) = actor {
            if let Some(i) = nodes.iter().rposition(|n| n.agent.as_ref() == Some(a)) {
                return i;
            }
        } else if let Some(r) = root {
            return r;
        }
        let i = new_node(nodes, actor.cloned());
        tops.push(i);
        i
    };

    // Trace ids seen, for the list's dedup: a set, as each report of a
    // batch may carry its own (a linear search made a task's trace
    // quadratic in them).
    let mut seen_traces = std::collections::HashSet::new();
    for r in records {
        let e = &r.event;
        if t.task_id.is_none() {
            t.task_id = Some(e.task_id.clone());
        }
        if let Some(id) = e.trace_id
            && seen_traces.insert(id)
        {
            t.trace_ids.push(id);
        }
        match e.kind {
            EventKind::TaskStarted => {
                if t.started_at.is_none() {
                    t.started_at = Some(e.at);
                    t.started_in = r.log.clone();
                    t.initiator = e.initiator.clone();
                    t.initiator_hmac = r.initiator_hmac.clone();
                    t.purpose = e.purpose.clone();
                    t.scope = e.scope.clone();
                }
                let i = match root {
                    Some(i) => i,
                    None => {
                        let i = new_node(&mut nodes, e.actor.clone());
                        root = Some(i);
                        i
                    }
                };
                if let (Some(node), Some(j)) = (nodes.get_mut(i), &e.token_jti) {
                    node.jtis.push(j.clone());
                }
            }
            EventKind::HopGranted | EventKind::HopRefused => {
                let granted = e.kind == EventKind::HopGranted;
                let parent = owner(
                    &mut nodes,
                    &mut tops,
                    root,
                    e.actor.as_ref(),
                    e.parent_jti.as_ref(),
                );
                let child = if granted {
                    let c = new_node(&mut nodes, e.target.clone());
                    if let Some(node) = nodes.get_mut(c) {
                        if let Some(j) = &e.token_jti {
                            node.jtis.push(j.clone());
                        }
                        node.delegated_by.clone_from(&e.parent_jti);
                    }
                    Some(c)
                } else {
                    None
                };
                let item = TraceItem::Hop {
                    index: r.index,
                    log: r.log.clone(),
                    at: e.at,
                    target: e.target.clone(),
                    granted,
                    decision: e.decision.clone(),
                    scope: e.scope.clone(),
                    purpose: e.purpose.clone(),
                    depth: e.depth,
                    justification: e.justification.clone(),
                    justification_hmac: r.justification_hmac.clone(),
                    reason: e.reason.clone(),
                    policy_ids: e.policy_ids.clone(),
                    trace_id: e.trace_id,
                    delegate: None,
                };
                if let Some(node) = nodes.get_mut(parent) {
                    node.items.push((item, child));
                }
            }
            EventKind::Redeemed => {
                // The redeemer is the hop's target: the hop to this agent
                // made with the token the redeem names (the first such
                // not yet redeemed), else the agent's newest node. By
                // agent alone, a redeem of Q's grant to W would land on a
                // later hop of P to W, and every call made with it too.
                let of_hop = e.actor.as_ref().and_then(|a| {
                    let to = |n: &NodeB| n.agent.as_ref() == Some(a);
                    let by = |n: &NodeB| to(n) && n.delegated_by == e.parent_jti;
                    e.parent_jti
                        .as_ref()
                        .and_then(|_| {
                            nodes
                                .iter()
                                .position(|n| by(n) && !n.redeemed)
                                .or_else(|| nodes.iter().rposition(by))
                        })
                        .or_else(|| nodes.iter().rposition(to))
                });
                let i = match of_hop {
                    Some(i) => i,
                    None => owner(
                        &mut nodes,
                        &mut tops,
                        root,
                        e.actor.as_ref(),
                        e.parent_jti.as_ref(),
                    ),
                };
                if let Some(node) = nodes.get_mut(i) {
                    if let Some(j) = e.token_jti.as_ref().filter(|j| !node.jtis.contains(j)) {
                        node.jtis.push(j.clone());
                    }
                    node.redeemed |= e.token_jti.is_some();
                    node.items.push((
                        TraceItem::Redeemed {
                            index: r.index,
                            log: r.log.clone(),
                            at: e.at,
                            token_jti: e.token_jti.clone(),
                            decision: e.decision.clone(),
                            reason: e.reason.clone(),
                            trace_id: e.trace_id,
                        },
                        None,
                    ));
                }
            }
            EventKind::ToolCall => {
                let i = owner(
                    &mut nodes,
                    &mut tops,
                    root,
                    e.actor.as_ref(),
                    e.token_jti.as_ref(),
                );
                if let Some(node) = nodes.get_mut(i) {
                    node.items.push((
                        TraceItem::ToolCall {
                            index: r.index,
                            log: r.log.clone(),
                            at: e.at,
                            tool: e.tool.clone(),
                            resource: e.resource.clone(),
                            risk: e.risk,
                            server: e.target.clone(),
                            decision: e.decision.clone(),
                            policy_ids: e.policy_ids.clone(),
                            reason: e.reason.clone(),
                            justification: e.justification.clone(),
                            input_digest: e.input_digest.clone(),
                            output_digest: e.output_digest.clone(),
                            trace_id: e.trace_id,
                            latency_ms: e.latency_ms,
                            upstream_status: e.upstream_status,
                            recorded: e.recorded.clone(),
                        },
                        None,
                    ));
                }
            }
            EventKind::PurposeChanged => t.task_events.push(TaskEvent::PurposeChanged {
                index: r.index,
                log: r.log.clone(),
                at: e.at,
                actor: e.actor.clone(),
                purpose: e.purpose.clone(),
                reason: e.reason.clone(),
            }),
            EventKind::TaskRefused => {
                if t.initiator.is_none() && t.initiator_hmac.is_none() {
                    t.initiator = e.initiator.clone();
                    t.initiator_hmac = r.initiator_hmac.clone();
                }
                t.purpose = t.purpose.take().or_else(|| e.purpose.clone());
                t.scope = t.scope.take().or_else(|| e.scope.clone());
                t.task_events.push(TaskEvent::StartRefused {
                    index: r.index,
                    log: r.log.clone(),
                    at: e.at,
                    root_agent: e.target.clone(),
                    risk: e.risk,
                    reason: e.reason.clone(),
                    policy_ids: e.policy_ids.clone(),
                });
            }
            EventKind::Revoked => t.task_events.push(TaskEvent::Revoked {
                index: r.index,
                log: r.log.clone(),
                at: e.at,
                reason: e.reason.clone(),
            }),
            EventKind::TaskEnded => t.task_events.push(TaskEvent::Ended {
                index: r.index,
                log: r.log.clone(),
                at: e.at,
                actor: e.actor.clone(),
                reason: e.reason.clone(),
            }),
            EventKind::ApprovalRequested | EventKind::ApprovalDecided => {
                t.task_events.push(TaskEvent::Approval {
                    index: r.index,
                    log: r.log.clone(),
                    at: e.at,
                    step: match (e.kind, e.decision.as_deref()) {
                        (EventKind::ApprovalRequested, _) => "requested",
                        (_, Some("allow")) => "approved",
                        _ => "denied",
                    }
                    .to_owned(),
                    actor: e.actor.clone(),
                    tool: e.tool.clone(),
                    resource: e.resource.clone(),
                    risk: e.risk,
                    approver: e.initiator.clone(),
                    approver_hmac: r.initiator_hmac.clone(),
                    reason: e.reason.clone(),
                });
            }
        }
    }

    let mut slots: Vec<Option<NodeB>> = nodes.into_iter().map(Some).collect();
    t.root = root.and_then(|i| assemble(&mut slots, i));
    t.unattached = tops
        .into_iter()
        .filter_map(|i| assemble(&mut slots, i))
        .collect();
    t
}

/// Moves node `i` and its delegates out of the arena into a tree. Children
/// are always created after their parent, so this terminates.
fn assemble(slots: &mut [Option<NodeB>], i: usize) -> Option<AgentNode> {
    let node = slots.get_mut(i)?.take()?;
    let items = node
        .items
        .into_iter()
        .map(|(mut item, child)| {
            if let (TraceItem::Hop { delegate, .. }, Some(c)) = (&mut item, child) {
                *delegate = assemble(slots, c);
            }
            item
        })
        .collect();
    Some(AgentNode {
        agent: node.agent,
        token_jtis: node.jtis,
        items,
    })
}

/// A line of the text tree and the lines under it.
struct Line {
    text: String,
    children: Vec<Line>,
}

fn opt<T: std::fmt::Display>(label: &str, v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| format!(", {label} {v}"))
        .unwrap_or_default()
}

/// `s` on one line: control characters (a newline that would start a
/// forged line of the tree, terminal escapes) and invisible ones (bidi
/// overrides, zero-width characters) shown escaped. Recorded fields come
/// from agents' requests, reasons from tool servers.
/// A name a caller chose (a tool call's resource, taken from its path or
/// arguments), quoted unless it is made only of letters, digits and
/// `-_./:@*+=~#%`: spaces, brackets, quotes and look-alike letters of
/// other scripts could make it read as more of the line (`acme (write):
/// allow (approved in ap_1)`), as a decision, a tier or an approval.
fn quoted_if_wordy(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@*+=~#%".contains(c));
    if plain {
        printable(s)
    } else {
        format!(
            "\"{}\"",
            printable(&s.replace('\\', "\\\\").replace('"', "\\\""))
        )
    }
}

fn printable(s: &str) -> String {
    let escaped = baton_core::text::controls_escaped(s);
    // The tree's own glyphs are added around a line, never inside it: in a
    // line's text they came from a caller drawing a line of its own (one a
    // terminal's soft wrap would show at the start of a row).
    if escaped
        .chars()
        .any(|c| ('\u{2500}'..='\u{257f}').contains(&c))
    {
        escaped
            .chars()
            .map(|c| {
                if ('\u{2500}'..='\u{257f}').contains(&c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        escaped
    }
}

fn scope_text(s: &Option<Scope>) -> String {
    s.as_ref()
        .map(|s| format!(", scope [{}]", s.to_strings().join(", ")))
        .unwrap_or_default()
}

fn sensitive(label: &str, clear: &Option<String>, mac: &Option<String>) -> String {
    match (clear, mac) {
        (Some(c), _) => format!(", {label} {c:?}"),
        (None, Some(m)) => format!(", {label} [redacted, hmac {}…]", m.get(..12).unwrap_or(m)),
        (None, None) => String::new(),
    }
}

/// How an event is named: `#index`, and `@log` when several brokers'
/// logs are traced together.
fn mark(index: u64, log: &Option<String>) -> String {
    match log {
        Some(l) => format!("#{index}@{l}"),
        None => format!("#{index}"),
    }
}

fn agent_name(a: &Option<SpiffeId>) -> String {
    a.as_ref()
        .map_or_else(|| "(unknown agent)".to_owned(), |a| a.to_string())
}

fn items_lines(items: &[TraceItem]) -> Vec<Line> {
    items.iter().map(item_line).collect()
}

fn item_line(item: &TraceItem) -> Line {
    match item {
        TraceItem::Hop {
            index,
            log,
            target,
            granted,
            scope,
            purpose,
            depth,
            justification,
            justification_hmac,
            reason,
            policy_ids,
            trace_id,
            delegate,
            ..
        } => {
            let mut text = format!("hop → {}: ", agent_name(target));
            if *granted {
                text.push_str("granted");
            } else {
                text.push_str("REFUSED");
                if let Some(r) = reason {
                    text.push_str(&format!(" ({r})"));
                }
            }
            text.push_str(&opt("depth", depth));
            text.push_str(&scope_text(scope));
            text.push_str(&opt("purpose", purpose));
            text.push_str(&sensitive(
                "justification",
                justification,
                justification_hmac,
            ));
            if !policy_ids.is_empty() {
                text.push_str(&format!(", policies [{}]", policy_ids.join(", ")));
            }
            if *granted && let Some(r) = reason {
                text.push_str(&format!(", reason {r}"));
            }
            text.push_str(&opt("trace", trace_id));
            text.push_str(&format!(" {}", mark(*index, log)));
            Line {
                text,
                children: delegate
                    .as_ref()
                    .map(|d| items_lines(&d.items))
                    .unwrap_or_default(),
            }
        }
        TraceItem::Redeemed {
            index,
            log,
            token_jti,
            decision,
            reason,
            trace_id,
            ..
        } => Line {
            text: match (decision.as_deref(), reason) {
                (Some("refused"), Some(r)) => {
                    format!(
                        "redeem refused ({r}){} {}",
                        opt("trace", trace_id),
                        mark(*index, log)
                    )
                }
                _ => format!(
                    "redeemed{}{}{} {}",
                    token_jti
                        .as_ref()
                        .map(|j| format!(" token {j}"))
                        .unwrap_or_default(),
                    // A redelivery says so.
                    reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    opt("trace", trace_id),
                    mark(*index, log)
                ),
            },
            children: Vec::new(),
        },
        TraceItem::ToolCall {
            index,
            log,
            tool,
            resource,
            risk,
            decision,
            policy_ids,
            reason,
            justification,
            trace_id,
            latency_ms,
            upstream_status,
            recorded,
            server,
            ..
        } => {
            // Every text here came in a tool server's report, so the line
            // names the server that made it.
            let mut text = format!("tool {}", quoted_if_wordy(tool.as_deref().unwrap_or("?")));
            if let Some(r) = resource {
                text.push_str(&format!(" on {}", quoted_if_wordy(r)));
            }
            if let Some(r) = risk {
                text.push_str(&format!(" ({r})"));
            }
            text.push_str(&format!(
                ": {}",
                printable(decision.as_deref().unwrap_or("?"))
            ));
            if let Some(r) = reason {
                text.push_str(&format!(" ({})", printable(r)));
            }
            if !policy_ids.is_empty() {
                text.push_str(&format!(", policies [{}]", policy_ids.join(", ")));
            }
            if let Some(s) = upstream_status {
                text.push_str(&format!(", upstream {s}"));
            }
            if let Some(ms) = latency_ms {
                text.push_str(&format!(" in {ms} ms"));
            }
            text.push_str(&opt("reported by", server));
            if !recorded.is_empty() {
                let fields: Vec<String> = recorded
                    .iter()
                    .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
                    .collect();
                text.push_str(&format!(", recorded {{{}}}", fields.join(", ")));
            }
            text.push_str(&sensitive("justification", justification, &None));
            text.push_str(&opt("trace", trace_id));
            text.push_str(&format!(" {}", mark(*index, log)));
            Line {
                text,
                children: Vec::new(),
            }
        }
    }
}

impl Trace {
    /// The tree as indented text (`├─`, `└─`), one event per line, each
    /// ending with its log index (`#n`).
    pub fn render_text(&self) -> String {
        let mut head = format!(
            "task {}",
            self.task_id
                .as_ref()
                .map_or_else(|| "(no events)".to_owned(), ToString::to_string)
        );
        head.push_str(&opt("purpose", &self.purpose));
        head.push_str(&scope_text(&self.scope));
        head.push_str(&opt("started at", &self.started_at));
        if let Some(log) = &self.started_in {
            head.push_str(&format!(" (recorded in log {log})"));
        }
        let mut children = Vec::new();
        if self.initiator.is_some() || self.initiator_hmac.is_some() {
            let who = match (&self.initiator, &self.initiator_hmac) {
                (Some(c), _) => c.clone(),
                (None, Some(m)) => format!("[redacted, hmac {}…]", m.get(..12).unwrap_or(m)),
                (None, None) => String::new(),
            };
            children.push(Line {
                text: format!("initiator {who}"),
                children: Vec::new(),
            });
        }
        if let Some(root) = &self.root {
            children.push(Line {
                text: format!("{} (root agent)", agent_name(&root.agent)),
                children: items_lines(&root.items),
            });
        }
        for n in &self.unattached {
            children.push(Line {
                text: format!(
                    "{} (not reached through a recorded hop)",
                    agent_name(&n.agent)
                ),
                children: items_lines(&n.items),
            });
        }
        for e in &self.task_events {
            let text = match e {
                TaskEvent::PurposeChanged {
                    index,
                    log,
                    actor,
                    purpose,
                    reason,
                    ..
                } => format!(
                    "purpose changed → {}{}{} {}",
                    purpose
                        .as_ref()
                        .map_or_else(|| "?".to_owned(), ToString::to_string),
                    opt("by", actor),
                    opt("reason", reason),
                    mark(*index, log)
                ),
                TaskEvent::Ended {
                    index,
                    log,
                    actor,
                    reason,
                    ..
                } => format!(
                    "task ended{}{} {}",
                    opt("by", actor),
                    opt("reason", reason),
                    mark(*index, log)
                ),
                TaskEvent::Revoked {
                    index, log, reason, ..
                } => format!(
                    "revoked by an operator{} {}",
                    reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default(),
                    mark(*index, log)
                ),
                TaskEvent::Approval {
                    index,
                    log,
                    step,
                    actor,
                    tool,
                    resource,
                    risk,
                    approver,
                    approver_hmac,
                    reason,
                    ..
                } => {
                    // Tool and resource are the caller's words (an MCP
                    // argument, a path segment): quoted unless plain, as
                    // on a tool call's line.
                    let mut text = format!(
                        "approval {step}: {} for {}",
                        quoted_if_wordy(tool.as_deref().unwrap_or("?")),
                        agent_name(actor)
                    );
                    if let Some(r) = resource {
                        text.push_str(&format!(", on {}", quoted_if_wordy(r)));
                    }
                    text.push_str(&opt("tier", risk));
                    text.push_str(&sensitive("by", approver, approver_hmac));
                    if let Some(r) = reason {
                        text.push_str(&format!(" ({r})"));
                    }
                    text.push_str(&format!(" {}", mark(*index, log)));
                    text
                }
                TaskEvent::StartRefused {
                    index,
                    log,
                    root_agent,
                    risk,
                    reason,
                    policy_ids,
                    ..
                } => {
                    let mut text = format!("task start REFUSED for {}", agent_name(root_agent));
                    text.push_str(&opt("risk ceiling", risk));
                    if let Some(r) = reason {
                        text.push_str(&format!(" ({r})"));
                    }
                    if !policy_ids.is_empty() {
                        text.push_str(&format!(", policies [{}]", policy_ids.join(", ")));
                    }
                    text.push_str(&format!(" {}", mark(*index, log)));
                    text
                }
            };
            children.push(Line {
                text,
                children: Vec::new(),
            });
        }
        let mut out = printable(&head);
        out.push('\n');
        render_children(&children, "", &mut out);
        out
    }
}

fn render_children(lines: &[Line], prefix: &str, out: &mut String) {
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        out.push_str(prefix);
        out.push_str(if last { "└─ " } else { "├─ " });
        // Every line whole, whatever field it was built from: no caller's
        // text starts a line of its own or reaches the terminal as a
        // control.
        out.push_str(&printable(&line.text));
        out.push('\n');
        let next = format!("{prefix}{}", if last { "   " } else { "│  " });
        render_children(&line.children, &next, out);
    }
}
