//! The text of a revocation stream entry (`r` of a `t=revoke` entry on
//! `{p}:revocations:v2`), format 2.
//!
//! One line per expiry: `EXP TOK TOK…` (lines separated by `\n`, fields by
//! one space), where `EXP` is the unix-seconds expiry shared by the ids of
//! the line (a token and its certificate share one; so do the credentials
//! a task issued within the same second) and each `TOK` is one id:
//!
//! - an id that is lower-case hex of even length (certificate serials,
//!   token `jti`s, digests) is written as `~` and the base64url (no
//!   padding) of its bytes: 32 hex digits take 23 characters;
//! - an id starting with `~` is written with one more `~` in front;
//! - any other id is written as it is.
//!
//! Format 1 (`{p}:revocations`, one `EXP ID` line per id) is read by older
//! followers only. It lives under another key on purpose: an older follower
//! reading format 2 under the old name would have misread it silently (it
//! skips lines it does not parse); under the new name it sees no entry at
//! all, not even heartbeats, goes stale and fails closed.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::RevocationError;

/// Whether `id` is written in its compact form.
fn is_lower_hex(id: &str) -> bool {
    !id.is_empty()
        && id.len().is_multiple_of(2)
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn push_token(out: &mut String, id: &str) {
    if is_lower_hex(id)
        && let Ok(bytes) = hex::decode(id)
    {
        out.push('~');
        out.push_str(&URL_SAFE_NO_PAD.encode(bytes));
    } else {
        if id.starts_with('~') {
            out.push('~');
        }
        out.push_str(id);
    }
}

/// The entry text for `(id, expiry)` pairs (ids valid for the store: no
/// whitespace). Lines come in ascending expiry; empty for no pair.
pub(crate) fn encode<'a>(entries: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut lines: BTreeMap<u64, String> = BTreeMap::new();
    for (id, exp) in entries {
        let line = lines.entry(exp).or_insert_with(|| exp.to_string());
        line.push(' ');
        push_token(line, id);
    }
    let mut out = String::with_capacity(lines.values().map(|l| l.len() + 1).sum());
    for line in lines.values() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    out
}

fn bad(line: usize, what: &str, value: &str) -> RevocationError {
    RevocationError::Protocol(format!(
        "revocation stream entry, line {line}: {what} {:?}",
        value.chars().take(64).collect::<String>()
    ))
}

fn decode_token(tok: &str, line: usize) -> Result<String, RevocationError> {
    match tok.strip_prefix('~') {
        None => Ok(tok.to_owned()),
        Some(rest) if rest.starts_with('~') => Ok(rest.to_owned()),
        Some(b64) => URL_SAFE_NO_PAD
            .decode(b64)
            .ok()
            .filter(|b| !b.is_empty())
            .map(hex::encode)
            .ok_or_else(|| bad(line, "id token is not base64url:", tok)),
    }
}

/// Every `(id, expiry)` of an entry's text, in the text's order. A line
/// that does not parse fails the whole entry (the follower resyncs from
/// the deny set rather than skip ids).
pub(crate) fn decode(text: &str) -> Result<Vec<(String, u64)>, RevocationError> {
    let mut out = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(' ');
        let exp_text = fields.next().unwrap_or_default();
        let exp = exp_text
            .parse::<u64>()
            .map_err(|_| bad(n + 1, "expiry is not unix seconds:", exp_text))?;
        for tok in fields {
            if tok.is_empty() {
                continue;
            }
            out.push((decode_token(tok, n + 1)?, exp));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_in_every_form() {
        let serial = "7a3f0b9c00112233445566778899aabb";
        let digest = "00".repeat(32);
        let pairs = [
            (serial, 2_000),
            ("lease-0123abcd", 2_000),
            ("~tilde", 1_500),
            ("~~two", 1_500),
            ("ABCDEF", 2_000),
            ("abc", 1_500),
            (digest.as_str(), 2_000),
            ("0a-b_C", 3_000),
        ];
        let text = encode(pairs.iter().map(|(i, e)| (*i, *e)));
        let mut got = decode(&text).unwrap();
        got.sort();
        let mut want: Vec<(String, u64)> =
            pairs.iter().map(|(i, e)| ((*i).to_owned(), *e)).collect();
        want.sort();
        assert_eq!(got, want);
        // One line per expiry, the expiry written once.
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(text.matches("2000").count(), 1, "{text}");
    }

    #[test]
    fn hex_ids_take_fewer_characters_than_their_text() {
        let serial = "7a3f0b9c00112233445566778899aabb";
        let text = encode([(serial, 1_700_000_000)]);
        assert_eq!(text, "1700000000 ~ej8LnAARIjNEVWZ3iJmquw");
        assert!(text.len() < "1700000000 ".len() + serial.len());
        // Upper-case and odd-length hex are not the canonical form: as they are.
        assert_eq!(encode([("7A3F", 5)]), "5 7A3F");
        assert_eq!(encode([("7a3", 5)]), "5 7a3");
        assert_eq!(encode(std::iter::empty()), "");
    }

    #[test]
    fn a_malformed_entry_fails_instead_of_skipping_ids() {
        // Control: a well-formed line.
        assert_eq!(decode("5 a b").unwrap(), [("a".into(), 5), ("b".into(), 5)]);
        // Format 1 text is one id per line: it parses (an id per line),
        // but a line whose first field is not a number does not.
        let err = |t: &str| decode(t).unwrap_err().to_string();
        assert!(err("x a").contains("line 1: expiry"), "{}", err("x a"));
        assert!(err("5 a\n5 ~!!").contains("line 2: id token"));
        assert!(err("5 ~").contains("id token"));
    }
}
