//! Binding a Unix socket at a path a previous run may have left behind.
//!
//! A daemon that died leaves its socket file: binding again needs it
//! removed. But a socket file may also be another live process's (a
//! second daemon started with the same path by mistake, or on purpose by
//! a process of the same uid): removing it would take that process's
//! clients over silently, and its shutdown would later delete ours. So a
//! socket is replaced only when nothing accepts on it, anything that is
//! not a socket is never replaced, and at shutdown the file is removed
//! only while it is still the one this process bound.

use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::SocketFileError;

/// The socket file a process bound: removed when dropped (or by
/// [`BoundSocket::remove_if_ours`]) only while it is still this one.
///
/// It holds the listening socket open until then (a duplicate of the
/// listener's descriptor): the file's inode cannot be freed and handed to
/// another process's socket at the same path (inode numbers are reused at
/// once on ext4), which would make that socket look like ours; and until
/// the file is removed, the path still counts as served, so a second
/// daemon started meanwhile is refused rather than racing the removal.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
    _listening: Option<std::os::fd::OwnedFd>,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one bound here (same
    /// device and inode); a file another process has put there since is
    /// left alone. Returns whether it removed it.
    pub fn remove_if_ours(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                std::fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove_if_ours();
    }
}

/// How long a start waits for another process binding the same socket.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The lock file of socket `path`: `<path>.lock`.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Takes the lock file beside socket `path`, waiting up to `wait` for
/// another process that holds it. The file is made if missing (mode 0600,
/// never through a symbolic link) and must be a regular file of this
/// process's user that no one else may write: a lock file another user
/// made (in a directory it may write) is refused, not trusted.
fn lock_beside(path: &Path, wait: std::time::Duration) -> Result<std::fs::File, SocketFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let at = lock_path(path);
    let io_err = |action: &'static str| {
        let at = at.clone();
        move |source: io::Error| SocketFileError::Io {
            action,
            path: at,
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&at)
        .map_err(io_err("open the lock file"))?;
    let meta = file.metadata().map_err(io_err("inspect the lock file"))?;
    // The effective uid of this process: the owner of its /proc entry.
    let me = std::fs::metadata("/proc/self")
        .map_err(io_err("read this process's user for the lock file"))?
        .uid();
    let refused = |why: String| SocketFileError::LockFile {
        path: at.clone(),
        why,
    };
    if !meta.is_file() {
        return Err(refused("the lock file is not a regular file".into()));
    }
    if meta.uid() != me {
        return Err(refused(format!(
            "the lock file belongs to uid {}, not to this process's uid {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refused(format!(
            "the lock file is writable by others (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < wait => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SocketFileError::LockBusy {
                    path: at,
                    waited_secs: wait.as_secs(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock")(e)),
        }
    }
}

/// Binds a listening Unix socket at `path` with file mode `mode`, making
/// its directory if needed. A socket file already there is removed only
/// when no process accepts connections on it; a live one, or a path
/// holding anything else (a regular file, a directory, a symbolic link),
/// is an error naming the path. Needs a Tokio runtime.
pub fn bind_unix_socket(
    path: &Path,
    mode: u32,
) -> Result<(tokio::net::UnixListener, BoundSocket), SocketFileError> {
    let io_err = |action: &'static str| {
        move |source: io::Error| SocketFileError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(io_err("create the directory of"))?;
    }
    // Two daemons starting at once must not both take the socket for
    // stale, the second removing the first's live one: the probe, the
    // removal and the bind run under a lock (released when `_lock`
    // drops). Not a lock on the directory, which any user who can read it
    // could hold forever, keeping the daemon from ever binding: a file of
    // this process's user, mode 0600, that nobody else can open.
    let _lock = lock_beside(path, LOCK_WAIT)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            if is_served(path).map_err(io_err("probe the socket already at"))? {
                return Err(SocketFileError::InUse {
                    path: path.to_owned(),
                });
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("remove the stale socket")(e));
                }
                _ => {}
            }
        }
        Ok(_) => {
            return Err(SocketFileError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect")(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_err("bind"))?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err("inspect the new socket"))?;
    let listening = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(io_err("hold the socket"))?;
    let bound = BoundSocket {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        _listening: Some(listening),
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        bound.remove_if_ours();
        return Err(io_err("set the mode of")(e));
    }
    Ok((listener, bound))
}

/// Whether a process accepts connections on the socket at `path`. The
/// probe never blocks: a listener whose backlog is full answers `EAGAIN`,
/// which counts as served; only "connection refused" (nobody listens) and
/// "not found" (removed meanwhile) count as not served.
fn is_served(path: &Path) -> io::Result<bool> {
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Connects to `path` and sends one byte; `listener` must read it.
    async fn reaches(listener: &tokio::net::UnixListener, path: &Path) {
        let mut client = tokio::net::UnixStream::connect(path).await.unwrap();
        client.write_all(b"x").await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                // Earlier probes sit in the backlog too: they end at once.
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut b = [0u8; 1];
                if conn.read(&mut b).await.unwrap() == 1 {
                    return b[0];
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, b'x');
    }

    #[tokio::test]
    async fn a_socket_another_process_serves_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (first, first_file) = bind_unix_socket(&path, 0o600).unwrap();
        let err = bind_unix_socket(&path, 0o600).unwrap_err();
        assert!(
            matches!(err, SocketFileError::InUse { .. }),
            "a live socket must not be replaced: {err}"
        );
        assert!(err.to_string().contains("s.sock"), "{err}");
        // Its clients still reach the first listener.
        reaches(&first, &path).await;
        // A listener stopped but not yet removed still holds the path.
        drop(first);
        let err = bind_unix_socket(&path, 0o600).unwrap_err();
        assert!(matches!(err, SocketFileError::InUse { .. }), "{err}");
        assert!(first_file.remove_if_ours());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_only_ours_is_removed_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("s.sock");
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        // The socket of a daemon that died: its file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (live, live_file) = bind_unix_socket(&path, 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        reaches(&live, &path).await;
        // Someone put another socket at the path since (the file removed
        // by hand, a new process bound): our shutdown leaves it alone.
        std::fs::remove_file(&path).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!live_file.remove_if_ours());
        drop(live_file);
        assert!(path.exists());
        drop(theirs);
        // Ours is removed when dropped.
        std::fs::remove_file(&path).unwrap();
        let (_l, f) = bind_unix_socket(&path, 0o600).unwrap();
        drop(f);
        assert!(!path.exists());
    }

    /// Any user who can read the socket's directory could lock it (a
    /// shared `flock`), and the daemon's start used to wait on that lock
    /// forever. The lock is now a file only this user may open: a lock held
    /// on the directory changes nothing. The control: a start that finds
    /// the lock file held waits, then fails naming it, and another user's
    /// or a shared lock file is refused, never trusted.
    #[tokio::test]
    async fn a_lock_on_the_directory_does_not_keep_the_socket_from_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let held = std::fs::File::open(dir.path()).unwrap();
        held.lock_shared().unwrap();
        let (listener, _file) = bind_unix_socket(&path, 0o666).unwrap();
        reaches(&listener, &path).await;
        let lock = lock_path(&path);
        let mode = std::fs::symlink_metadata(&lock)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Control: the lock file itself held (another daemon starting).
        let other = dir.path().join("other.sock");
        let theirs = lock_beside(&other, std::time::Duration::ZERO).unwrap();
        let err = lock_beside(&other, std::time::Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, SocketFileError::LockBusy { .. }), "{err}");
        assert!(err.to_string().contains("other.sock.lock"), "{err}");
        drop(theirs);
        lock_beside(&other, std::time::Duration::ZERO).unwrap();

        // A lock file others may write, or a link to one, is refused.
        let shared = dir.path().join("shared.sock");
        std::fs::write(lock_path(&shared), b"").unwrap();
        std::fs::set_permissions(lock_path(&shared), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        let err = bind_unix_socket(&shared, 0o600).unwrap_err();
        assert!(
            matches!(&err, SocketFileError::LockFile { why, .. } if why.contains("writable by others")),
            "{err}"
        );
        let linked = dir.path().join("linked.sock");
        std::os::unix::fs::symlink(lock_path(&other), lock_path(&linked)).unwrap();
        let err = bind_unix_socket(&linked, 0o600).unwrap_err();
        assert!(matches!(err, SocketFileError::Io { .. }), "{err}");
        assert!(!linked.exists() && !shared.exists());
    }

    #[tokio::test]
    async fn anything_but_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.db");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_unix_socket(&file, 0o600).unwrap_err();
        assert!(matches!(err, SocketFileError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        // A symbolic link to a live socket is not followed or replaced.
        let real = dir.path().join("real.sock");
        let (_l, _f) = bind_unix_socket(&real, 0o600).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = bind_unix_socket(&link, 0o600).unwrap_err();
        assert!(matches!(err, SocketFileError::NotASocket { .. }), "{err}");
        assert!(real.exists() && link.exists());
    }
}
