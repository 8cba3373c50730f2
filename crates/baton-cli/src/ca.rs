//! `baton ca ...`: the CA's authorities and their rotation, through the
//! broker's admin socket.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Result;
use baton_broker::rotation::{ActivateRequest, AuthorityRequest, CaStatus, PrepareRequest};
use baton_ca::AuthorityKind;
use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::admin::AdminClient;
use crate::cli::{AdminArgs, EXIT_FAILURE, OutputFormat, exit};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// List the X.509 authorities and JWT keys, their state, and what still
    /// waits for re-issuance under a tainted one.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Prepare the next authority: published in the bundle now, signing
    /// nothing until `baton ca activate`. Give agents a sync interval to
    /// pick it up before activating.
    Prepare {
        /// Which kind to prepare.
        #[arg(long, value_enum, default_value_t = KindArg::Both)]
        kind: KindArg,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Switch signing to a prepared authority (default: every prepared
    /// one); the previous one becomes old and stays trusted until what it
    /// signed expires. Refused while some agent lacks the new bundle.
    Activate {
        /// The prepared authority's id (see `baton ca show`).
        id: Option<String>,
        /// Activate even though some agents have not synced the bundle yet
        /// (SVIDs from the new authority may fail there meanwhile).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Taint an old authority: agents re-issue every SVID it signed at
    /// their next sync. Then revoke it.
    Taint {
        /// The old authority's id.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a tainted old (or a prepared) authority: it leaves the
    /// bundle, so anything it signed is rejected everywhere.
    Revoke {
        /// The authority's id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait, with a progress line, until every agent and workload SVID the
    /// authority signed has been re-issued.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit code 1).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    X509,
    Jwt,
    Both,
}

pub async fn ca(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Show { admin } => {
            let status = status(&AdminClient::new(&admin.admin_socket)?).await?;
            match admin.output {
                OutputFormat::Json => output::json(&status),
                OutputFormat::Table => print_status(&status),
            }
            Ok(())
        }
        CaCmd::Prepare { kind, admin } => {
            let kinds = match kind {
                KindArg::X509 => vec![AuthorityKind::X509],
                KindArg::Jwt => vec![AuthorityKind::Jwt],
                KindArg::Both => Vec::new(),
            };
            let reply: Reply = AdminClient::new(&admin.admin_socket)?
                .post("/v1/admin/ca/prepare", &PrepareRequest { kinds })
                .await?;
            print_reply(admin.output, &reply);
            if admin.output == OutputFormat::Table {
                output::line(
                    "next: wait until `baton ca show` lists no lagging agents, then `baton ca activate`",
                );
            }
            Ok(())
        }
        CaCmd::Activate { id, force, admin } => {
            let reply: Reply = AdminClient::new(&admin.admin_socket)?
                .post("/v1/admin/ca/activate", &ActivateRequest { id, force })
                .await?;
            print_reply(admin.output, &reply);
            Ok(())
        }
        CaCmd::Taint { id, wait, admin } => {
            let client = AdminClient::new(&admin.admin_socket)?;
            let reply: Reply = client
                .post("/v1/admin/ca/taint", &AuthorityRequest { id: id.clone() })
                .await?;
            print_reply(admin.output, &reply);
            if wait.wait {
                wait_for_reissue(&client, &id, wait.timeout).await?;
            }
            Ok(())
        }
        CaCmd::Revoke { id, admin } => {
            let reply: Reply = AdminClient::new(&admin.admin_socket)?
                .post("/v1/admin/ca/revoke", &AuthorityRequest { id })
                .await?;
            print_reply(admin.output, &reply);
            Ok(())
        }
    }
}

/// The admin API's rotation answer, as the CLI reads it.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Reply {
    events: Vec<serde_json::Value>,
    bundle_sequence: u64,
}

async fn status(client: &AdminClient) -> Result<CaStatus> {
    client.get("/v1/admin/ca").await
}

fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn print_status(s: &CaStatus) {
    output::line(&format!(
        "trust domain {}  bundle sequence {}  upstream {}  live nodes {}",
        s.trust_domain,
        s.bundle_sequence,
        if s.upstream { "yes" } else { "no" },
        s.nodes
    ));
    output::line(&format!(
        "{:<5} {:<42} {:<9} {:<7} {:<21} {:<21} PENDING",
        "KIND", "ID", "STATE", "TAINTED", "CREATED", "NOT AFTER"
    ));
    for a in &s.authorities {
        let st = &a.status;
        let pending = a.pending.map_or_else(String::new, |p| {
            format!(
                "{} agent, {} workload, {} broker, {} task (expire by {})",
                p.agents,
                p.workloads,
                p.broker,
                p.tasks,
                if p.tasks == 0 {
                    "-".to_owned()
                } else {
                    when(p.tasks_expire_by)
                }
            )
        });
        output::line(&format!(
            "{:<5} {:<42} {:<9} {:<7} {:<21} {:<21} {}",
            st.kind.to_string(),
            st.id,
            st.state.to_string(),
            if st.tainted { "yes" } else { "no" },
            when(st.created_at),
            when(st.not_after),
            pending
        ));
    }
    if !s.nodes_lagging.is_empty() {
        output::line(&format!(
            "{} agent(s) have not synced the bundle with the prepared authority yet: {}",
            s.nodes_lagging.len(),
            s.nodes_lagging
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn print_reply(format: OutputFormat, reply: &Reply) {
    match format {
        OutputFormat::Json => output::json(reply),
        OutputFormat::Table => {
            for e in &reply.events {
                let field = |k: &str| {
                    e.get("authority")
                        .and_then(|a| a.get(k))
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                output::line(&format!(
                    "{} {} authority {}",
                    e.get("action")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?"),
                    field("kind"),
                    field("id")
                ));
            }
            output::line(&format!("bundle sequence {}", reply.bundle_sequence));
        }
    }
}

/// Polls until nothing re-issuable signed by `id` is live, printing a
/// progress line on stderr.
async fn wait_for_reissue(client: &AdminClient, id: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let s = status(client).await?;
        let Some(pending) = s
            .authorities
            .iter()
            .find(|a| a.status.id == id)
            .and_then(|a| a.pending)
        else {
            // Pruned or revoked meanwhile: nothing of it is left.
            progress(tty, "re-issuance complete: the authority is gone", true);
            return Ok(());
        };
        let left = pending.reissuable();
        let line = format!(
            "waiting for re-issuance of SVIDs signed by {id}: {left} left ({} agent, {} workload, {} broker); {} task credential(s) end on their own, {:.0}s elapsed",
            pending.agents,
            pending.workloads,
            pending.broker,
            pending.tasks,
            start.elapsed().as_secs_f64()
        );
        if left == 0 {
            progress(
                tty,
                &format!(
                    "re-issuance complete after {:.1}s; now `baton ca revoke {id}`",
                    start.elapsed().as_secs_f64()
                ),
                true,
            );
            return Ok(());
        }
        if line != last || tty {
            progress(tty, &line, false);
            last = line;
        }
        if start.elapsed() >= timeout {
            return Err(exit(
                EXIT_FAILURE,
                format!(
                    "gave up after {}: {left} SVID(s) signed by {id} are still live. Check `baton ca show` and the agents' logs (an agent that cannot reach the broker cannot re-issue)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[allow(clippy::print_stderr)]
fn progress(tty: bool, line: &str, done: bool) {
    if tty {
        eprint!("\r\x1b[2K{line}");
        if done {
            eprintln!();
        }
    } else {
        eprintln!("{line}");
    }
}
