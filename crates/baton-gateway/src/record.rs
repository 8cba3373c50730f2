//! What a route or MCP tool keeps of its calls in clear text. By default a
//! call's input and output are in the audit log only as keyed HMAC digests;
//! a route may name fields to keep readable:
//!
//! - `record-headers`: request headers (never ones that carry credentials);
//! - `record-input`: JSON Pointers (RFC 6901) into the request's JSON body
//!   (for an MCP tool: into the call's `arguments`);
//! - `record-output`: JSON Pointers into the answer's JSON body (for an MCP
//!   tool: into the JSON-RPC `result`), when the answer is JSON and not
//!   streamed;
//! - `redact`: JSON Pointers whose values are replaced by `[redacted]`
//!   wherever they fall inside a recorded field (in the input or the
//!   output).
//!
//! Whatever the route names, the keyed digest of a request's query string
//! is recorded (`request:query-digest`): frameworks merge query parameters
//! with the body's, so what the upstream acts on is not the body alone,
//! and a query claimed later can be checked against the record. Like the
//! input's, it is a digest by default: a query may carry what the route
//! does not name for clear text.
//!
//! Whatever the configuration says, values that look like credentials are
//! redacted too: object members named like secrets (`password`, `token`,
//! `api_key`, `authorization`, ...) and strings shaped like one (a JWT, a
//! PEM block, `Bearer ...`, well-known API-key prefixes). Each recorded
//! value is compact JSON cut at [`MAX_FIELD_CHARS`] characters, so a
//! route cannot turn the audit log into a copy of the traffic.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Most characters of one recorded value (longer ones are cut, marked).
pub const MAX_FIELD_CHARS: usize = 256;
/// Most pointers in each of `record-input`, `record-output`, `redact`
/// (and headers in `record-headers`): with the three lists full, a record
/// stays within the 64 fields the audit log keeps.
pub const MAX_POINTERS: usize = 16;
/// Longest pointer or header name: its field's name (`output:` and it)
/// stays within the 256 bytes the audit log keeps.
pub const MAX_NAME: usize = 200;
/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// The clear-text fields of one route or MCP tool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub headers: Vec<HeaderName>,
    pub input: Vec<String>,
    pub output: Vec<String>,
    pub redact: Vec<String>,
}

/// Checks one list of JSON Pointers: `Err` says what is wrong.
pub(crate) fn pointers(list: &[String]) -> Result<Vec<String>, String> {
    if list.len() > MAX_POINTERS {
        return Err(format!("at most {MAX_POINTERS} entries"));
    }
    for p in list {
        if !p.starts_with('/') || p.len() < 2 {
            return Err(format!(
                "{p:?} is not a JSON Pointer to a field (RFC 6901: \"/name\", \"/outer/inner\", \"/items/0\")"
            ));
        }
        if p.chars().any(char::is_control) {
            return Err(format!("{p:?} contains control characters"));
        }
        if p.len() > MAX_NAME {
            return Err(format!("{p:?} is over {MAX_NAME} bytes"));
        }
        let mut rest = p.as_str();
        while let Some(i) = rest.find('~') {
            let next = rest.get(i + 1..i + 2);
            if next != Some("0") && next != Some("1") {
                return Err(format!("{p:?}: `~` must be `~0` or `~1` (RFC 6901)"));
            }
            rest = rest.get(i + 2..).unwrap_or_default();
        }
    }
    Ok(list.to_vec())
}

