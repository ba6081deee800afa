//! Text from outside made safe to print: a connector's output, messages
//! and interaction texts reach the daemon's log and the operator's
//! terminal, where a raw newline would start a forged log line and an
//! escape sequence could rewrite what the terminal shows.
//!
//! Every control character (C0, DEL, C1), the Unicode line and paragraph
//! separators and the bidirectional overrides (which can reorder what a
//! line appears to say) are written as escapes: `\n`, `\r`, `\t`, and
//! `\u{1b}` for the rest. Everything else passes unchanged, so ordinary
//! text costs one scan and no copy.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every character that could break a line or steer a
/// terminal escaped.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        for (input, expected) in [
            ("plain text, ünïcode ✓", "plain text, ünïcode ✓"),
            ("ok\nWARN forged", "ok\\nWARN forged"),
            ("a\r\tb", "a\\r\\tb"),
            ("\u{1b}[2K\u{7}", "\\u{1b}[2K\\u{7}"),
            ("\u{0}\u{7f}\u{85}\u{9b}", "\\u{0}\\u{7f}\\u{85}\\u{9b}"),
            ("\u{202e}evil\u{2028}", "\\u{202e}evil\\u{2028}"),
        ] {
            assert_eq!(printable(input), expected, "{input:?}");
        }
        assert!(matches!(printable("clean"), Cow::Borrowed(_)));
    }
}
