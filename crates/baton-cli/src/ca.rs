//! `baton ca ...`: the CA's authorities and their rotation, through the
//! broker's admin socket.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Result;
use baton_broker::rotation::{
    ActivateRequest, AuthorityRequest, AuthorityView, CaStatus, PendingReissue, PrepareRequest,
    RevokeRequest,
};
use baton_ca::{AuthorityKind, AuthorityState};
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
        /// Then wait, with a progress line, until every live agent has
        /// synced the bundle that carries it (no lagging agents), so that
        /// `baton ca activate` is safe. An authority of that kind already
        /// prepared is waited for, not prepared again.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit code 1).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Switch signing to a prepared authority (default: every prepared
    /// one); the previous one becomes old and stays trusted until what it
    /// signed expires. Refused while some agent lacks the new bundle.
    Activate {
        /// The prepared authority's id (see `baton ca show`). JWT key ids
        /// may begin with `-`; they are taken as ids, not flags.
        #[arg(allow_hyphen_values = true)]
        id: Option<String>,
        /// Activate even though some agents have not synced the bundle yet
        /// (SVIDs from the new authority may fail there meanwhile).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Taint an old authority: agents re-issue every SVID it signed at
    /// their next sync. Then revoke it. With --wait on an authority already
    /// tainted, only waits.
    Taint {
        /// The old authority's id (one beginning with `-` is an id).
        #[arg(allow_hyphen_values = true)]
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a tainted old (or a prepared) authority: it leaves the
    /// bundle, so anything it signed is rejected everywhere. A JWT key is
    /// refused while a JWT-SVID or delegation token it signed is still
    /// live (`baton ca taint <kid> --wait` waits for that).
    Revoke {
        /// The authority's id (one beginning with `-` is an id).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Revoke a JWT key although tokens it signed are still live: every
        /// one of them fails validation at once.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait, with a progress line, until every agent and workload SVID the
    /// authority signed has been re-issued; for a JWT key, until every
    /// agent dropped its cached tokens and every token it signed expired,
    /// so that `baton ca revoke` is safe.
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
        CaCmd::Prepare {
            kind,
            wait,
            timeout,
            admin,
        } => {
            let client = AdminClient::new(&admin.admin_socket)?;
            let mut kinds = match kind {
                KindArg::X509 => vec![AuthorityKind::X509],
                KindArg::Jwt => vec![AuthorityKind::Jwt],
                KindArg::Both => vec![AuthorityKind::X509, AuthorityKind::Jwt],
            };
            if wait {
                // Waiting again after a timeout: what is prepared already
                // is waited for, not prepared a second time.
                let s = status(&client).await?;
                for a in &s.authorities {
                    if a.status.state == AuthorityState::Prepared {
                        kinds.retain(|k| *k != a.status.kind);
                        progress(
                            false,
                            &format!(
                                "{} authority {} is already prepared; waiting for the agents",
                                a.status.kind, a.status.id
                            ),
                            true,
                        );
                    }
                }
            }
            if !kinds.is_empty() {
                let reply: Reply = client
                    .post("/v1/admin/ca/prepare", &PrepareRequest { kinds })
                    .await?;
                print_reply(admin.output, &reply);
            }
            if wait {
                wait_for_sync(&client, timeout).await?;
            } else if admin.output == OutputFormat::Table {
                output::line(
                    "next: wait until `baton ca show` lists no lagging agents (or `baton ca prepare --wait`), then `baton ca activate`",
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
            let already = wait.wait
                && status(&client).await?.authorities.iter().any(|a| {
                    a.status.id == id
                        && a.status.tainted
                        && a.status.state != AuthorityState::Revoked
                });
            if already {
                // Waiting again (after a timeout): the taint stands.
                progress(
                    false,
                    &format!("authority {id} is already tainted; waiting for re-issuance"),
                    true,
                );
            } else {
                let reply: Reply = client
                    .post("/v1/admin/ca/taint", &AuthorityRequest { id: id.clone() })
                    .await?;
                print_reply(admin.output, &reply);
            }
            if wait.wait {
                wait_for_reissue(&client, &id, wait.timeout).await?;
            }
            Ok(())
        }
        CaCmd::Revoke { id, force, admin } => {
            let reply: Reply = AdminClient::new(&admin.admin_socket)?
                .post("/v1/admin/ca/revoke", &RevokeRequest { id, force })
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
        let pending = a.pending.map_or_else(String::new, |p| match st.kind {
            AuthorityKind::X509 => format!(
                "{} agent, {} workload, {} broker, {} task{}",
                p.agents,
                p.workloads,
                p.broker,
                p.tasks,
                if p.tasks == 0 || p.tasks_expire_by == 0 {
                    String::new()
                } else {
                    format!(" (expire by {})", when(p.tasks_expire_by))
                }
            ),
            AuthorityKind::Jwt => format!(
                "{} cached at {} agent(s) not yet synced; {} JWT-SVID, {} delegation token live{}",
                p.jwt_svids_cached,
                p.jwt_agents_unsynced,
                p.jwt_svids,
                p.delegation_tokens,
                if p.tokens_expire_by == 0 {
                    String::new()
                } else {
                    format!(" (expire by {})", when(p.tokens_expire_by))
                }
            ),
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
/// progress line on stderr. For a JWT key it then waits until no token it
/// signed is live any more, so that `baton ca revoke` is safe.
async fn wait_for_reissue(client: &AdminClient, id: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut reissued = false;
    loop {
        let s = status(client).await?;
        let Some((view, pending)) = s
            .authorities
            .iter()
            .find(|a| a.status.id == id)
            .and_then(|a| a.pending.map(|p| (a, p)))
        else {
            // Pruned or revoked meanwhile: nothing of it is left.
            progress(
                tty,
                "re-issuance complete: the authority is gone (revoked, or pruned once everything it signed expired)",
                true,
            );
            return Ok(());
        };
        let elapsed = start.elapsed().as_secs_f64();
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = if !pending.reissued() {
            reissue_line(view, &pending, elapsed)
        } else {
            if !reissued {
                reissued = true;
                let next = match view.status.kind {
                    AuthorityKind::Jwt if pending.tokens_live(now) => {
                        "; waiting for the tokens it signed to expire".to_owned()
                    }
                    _ => format!("; now `baton ca revoke {id}`"),
                };
                progress(
                    tty,
                    &format!("re-issuance complete after {elapsed:.1}s{next}"),
                    true,
                );
            }
            if view.status.kind != AuthorityKind::Jwt || !pending.tokens_live(now) {
                if view.status.kind == AuthorityKind::Jwt {
                    progress(
                        tty,
                        &format!(
                            "no token signed by {id} is live any more after {elapsed:.1}s; now `baton ca revoke {id}`"
                        ),
                        true,
                    );
                }
                return Ok(());
            }
            format!(
                "waiting for tokens signed by {id} to expire: {} JWT-SVID(s), {} delegation token(s) live until {} (holders can renew delegation tokens now with `baton grant renew`), {elapsed:.0}s elapsed",
                pending.jwt_svids,
                pending.delegation_tokens,
                when(pending.tokens_expire_by),
            )
        };
        if line != last || tty {
            progress(tty, &line, false);
            last = line;
        }
        if start.elapsed() >= timeout {
            let what = if pending.reissued() {
                format!(
                    "{} JWT-SVID(s) and {} delegation token(s) signed by {id} are live until {}: `baton ca revoke {id}` is refused until then",
                    pending.jwt_svids,
                    pending.delegation_tokens,
                    when(pending.tokens_expire_by)
                )
            } else {
                format!(
                    "{} SVID(s) signed by {id} are still to be re-issued (or dropped by an agent that has not synced)",
                    pending.reissuable().max(pending.jwt_agents_unsynced)
                )
            };
            return Err(exit(
                EXIT_FAILURE,
                format!(
                    "gave up after {}: {what}. Check `baton ca show` and the agents' logs (an agent that cannot reach the broker cannot re-issue)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until no live agent lags behind the bundle that carries the
/// prepared authority, printing a progress line on stderr; gives up after
/// `timeout` (exit code 1) naming the agents.
async fn wait_for_sync(client: &AdminClient, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let s = status(client).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let names = |n: &[baton_core::SpiffeId]| {
            let mut v: Vec<String> = n.iter().take(5).map(ToString::to_string).collect();
            if n.len() > 5 {
                v.push("...".into());
            }
            v.join(", ")
        };
        if s.nodes_lagging.is_empty() {
            progress(
                tty,
                &format!(
                    "no lagging agents after {elapsed:.1}s: all {} live agent(s) have the bundle with the prepared authority; now `baton ca activate`",
                    s.nodes
                ),
                true,
            );
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(exit(
                EXIT_FAILURE,
                format!(
                    "gave up after {}: {} of {} live agent(s) have not synced the bundle with the prepared authority: {}. An agent that cannot reach the broker cannot sync; check its logs, `baton node evict` a node that is gone, or `baton ca activate --force`",
                    humantime::format_duration(timeout),
                    s.nodes_lagging.len(),
                    s.nodes,
                    names(&s.nodes_lagging)
                ),
            ));
        }
        let line = format!(
            "waiting for {} of {} live agent(s) to sync the bundle with the prepared authority: {}; {elapsed:.0}s elapsed",
            s.nodes_lagging.len(),
            s.nodes,
            names(&s.nodes_lagging)
        );
        if line != last || tty {
            progress(tty, &line, false);
            last = line;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn reissue_line(view: &AuthorityView, p: &PendingReissue, elapsed: f64) -> String {
    let id = &view.status.id;
    match view.status.kind {
        AuthorityKind::X509 => format!(
            "waiting for re-issuance of SVIDs signed by {id}: {} left ({} agent, {} workload, {} broker); {} task credential(s) end on their own, {elapsed:.0}s elapsed",
            p.reissuable(),
            p.agents,
            p.workloads,
            p.broker,
            p.tasks,
        ),
        AuthorityKind::Jwt => format!(
            "waiting for agents to drop JWT-SVIDs signed by {id}: {} cached at {} agent(s) that have not applied the taint yet; {} JWT-SVID(s), {} delegation token(s) live, {elapsed:.0}s elapsed",
            p.jwt_svids_cached, p.jwt_agents_unsynced, p.jwt_svids, p.delegation_tokens,
        ),
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
