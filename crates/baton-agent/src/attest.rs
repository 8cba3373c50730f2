//! Workload attestation: turns the kernel's peer credential of a Workload API
//! caller into selectors (`unix:uid`, `unix:gid`, `unix:path`, `unix:sha256`).
//!
//! The only way to get an [`AttestedWorkload`] is [`Attestor::attest`], and the
//! cache only answers for an `AttestedWorkload`, so no code path can hand out
//! an SVID without attesting the caller first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use baton_core::{Selector, SelectorKind};

/// How many executable digests we remember before starting over. A node runs
/// far fewer distinct binaries than this; the bound only stops a caller that
/// keeps rewriting its binary from growing the map forever.
const DIGEST_CACHE_LIMIT: usize = 4096;
/// Largest executable whose digest is taken (`unix:sha256`). Hashing runs
/// before the caller's entries are looked at, so any local user could
/// otherwise have the daemon read a huge (sparse) file again on every
/// call; a larger executable is attested without a digest selector.
const MAX_DIGESTED_EXECUTABLE: u64 = 1 << 30;

/// Why a caller could not be attested. Each variant ends the call with
/// `PermissionDenied`; they are distinct so that logs tell a race from a bug.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("process {pid} exited while it was being attested")]
    ProcessExited { pid: i32 },
    #[error(
        "process {pid} was replaced by another process with the same pid while it was being attested"
    )]
    PidReused { pid: i32 },
    #[error("cannot read {what} of process {pid}: {source}")]
    Io {
        pid: i32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse /proc/{pid}/stat: {source}")]
    Stat {
        pid: i32,
        #[source]
        source: StatParseError,
    },
}

/// Why a `/proc/<pid>/stat` line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatParseError {
    #[error("no closing ')' after the command name")]
    NoCommEnd,
    #[error("field 22 (starttime) is missing")]
    MissingStartTime,
    #[error("field 22 (starttime) is not a number: \"{}\"", .0.escape_debug())]
    BadStartTime(String),
}

/// Proof that a caller was attested: the selectors the kernel vouched for.
/// Built only by [`Attestor::attest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedWorkload {
    // INVARIANT: sorted and deduplicated, so comparisons are order-free.
    selectors: Vec<Selector>,
    pid: Option<i32>,
    uid: u32,
}

impl AttestedWorkload {
    /// The attested selectors, sorted.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Lets tests inside this crate stand in for an attested caller.
    #[cfg(test)]
    pub(crate) fn for_test(mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self {
            selectors,
            pid: None,
            uid: 0,
        }
    }
}

/// Identity of an executable file's content as far as we can tell without
/// reading it: if none of these changed, the digest did not either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

/// The Unix workload attestor. Cheap to share behind an `Arc`; its methods
/// block on `/proc` reads, so call them from a blocking task.
#[derive(Debug)]
pub struct Attestor {
    proc_root: PathBuf,
    digests: Mutex<HashMap<FileKey, String>>,
}

impl Default for Attestor {
    fn default() -> Self {
        Self::new()
    }
}

