//! Text from callers shown to a human (a terminal, a log line): control
//! characters and the invisible characters that change how the text around
//! them reads are shown escaped, so that a recorded field cannot draw a
//! forged line, move the cursor, or reverse what an operator reads.

/// Whether `c` shows as nothing (or as blank) yet is text: Unicode's
/// default-ignorable code points and format characters (bidi overrides
/// and isolates, zero-width characters, the soft hyphen, the byte-order
/// mark, variation selectors, tag characters that smuggle text a human
/// never sees, Hangul fillers), the line and paragraph separators, and the
/// blank Braille pattern, which draws as nothing but is not whitespace (a
/// name of only `U+2800` looks empty, and trimming does not remove it).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{034f}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061c}'
            | '\u{06dd}'
            | '\u{070f}'
            | '\u{08e2}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}'
    )
}

/// Whether `c` must not reach a human's screen as it is.
pub fn is_unsafe_to_show(c: char) -> bool {
    c.is_control() || is_invisible(c)
}

/// `text` with its control characters (newlines, escapes) written as Rust
/// escapes (`\n`, `\u{1b}`) and its invisible ones as `\u{..}`; everything
/// else as it is. Idempotent on its own output.
pub fn controls_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else if is_invisible(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::controls_escaped;

    #[test]
    fn controls_and_invisible_characters_are_shown_escaped_and_the_rest_as_it_is() {
        assert_eq!(
            controls_escaped("vendor 10 ünïcödé €"),
            "vendor 10 ünïcödé €"
        );
        assert_eq!(controls_escaped("a\nb"), "a\\nb");
        assert_eq!(controls_escaped("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(
            controls_escaped("inv\u{202e}fdp.exe"),
            "inv\\u{202e}fdp.exe"
        );
        assert_eq!(
            controls_escaped("a\u{200b}b\u{2028}c"),
            "a\\u{200b}b\\u{2028}c"
        );
        // Tag characters (text no one sees), a variation selector, a
        // Hangul filler, an interlinear annotation anchor, a C1 control.
        assert_eq!(
            controls_escaped("ok\u{e0041}\u{e0042}\u{fe0f}\u{3164}\u{fff9}\u{85}"),
            "ok\\u{e0041}\\u{e0042}\\u{fe0f}\\u{3164}\\u{fff9}\\u{85}"
        );
        // The blank Braille pattern: looks empty, is not whitespace.
        assert_eq!(controls_escaped("to \u{2800}"), "to \\u{2800}");
        assert_eq!(controls_escaped("\u{2801}"), "\u{2801}");
        let once = controls_escaped("x\u{1b}\n\u{202e}");
        assert_eq!(controls_escaped(&once), once);
    }
}
