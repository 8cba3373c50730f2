//! Credentials written by the CLI: never through a planted symbolic link,
//! keys and tokens 0600 even over an existing wider file; grants read from
//! standard input or a file; `--help` never prints a secret from the
//! environment.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{Cluster, Options, TD, baton, wait_for};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn run(c: &Cluster, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd: Command = baton();
    cmd.args(args)
        .env("BATON_ADMIN_SOCKET", c.admin_socket())
        .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
        .env_remove("BATON_GRANT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `baton svid fetch --write DIR`, once the agent serves the SVID.
fn fetch_into(c: &Cluster, dir: &Path) -> Output {
    run(
        c,
        &["svid", "fetch", "--write", dir.to_str().unwrap()],
        None,
    )
}

#[test]
fn svid_write_refuses_a_planted_link_and_tightens_an_existing_key() {
    let c = Cluster::start(Options::default());
    c.register("/agents/files", &[]);
    let scratch = c.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    // Control: a fresh directory gets the files, the key 0600.
    wait_for("an SVID from the agent", Duration::from_secs(60), || {
        fetch_into(&c, &scratch).status.success().then_some(())
    });
    assert_eq!(mode(&scratch.join("key.pem")), 0o600);
    assert_eq!(mode(&scratch.join("svid.pem")), 0o644);

    // The node daemon's socket reached through a symbolic link (one
    // another user could have planted in its place) is refused before
    // anything is asked or written.
    let linked = c.path("linked.sock");
    std::os::unix::fs::symlink(c.agent_socket(), &linked).unwrap();
    let elsewhere = c.path("through-link");
    let out = run(
        &c,
        &[
            "svid",
            "fetch",
            "--socket",
            linked.to_str().unwrap(),
            "--write",
            elsewhere.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(!elsewhere.join("key.pem").exists());

    // A key.pem already there with 0644 ends up 0600, with the new key.
    let existing = c.path("existing");
    std::fs::create_dir_all(&existing).unwrap();
    let key = existing.join("key.pem");
    std::fs::write(&key, "old").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fetch_into(&c, &existing);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        mode(&key),
        0o600,
        "a pre-existing 0644 key.pem must become 0600"
    );
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");

    // A symbolic link planted at key.pem is refused, not written through,
    // and nothing else in the directory is written either.
    let planted = c.path("planted");
    std::fs::create_dir_all(&planted).unwrap();
    let victim = c.path("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("key.pem")).unwrap();
    let out = fetch_into(&c, &planted);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("key.pem") && err.contains("symbolic link"),
        "the refusal must name the file and say why: {err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(mode(&victim), 0o644);
    assert!(!planted.join("svid.pem").exists());
    assert!(
        std::fs::symlink_metadata(planted.join("key.pem"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

fn start_task(c: &Cluster, root: &str) -> String {
    let out = run(
        c,
        &[
            "task",
            "start",
            "--user",
            "alice@example.com",
            "--group",
            "engineering",
            "--root-agent",
            root,
            "--purpose",
            "support.case-research",
            "--scope",
            "tool:crm.search:read",
            "--audience",
            "crm",
            "-o",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "task start: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["grant"].as_str().unwrap().to_owned()
}

#[test]
fn grants_come_from_stdin_or_a_file_and_credentials_are_private() {
    let c = Cluster::start(Options::default());
    let planner = format!("spiffe://{TD}/agents/planner");
    c.register("/agents/planner", &[]);
    wait_for("the planner's SVID", Duration::from_secs(60), || {
        fetch_into(&c, &c.path("probe"))
            .status
            .success()
            .then_some(())
    });

    // From standard input (`--grant -`), into a directory whose token file
    // already exists with 0644.
    let grant = start_task(&c, &planner);
    let out_dir = c.path("cred-stdin");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("token"), "old").unwrap();
    std::fs::set_permissions(
        out_dir.join("token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run(
        &c,
        &[
            "grant",
            "redeem",
            "--grant",
            "-",
            "--spiffe-id",
            &planner,
            "--out",
            out_dir.to_str().unwrap(),
        ],
        Some(&format!("{grant}\n")),
    );
    assert!(out.status.success(), "redeem from stdin: {}", stderr(&out));
    assert_eq!(mode(&out_dir.join("token")), 0o600);
    assert_eq!(mode(&out_dir.join("key.pem")), 0o600);
    assert_ne!(
        std::fs::read_to_string(out_dir.join("token")).unwrap(),
        "old"
    );

    // From a file.
    let grant = start_task(&c, &planner);
    let grant_file = c.path("grant.txt");
    std::fs::write(&grant_file, &grant).unwrap();
    // Readable by every user, it is no secret: refused before it is read,
    // and the grant is still good for the control below.
    let redeem_from_file = |out: &Path| {
        run(
            &c,
            &[
                "grant",
                "redeem",
                "--grant-file",
                grant_file.to_str().unwrap(),
                "--spiffe-id",
                &planner,
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        )
    };
    std::fs::set_permissions(
        &grant_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let refused = redeem_from_file(&c.path("cred-refused"));
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    std::fs::set_permissions(
        &grant_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let file_dir = c.path("cred-file");
    let out = redeem_from_file(&file_dir);
    assert!(out.status.success(), "redeem from a file: {}", stderr(&out));
    assert_eq!(mode(&file_dir.join("token")), 0o600);
    assert_eq!(
        mode(&file_dir),
        0o700,
        "a new credential directory is private"
    );

    // A link planted at `token` is refused before the grant is spent.
    let grant = start_task(&c, &planner);
    let planted = c.path("cred-planted");
    std::fs::create_dir_all(&planted).unwrap();
    let victim = c.path("victim-token");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("token")).unwrap();
    let out = run(
        &c,
        &[
            "grant",
            "redeem",
            "--grant",
            "-",
            "--spiffe-id",
            &planner,
            "--out",
            planted.to_str().unwrap(),
        ],
        Some(&grant),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("token") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // An empty standard input is refused with the flag named.
    let out = run(
        &c,
        &[
            "grant",
            "redeem",
            "--grant",
            "-",
            "--out",
            c.path("x").to_str().unwrap(),
        ],
        Some(""),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--grant") && err.contains("empty"), "{err}");
}

#[test]
fn help_does_not_print_secrets_from_the_environment() {
    let secret = "grant-secret-value-7c1f";
    for (var, args) in [
        ("BATON_GRANT", &["grant", "redeem", "--help"][..]),
        ("BATON_JOIN_TOKEN", &["agent", "--help"][..]),
        ("BATON_ID_TOKEN", &["task", "start", "--help"][..]),
        ("BATON_API_KEY", &["secret", "introspect", "--help"][..]),
    ] {
        let out = baton().args(args).env(var, secret).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}");
        // Control: the help does document the variable.
        assert!(
            help.contains(var),
            "{args:?} help should name {var}: {help}"
        );
        assert!(
            !help.contains(secret),
            "{args:?} --help printed the value of {var}: {help}"
        );
    }
}
