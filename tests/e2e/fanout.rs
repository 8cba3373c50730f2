//! The asynchronous fan-out case: a grant travels through a real Redis
//! Stream to a worker process, which redeems it through its node daemon and
//! calls the tool; the chain and purpose survive the queue.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::delegation::{PLANNER, RESEARCHER, World, claims};
use crate::harness::{Proc, wait_for};

/// A throwaway redis-server on a free port in the test's temp dir.
fn redis(w: &World) -> (Proc, String) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .arg("--dir")
    .arg(w.c.path(""));
    let p = Proc::spawn("redis", cmd, w.c.path("redis.log"));
    wait_for("redis-server up", Duration::from_secs(30), || {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .stdout(Stdio::piped())
            .output()
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
            .map(|_| ())
    });
    (p, format!("redis://127.0.0.1:{port}"))
}

#[test]
fn grant_survives_a_redis_stream_to_a_worker() {
    let w = World::start();
    let (_redis, url) = redis(&w);
    let (task, grant) = w.start_task(
        &["tool:crm.search:read", "dataset:crm:read"],
        "2",
        "10m",
        "read",
    );
    let planner = w.redeem(&grant, PLANNER, "planner");
    let hop = w.delegate(
        &planner,
        RESEARCHER,
        &["tool:crm.search:read", "dataset:crm:read"],
        &[],
    );
    assert!(
        hop.status.success(),
        "{}",
        String::from_utf8_lossy(&hop.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    // The planner enqueues the grant; a separate worker process takes it.
    w.ok(&[
        "example",
        "enqueue",
        "--redis",
        &url,
        "--grant",
        g["grant"].as_str().unwrap(),
        "--tool",
        "crm.search",
    ]);
    let out = w.json(&[
        "example",
        "worker",
        "--redis",
        &url,
        "--spiffe-id",
        RESEARCHER,
        "--url",
        &w.tool_url,
        "--out",
        w.c.path("worker").to_str().unwrap(),
        "--wait",
        "20s",
    ]);
    assert_eq!(out["task_id"], task.as_str());
    assert_eq!(out["spiffe_id"], RESEARCHER);
    assert!(out["result"].to_string().contains("Acme Corp"));
    let c = claims(&w.c.path("worker"));
    assert_eq!(c["task"]["purpose"], "support.case-research");
    assert_eq!(c["act"]["sub"], RESEARCHER);
    assert_eq!(c["act"]["act"]["sub"], PLANNER);
    assert_eq!(c["sub"], "alice@example.com");
    // The worker's call is in the task's trace, under the researcher.
    wait_for(
        "worker's call in the trace",
        Duration::from_secs(30),
        || {
            w.json(&["audit", "trace", &task, "--json"])
                .to_string()
                .contains("crm.search")
                .then_some(())
        },
    );
}
