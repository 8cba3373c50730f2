//! Bad inputs each get a clear, specific error and change nothing.

use std::io::Write;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, SystemTime};

use baton_proto::workload::X509svidRequest;
use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::harness::{Cluster, Options, Proc, TD, wait_for, wait_for_async};

pub async fn raw_channel(c: &Cluster) -> Channel {
    let path = c.agent_socket();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap()
}

async fn fetch_status(c: &Cluster, header: bool) -> tonic::Status {
    let mut client = SpiffeWorkloadApiClient::new(raw_channel(c).await);
    let mut req = tonic::Request::new(X509svidRequest {});
    if header {
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
    }
    match client.fetch_x509svid(req).await {
        Ok(mut stream) => match stream.get_mut().message().await {
            Ok(m) => panic!("expected an error, got {m:?}"),
            Err(s) => s,
        },
        Err(s) => s,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_refusals() {
    let c = Cluster::start(Options::default());

    // Missing security header.
    let s = fetch_status(&c, false).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("security header"), "{s:?}");

    // A caller with no entry.
    let s = fetch_status(&c, true).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("no identity issued"), "{s:?}");

    // Garbage on the socket does not hurt the daemon.
    for garbage in [
        &b"\x00\x01\x02garbage\xff\xfe"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x50; 4096],
    ] {
        let mut s = StdUnixStream::connect(c.agent_socket()).unwrap();
        let _ = s.write_all(garbage);
    }
    c.register("/after-garbage", &[]);
    let client = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    let svid = wait_for_async("SVID after garbage", Duration::from_secs(30), || async {
        client.fetch_x509_svid().await.ok()
    })
    .await;
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/after-garbage")
    );
}

#[test]
fn entry_create_rejects_bad_input_and_changes_nothing() {
    let c = Cluster::start(Options {
        start_agent: false,
        ..Options::default()
    });
    let parent = format!("spiffe://{TD}/baton/node/n1");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/",
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id",
        ),
        (
            &[
                "--spiffe-id",
                "http://example.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "scheme",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://Example.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/../b",
                "--selector",
                "unix:uid:1",
            ],
            "'.' or '..'",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:uid:abc",
            ],
            "unix:uid",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a",
                "--selector",
                "k8s:ns:x",
            ],
            "unknown type",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:sha256:xyz",
            ],
            "64 lowercase hex",
        ),
        // Only the executable: any process could connect, then exec it.
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:path:/usr/bin/python3",
            ],
            "add unix:uid:<n> or unix:gid:<n>",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "parent_id",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["entry", "create", "--parent-id", &parent];
        args.extend_from_slice(extra);
        let out = c.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
    // The broker validates too (a client that skips the CLI).
    let body = r#"{"spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/n","selectors":["unix:gid:-4"]}"#;
    let answer = admin_post(&c, "/v1/admin/entries", body);
    assert_eq!(answer["field"], "selectors", "{answer}");
    assert_eq!(answer["code"], "invalid_argument", "{answer}");
    let answer = admin_post(
        &c,
        "/v1/admin/entries",
        r#"{"spiffe_id":"spiffe://example.org/a","bogus":1}"#,
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `bogus`"),
        "{answer}"
    );
    let list = c.cli_json(&["entry", "list"]);
    assert_eq!(
        list["entries"].as_array().unwrap().len(),
        0,
        "nothing was stored"
    );

    // Unknown and malformed entry ids.
    let out = c.cli(&["entry", "show", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.cli(&["entry", "delete", "6f1b1d5e-6c3a-4d1e-9a51-4c2f0d3b9e11"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entry with id"));
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let c = Cluster::start(Options::default());
    let first_token = {
        // The running agent used one token; a second agent with a token that
        // was already used is refused.
        let t = c.join_token(None);
        let mut p = Proc::spawn(
            "agent2",
            c.agent_command(&c.path("agent2"), &c.path("agent2.sock"), Some(&t)),
            c.path("agent2.log"),
        );
        wait_for("agent2 ready", Duration::from_secs(30), || {
            c.path("agent2.sock").exists().then_some(())
        });
        p.stop();
        t
    };
    let out = c
        .agent_command(
            &c.path("agent3"),
            &c.path("agent3.sock"),
            Some(&first_token),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("already used"), "{err}");

    // Unknown token.
    let out = c
        .agent_command(&c.path("agent4"), &c.path("agent4.sock"), Some("deadbeef"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown"), "{err}");

    // Expired token: wait (by the clock, not a guess) until it has expired.
    let v = c.cli_json(&["token", "generate", "--ttl", "1s"]);
    let expires_at = v["expires_at"].as_u64().unwrap();
    wait_for("token expiry", Duration::from_secs(10), || {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now >= expires_at).then_some(())
    });
    let out = c
        .agent_command(
            &c.path("agent5"),
            &c.path("agent5.sock"),
            v["token"].as_str(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("expired"), "{err}");

    // No token and no stored identity.
    let out = c
        .agent_command(&c.path("agent6"), &c.path("agent6.sock"), None)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--join-token"));
}

/// POSTs raw JSON to the admin socket, bypassing the CLI's own checks.
fn admin_post(c: &Cluster, path: &str, body: &str) -> serde_json::Value {
    baton_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .unix_socket(c.admin_socket())
            .build()
            .unwrap();
        let resp = client
            .post(format!("http://admin{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        resp.json().await.unwrap()
    })
}

#[test]
fn a_bad_policy_stops_broker_start_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policies");
    for f in std::fs::read_dir(shipped).unwrap() {
        let f = f.unwrap().path();
        if f.extension()
            .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            std::fs::copy(&f, policies.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        policies.join("broken.cedar"),
        "// a typo on line 3\n@id(\"typo\")\npermit (principal, action, resource) when { context.purpos == \"x\" };\n",
    )
    .unwrap();
    let out = crate::harness::baton()
        .args([
            "broker",
            "--trust-domain",
            "example.org",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("broker"))
        .arg("--policies")
        .arg(&policies)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "broker started with a bad policy");
    assert!(
        err.contains("broken.cedar:3:"),
        "error names file and line: {err}"
    );
    assert!(!dir.path().join("broker/admin.sock").exists());
}
