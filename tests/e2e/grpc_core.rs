//! A standard gRPC-core client (Python `grpcio`, as py-spiffe uses) fetches
//! an SVID from a real `baton agent` over a socket at an absolute path.
//! Such clients send the socket path, percent-encoded, as `:authority`
//! (`tmp%2F...%2Fagent.sock`), which the HTTP/2 stack used to refuse with a
//! stream reset.

use std::process::Command;
use std::time::Duration;

use spiffe::WorkloadApiClient;

use crate::harness::{Cluster, Options, TD, wait_for_async};

/// The client: the raw call, with identity (de)serialisers, so no generated
/// code is needed. Exit 0 and "OK" when both checks pass.
const CLIENT: &str = r#"
import sys
import grpc

socket_path, want = sys.argv[1], sys.argv[2].encode()
channel = grpc.insecure_channel("unix:" + socket_path)
fetch = channel.unary_stream(
    "/SpiffeWorkloadAPI/FetchX509SVID",
    request_serializer=lambda b: b,
    response_deserializer=lambda b: b,
)

# With the security header: the first response carries the SVID.
try:
    first = next(iter(fetch(b"", metadata=[("workload.spiffe.io", "true")], timeout=60)))
except grpc.RpcError as e:
    print("FAIL: with the header: %s: %s" % (e.code(), e.details()))
    sys.exit(1)
if want not in first:
    print("FAIL: the response does not carry %r" % want)
    sys.exit(1)

# Without it: the server itself refuses (so it was really reached).
try:
    next(iter(fetch(b"", timeout=60)))
    print("FAIL: a call without the security header was answered")
    sys.exit(1)
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
        print("FAIL: without the header: %s: %s" % (e.code(), e.details()))
        sys.exit(1)
print("OK")
"#;

fn require_grpcio() {
    let ok = Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs python3 with the grpcio package: install it with \
         `python3 -m pip install grpcio` (.ci/run does)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_fetches_an_svid_over_an_absolute_socket_path() {
    require_grpcio();
    let c = Cluster::start(Options::default());
    let id = format!("spiffe://{TD}/agents/py");
    c.register("/agents/py", &[]);
    let socket = c.agent_socket();
    assert!(socket.is_absolute());

    // Wait until the agent holds the SVID (the Rust client sends a valid
    // authority, so this does not depend on the fix).
    let client = WorkloadApiClient::connect_to(c.endpoint()).await.unwrap();
    wait_for_async(
        "the SVID for the Python client",
        Duration::from_secs(60),
        || async {
            match client.fetch_x509_svid().await {
                Ok(svid) if svid.spiffe_id().to_string() == id => Some(()),
                _ => None,
            }
        },
    )
    .await;

    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", CLIENT])
            .arg(&socket)
            .arg(&id)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "the grpcio client failed ({}):\n{stdout}\n{stderr}\nagent log:\n{}",
        out.status,
        c.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
    );
}