impl Recording {
    /// Nothing is recorded in clear text.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.input.is_empty() && self.output.is_empty()
    }

    /// Whether the request's body can be recorded (and shown to an
    /// approver) as the upstream reads it, on a route that records input
    /// fields. Refused: a body not typed JSON (`json_typed`: a form or
    /// text body that also parses as JSON would be recorded as one thing
    /// and acted on as another), a body that is not JSON, and a JSON body
    /// with a member name repeated, or repeated but for case, in any
    /// object (this gateway reads the last one, an upstream perhaps the
    /// first, or, as Go does, either spelling). An empty body records
    /// its fields as absent.
    pub fn check_input(&self, json_typed: bool, body: &[u8]) -> Result<(), InputRefused> {
        if self.input.is_empty() || body.is_empty() {
            return Ok(());
        }
        if !json_typed {
            return Err(InputRefused::NotJsonTyped);
        }
        if let Err(e) = within_value_bound(body) {
            return Err(InputRefused::Unreadable(e));
        }
        let mut d = serde_json::Deserializer::from_slice(body);
        Unique::deserialize(&mut d)
            .and_then(|_| d.end())
            .map_err(|e| InputRefused::Unreadable(e.to_string()))?;
        let doc: Value =
            serde_json::from_slice(body).map_err(|e| InputRefused::Unreadable(e.to_string()))?;
        match self.look_alike_input(&doc) {
            Some(why) => Err(InputRefused::Unreadable(why)),
            None => Ok(()),
        }
    }

    /// A member of `doc` spelled otherwise than a recorded input field's
    /// name but the same to a case-insensitive reader (`AMOUNT` for
    /// `/amount`; Go's encoding/json also folds `ſ` to `s`): the record
    /// (and an approver) would show the field absent while such an
    /// upstream acts on it. Says which, if any.
    pub fn look_alike_input(&self, doc: &Value) -> Option<String> {
        for pointer in &self.input {
            let mut at = doc;
            for raw in pointer.split('/').skip(1) {
                let seg = raw.replace("~1", "/").replace("~0", "~");
                let next = match at {
                    Value::Object(members) => match members.get(&seg) {
                        Some(v) => Some(v),
                        None => {
                            let want = fold(&seg);
                            if let Some(other) = members.keys().find(|k| fold(k) == want) {
                                return Some(format!(
                                    "member {other:?} is the recorded field {seg:?} ({pointer}) to a case-insensitive reader, but not to the record: send it as {seg:?}"
                                ));
                            }
                            None
                        }
                    },
                    Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
                    _ => None,
                };
                match next {
                    Some(v) => at = v,
                    None => break,
                }
            }
        }
        None
    }

    /// The request's recorded headers and input fields (`body` parsed as
    /// JSON when an input field is named; a body that is not JSON records
    /// that, not its bytes).
    pub fn request_fields(&self, headers: &HeaderMap, body: &[u8]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for h in &self.headers {
            // Every value the upstream gets, in order.
            let values: Vec<String> = headers
                .get_all(h)
                .iter()
                .map(|v| {
                    v.to_str().map_or_else(
                        |_| "(not text)".to_owned(),
                        |t| {
                            if looks_like_credential(t) {
                                REDACTED.to_owned()
                            } else {
                                t.to_owned()
                            }
                        },
                    )
                })
                .collect();
            if !values.is_empty() {
                out.insert(format!("header:{h}"), cut(&values.join(", ")));
            }
        }
        if !self.input.is_empty() {
            match parse_bounded(body) {
                Ok(doc) => self.fields("input", &self.input, &doc, &mut out),
                Err(_) => {
                    out.insert("input".into(), "(not JSON)".into());
                }
            }
        }
        out
    }

    /// The distinct top-level members of the request body that
    /// `record-input` names (`amount` of `/amount`, `payment` of
    /// `/payment/amount`), unescaped: a request must not name them again
    /// as query or form parameters, which some frameworks merge with the
    /// body's (see `recorded_field_override` in the gateway).
    pub fn input_roots(&self) -> Vec<String> {
        let mut roots: Vec<String> = Vec::new();
        for p in &self.input {
            let root = input_root(p);
            if !root.is_empty() && !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }

    /// The recorded input fields of an already parsed document (an MCP
    /// call's arguments).
    pub fn input_fields(&self, doc: &Value) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        self.fields("input", &self.input, doc, &mut out);
        out
    }

    /// The recorded output fields of an answer's JSON body.
    pub fn output_fields(&self, body: &[u8]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.output.is_empty() {
            return out;
        }
        // Bounded as request bodies are: an 8 MiB answer of tiny values
        // would otherwise take some 40 times its size to parse.
        match parse_bounded(body) {
            Ok(doc) => self.fields("output", &self.output, &doc, &mut out),
            Err(_) => {
                out.insert(
                    "output".into(),
                    format!("(not JSON, or more than {MAX_JSON_VALUES} values)"),
                );
            }
        }
        out
    }

    /// The recorded output fields of an already parsed document (an MCP
    /// answer's `result`).
    pub fn output_fields_of(&self, doc: &Value) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        self.fields("output", &self.output, doc, &mut out);
        out
    }

    fn fields(
        &self,
        side: &str,
        wanted: &[String],
        doc: &Value,
        out: &mut BTreeMap<String, String>,
    ) {
        for p in wanted {
            let key = format!("{side}:{p}");
            let Some(v) = doc.pointer(p) else {
                out.insert(key, "(absent)".into());
                continue;
            };
            // A redact pointer at or above this field hides all of it.
            if self.redact.iter().any(|r| is_within(p, r)) {
                out.insert(key, REDACTED.into());
                continue;
            }
            let mut v = v.clone();
            for r in &self.redact {
                if let Some(inner) = r.strip_prefix(p.as_str())
                    && inner.starts_with('/')
                    && let Some(slot) = v.pointer_mut(inner)
                {
                    *slot = Value::String(REDACTED.into());
                }
            }
            scrub(&mut v);
            let text = match &v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.insert(key, cut(&text));
        }
    }
}

