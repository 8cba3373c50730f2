//! JWT key rotation by the documented runbook (`ca prepare --kind jwt` →
//! `activate` → `taint K1 --wait` → `revoke K1`) while a workload keeps
//! fetching JWT-SVIDs and validating each one twice: with the node
//! daemon's `ValidateJWTSVID` and offline, with the `spiffe` crate against
//! the JWT bundle it just fetched. Not one call may fail. A revoke before
//! the wait is done is refused (`jwt_key_in_use`); after it, the revoke
//! goes through and a token of the old key is refused because its key
//! left the bundle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::harness::{Cluster, Options, Proc, TD, baton, wait_for, wait_for_async};

const AUD: &str = "jwt-loop";

#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    /// kid -> tokens seen.
    kids: std::collections::BTreeMap<String, u64>,
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn exp_of(token: &str) -> u64 {
    let svid = spiffe::JwtSvid::parse_insecure(token).unwrap();
    u64::try_from(svid.expiry().unix_timestamp()).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One fetch and two validations; the error names the step that failed.
async fn fetch_and_validate(client: &spiffe::WorkloadApiClient) -> Result<String, String> {
    let token = client
        .fetch_jwt_token([AUD], None)
        .await
        .map_err(|e| format!("fetch: {e}"))?;
    client
        .validate_jwt_token(AUD, &token)
        .await
        .map_err(|e| format!("agent validation of a {} token: {e}", kid_of(&token)))?;
    let bundles = client
        .fetch_jwt_bundles()
        .await
        .map_err(|e| format!("fetch JWT bundles: {e}"))?;
    spiffe::JwtSvid::parse_and_validate(&token, &bundles, &[AUD])
        .map_err(|e| format!("offline validation of a {} token: {e}", kid_of(&token)))?;
    Ok(token)
}

fn ca_show(c: &Cluster) -> Value {
    c.cli_json(&["ca", "show"])
}

fn jwt_key(show: &Value, state: &str) -> Value {
    let found: Vec<&Value> = show["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "jwt" && a["state"] == state)
        .collect();
    assert_eq!(found.len(), 1, "one {state} JWT key: {show}");
    found[0].clone()
}

/// POSTs to the admin socket and returns (HTTP status, body).
async fn admin_post(c: &Cluster, path: &str, body: Value) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .unix_socket(c.admin_socket())
        .build()
        .unwrap();
    let resp = client
        .post(format!("http://admin{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_key_rotation_runbook_fails_no_fetch_and_validate_and_revoke_waits_for_expiry() {
    baton_tls::install_crypto_provider();
    // No pruning pass during the test: K1 would leave the bundle by itself
    // the moment its last token expired, racing the operator's revoke.
    let c = Cluster::start_with_broker_args(
        Options::default(),
        vec![
            "--rotation".into(),
            "manual".into(),
            "--rotation-check".into(),
            "1h".into(),
        ],
    );
    // Short-lived tokens keep the wait for their expiry short.
    c.register("/svc/jwt-loop", &["--jwt-ttl", "60s"]);
    let client = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    wait_for_async("a first JWT-SVID", Duration::from_secs(30), || async {
        fetch_and_validate(&client).await.ok()
    })
    .await;
    let k1 = jwt_key(&ca_show(&c), "active")["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The loop: fetch + validate, back to back, until told to stop.
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (client, stats, stop) = (client.clone(), stats.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = fetch_and_validate(&client).await;
                {
                    let mut s = stats.lock().unwrap();
                    match r {
                        Ok(token) => {
                            s.ok += 1;
                            *s.kids.entry(kid_of(&token)).or_default() += 1;
                        }
                        Err(e) => {
                            s.failed += 1;
                            s.errors.push(e);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let ok_now = || stats.lock().unwrap().ok;
    let wait_ok = |more: u64| {
        let start = ok_now();
        let stats = stats.clone();
        wait_for_async(
            "fetch+validate traffic",
            Duration::from_secs(60),
            move || {
                let stats = stats.clone();
                async move {
                    let s = stats.lock().unwrap();
                    assert_eq!(s.failed, 0, "a fetch+validate failed: {:?}", s.errors);
                    (s.ok >= start + more).then_some(())
                }
            },
        )
    };
    wait_ok(20).await;

    // Prepare, and wait until the agent has the bundle with the new key.
    c.cli_ok(&["ca", "prepare", "--kind", "jwt"]);
    let k2 = jwt_key(&ca_show(&c), "prepared")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(
        "the agent to sync the prepared key",
        Duration::from_secs(30),
        || {
            ca_show(&c)["nodes_lagging"]
                .as_array()
                .unwrap()
                .is_empty()
                .then_some(())
        },
    );
    wait_ok(20).await;
    // A token of K1 kept aside, minted fresh just before the activation.
    let keepsake = client.fetch_jwt_token(["keepsake"], None).await.unwrap();
    assert_eq!(kid_of(&keepsake), k1);
    let keepsake_exp = exp_of(&keepsake);
    c.cli_ok(&["ca", "activate"]);
    assert_eq!(jwt_key(&ca_show(&c), "active")["id"], k2.as_str());
    wait_ok(5).await;

    // Taint with --wait, in the background as an operator's terminal would.
    let wait_log = c.path("taint-wait.log");
    let mut cmd = baton();
    cmd.args(["ca", "taint", &k1, "--wait", "--timeout", "180s"])
        .env("BATON_ADMIN_SOCKET", c.admin_socket());
    let mut waiter = Proc::spawn("ca taint --wait", cmd, wait_log.clone());
    wait_for("the taint", Duration::from_secs(30), || {
        (jwt_key(&ca_show(&c), "old")["tainted"] == true).then_some(())
    });

    // Revoking now is refused: tokens of K1 are still live (the keepsake
    // at least), so validators must keep K1 in their bundles.
    assert!(
        unix_now() + 1 < keepsake_exp,
        "the machine is too slow for this test: the keepsake expired already"
    );
    let (status, body) = admin_post(&c, "/v1/admin/ca/revoke", serde_json::json!({"id": k1})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "jwt_key_in_use", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("still live"), "{message}");
    assert!(message.contains("--force"), "{message}");
    let out = c.cli(&["ca", "revoke", &k1]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("JWT key {k1}")), "{err}");
    // `ca show` counts what remains, and the key is still in the bundle.
    let pending = jwt_key(&ca_show(&c), "old")["pending"].clone();
    assert!(pending["jwt_svids"].as_u64().unwrap() >= 2, "{pending}");
    assert_eq!(pending["delegation_tokens"], 0, "{pending}");
    assert!(
        pending["tokens_expire_by"].as_u64().unwrap() >= keepsake_exp,
        "{pending}"
    );
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    assert!(bundles.get(&td).unwrap().find_jwt_authority(&k1).is_some());
    client
        .validate_jwt_token("keepsake", &keepsake)
        .await
        .unwrap();

    // The agent drops its cached K1 tokens as soon as it applies the
    // taint: the keepsake's audience gets a K2 token although the cached
    // K1 one is fresh (it would be served until half its life: 30 s of
    // its 60 s).
    let half_life = keepsake_exp - 30;
    let renewed = wait_for_async(
        "a K2 token for the keepsake audience",
        Duration::from_secs(30),
        || async {
            let t = client.fetch_jwt_token(["keepsake"], None).await.ok()?;
            (kid_of(&t) == k2).then_some(t)
        },
    )
    .await;
    let at = unix_now();
    assert!(
        at < half_life,
        "the cached K1 token was served until {at}, past the taint (its half life is {half_life})"
    );
    assert_ne!(renewed, keepsake);
    wait_for_async("K2 tokens in the loop", Duration::from_secs(30), || async {
        let s = stats.lock().unwrap();
        assert_eq!(s.failed, 0, "a fetch+validate failed: {:?}", s.errors);
        s.kids.contains_key(&k2).then_some(())
    })
    .await;

    // The wait ends once every K1 token expired; then the revoke goes through.
    let status = wait_for("taint --wait to finish", Duration::from_secs(210), || {
        waiter.child.try_wait().unwrap()
    });
    let progress = waiter.log_text();
    #[allow(clippy::print_stdout)]
    {
        println!("baton ca taint {k1} --wait:\n{progress}");
    }
    assert!(status.success(), "taint --wait: {progress}");
    assert!(progress.contains("re-issuance complete"), "{progress}");
    assert!(
        progress.contains(&format!("no token signed by {k1} is live any more")),
        "{progress}"
    );
    assert!(unix_now() >= keepsake_exp);
    c.cli_ok(&["ca", "revoke", &k1]);
    wait_ok(30).await;
    stop.store(true, Ordering::Relaxed);
    looper.await.unwrap();
    {
        let s = stats.lock().unwrap();
        #[allow(clippy::print_stdout)]
        {
            println!(
                "JWT rotation: {} fetch+validate calls succeeded, {} failed; tokens by key: {:?}",
                s.ok, s.failed, s.kids
            );
        }
        assert_eq!(s.failed, 0, "failed calls: {:?}", s.errors);
        assert!(s.ok > 100, "too little traffic to mean anything: {}", s.ok);
    }

    // After the revoke a K1 token is refused because its key left the
    // bundle (not merely because it expired), by the agent and offline.
    wait_for_async(
        "the agent to refuse the K1 token for its key",
        Duration::from_secs(30),
        || async {
            match client.validate_jwt_token("keepsake", &keepsake).await {
                Err(e) if e.to_string().contains("is not in the bundle") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(bundles.get(&td).unwrap().find_jwt_authority(&k1).is_none());
    match spiffe::JwtSvid::parse_and_validate(&keepsake, &bundles, &["keepsake"]) {
        Err(spiffe::JwtSvidError::AuthorityNotFound(kid)) => assert_eq!(kid, k1),
        other => panic!("expected AuthorityNotFound, got {other:?}"),
    }
    // Control: a fresh token (from K2) passes both.
    let fresh = fetch_and_validate(&client).await.unwrap();
    assert_eq!(kid_of(&fresh), k2);
}
