//! Pure types shared by every Baton component.
//!
//! Nothing here does I/O. Values are validated when they are parsed (at the
//! edge: CLI flags, HTTP bodies, gRPC requests), so a bad SPIFFE ID or
//! selector never travels inward.

pub mod api;
pub mod entry;
pub mod secret;
pub mod selector;
pub mod spiffe_id;

pub use entry::{Entry, EntryError, EntryId, NewEntry};
pub use secret::Secret;
pub use selector::{Selector, SelectorError, SelectorKind};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
