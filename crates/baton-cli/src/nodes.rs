//! `baton node list|show|evict|ban|unban`: attested nodes, through the
//! broker's admin socket.

use anyhow::Result;
use baton_broker::nodes::{NodeAction, NodeView};
use baton_core::SpiffeId;

use crate::admin::AdminClient;
use crate::cli::{AdminArgs, EXIT_REFUSED, NodeCmd, OutputFormat, exit};
use crate::output;

pub async fn node(cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List { admin } => {
            let v: serde_json::Value = client(&admin)?.get("/v1/admin/nodes").await?;
            let nodes: Vec<NodeView> = serde_json::from_value(v["nodes"].clone())
                .map_err(|e| exit(EXIT_REFUSED, format!("unexpected broker answer: {e}")))?;
            match admin.output {
                OutputFormat::Json => output::json(&serde_json::json!({ "nodes": nodes })),
                OutputFormat::Table => print_table(&nodes),
            }
            Ok(())
        }
        NodeCmd::Show { node_id, admin } => {
            let id = node_arg(&node_id)?;
            let node: NodeView = client(&admin)?
                .get(&format!("/v1/admin/node?id={}", encode(id.as_str())))
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&node),
                OutputFormat::Table => print_table(std::slice::from_ref(&node)),
            }
            Ok(())
        }
        NodeCmd::Evict {
            node_id,
            reason,
            admin,
        } => act("evict", &node_id, reason, &admin).await,
        NodeCmd::Ban {
            node_id,
            reason,
            admin,
        } => act("ban", &node_id, reason, &admin).await,
        NodeCmd::Unban { node_id, admin } => act("unban", &node_id, None, &admin).await,
    }
}

fn client(admin: &AdminArgs) -> Result<AdminClient> {
    AdminClient::new(&admin.admin_socket)
}

/// Checks the argument before anything is sent, naming it in the error.
fn node_arg(raw: &str) -> Result<SpiffeId> {
    SpiffeId::parse(raw).map_err(|e| {
        exit(
            EXIT_REFUSED,
            format!(
                "<NODE_ID> {raw:?} is not a SPIFFE ID ({e}); pass the node's ID as `baton node list` prints it, e.g. spiffe://example.org/baton/node/n1"
            ),
        )
    })
}

async fn act(verb: &str, raw: &str, reason: Option<String>, admin: &AdminArgs) -> Result<()> {
    let id = node_arg(raw)?;
    let mut body = serde_json::json!({ "node_id": id });
    if let Some(r) = reason {
        body["reason"] = serde_json::Value::String(r);
    }
    let done: NodeAction = client(admin)?
        .post(&format!("/v1/admin/nodes/{verb}"), &body)
        .await?;
    match admin.output {
        OutputFormat::Json => output::json(&done),
        OutputFormat::Table => {
            output::line(&format!(
                "{} {}: {} credential(s) revoked",
                done.action, done.node, done.revoked
            ));
            if let Some(p) = &done.propagation {
                output::line(&format!("Propagation: {}", p.message));
            }
            match done.action.as_str() {
                "evicted" => output::line(
                    "It must attest again: `baton token generate --node-id <id>`, then restart its agent with --join-token.",
                ),
                "banned" => output::line("It cannot attest again until `baton node unban <id>`."),
                _ => output::line(
                    "It must attest again with a new join token (`baton token generate --node-id <id>`).",
                ),
            }
        }
    }
    Ok(())
}

fn print_table(nodes: &[NodeView]) {
    if nodes.is_empty() {
        output::line("no nodes");
        return;
    }
    for (i, n) in nodes.iter().enumerate() {
        if i > 0 {
            output::line("");
        }
        output::line(&format!("Node ID:           {}", n.spiffe_id));
        output::line(&format!(
            "Attested at:       {}",
            output::when(n.attested_at)
        ));
        output::line(&format!("Agent SVID serial: {}", n.agent_svid_serial));
        output::line(&format!(
            "Agent SVID expiry: {}",
            output::when(n.agent_svid_expires_at)
        ));
        output::line(&format!(
            "Banned:            {}",
            if n.banned { "yes" } else { "no" }
        ));
        output::line(&format!("Entries under it:  {}", n.entries));
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode("spiffe://example.org/baton/node/n-1"),
            "spiffe%3A%2F%2Fexample.org%2Fbaton%2Fnode%2Fn-1"
        );
    }

    #[test]
    fn bad_node_id_names_the_argument() {
        let e = node_arg("not-an-id").unwrap_err();
        assert!(e.to_string().contains("<NODE_ID>"), "{e}");
    }
}