/// The top-level member a JSON Pointer starts at, unescaped (RFC 6901:
/// `~1` is `/`, `~0` is `~`): `payment` of `/payment/amount`.
pub(crate) fn input_root(pointer: &str) -> String {
    let first = pointer.split('/').nth(1).unwrap_or_default();
    first.replace("~1", "/").replace("~0", "~")
}

/// The recorded field that holds the keyed digest of a request's query
/// string, kept for every call that has one.
pub const QUERY_FIELD: &str = "request:query-digest";

/// Most JSON values a request body the gateway parses may hold. A parsed
/// value takes some 70–100 bytes, so an 8 MiB body of `[0,0,…]` would
/// take some 50 times its size; bounded, a parse takes at most a few MiB
/// beside the body's own strings.
pub const MAX_JSON_VALUES: usize = 100_000;

/// Refuses, before parsing, a JSON text with more than [`MAX_JSON_VALUES`]
/// values.
pub(crate) fn within_value_bound(body: &[u8]) -> Result<(), String> {
    count_values(body, MAX_JSON_VALUES).map(drop)
}

/// How many values a JSON text holds at most, counted without parsing:
/// the `[`, `{` and `,` outside strings (each starts or separates a
/// value), plus one; refused past `max`.
pub(crate) fn count_values(body: &[u8], max: usize) -> Result<usize, String> {
    let (mut values, mut in_string, mut escaped) = (1usize, false, false);
    for b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' | b',' => values += 1,
                _ => {}
            }
        }
        if values > max {
            return Err(format!("the JSON body holds more than {max} values"));
        }
    }
    Ok(values)
}

/// A request body parsed as JSON within [`MAX_JSON_VALUES`].
pub(crate) fn parse_bounded(body: &[u8]) -> Result<Value, String> {
    within_value_bound(body)?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Why a route that records its input refused a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputRefused {
    NotJsonTyped,
    Unreadable(String),
}

impl InputRefused {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::NotJsonTyped => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unreadable(_) => http::StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for InputRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotJsonTyped => f.write_str(
                "this route records fields of its JSON input: a request body must be sent as application/json (one Content-Type, well formed), so that the record and an approver see what the upstream reads",
            ),
            Self::Unreadable(e) => write!(
                f,
                "the JSON body cannot be recorded as the upstream reads it ({e}); this route records its input"
            ),
        }
    }
}

/// A key as a server that matches keys without case reads it: upper then
/// lower case, so `ſ`, `K` (Kelvin), `µ`, `ς` fold as Go folds them (to `s`,
/// `k`, `μ`, `σ`).
pub(crate) fn fold(k: &str) -> String {
    k.to_uppercase().to_lowercase()
}

/// The start of the error a repeated member name gives.
const DUPLICATE: &str = "duplicate member";

/// Any JSON value, read only to find a repeated member name in an object
/// at any depth (serde_json keeps the last one silently).
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut folded = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE} {key:?}")));
            }
            if !folded.insert(fold(&key)) {
                return Err(de::Error::custom(format!(
                    "member {key:?} repeats another but for case"
                )));
            }
            map.next_value::<Unique>()?;
            seen.insert(key);
        }
        Ok(Unique)
    }
}

