//! W3C Trace Context (`traceparent`): the trace an agent framework's request
//! belongs to, so Baton's spans and audit events join it.
//!
//! `traceparent: 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`,
//! lowercase; an all-zero trace or span id is invalid. A later version may
//! append `-` and more fields, which are ignored; version `ff` is invalid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The `traceparent` header's name (HTTP headers and gRPC metadata).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Longest `traceparent` value accepted (version 00 is 55 bytes; later
/// versions may add fields).
const MAX_LEN: usize = 256;

/// Why a `traceparent` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    #[error(
        "traceparent must be `version-trace_id-parent_id-flags` (e.g. 00-<32 hex>-<16 hex>-01)"
    )]
    Shape,
    #[error("traceparent is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("traceparent {field} must be {len} lowercase hex digits")]
    Hex { field: &'static str, len: usize },
    #[error("traceparent version ff is invalid")]
    Version,
    #[error("traceparent {0} must not be all zeros")]
    Zero(&'static str),
}

/// A trace id: 16 bytes, not all zero; 32 lowercase hex digits as text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId([u8; 16]);

impl TraceId {
    pub fn from_bytes(bytes: [u8; 16]) -> Result<Self, TraceContextError> {
        if bytes == [0; 16] {
            return Err(TraceContextError::Zero("trace id"));
        }
        Ok(Self(bytes))
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl FromStr for TraceId {
    type Err = TraceContextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(lower_hex("trace id", s)?)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A parsed `traceparent`: the caller's trace and the span Baton's span
/// continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The caller's span, the parent of Baton's (not all zero).
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl FromStr for TraceParent {
    type Err = TraceContextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(TraceContextError::TooLong);
        }
        let s = s.trim_matches([' ', '\t']);
        let mut parts = s.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TraceContextError::Shape);
        };
        let [version]: [u8; 1] = lower_hex("version", version)?;
        if version == 0xff {
            return Err(TraceContextError::Version);
        }
        // Version 00 has exactly four fields; a later one may add more.
        if version == 0 && parts.next().is_some() {
            return Err(TraceContextError::Shape);
        }
        let trace_id: TraceId = trace.parse()?;
        let parent_id: [u8; 8] = lower_hex("parent id", parent)?;
        if parent_id == [0; 8] {
            return Err(TraceContextError::Zero("parent id"));
        }
        let [flags]: [u8; 1] = lower_hex("flags", flags)?;
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            hex::encode(self.parent_id),
            self.flags
        )
    }
}

fn lower_hex<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], TraceContextError> {
    let err = TraceContextError::Hex { field, len: N * 2 };
    if s.len() != N * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(err);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_spec_example() {
        let tp: TraceParent = GOOD.parse().unwrap();
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), GOOD);
        let json = serde_json::to_string(&tp.trace_id).unwrap();
        assert_eq!(json, "\"4bf92f3577b34da6a3ce929d0e0e4736\"");
        assert_eq!(serde_json::from_str::<TraceId>(&json).unwrap(), tp.trace_id);
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let tp: TraceParent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
            .parse()
            .unwrap();
        assert!(!tp.sampled());
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<TraceId>("\"00000000000000000000000000000000\"").is_err());
        let long = format!("01-{}", "a".repeat(300));
        assert_eq!(long.parse::<TraceParent>(), Err(TraceContextError::TooLong));
    }
}
