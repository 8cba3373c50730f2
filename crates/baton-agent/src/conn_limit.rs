//! A cap on the Workload API connections of each local user.
//!
//! The socket is open to every local user (each call is attested on its
//! own), so without a cap one user could hold every file descriptor the
//! daemon may open, and then no workload on the node would be attested,
//! synced or rotated. Each connection holds a [`ConnectionSlot`] of its
//! peer's uid until it closes; past [`MAX_CONNECTIONS_PER_UID`] a new
//! connection of that uid is closed at once, and other users are not
//! affected. A connection whose peer credentials cannot be read is
//! counted under one shared slot set (fail closed: never unlimited).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::net::UnixStream;

/// Connections one uid may hold open at once. A workload process holds
/// one or two (an SVID stream, a call); this leaves room for a few hundred
/// processes of one user.
pub const MAX_CONNECTIONS_PER_UID: usize = 256;

/// Open connections of one uid, and whether its refusal was logged since
/// it last had room (a user knocking in a loop logs one line, not one a
/// connection).
#[derive(Debug, Default)]
struct Count {
    open: usize,
    warned: bool,
}

type Counts = Arc<Mutex<HashMap<Option<u32>, Count>>>;

/// Open connections per uid (`None`: credentials not readable).
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: Counts,
}

/// One open connection of a uid; the count goes down when it is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    uid: Option<u32>,
    open: Counts,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for a connection of `uid`, or None when it has `max` open.
    pub fn admit(&self, uid: Option<u32>) -> Option<ConnectionSlot> {
        self.admit_noting(uid).0
    }

    /// [`Self::admit`], and whether this refusal is the first since the
    /// user last had room.
    fn admit_noting(&self, uid: Option<u32>) -> (Option<ConnectionSlot>, bool) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let c = open.entry(uid).or_default();
        if c.open >= self.max {
            let first = !c.warned;
            c.warned = true;
            return (None, first);
        }
        c.open += 1;
        let slot = ConnectionSlot {
            uid,
            open: Arc::clone(&self.open),
        };
        (Some(slot), false)
    }

    /// A slot for `stream`'s peer, read from its credentials; None (and
    /// a warning) when that user has too many open.
    pub fn admit_stream(&self, stream: &UnixStream) -> Option<ConnectionSlot> {
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let (slot, first_refusal) = self.admit_noting(uid);
        if first_refusal {
            tracing::warn!(
                uid = ?uid,
                max = self.max,
                "Workload API connections refused: this user holds the most connections one user may (logged once until one closes)"
            );
        }
        slot
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.get_mut(&self.uid) {
            c.open = c.open.saturating_sub(1);
            c.warned = false;
            if c.open == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn each_uid_has_its_own_count() {
        let limit = ConnectionLimit::new(2);
        let a1 = limit.admit(Some(1000)).unwrap();
        let _a2 = limit.admit(Some(1000)).unwrap();
        // Refused; only the first refusal since it had room is logged.
        assert!(matches!(limit.admit_noting(Some(1000)), (None, true)));
        assert!(matches!(limit.admit_noting(Some(1000)), (None, false)));
        // Another user, and unreadable credentials, are not affected.
        let _b = limit.admit(Some(1001)).unwrap();
        let _u = limit.admit(None).unwrap();
        // A closed connection frees its slot.
        drop(a1);
        let again = limit.admit(Some(1000));
        assert!(again.is_some());
        assert!(matches!(limit.admit_noting(Some(1000)), (None, true)));
    }

    /// Real sockets: connections past the cap are closed at once; those
    /// admitted stay open (the control).
    #[tokio::test]
    async fn connections_past_the_cap_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let limit = ConnectionLimit::new(3);
        let mut clients = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..5 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            let (server, _) = listener.accept().await.unwrap();
            if let Some(slot) = limit.admit_stream(&server) {
                kept.push((server, slot));
            }
        }
        assert_eq!(kept.len(), 3);
        let mut buf = [0u8; 1];
        for c in &mut clients[3..] {
            assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed");
        }
        // The admitted ones are open: nothing to read yet.
        for c in &mut clients[..3] {
            let pending =
                tokio::time::timeout(std::time::Duration::from_millis(50), c.read(&mut buf)).await;
            assert!(pending.is_err(), "still open");
        }
        kept.pop();
        let _again = UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(limit.admit_stream(&server).is_some());
    }
}
