//! Making text that a peer controls safe to log or print. Certificate names
//! and labels (up to ~64 KB), error messages that quote peer data and
//! `last_error` all go through [`sanitize`] (or [`name`] / [`error`]) before
//! they reach a log line or a terminal, so a newline cannot forge a log line,
//! an escape sequence cannot reach the terminal, a bidi override cannot make
//! text read differently from what it is, and a huge label cannot flood.

use std::fmt::{Display, Write};

/// Output limit, in characters, for a name or label.
pub const NAME_MAX: usize = 128;
/// Output limit, in characters, for an error message.
pub const ERROR_MAX: usize = 512;

/// A peer-supplied name or label, escaped and cut to [`NAME_MAX`] characters.
pub fn name(text: &str) -> String {
    sanitize(text, NAME_MAX)
}

/// An error (with its whole `{:#}` chain for anyhow errors), escaped and cut to
/// [`ERROR_MAX`] characters.
pub fn error(err: &(impl Display + ?Sized)) -> String {
    sanitize(&format!("{err:#}"), ERROR_MAX)
}

/// Escapes `text` and cuts it to at most `max_chars` characters.
///
/// Escaped, so that the output holds no control or invisible formatting
/// character and reads back unambiguously: `\` as `\\`, `"` as `\"`, tab,
/// CR and LF as `\t`, `\r`, `\n`, other ASCII controls and DEL as `\xHH`,
/// and C1 controls, bidi controls, zero-width characters, line and paragraph
/// separators and other format characters as `\u{HHHH}`.
///
/// Cut, when the escaped text is longer than `max_chars`, at a character
/// boundary (never inside an escape), followed by `…(+N bytes)` where N
/// counts the bytes of `text` left out; the marker counts toward
/// `max_chars`. Work and memory are bounded by `max_chars`, not by the length
/// of `text`.
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut out_chars = 0;
    // (output bytes, output chars, input bytes) after each whole escape, so
    // the cut can step back to make room for the marker.
    let mut cuts = vec![(0, 0, 0)];
    for (at, c) in text.char_indices() {
        let before = out.len();
        push_escaped(&mut out, c);
        out_chars += out[before..].chars().count();
        if out_chars > max_chars {
            return with_marker(out, &cuts, text.len(), max_chars);
        }
        cuts.push((out.len(), out_chars, at + c.len_utf8()));
    }
    out
}

/// Cuts `out` at the last recorded boundary that leaves room for the marker.
fn with_marker(
    mut out: String,
    cuts: &[(usize, usize, usize)],
    input_len: usize,
    max_chars: usize,
) -> String {
    for &(out_bytes, out_chars, in_bytes) in cuts.iter().rev() {
        let marker = format!("…(+{} bytes)", input_len - in_bytes);
        if out_chars + marker.chars().count() <= max_chars {
            out.truncate(out_bytes);
            out.push_str(&marker);
            return out;
        }
    }
    // Not even the marker fits: say only that something was cut.
    "…".chars().take(max_chars).collect()
}

fn push_escaped(out: &mut String, c: char) {
    // `write!` to a String cannot fail.
    let _ = match c {
        '\\' => out.write_str("\\\\"),
        '"' => out.write_str("\\\""),
        '\t' => out.write_str("\\t"),
        '\r' => out.write_str("\\r"),
        '\n' => out.write_str("\\n"),
        c if c.is_ascii_control() => write!(out, "\\x{:02x}", u32::from(c)),
        c if needs_escape(c) => write!(out, "\\u{{{:x}}}", u32::from(c)),
        c => out.write_char(c),
    };
}

