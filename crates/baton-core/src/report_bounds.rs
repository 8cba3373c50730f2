//! The bounds the broker holds every tool-call report to, shared with the
//! servers that write reports: a gateway refuses a call whose record the
//! broker would refuse, before the call is forwarded, so no call runs
//! without a record the log can keep.

use std::collections::BTreeMap;

use crate::api::ToolCallReport;

/// Most clear-text fields one report may carry, and their sizes.
pub const MAX_RECORDED_FIELDS: usize = 64;
pub const MAX_RECORDED_KEY: usize = 256;
pub const MAX_RECORDED_VALUE: usize = 2048;
/// Longest justification a hop may carry (it goes into the audit log).
pub const MAX_JUSTIFICATION: usize = 2048;
/// Longest resource a report may name.
pub const MAX_RESOURCE: usize = 1024;
/// Longest tool name.
pub const MAX_TOOL: usize = 256;
/// Most entries of a report's list fields.
pub const MAX_LIST: usize = 64;

/// A report field outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct OutOfBounds {
    pub field: &'static str,
    pub message: String,
}

fn out(field: &'static str, message: impl Into<String>) -> OutOfBounds {
    OutOfBounds {
        field,
        message: message.into(),
    }
}

/// Clear-text fields (`recorded`, an approval's `shown`): at most
/// [`MAX_RECORDED_FIELDS`], names non-empty, short and without control
/// characters, values at most [`MAX_RECORDED_VALUE`] bytes.
pub fn check_recorded(
    field: &'static str,
    recorded: &BTreeMap<String, String>,
) -> Result<(), OutOfBounds> {
    if recorded.len() > MAX_RECORDED_FIELDS {
        return Err(out(
            field,
            format!("at most {MAX_RECORDED_FIELDS} recorded fields"),
        ));
    }
    for (k, v) in recorded {
        if k.is_empty() || k.len() > MAX_RECORDED_KEY || k.chars().any(char::is_control) {
            return Err(out(
                field,
                format!(
                    "field name {:?} is empty, over {MAX_RECORDED_KEY} bytes or has control characters",
                    k.escape_default().to_string()
                ),
            ));
        }
        if v.len() > MAX_RECORDED_VALUE {
            return Err(out(
                field,
                format!("the value of {k:?} is over {MAX_RECORDED_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

/// A resource a report may name: at most [`MAX_RESOURCE`] bytes, no
/// control characters.
pub fn check_resource(resource: &str) -> Result<(), OutOfBounds> {
    if resource.len() > MAX_RESOURCE {
        return Err(out(
            "resource",
            format!("resource is over {MAX_RESOURCE} bytes"),
        ));
    }
    if resource.chars().any(char::is_control) {
        return Err(out("resource", "resource has control characters"));
    }
    Ok(())
}

/// Longest policy id a record keeps (see [`recordable_policy_ids`]).
pub const MAX_POLICY_ID: usize = 256;

/// `ids` as a record may list them: at most [`MAX_LIST`] (past it, the
/// last entry says how many more decided), each within
/// [`MAX_POLICY_ID`] bytes without control characters (else only its
/// size). A call's deciding policies are the operator's, not a caller's,
/// but a record the log refuses would leave the call unrecorded.
pub fn recordable_policy_ids(ids: &mut Vec<String>) {
    for id in ids.iter_mut() {
        if id.len() > MAX_POLICY_ID || id.chars().any(char::is_control) {
            *id = format!("(unrecordable policy id: {} bytes)", id.len());
        }
    }
    if ids.len() > MAX_LIST {
        let more = ids.len() - (MAX_LIST - 1);
        ids.truncate(MAX_LIST - 1);
        ids.push(format!("(and {more} more policies)"));
    }
}

/// `resource` as a record may name it: itself when within bounds, else
/// only its size (a refusal's record keeps no text the log would refuse).
pub fn recordable_resource(resource: &str) -> String {
    match check_resource(resource) {
        Ok(()) => resource.to_owned(),
        Err(_) => format!("(unrecordable: {} bytes)", resource.len()),
    }
}

/// A tool name as a record may carry it: itself when within
/// [`MAX_TOOL`] bytes without control characters, else only its size.
pub fn recordable_tool(tool: &str) -> String {
    if tool.len() > MAX_TOOL || tool.chars().any(char::is_control) {
        format!("(unrecordable tool name: {} bytes)", tool.len())
    } else {
        tool.to_owned()
    }
}

/// Longest reason a record keeps of a refusal's own text (a request
/// line, a tool name) before it is cut.
pub const MAX_REFUSAL_REASON: usize = 1024;

impl ToolCallReport {
    /// Every caller-chosen text of the report within its bounds: a
    /// reporter cannot make the audit log a copy of its traffic through
    /// any field, and a resource taken from a call's arguments stays one
    /// short line.
    pub fn check_bounds(&self) -> Result<(), OutOfBounds> {
        let prose = |field: &'static str, v: &str, max: usize| {
            if v.len() > max {
                return Err(out(field, format!("{field} is over {max} bytes")));
            }
            Ok(())
        };
        let text = |field: &'static str, v: &str, max: usize| {
            prose(field, v, max)?;
            if v.chars().any(char::is_control) {
                return Err(out(field, format!("{field} has control characters")));
            }
            Ok(())
        };
        let list = |field: &'static str, l: &[String], max: usize| {
            if l.len() > MAX_LIST {
                return Err(out(field, format!("{field} has over {MAX_LIST} entries")));
            }
            l.iter().try_for_each(|v| text(field, v, max))
        };
        text("report_id", &self.report_id, 128)?;
        text("token_jti", &self.token_jti, 128)?;
        text("tool", &self.tool, MAX_TOOL)?;
        check_resource(&self.resource)?;
        text("input_digest", &self.input_digest, 256)?;
        text(
            "output_digest",
            self.output_digest.as_deref().unwrap_or_default(),
            256,
        )?;
        prose(
            "justification",
            self.justification.as_deref().unwrap_or_default(),
            MAX_JUSTIFICATION,
        )?;
        prose("reason", self.reason.as_deref().unwrap_or_default(), 4096)?;
        list("scope_used", &self.scope_used, 256)?;
        list("policy_ids", &self.policy_ids, MAX_POLICY_ID)?;
        check_recorded("recorded", &self.recorded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(resource: &str) -> ToolCallReport {
        serde_json::from_value(serde_json::json!({
            "report_id": "r-1", "task_id": "task-0123456789abcdef0123456789abcdef",
            "token_jti": "j", "agent": "spiffe://example.org/a", "tool": "crm.search",
            "resource": resource, "risk": "read", "scope_used": [], "input_digest": "00",
            "decision": "allow", "policy_ids": [], "at": 1,
        }))
        .unwrap()
    }

    #[test]
    fn names_the_field_out_of_bounds() {
        assert_eq!(report(&"a".repeat(MAX_RESOURCE)).check_bounds(), Ok(()));
        let long = report(&"a".repeat(MAX_RESOURCE + 1))
            .check_bounds()
            .unwrap_err();
        assert_eq!(long.field, "resource");
        let newline = report("case/1\ncase/2").check_bounds().unwrap_err();
        assert_eq!(newline.field, "resource");
        let mut r = report("case/1");
        r.recorded
            .insert("input:/a".into(), "x".repeat(MAX_RECORDED_VALUE + 1));
        assert_eq!(r.check_bounds().unwrap_err().field, "recorded");
    }
}

/// Deserializers that stop at a report's bounds while parsing: a list or
/// map past its bound is an error at its first extra entry, so a hostile
/// body (a million empty strings in `scope_used`) never becomes a million
/// values in memory before [`check`]'s refusal.
pub mod bounded {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    struct Seq<T> {
        max: usize,
        field: &'static str,
        item: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Seq<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}: a list of at most {} entries", self.field, self.max)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                if items.len() == self.max {
                    return Err(A::Error::custom(format!(
                        "{}: more than {} entries",
                        self.field, self.max
                    )));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    struct Map {
        max: usize,
        field: &'static str,
    }

    impl<'de> Visitor<'de> for Map {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{}: an object of at most {} fields",
                self.field, self.max
            )
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if fields.len() == self.max {
                    return Err(A::Error::custom(format!(
                        "{}: more than {} fields",
                        self.field, self.max
                    )));
                }
                fields.insert(k, v);
            }
            Ok(fields)
        }
    }

    /// A list of at most `max` entries, named `field` in the error.
    pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
        max: usize,
        field: &'static str,
    ) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(Seq {
            max,
            field,
            item: PhantomData,
        })
    }

    pub fn scope_used<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        seq(d, super::MAX_LIST, "scope_used")
    }

    pub fn policy_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        seq(d, super::MAX_LIST, "policy_ids")
    }

    pub fn recorded<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Map {
            max: super::MAX_RECORDED_FIELDS,
            field: "recorded",
        })
    }

    pub fn shown<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Map {
            max: super::MAX_RECORDED_FIELDS,
            field: "shown",
        })
    }
}