/// Whether pointer `field` is `outer` or inside it.
fn is_within(field: &str, outer: &str) -> bool {
    field == outer
        || field
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Redacts, in place, members named like secrets and strings shaped like
/// credentials, at any depth.
fn scrub(v: &mut Value) {
    match v {
        Value::String(s) if looks_like_credential(s) => *s = REDACTED.into(),
        Value::Array(items) => items.iter_mut().for_each(scrub),
        Value::Object(members) => {
            for (name, member) in members.iter_mut() {
                if secret_name(name) {
                    *member = Value::String(REDACTED.into());
                } else {
                    scrub(member);
                }
            }
        }
        _ => {}
    }
}

/// A member name that says its value is a secret.
fn secret_name(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const EXACT: [&str; 8] = [
        "authorization",
        "cookie",
        "setcookie",
        "credential",
        "credentials",
        "passphrase",
        "pin",
        "cvv",
    ];
    const WITHIN: [&str; 6] = [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "privatekey",
    ];
    EXACT.contains(&n.as_str()) || WITHIN.iter().any(|w| n.contains(w))
}

/// A string shaped like a credential.
fn looks_like_credential(s: &str) -> bool {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let jwt = t.starts_with("eyJ") && t.matches('.').count() >= 2;
    const PREFIXES: [&str; 9] = [
        "bearer ", "basic ", "sk-", "sk_live_", "rk_live_", "ghp_", "gho_", "xoxb-", "xoxp-",
    ];
    jwt || t.contains("-----BEGIN")
        || PREFIXES.iter().any(|p| lower.starts_with(p))
        || (t.len() == 20 && t.starts_with("AKIA") && t.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// `text` cut at [`MAX_FIELD_CHARS`] characters, the cut marked.
fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!(
            "{}…(cut, {} bytes in all)",
            text.get(..end).unwrap_or_default(),
            text.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(input: &[&str], redact: &[&str]) -> Recording {
        Recording {
            input: input.iter().map(|s| (*s).to_owned()).collect(),
            redact: redact.iter().map(|s| (*s).to_owned()).collect(),
            ..Recording::default()
        }
    }

    #[test]
    fn named_fields_are_kept_and_the_rest_is_not() {
        let r = rec(&["/account", "/amount", "/missing"], &[]);
        let f = r.request_fields(
            &HeaderMap::new(),
            br#"{"account":"acme","amount":12.5,"note":"private"}"#,
        );
        assert_eq!(f["input:/account"], "acme");
        assert_eq!(f["input:/amount"], "12.5");
        assert_eq!(f["input:/missing"], "(absent)");
        assert!(!f.values().any(|v| v.contains("private")), "{f:?}");
        assert_eq!(
            r.request_fields(&HeaderMap::new(), b"not json")["input"],
            "(not JSON)"
        );
    }

    #[test]
    fn configured_and_secret_looking_values_are_redacted() {
        let r = rec(&["/customer", "/card"], &["/customer/ssn", "/card"]);
        let body = serde_json::json!({
            "customer": {
                "name": "Ada",
                "ssn": "123-45-6789",
                "api_key": "abc",
                "note": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
                "keys": ["-----BEGIN PRIVATE KEY-----\nAAA", "ok"],
                "auth": "Bearer abc.def",
            },
            "card": {"number": "4111"},
        });
        let f = r.input_fields(&body);
        let customer = &f["input:/customer"];
        assert!(customer.contains("Ada"), "{customer}");
        for secret in ["123-45-6789", "abc", "eyJhbGci", "BEGIN", "Bearer"] {
            assert!(!customer.contains(secret), "{secret} in {customer}");
        }
        assert!(customer.contains("\"ok\""), "{customer}");
        assert_eq!(f["input:/card"], REDACTED);
        let deep = rec(&["/card/number"], &["/card"]).input_fields(&body);
        assert_eq!(deep["input:/card/number"], REDACTED);
    }

    #[test]
    fn long_values_are_cut_and_pointers_are_checked() {
        let long = "x".repeat(1000);
        let f = rec(&["/a"], &[]).input_fields(&serde_json::json!({ "a": long }));
        assert!(f["input:/a"].contains("cut, 1000 bytes"), "{f:?}");
        assert!(f["input:/a"].chars().count() < 300);
        assert!(pointers(&["/a/b".into(), "/items/0".into(), "/a~1b".into()]).is_ok());
        for bad in ["a", "/", "/a~2", "/a\n"] {
            assert!(pointers(&[bad.to_owned()]).is_err(), "{bad:?}");
        }
        assert!(pointers(&vec!["/a".to_owned(); MAX_POINTERS + 1]).is_err());
        assert!(pointers(&[format!("/{}", "a".repeat(MAX_NAME))]).is_err());
        assert!(pointers(&[format!("/{}", "a".repeat(MAX_NAME - 1))]).is_ok());
    }

    #[test]
    fn a_json_body_with_too_many_values_is_refused_before_it_is_parsed() {
        let many = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        let err = parse_bounded(many.as_bytes()).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        let nested = format!(
            "{}{}",
            "[".repeat(MAX_JSON_VALUES),
            "]".repeat(MAX_JSON_VALUES)
        );
        assert!(within_value_bound(nested.as_bytes()).is_err());
        assert!(matches!(
            rec(&["/a"], &[]).check_input(true, many.as_bytes()),
            Err(InputRefused::Unreadable(_))
        ));
        // Controls: commas, brackets and escaped quotes inside strings are
        // not values; a body just within the bound parses.
        let text = format!(r#"{{"a":"{}\",[{{"}}"#, ",".repeat(MAX_JSON_VALUES * 2));
        assert!(parse_bounded(text.as_bytes()).is_ok(), "{}", &text[..20]);
        let within = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES - 2));
        assert!(parse_bounded(within.as_bytes()).is_ok());
    }

    #[test]
    fn a_body_the_upstream_could_read_otherwise_is_refused_where_input_is_recorded() {
        let r = rec(&["/status"], &[]);
        for body in [
            br#"{"status":"open","status":"closed"}"#.as_slice(),
            br#"{"a":[{"b":1,"b":2}]}"#.as_slice(),
            // Go's encoding/json matches keys without case.
            br#"{"status":"open","STATUS":"closed"}"#.as_slice(),
            "{\"a\":{\"Kelvin\":1,\"\u{212a}elvin\":2}}".as_bytes(),
            // Not JSON, or JSON with more after it.
            b"plain text".as_slice(),
            br#"{"status":"open"} {"status":"closed"}"#.as_slice(),
            // The recorded field under another spelling only: recorded as
            // absent, read by Go as the field.
            br#"{"STATUS":"closed"}"#.as_slice(),
            "{\"\u{17f}tatus\":\"closed\"}".as_bytes(),
        ] {
            let err = r.check_input(true, body).unwrap_err();
            assert!(
                matches!(err, InputRefused::Unreadable(_)),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        // A form or text body that also parses as JSON: the upstream reads
        // it as what its type says.
        assert_eq!(
            r.check_input(false, br#"{"status":"open","x":"&status=closed"}"#),
            Err(InputRefused::NotJsonTyped)
        );
        // Controls: unique names typed JSON, an empty body, a route that
        // records no input.
        assert!(
            r.check_input(true, br#"{"status":"open","a":{"status":1}}"#)
                .is_ok()
        );
        assert!(
            r.check_input(true, br#"{"note":"no status at all"}"#)
                .is_ok()
        );
        let deep = rec(&["/payment/amount"], &[]);
        assert!(
            deep.check_input(true, br#"{"payment":{"amount":1}}"#)
                .is_ok()
        );
        assert!(
            deep.check_input(true, br#"{"Payment":{"amount":1}}"#)
                .is_err()
        );
        assert!(
            deep.check_input(true, br#"{"payment":{"AMOUNT":1}}"#)
                .is_err()
        );
        assert!(r.check_input(false, b"").is_ok());
        assert!(
            rec(&[], &[])
                .check_input(false, br#"{"status":"open","status":"closed"}"#)
                .is_ok()
        );
    }

    /// A request's query is recorded raw, but for the values of secrets
    /// (by name or by shape); one longer than a field's bound is cut, with
    /// the keyed digest of the whole, so its record stays within what the
    /// log keeps.
    #[test]
    fn input_roots_are_the_top_level_members_recorded() {
        let r = rec(
            &[
                "/amount",
                "/payment/to",
                "/payment/from",
                "/a~1b",
                "/c~0d/e",
            ],
            &[],
        );
        assert_eq!(r.input_roots(), vec!["amount", "payment", "a/b", "c~d"]);
        assert!(rec(&[], &[]).input_roots().is_empty());
    }

    #[test]
    fn headers_that_hold_credentials_are_redacted() {
        let r = Recording {
            headers: vec![
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-api"),
            ],
            ..Recording::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "req-1".parse().unwrap());
        h.insert("x-api", "Bearer secret".parse().unwrap());
        let f = r.request_fields(&h, b"");
        assert_eq!(f["header:x-request-id"], "req-1");
        assert_eq!(f["header:x-api"], REDACTED);
    }
}
