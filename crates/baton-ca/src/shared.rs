//! A CA shared by several brokers: its journal and key files live in one
//! store (the brokers' PostgreSQL datastore, sealed there with a key every
//! broker holds) instead of a key directory.
//!
//! Every rotation step runs under the store's lock, on what is stored
//! (merged with what this process knows), and writes its new files and
//! the journal in one atomic step: two brokers never prepare two
//! authorities, and a crash leaves the previous state whole. Issuance
//! never touches the store; a broker follows the others' steps with
//! [`Ca::refresh`](crate::Ca::refresh).

use std::collections::BTreeMap;
use std::fmt;

use crate::CaError;

/// What a shared store holds: the journal and the files, by name.
#[derive(Default)]
pub struct SharedState {
    pub journal: Option<Vec<u8>>,
    /// Key files (PKCS#8 DER) and certificates (DER), by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Rows that could not be read, by name, with the reason: an error
    /// only if the journal names them (a stray row does not stop the CA;
    /// the next step deletes it).
    pub unreadable: BTreeMap<String, String>,
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("journal", &self.journal.as_ref().map(Vec::len))
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("unreadable", &self.unreadable)
            .finish()
    }
}

/// What one rotation step writes, atomically: its new files, the journal,
/// and the names of every file still needed (the others are deleted).
pub struct SharedWrite {
    pub files: Vec<(String, Vec<u8>)>,
    pub journal: Vec<u8>,
    pub keep: Vec<String>,
}

impl fmt::Debug for SharedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedWrite")
            .field(
                "files",
                &self.files.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

/// A step run by [`SharedCaStore::transact`].
pub type SharedStep<'a> = dyn FnMut(SharedState) -> Result<Option<SharedWrite>, CaError> + 'a;

/// Where a shared CA lives. Implementations hold a lock across every
/// process sharing the store for the whole of [`transact`](Self::transact).
pub trait SharedCaStore: Send + Sync + fmt::Debug {
    /// Where the store is, for errors and logs (no credentials).
    fn location(&self) -> String;
    /// The stored journal alone, without locking (a follower's cheap check).
    fn journal(&self) -> Result<Option<Vec<u8>>, CaError>;
    /// Everything stored, without locking.
    fn load(&self) -> Result<SharedState, CaError>;
    /// Runs `step` once on what is stored, under the store's lock, and
    /// applies what it returns (nothing for `None`) atomically: either all
    /// of it is stored or none.
    fn transact(&self, step: &mut SharedStep<'_>) -> Result<(), CaError>;
}
