//! The audit log is opened for power-loss durability unless asked otherwise:
//! an event whose receipt was returned must survive a power cut.

use baton_audit::Durability;

#[test]
fn logs_are_fsynced_on_every_append_by_default() {
    // `AuditLog::open` uses the default; `PowerLoss` is `synchronous=FULL`.
    assert_eq!(Durability::default(), Durability::PowerLoss);
}