impl Attestor {
    pub fn new() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            digests: Mutex::new(HashMap::new()),
        }
    }

    /// Attests the peer of a Unix socket from its credential.
    ///
    /// Without a pid only `unix:uid` and `unix:gid` are produced. When the
    /// agent may not inspect the process (another user's process and the
    /// agent is unprivileged) the path and digest selectors are left out:
    /// fewer selectors can only match fewer entries, never more.
    pub fn attest(
        &self,
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    ) -> Result<AttestedWorkload, AttestError> {
        let mut selectors = vec![Selector::uid(uid), Selector::gid(gid)];
        if let Some(pid) = pid {
            // The pid in the credential was captured at connect time; the
            // process may since have exited and the pid been reused. Reading
            // the start time before and after ties what we read to one process.
            let before = self.start_time(pid)?;
            selectors.extend(self.exe_selectors(pid)?);
            let after = self.start_time(pid)?;
            if before != after {
                return Err(AttestError::PidReused { pid });
            }
        }
        selectors.sort();
        selectors.dedup();
        Ok(AttestedWorkload {
            selectors,
            pid,
            uid,
        })
    }

    fn proc_path(&self, pid: i32, name: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(name)
    }

    fn start_time(&self, pid: i32) -> Result<u64, AttestError> {
        let stat = std::fs::read_to_string(self.proc_path(pid, "stat"))
            .map_err(|e| io_error(pid, "stat", e))?;
        parse_start_time(&stat).map_err(|source| AttestError::Stat { pid, source })
    }

    fn exe_selectors(&self, pid: i32) -> Result<Vec<Selector>, AttestError> {
        let exe = self.proc_path(pid, "exe");
        let target = match std::fs::read_link(&exe) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::debug!(
                    pid,
                    "cannot inspect the caller's executable; attesting uid/gid only"
                );
                return Ok(Vec::new());
            }
            Err(e) => return Err(io_error(pid, "executable path", e)),
        };
        let mut out = Vec::with_capacity(2);
        // A path that is not UTF-8 (or not absolute, e.g. a kernel thread)
        // cannot be named by an entry, so there is nothing to select on.
        if let Some(p) = target.to_str()
            && let Ok(s) = Selector::new(SelectorKind::UnixPath, p)
        {
            out.push(s);
        }
        match self.digest(pid, &exe) {
            Ok(Some(hex)) => {
                if let Ok(s) = Selector::new(SelectorKind::UnixSha256, &hex) {
                    out.push(s);
                }
            }
            Ok(None) => {
                tracing::debug!(
                    pid,
                    max = MAX_DIGESTED_EXECUTABLE,
                    "the caller's executable is larger than the daemon hashes; no digest selector"
                );
            }
            Err(AttestError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                tracing::debug!(
                    pid,
                    "cannot read the caller's executable; no digest selector"
                );
            }
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    /// SHA-256 of the executable, read through `/proc/<pid>/exe` itself so
    /// that the bytes are those of the running image even if the file on
    /// disk was replaced or deleted since.
    /// None for an executable over [`MAX_DIGESTED_EXECUTABLE`] bytes.
    fn digest(&self, pid: i32, exe: &Path) -> Result<Option<String>, AttestError> {
        let file = File::open(exe).map_err(|e| io_error(pid, "executable", e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_error(pid, "executable metadata", e))?;
        if meta.size() > MAX_DIGESTED_EXECUTABLE {
            return Ok(None);
        }
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        };
        if let Some(hex) = self.lock_digests().get(&key) {
            return Ok(Some(hex.clone()));
        }
        // The file may grow after its size was read: no more than the cap
        // (and one byte to tell) is read either way.
        let mut capped = file.take(MAX_DIGESTED_EXECUTABLE + 1);
        let (hex, read) =
            sha256_reader_counted(&mut capped).map_err(|e| io_error(pid, "executable", e))?;
        if read > MAX_DIGESTED_EXECUTABLE {
            return Ok(None);
        }
        let mut cache = self.lock_digests();
        if cache.len() >= DIGEST_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Ok(Some(hex))
    }

    fn lock_digests(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A poisoned map only means another attestation panicked mid-insert;
        // the map holds no half-written entries, so keep using it.
        self.digests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn io_error(pid: i32, what: &'static str, e: io::Error) -> AttestError {
    // ESRCH shows up when the process dies between open and read.
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(3) {
        AttestError::ProcessExited { pid }
    } else {
        AttestError::Io {
            pid,
            what,
            source: e,
        }
    }
}

/// Lowercase hex SHA-256 of everything `r` yields.
#[cfg(test)]
pub(crate) fn sha256_reader(r: &mut impl Read) -> io::Result<String> {
    sha256_reader_counted(r).map(|(hex, _)| hex)
}

/// [`sha256_reader`], and how many bytes it read.
fn sha256_reader_counted(r: &mut impl Read) -> io::Result<(String, u64)> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((hex::encode(ctx.finish().as_ref()), read))
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line.
///
/// Field 2 is the command name in parentheses and may itself contain spaces
/// and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_start_time(stat: &str) -> Result<u64, StatParseError> {
    let end = stat.rfind(')').ok_or(StatParseError::NoCommEnd)?;
    // After the comm come fields 3, 4, ...; field 22 is the 20th of them.
    let field = stat[end + 1..]
        .split_ascii_whitespace()
        .nth(22 - 3)
        .ok_or(StatParseError::MissingStartTime)?;
    field
        .parse()
        .map_err(|_| StatParseError::BadStartTime(field.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_field(name: &str) -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        // Real, effective, saved, filesystem: SO_PEERCRED reports the effective one.
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    #[test]
    fn attests_own_process() {
        let uid = status_field("Uid");
        let gid = status_field("Gid");
        let pid = i32::try_from(std::process::id()).unwrap();
        let attestor = Attestor::new();
        let w = attestor.attest(uid, gid, Some(pid)).unwrap();

        let exe = std::env::current_exe().unwrap();
        let digest = sha256_reader(&mut File::open(&exe).unwrap()).unwrap();
        let expected = [
            Selector::uid(uid),
            Selector::gid(gid),
            Selector::new(SelectorKind::UnixPath, exe.to_str().unwrap()).unwrap(),
            Selector::new(SelectorKind::UnixSha256, &digest).unwrap(),
        ];
        for s in &expected {
            assert!(w.selectors().contains(s), "{s} missing from {w:?}");
        }
        assert_eq!(w.selectors().len(), 4);
        assert_eq!(w.pid(), Some(pid));

        // Second attestation is served from the digest cache and agrees.
        assert_eq!(attestor.lock_digests().len(), 1);
        assert_eq!(attestor.attest(uid, gid, Some(pid)).unwrap(), w);
    }

    /// An executable over the cap (a sparse 2 GiB file: nothing to read
    /// for the kernel, 2 GiB of hashing for the daemon) gets no digest
    /// and costs no reading; the test binary itself (the control) does.
    #[test]
    fn a_huge_executable_is_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let huge = dir.path().join("huge");
        let f = File::create(&huge).unwrap();
        f.set_len(2 * MAX_DIGESTED_EXECUTABLE).unwrap();
        drop(f);
        let pid = i32::try_from(std::process::id()).unwrap();
        let attestor = Attestor::new();
        let started = std::time::Instant::now();
        assert_eq!(attestor.digest(pid, &huge).unwrap(), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        assert!(attestor.lock_digests().is_empty());
        let exe = std::env::current_exe().unwrap();
        let own = attestor.digest(pid, &exe).unwrap().unwrap();
        assert_eq!(own, sha256_reader(&mut File::open(&exe).unwrap()).unwrap());
    }

    #[test]
    fn vanished_pid_is_a_distinct_error() {
        // Spawn and reap a child: its pid then names no process (pid reuse
        // within the test is possible but wildly unlikely).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        let err = Attestor::new().attest(0, 0, Some(pid)).unwrap_err();
        assert!(
            matches!(err, AttestError::ProcessExited { pid: p } if p == pid),
            "{err:?}"
        );
    }

    #[test]
    fn without_pid_only_ids() {
        let w = Attestor::new().attest(7, 8, None).unwrap();
        assert_eq!(w.selectors(), &[Selector::uid(7), Selector::gid(8)]);
    }

    #[test]
    fn stat_parser_counts_from_last_paren() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        // A comm (at most 15 bytes) that tries to shift the fields: "x) 1 (y".
        let line = format!("4242 (x) 1 (y) {tail}");
        assert_eq!(parse_start_time(&line), Ok(987654));
        let plain = format!("1 (sh) {tail}");
        assert_eq!(parse_start_time(&plain), Ok(987654));
        assert_eq!(parse_start_time("1 sh S 1"), Err(StatParseError::NoCommEnd));
        assert_eq!(
            parse_start_time("1 (sh) S 1 2"),
            Err(StatParseError::MissingStartTime)
        );
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_start_time(&own).unwrap() > 0);
    }
}