/// Non-ASCII characters that are shown escaped: control characters (C1) and
/// the characters that are invisible or change how the text around them is
/// displayed (Unicode general categories Cf, Zl and Zp).
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            u32::from(c),
            0x00AD // soft hyphen
            | 0x0600..=0x0605 // Arabic number signs
            | 0x061C // Arabic letter mark (bidi)
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E // Mongolian vowel separator
            | 0x200B..=0x200F // zero-width space, (non-)joiner, LRM, RLM
            | 0x2028..=0x202E // line/paragraph separators, bidi embeddings and overrides
            | 0x2060..=0x2064 // word joiner, invisible operators
            | 0x2066..=0x206F // bidi isolates, deprecated format characters
            | 0xFEFF // zero-width no-break space (BOM)
            | 0xFFF9..=0xFFFB // interlinear annotations
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE007F // tags: invisible ASCII look-alikes (and unassigned)
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(sanitize("node-1.example", NAME_MAX), "node-1.example");
        assert_eq!(
            sanitize("Zoë's laptop, 東京", NAME_MAX),
            "Zoë's laptop, 東京"
        );
        assert_eq!(sanitize("", 0), "");
    }

    #[test]
    fn a_newline_cannot_forge_a_log_line() {
        let forged = "n1\n2026-01-01T00:00:00Z INFO keyd: peer n9 admitted";
        let s = sanitize(forged, ERROR_MAX);
        assert!(!s.contains('\n'), "{s}");
        assert!(s.starts_with("n1\\n2026"), "{s}");
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(
            sanitize("a\x1b[31mb\r\t\0\x7f", NAME_MAX),
            "a\\x1b[31mb\\r\\t\\x00\\x7f"
        );
        assert_eq!(sanitize("\u{9b}31m\u{85}", NAME_MAX), "\\u{9b}31m\\u{85}");
    }

    #[test]
    fn bidi_and_invisible_characters_are_escaped() {
        assert_eq!(
            sanitize("evil\u{202e}gpj.exe", NAME_MAX),
            "evil\\u{202e}gpj.exe"
        );
        assert_eq!(
            sanitize("\u{2066}\u{2067}\u{2068}\u{2069}", NAME_MAX),
            "\\u{2066}\\u{2067}\\u{2068}\\u{2069}"
        );
        assert_eq!(
            sanitize("a\u{200b}b\u{feff}", NAME_MAX),
            "a\\u{200b}b\\u{feff}"
        );
        assert_eq!(sanitize("x\u{2028}y", NAME_MAX), "x\\u{2028}y");
        assert_eq!(sanitize("\u{e0041}", NAME_MAX), "\\u{e0041}");
    }

    #[test]
    fn backslash_and_quote_are_escaped_so_the_output_is_unambiguous() {
        // A literal `\n` in the input must not read like an escaped newline.
        assert_eq!(sanitize("a\\nb", NAME_MAX), "a\\\\nb");
        assert_ne!(sanitize("a\\nb", NAME_MAX), sanitize("a\nb", NAME_MAX));
        assert_eq!(sanitize("say \"hi\"", NAME_MAX), "say \\\"hi\\\"");
    }

    #[test]
    fn long_text_is_cut_with_a_marker_within_the_limit() {
        let long = "a".repeat(64 * 1024);
        let s = name(&long);
        assert_eq!(s.chars().count(), NAME_MAX);
        let kept = NAME_MAX - "…(+65419 bytes)".chars().count();
        assert_eq!(
            s,
            format!("{}…(+{} bytes)", "a".repeat(kept), 64 * 1024 - kept)
        );
    }

    #[test]
    fn the_cut_never_splits_an_escape() {
        // Each ESC becomes four characters; a cut inside one would leave `\x1`.
        let s = sanitize(&"\x1b".repeat(100), 30);
        let body = s.split('…').next().unwrap();
        assert_eq!(body.len() % 4, 0, "{s}");
        assert!(body.chars().count() + s[body.len()..].chars().count() <= 30);
    }

    #[test]
    fn text_exactly_at_the_limit_is_not_cut() {
        assert_eq!(sanitize("abcd", 4), "abcd");
        assert_eq!(sanitize("\n\n", 4), "\\n\\n");
        assert!(sanitize("abcde", 4).chars().count() <= 4);
    }

    #[test]
    fn tiny_limits_hold() {
        assert_eq!(sanitize("abc", 0), "");
        assert_eq!(sanitize("abc", 1), "…");
        assert_eq!(sanitize("abcdefghijklmnopq", 12), "…(+17 bytes)");
        assert_eq!(sanitize("abcdefghijklmnopq", 13), "a…(+16 bytes)");
    }

    #[test]
    fn error_keeps_the_chain_and_escapes_it() {
        let e = anyhow::anyhow!("label \"x\ny\"").context("peer refused");
        assert_eq!(error(&e), "peer refused: label \\\"x\\ny\\\"");
    }

    /// What the escaping must cover, listed apart from [`needs_escape`] so a
    /// character dropped from that list is caught.
    fn must_escape(c: char) -> bool {
        matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
                | '\u{e0000}'..='\u{e007f}'
        )
    }

    /// Strings rich in what the escaping is for (proptest's `any::<String>()`
    /// holds no control or format characters at all).
    fn hostile() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            any::<char>(),
            prop::char::range('\0', '\u{7f}'),
            prop::char::range('\u{80}', '\u{9f}'),
            prop::char::range('\u{2000}', '\u{206f}'),
            prop::char::range('\u{e0000}', '\u{e007f}'),
            Just('\\'),
            Just('…'),
        ];
        prop::collection::vec(c, 0..400).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn output_has_no_control_or_format_char_and_respects_the_limit(
            text in hostile(),
            max in 0usize..300,
        ) {
            let s = sanitize(&text, max);
            prop_assert!(s.chars().count() <= max);
            prop_assert!(!s.chars().any(|c| c.is_control() || must_escape(c) || needs_escape(c)), "{s:?}");
        }

        #[test]
        fn cut_output_is_a_prefix_of_the_whole_and_counts_what_it_left_out(
            text in hostile(),
            max in 0usize..300,
        ) {
            let whole = sanitize(&text, usize::MAX);
            let s = sanitize(&text, max);
            if s != whole && s != "…" && !s.is_empty() {
                let at = s.rfind("…(+").unwrap();
                let body = &s[..at];
                prop_assert!(whole.starts_with(body));
                let left: usize = s[at..].trim_start_matches("…(+").trim_end_matches(" bytes)")
                    .parse().unwrap();
                prop_assert_eq!(unescape(body).len() + left, text.len());
            }
        }

        #[test]
        fn uncut_output_decodes_back_to_the_input(text in hostile()) {
            let s = sanitize(&text, usize::MAX);
            prop_assert_eq!(unescape(&s), text);
        }
    }

    /// The inverse of the escaping, for the round-trip property.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match it.next().unwrap() {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'n' => out.push('\n'),
                'x' => {
                    let hex: String = it.by_ref().take(2).collect();
                    out.push(char::from(u8::from_str_radix(&hex, 16).unwrap()));
                }
                'u' => {
                    assert_eq!(it.next(), Some('{'));
                    let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => panic!("unknown escape \\{other}"),
            }
        }
        out
    }
}
