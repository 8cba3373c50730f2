//! `baton task ...` and `baton revoke ...`: operator verbs over the admin socket.

use anyhow::Result;
use baton_core::api::{StartTaskRequest, StartTaskResponse};
use baton_core::{Purpose, RiskTier, Scope, Secret, SpiffeId};

use crate::admin::AdminClient;
use crate::cli::{EXIT_REFUSED, OutputFormat, RevokeCmd, TaskCmd, exit};
use crate::output;

fn refused(field: &str, e: impl std::fmt::Display) -> anyhow::Error {
    exit(EXIT_REFUSED, format!("--{field}: {e}"))
}

fn print_task(format: OutputFormat, task: &serde_json::Value) {
    match format {
        OutputFormat::Json => output::json(task),
        OutputFormat::Table => {
            let s = |k: &str| task[k].as_str().unwrap_or("-").to_owned();
            output::line(&format!("Task:         {}", s("id")));
            output::line(&format!(
                "Initiator:    {} ({})",
                s("initiator"),
                s("initiator_iss")
            ));
            output::line(&format!("Root agent:   {}", s("root_agent")));
            output::line(&format!("Purpose:      {}", s("purpose")));
            output::line(&format!("Scope:        {}", task["scope"]));
            output::line(&format!("Risk ceiling: {}", s("risk_ceiling")));
            output::line(&format!("Max depth:    {}", task["max_depth"]));
            output::line(&format!(
                "Expires at:   {}",
                output::when(task["expires_at"].as_u64().unwrap_or(0))
            ));
            match task["ended_at"].as_u64() {
                Some(t) => output::line(&format!("Ended at:     {}", output::when(t))),
                None => output::line("Status:       active"),
            }
        }
    }
}

/// The human's ID token: given (flag, file or standard input), or minted
/// by `baton dev`'s local issuer for `--user`.
async fn id_token_for(
    client: &AdminClient,
    id_token: Option<&str>,
    id_token_file: Option<&std::path::Path>,
    user: Option<String>,
    groups: Vec<String>,
) -> Result<String> {
    let given = crate::creds::secret_input(id_token, id_token_file, "id-token")?;
    match (given, user) {
        (Some(t), _) => Ok(t.expose().to_owned()),
        (None, Some(user)) => {
            let v: serde_json::Value = client
                .post(
                    "/v1/admin/dev/id-token",
                    &serde_json::json!({ "user": user, "groups": groups }),
                )
                .await?;
            Ok(v["id_token"].as_str().unwrap_or_default().to_owned())
        }
        (None, None) => Err(exit(
            EXIT_REFUSED,
            "pass --id-token-file FILE or --id-token - (the user's OIDC ID token, from a file or standard input) or, with `baton dev`, --user NAME",
        )),
    }
}

/// `baton approve` / `baton deny`.
pub async fn decide(args: crate::cli::ApprovalArgs, approve: bool) -> Result<()> {
    let client = AdminClient::new(&args.admin.admin_socket)?;
    let id_token = id_token_for(
        &client,
        args.id_token.as_deref(),
        args.id_token_file.as_deref(),
        args.user,
        args.groups,
    )
    .await?;
    let decided: baton_core::api::ApprovalState = client
        .post(
            &format!(
                "/v1/admin/approvals/{}/decision",
                approval_segment(&args.id)?
            ),
            &baton_core::api::ApprovalDecision {
                id_token: Secret::new(id_token),
                approve,
                reason: args.reason,
            },
        )
        .await?;
    match args.admin.output {
        OutputFormat::Json => output::json(&decided),
        OutputFormat::Table => {
            output::line(&format!(
                "{} {}: {} on {} ({}) by {} in task {}",
                if approve { "Approved" } else { "Denied" },
                decided.id,
                decided.tool,
                controls_escaped(&decided.resource),
                decided.risk,
                decided.agent,
                decided.task_id
            ));
            output::line(&format!(
                "Valid until: {} (one call: the agent retries the same call)",
                output::when(decided.expires_at)
            ));
        }
    }
    Ok(())
}

