//! `baton task show` lists a task's credentials by the ids `baton revoke
//! credential` takes, `task start -o json` gives the ids it minted, and a
//! serial copied from openssl (upper case, `serial=`, colon-separated)
//! names the same credential; garbage is refused naming the field.

use std::path::Path;
use std::process::Command;

use crate::delegation::{PLANNER, World};

fn openssl_serial(cred: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cred.join("svid.pem"))
        .output()
        .expect("openssl (the test compares with what openssl prints)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn find<'a>(creds: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    creds
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed in {creds}"))
}

#[test]
fn task_show_lists_credentials_and_revoke_takes_serials_as_openssl_prints_them() {
    let w = World::start();
    let v = w.json(&[
        "task",
        "start",
        "--user",
        "alice@example.com",
        "--group",
        "engineering",
        "--root-agent",
        PLANNER,
        "--purpose",
        "support.case-research",
        "--scope",
        "tool:crm.search:read",
        "--audience",
        "crm",
        "-o",
        "json",
    ]);
    let task = v["task_id"].as_str().unwrap().to_owned();
    let grant = v["grant"].as_str().unwrap().to_owned();
    // What the start minted: the grant, by its registry id (never the grant itself).
    let minted = v["credentials"].as_array().unwrap();
    assert_eq!(minted.len(), 1, "{v}");
    assert_eq!(minted[0]["kind"], "grant", "{v}");
    let grant_id = minted[0]["id"].as_str().unwrap().to_owned();
    assert_ne!(grant_id, grant);
    assert_eq!(minted[0]["agent"], PLANNER, "{v}");

    let cred = w.redeem(&grant, PLANNER, "planner");
    let printed = openssl_serial(&cred);
    let hex = printed.strip_prefix("serial=").unwrap().to_owned();
    let ours = hex.to_ascii_lowercase();

    let shown = w.json(&["task", "show", &task, "-o", "json"]);
    assert_eq!(shown["id"], task.as_str(), "{shown}");
    let creds = &shown["credentials"];
    let x509 = find(creds, &ours);
    assert_eq!(x509["kind"], "x509", "{x509}");
    assert_eq!(x509["agent"], PLANNER, "{x509}");
    assert_eq!(x509["revoked"], false, "{x509}");
    assert!(x509["expires_at"].as_u64().unwrap() > unix_now(), "{x509}");
    assert_eq!(find(creds, &grant_id)["kind"], "grant");
    assert!(
        creds
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "token"),
        "{creds}"
    );

    // For people: the same ids, holders, RFC 3339 times, no unix seconds.
    let human = w.ok(&["task", "show", &task]);
    assert!(human.contains("Credentials:"), "{human}");
    assert!(
        human.contains(&ours) && human.contains(&grant_id),
        "{human}"
    );
    assert!(human.contains(PLANNER), "{human}");
    assert!(!human.contains("(unix"), "{human}");
    let year = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    assert!(
        human.contains(&year[..5]) && human.contains("Z (in "),
        "{human}"
    );

    // Garbage is refused with the field named, and nothing is revoked.
    for garbage in ["zz:11", "7a::3f", "serial=xyz", "a b"] {
        let err = w.refused(&["revoke", "credential", garbage]);
        assert!(
            err.contains("credential") && err.contains("is not a credential id"),
            "{garbage}: {err}"
        );
    }
    let shown = w.json(&["task", "show", &task, "-o", "json"]);
    assert_eq!(find(&shown["credentials"], &ours)["revoked"], false);

    // The serial colon-separated in upper case, as certificate viewers print it.
    let colons: Vec<String> = hex
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let colons = colons.join(":");
    let r = w.json(&["revoke", "credential", &colons, "-o", "json"]);
    let ids: Vec<&str> = r["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&ours.as_str()), "{r}");
    // openssl's own line names the same credential (idempotent: same ids).
    let again = w.json(&["revoke", "credential", &printed, "-o", "json"]);
    assert_eq!(again["revoked"], r["revoked"], "{again}");

    let shown = w.json(&["task", "show", &task, "-o", "json"]);
    assert_eq!(
        find(&shown["credentials"], &ours)["revoked"],
        true,
        "{shown}"
    );
    let human = w.ok(&["task", "show", &task]);
    let line = human
        .lines()
        .find(|l| l.contains(&ours))
        .unwrap_or_else(|| panic!("{human}"));
    assert!(line.contains("revoked"), "{line}");
}
