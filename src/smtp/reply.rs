//! SMTP replies: a three-digit code (RFC 5321 4.2), an RFC 3463 enhanced status code and text.
//!
//! Owns the wire form of every reply inboxd sends, single- and multi-line. It must not decide
//! *which* reply a situation deserves (the session does) and does no I/O.

use std::fmt;

/// RFC 5321 4.5.3.1.5: the longest reply line, CRLF included.
pub const MAX_REPLY_LINE: usize = 512;

/// One SMTP reply. `enhanced` is `None` only where RFC 2034 section 3 exempts a reply from the
/// enhanced code: the greeting and the answers to HELO/EHLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<&'static str>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply carrying an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced code (greeting, HELO/EHLO answers: RFC 2034 section 3).
    pub fn plain(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    /// Temporary (4xx) or permanent (5xx) failure, as RFC 5321 4.2.1 classifies by first digit.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form (`NNN-text` lines, then `NNN text`, each ending in CRLF).
    /// Reply text is ours, but any text that may contain client bytes is cleaned here too:
    /// a CR or LF inside a line would forge an extra reply line (RFC 5321 4.2).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if i + 1 == n { b' ' } else { b'-' });
            if let Some(e) = self.enhanced {
                out.extend_from_slice(e.as_bytes());
                out.push(b' ');
            }
            // RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF. Texts that
            // echo the client (a greeting name, a parameter) are cut to fit (found by fuzzing:
            // an unknown 490-octet MAIL parameter made a 527-octet line).
            let mut room = MAX_REPLY_LINE - 2 - 4 - self.enhanced.map_or(0, |e| e.len() + 1);
            if room < text.len() {
                // Never half a character.
                while !text.is_char_boundary(room) {
                    room -= 1;
                }
            }
            out.extend(text.bytes().take(room).map(|b| {
                if b == b'\r' || b == b'\n' {
                    b' '
                } else {
                    b
                }
            }));
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        let s = String::from_utf8_lossy(&bytes);
        write!(f, "{}", s.trim_end().replace("\r\n", " | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced_code() {
        let r = Reply::new(250, "2.1.0", "Sender OK");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Sender OK\r\n");
    }

    #[test]
    fn multi_line_uses_dash_continuations() {
        let r = Reply::plain(
            250,
            vec!["host".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.to_bytes(),
            b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn line_breaks_in_text_cannot_forge_reply_lines() {
        let r = Reply::new(501, "5.5.4", "bad\r\n250 ok");
        assert_eq!(r.to_bytes(), b"501 5.5.4 bad  250 ok\r\n");
    }

    #[test]
    fn lines_are_cut_to_512_octets() {
        let long = "x".repeat(600);
        for r in [
            Reply::new(555, "5.5.4", long.clone()),
            Reply::plain(250, vec![long.clone(), "8BITMIME".into()]),
        ] {
            let bytes = r.to_bytes();
            let first = bytes.split(|&b| b == b'\n').next().unwrap();
            assert_eq!(first.len() + 1, MAX_REPLY_LINE, "{}", first.len());
            assert!(bytes.ends_with(b"\r\n"));
        }
        // A cut never splits a character: 'é' is two octets, and after one 'a' the 500th
        // octet of the text is the first half of one.
        let r = Reply::new(555, "5.5.4", format!("a{}", "\u{e9}".repeat(300))).to_bytes();
        assert!(std::str::from_utf8(&r).is_ok());
        assert!(r.len() <= MAX_REPLY_LINE);
    }
}