pub async fn task(cmd: TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::Start {
            id_token,
            id_token_file,
            user,
            groups,
            root_agent,
            purpose,
            scope,
            risk_ceiling,
            ttl,
            max_depth,
            audience,
            admin,
        } => {
            let client = AdminClient::new(&admin.admin_socket)?;
            let root_agent = SpiffeId::parse(&root_agent).map_err(|e| refused("root-agent", e))?;
            let purpose: Purpose = purpose.parse().map_err(|e| refused("purpose", e))?;
            let scope = Scope::parse(&scope).map_err(|e| refused("scope", e))?;
            let risk_ceiling: RiskTier = risk_ceiling
                .parse()
                .map_err(|e| refused("risk-ceiling", e))?;
            let id_token = id_token_for(
                &client,
                id_token.as_deref(),
                id_token_file.as_deref(),
                user,
                groups,
            )
            .await?;
            let resp: StartTaskResponse = client
                .post(
                    "/v1/admin/tasks",
                    &StartTaskRequest {
                        id_token: Secret::new(id_token),
                        root_agent,
                        purpose,
                        scope,
                        risk_ceiling,
                        ttl_secs: ttl.as_secs(),
                        max_depth,
                        audience,
                    },
                )
                .await?;
            // What the start minted (the grant), by the ids `baton revoke
            // credential` takes.
            let minted = credentials(&client, &resp.task_id.to_string()).await?;
            match admin.output {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "task_id": resp.task_id,
                    "expires_at": resp.expires_at,
                    "grant": resp.grant.grant.expose(),
                    "target": resp.grant.target,
                    "grant_expires_at": resp.grant.expires_at,
                    "credentials": minted,
                })),
                OutputFormat::Table => {
                    output::line(&format!("Task:        {}", resp.task_id));
                    output::line(&format!("Root agent:  {}", resp.grant.target));
                    output::line(&format!("Grant:       {}", resp.grant.grant.expose()));
                    output::line(&format!(
                        "Grant until: {} (single use)",
                        output::when(resp.grant.expires_at)
                    ));
                    for c in &minted {
                        output::line(&format!(
                            "Credential:  {} ({})",
                            c["id"].as_str().unwrap_or("-"),
                            c["kind"].as_str().unwrap_or("-")
                        ));
                    }
                }
            }
            Ok(())
        }
        TaskCmd::Show { id, admin } => {
            let client = AdminClient::new(&admin.admin_socket)?;
            let mut v: serde_json::Value = client
                .get(&format!("/v1/admin/tasks/{}", task_segment(&id)?))
                .await?;
            let creds = credentials(&client, &id).await?;
            match admin.output {
                OutputFormat::Json => {
                    v["credentials"] = serde_json::Value::Array(creds);
                    output::json(&v);
                }
                OutputFormat::Table => {
                    print_task(admin.output, &v);
                    print_credentials(&creds);
                }
            }
            Ok(())
        }
        TaskCmd::List { admin } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .get("/v1/admin/tasks")
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&v),
                OutputFormat::Table => {
                    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
                    if tasks.is_empty() {
                        output::line("no tasks");
                    }
                    for t in tasks {
                        output::line(&format!(
                            "{}  {}  {}  {}",
                            t["id"].as_str().unwrap_or("-"),
                            t["purpose"].as_str().unwrap_or("-"),
                            if t["ended_at"].is_null() {
                                "active"
                            } else {
                                "ended"
                            },
                            t["root_agent"].as_str().unwrap_or("-"),
                        ));
                    }
                }
            }
            Ok(())
        }
        TaskCmd::End { id, admin } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .post(
                    &format!("/v1/admin/tasks/{}/end", task_segment(&id)?),
                    &serde_json::json!({}),
                )
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&v),
                OutputFormat::Table => {
                    print_task(admin.output, &v["task"]);
                    output::line(&format!("Revoked:      {} credential(s)", v["revoked"]));
                    propagation_line(&v["propagation"]);
                }
            }
            Ok(())
        }
        TaskCmd::Grant {
            id,
            audience,
            admin,
        } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .post(
                    &format!("/v1/admin/tasks/{}/grant", task_segment(&id)?),
                    &serde_json::json!({ "audience": audience }),
                )
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&v),
                OutputFormat::Table => {
                    output::line(&format!("Grant:   {}", v["grant"].as_str().unwrap_or("-")));
                    output::line(&format!("Target:  {}", v["target"].as_str().unwrap_or("-")));
                }
            }
            Ok(())
        }
        TaskCmd::SetPurpose { id, purpose, admin } => {
            let purpose: Purpose = purpose.parse().map_err(|e| refused("purpose", e))?;
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .post(
                    &format!("/v1/admin/tasks/{}/purpose", task_segment(&id)?),
                    &serde_json::json!({ "purpose": purpose }),
                )
                .await?;
            print_task(admin.output, &v["task"]);
            if admin.output == OutputFormat::Table {
                propagation_line(&v["propagation"]);
            }
            Ok(())
        }
    }
}

