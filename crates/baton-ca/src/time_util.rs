//! Conversions between `SystemTime` and the whole-second times certificates
//! and JWTs carry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

use crate::CaError;

/// Seconds since the epoch, 0 for times before it (only used in messages
/// and for values already known to be after 1970).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Drops sub-second precision, so what we report equals what the
/// certificate or token encodes.
pub(crate) fn floor_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_secs(t))
}

pub(crate) fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CaError> {
    let secs = i64::try_from(unix_secs(t)).map_err(|_| CaError::TimeOutOfRange(t))?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| CaError::TimeOutOfRange(t))
}

/// Converts a certificate's ASN.1 time; times before 1970 clamp to the epoch
/// (no certificate we care about starts that early).
pub(crate) fn from_unix_i64(secs: i64) -> SystemTime {
    u64::try_from(secs).map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(s))
}
