//! Pure types shared by every Baton component.
//!
//! Nothing here does I/O. Values are validated when they are parsed (at the
//! edge: CLI flags, HTTP bodies, gRPC requests), so a bad SPIFFE ID or
//! selector never travels inward.

pub mod api;
pub mod budget;
pub mod delegation;
pub mod entry;
pub mod report_bounds;
pub mod scope;
pub mod secret;
pub mod selector;
pub mod spiffe_id;
pub mod text;
pub mod trace_context;

pub use delegation::{
    Actor, Confirmation, DelegationClaims, DelegationError, ParentRef, Purpose, RiskTier,
    TaskClaims, TaskId,
};
pub use entry::{Entry, EntryError, EntryId, NewEntry};
pub use scope::{Permission, Scope, ScopeError};
pub use secret::Secret;
pub use selector::{Selector, SelectorError, SelectorKind};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use trace_context::{TraceContextError, TraceId, TraceParent};