/// The credentials registered under task `id`, oldest first.
async fn credentials(client: &AdminClient, id: &str) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = client
        .get(&format!(
            "/v1/admin/tasks/{}/credentials",
            task_segment(id)?
        ))
        .await?;
    Ok(v["credentials"].as_array().cloned().unwrap_or_default())
}

fn print_credentials(creds: &[serde_json::Value]) {
    if creds.is_empty() {
        output::line("Credentials:  none live (expired ones are pruned)");
        return;
    }
    output::line("Credentials:");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rows: Vec<[String; 5]> = creds
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
            let expires = c["expires_at"].as_u64().unwrap_or(0);
            let status = if c["revoked"].as_bool() == Some(true) {
                "revoked"
            } else if expires <= now {
                "expired"
            } else {
                "live"
            };
            [
                s("id"),
                s("kind"),
                s("agent"),
                output::when(expires),
                status.to_owned(),
            ]
        })
        .collect();
    let head = ["ID", "KIND", "HOLDER", "EXPIRES", "STATUS"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let fmt = |r: &[String; 5]| {
        format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        )
    };
    output::line(&fmt(&head.map(str::to_owned)));
    for r in &rows {
        output::line(&fmt(r));
    }
}

/// Tells the operator whether verifiers following Redis have the
/// revocation yet ("recorded; propagating" while the relay is behind).
pub(crate) fn propagation_line(p: &serde_json::Value) {
    if let Some(message) = p["message"].as_str() {
        output::line(&format!("Propagation:  {message}"));
    }
}

pub async fn revoke(cmd: RevokeCmd) -> Result<()> {
    let mut until = None;
    let (target, args) = match cmd {
        RevokeCmd::Credential { id, args } => (serde_json::json!({ "credential": id }), args),
        RevokeCmd::Subtree { id, args } => (serde_json::json!({ "subtree": id }), args),
        RevokeCmd::Task { id, args } => (serde_json::json!({ "task": id }), args),
        RevokeCmd::Agent {
            spiffe_id,
            until: lapse,
            args,
        } => {
            until = lapse.map(|d| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |n| n.as_secs())
                    .saturating_add(d.as_secs())
            });
            (serde_json::json!({ "agent": spiffe_id }), args)
        }
        RevokeCmd::Node { spiffe_id, args } => (serde_json::json!({ "node": spiffe_id }), args),
        RevokeCmd::Unblock { spiffe_id, admin } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .post(
                    "/v1/admin/agents/unblock",
                    &serde_json::json!({ "agent": spiffe_id }),
                )
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&v),
                OutputFormat::Table => output::line(&format!(
                    "unblocked {spiffe_id}: it may get new credentials again"
                )),
            }
            return Ok(());
        }
    };
    let (reason, admin) = (args.reason, args.admin);
    let mut body = serde_json::json!({ "target": target, "reason": reason });
    if let Some(u) = until {
        body["until"] = serde_json::json!(u);
    }
    let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
        .post("/v1/admin/revoke", &body)
        .await?;
    match admin.output {
        OutputFormat::Json => output::json(&v),
        OutputFormat::Table => {
            let n = v["revoked"].as_array().map_or(0, Vec::len);
            output::line(&format!(
                "revoked {n} credential(s) for {}{}",
                v["target"].as_str().unwrap_or("-"),
                if v["blocked"].is_object() {
                    "; blocked from new credentials (`baton revoke unblock` lifts it)"
                } else {
                    ""
                }
            ));
            propagation_line(&v["propagation"]);
        }
    }
    Ok(())
}

/// An approval id as a path segment: `ap_` and lowercase hex, nothing else.
fn approval_segment(id: &str) -> Result<&str> {
    let ok = id.strip_prefix("ap_").is_some_and(|hex| {
        !hex.is_empty()
            && hex.len() <= 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(id)
    } else {
        Err(exit(
            EXIT_REFUSED,
            format!(
                "{id:?} is not an approval id (ap_ and hex digits, as the agent's error names it)"
            ),
        ))
    }
}

/// The call's fields its route records in clear text, one a line, with
/// control and invisible characters escaped (an agent chose them: a
/// newline, an escape sequence or a bidi override must not draw or
/// reorder text on the deciding human's terminal). A text field shows
/// without quotes, other JSON values (numbers, objects) as compact JSON.
fn show_fields(shown: &std::collections::BTreeMap<String, String>) {
    if shown.is_empty() {
        output::line(
            "Input:         not shown (the route records no field in clear text: only its digest is bound; name fields with record-input to show them here)",
        );
        return;
    }
    output::line("Input:");
    for (k, v) in shown {
        output::line(&format!(
            "  {}: {}",
            controls_escaped(k),
            controls_escaped(v)
        ));
    }
}

/// What an agent wrote, safe to show an approver: see
/// [`baton_core::text::controls_escaped`].
pub(crate) use baton_core::text::controls_escaped;

/// `baton approval show ID`.
pub async fn show_approval(id: &str, admin: crate::cli::AdminArgs) -> Result<()> {
    let client = AdminClient::new(&admin.admin_socket)?;
    let a: baton_core::api::ApprovalState = client
        .get(&format!("/v1/admin/approvals/{}", approval_segment(id)?))
        .await?;
    match admin.output {
        OutputFormat::Json => output::json(&a),
        OutputFormat::Table => {
            output::line(&format!("Approval:      {}", a.id));
            output::line(&format!("Status:        {}", a.status));
            output::line(&format!("Task:          {}", a.task_id));
            output::line(&format!("Agent:         {}", a.agent));
            output::line(&format!(
                "Tool:          {} on {} ({})",
                controls_escaped(&a.tool),
                controls_escaped(&a.resource),
                a.risk
            ));
            if let Some(t) = &a.target {
                output::line(&format!("Request:       {}", controls_escaped(t)));
            }
            show_fields(&a.shown);
            output::line(&format!("Input digest:  {}", a.input_digest));
            output::line(&format!("Asked by:      {}", a.requested_by));
            output::line(&format!("Asked at:      {}", output::when(a.created_at)));
            output::line(&format!("Expires:       {}", output::when(a.expires_at)));
            if let Some(who) = &a.decided_by {
                output::line(&format!("Decided by:    {}", controls_escaped(who)));
            }
            if let Some(why) = &a.reason {
                output::line(&format!("Reason:        {}", controls_escaped(why)));
            }
        }
    }
    Ok(())
}

pub(crate) fn task_segment(id: &str) -> Result<String> {
    id.parse::<baton_core::TaskId>()
        .map(|t| t.to_string())
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::controls_escaped;

    #[test]
    fn what_an_agent_wrote_cannot_draw_or_reorder_the_approvers_terminal() {
        assert_eq!(controls_escaped("vendor 10"), "vendor 10");
        assert_eq!(controls_escaped("ünïcödé €"), "ünïcödé €");
        assert_eq!(controls_escaped("a\nb"), "a\\nb");
        assert_eq!(controls_escaped("x\u{1b}[2J"), "x\\u{1b}[2J");
        // A right-to-left override would show `mallory` reversed.
        assert_eq!(controls_escaped("\u{202e}yrollam"), "\\u{202e}yrollam");
        assert_eq!(
            controls_escaped("a\u{200b}b\u{2066}c\u{feff}"),
            "a\\u{200b}b\\u{2066}c\\u{feff}"
        );
    }
}
