//! SMTP command lines (RFC 5321 4.1.1, 4.1.2) and the extension parameters inboxd supports
//! (SIZE, RFC 1870; BODY, RFC 6152).
//!
//! Owns turning one command line (CRLF already removed) into a [`Command`] or a syntax-error
//! reply. It must not know the session state (sequencing is the session's job), the
//! configuration, or anything outside the line.

use super::path::{self, ForwardPath, PathError, ReversePath};
use super::reply::Reply;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        path: ReversePath,
        size: Option<u64>,
        body: Option<Body>,
    },
    Rcpt(ForwardPath),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy(String),
    Expn(String),
    Help,
}

/// Parses one command line. A failure is the reply to send (500/501/553/555), already
/// classified here where the error is detected.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let (verb, arg) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let verb = verb.to_ascii_uppercase();
    match verb.as_slice() {
        b"EHLO" => Ok(Command::Ehlo(greeting_name(arg, "EHLO")?)),
        b"HELO" => Ok(Command::Helo(greeting_name(arg, "HELO")?)),
        b"MAIL" => parse_mail(arg),
        b"RCPT" => parse_rcpt(arg),
        b"DATA" => no_argument(arg, Command::Data, "DATA"),
        b"RSET" => no_argument(arg, Command::Rset, "RSET"),
        b"QUIT" => no_argument(arg, Command::Quit, "QUIT"),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"VRFY" => Ok(Command::Vrfy(required_string(arg, "VRFY")?)),
        b"EXPN" => Ok(Command::Expn(required_string(arg, "EXPN")?)),
        _ => Err(Reply::new(500, "5.5.1", "Command unrecognized")),
    }
}

/// EHLO/HELO take a domain or address literal (RFC 5321 4.1.1.1). We keep any single token of
/// visible ASCII, since it is only recorded in the Received field, never trusted.
fn greeting_name(arg: &[u8], verb: &str) -> Result<String, Reply> {
    let arg = trim(arg);
    if arg.is_empty() || !arg.iter().all(|&b| (33..=126).contains(&b)) {
        return Err(Reply::new(
            501,
            "5.5.4",
            format!("Syntax: {verb} domain-or-address-literal"),
        ));
    }
    Ok(String::from_utf8_lossy(arg).into_owned())
}

fn no_argument(arg: &[u8], cmd: Command, verb: &str) -> Result<Command, Reply> {
    if trim(arg).is_empty() {
        Ok(cmd)
    } else {
        Err(Reply::new(
            501,
            "5.5.4",
            format!("Syntax: {verb} takes no arguments"),
        ))
    }
}

fn required_string(arg: &[u8], verb: &str) -> Result<String, Reply> {
    let arg = trim(arg);
    // RFC 5321 4.1.2: String is an Atom or a Quoted-string, printable US-ASCII and spaces; a
    // control or 8-bit octet is a syntax error (found by fuzzing: they used to be accepted).
    if arg.is_empty() || !arg.iter().all(|&b| (32..=126).contains(&b)) {
        return Err(Reply::new(501, "5.5.4", format!("Syntax: {verb} string")));
    }
    Ok(String::from_utf8_lossy(arg).into_owned())
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end]
}

/// Strips a case-insensitive `FROM:`/`TO:` prefix. Spaces after the colon are tolerated (not
/// RFC 5321 syntax, but common and harmless).
fn after_keyword<'a>(arg: &'a [u8], kw: &[u8]) -> Option<&'a [u8]> {
    if arg.len() >= kw.len() && arg[..kw.len()].eq_ignore_ascii_case(kw) {
        let rest = &arg[kw.len()..];
        let skip = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
        Some(&rest[skip..])
    } else {
        None
    }
}

fn path_error(e: PathError, which: &str, enhanced: &'static str) -> Reply {
    match e {
        PathError::NonAscii => Reply::new(
            553,
            "5.6.7",
            format!("Non-ASCII {which} address needs SMTPUTF8, which is not offered"),
        ),
        PathError::TooLong => Reply::new(501, enhanced, format!("{which} address too long")),
        PathError::Syntax => Reply::new(501, enhanced, format!("Bad {which} address syntax")),
    }
}

fn parse_mail(arg: &[u8]) -> Result<Command, Reply> {
    let rest = after_keyword(arg, b"FROM:")
        .ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: MAIL FROM:<address>"))?;
    let (path, params) =
        path::parse_reverse_path(rest).map_err(|e| path_error(e, "sender", "5.1.7"))?;
    let mut size = None;
    let mut body = None;
    for (key, value) in params_of(params)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v))
                if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                // 20 digits can overflow u64; such a size is over any limit anyway.
                size = Some(v.parse::<u64>().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => body = Some(Body::SevenBit),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                body = Some(Body::EightBitMime)
            }
            ("SIZE", _) | ("BODY", _) => {
                return Err(Reply::new(501, "5.5.4", format!("Bad value for {key}")));
            }
            _ => {
                return Err(Reply::new(
                    555,
                    "5.5.4",
                    format!("Unsupported MAIL parameter {key}"),
                ));
            }
        }
    }
    Ok(Command::Mail { path, size, body })
}

fn parse_rcpt(arg: &[u8]) -> Result<Command, Reply> {
    let rest = after_keyword(arg, b"TO:")
        .ok_or_else(|| Reply::new(501, "5.5.4", "Syntax: RCPT TO:<address>"))?;
    let (path, params) =
        path::parse_forward_path(rest).map_err(|e| path_error(e, "recipient", "5.1.3"))?;
    if let Some((key, _)) = params_of(params)?.into_iter().next() {
        return Err(Reply::new(
            555,
            "5.5.4",
            format!("Unsupported RCPT parameter {key}"),
        ));
    }
    Ok(Command::Rcpt(path))
}

/// `Mail-parameters = esmtp-param *(SP esmtp-param)`, `esmtp-param = esmtp-keyword ["=" esmtp-value]`.
fn params_of(s: &[u8]) -> Result<Vec<(String, Option<String>)>, Reply> {
    let bad = || Reply::new(501, "5.5.4", "Bad parameter syntax");
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if s[0] != b' ' {
        return Err(bad());
    }
    let mut out = Vec::new();
    for word in s.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let (k, v) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        let key_ok = !k.is_empty() && k.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        let val_ok = v.is_none_or(|v| v.iter().all(|&b| (33..=126).contains(&b) && b != b'='));
        if !key_ok || !val_ok {
            return Err(bad());
        }
        out.push((
            String::from_utf8_lossy(k).into_owned(),
            v.map(|v| String::from_utf8_lossy(v).into_owned()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::path::{Domain, Mailbox};

    fn code(line: &str) -> u16 {
        match parse(line.as_bytes()) {
            Ok(c) => panic!("{line}: parsed as {c:?}"),
            Err(r) => r.code,
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"eHlO client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"noop"), Ok(Command::Noop));
        assert_eq!(parse(b"NOOP anything at all"), Ok(Command::Noop));
    }

    #[test]
    fn mail_with_params() {
        let c = parse(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME").unwrap();
        let expected = Command::Mail {
            path: ReversePath::Mailbox(Mailbox {
                local_part: "a".into(),
                quoted: false,
                domain: Domain::Name("b.example".into()),
            }),
            size: Some(1000),
            body: Some(Body::EightBitMime),
        };
        assert_eq!(c, expected);
        assert!(matches!(
            parse(b"mail from: <>"),
            Ok(Command::Mail {
                path: ReversePath::Null,
                ..
            })
        ));
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(code("FROB"), 500);
        assert_eq!(code("EHLO"), 501);
        assert_eq!(code("MAIL <a@b>"), 501);
        assert_eq!(code("MAIL FROM:a@b"), 501);
        assert_eq!(code("MAIL FROM:<a@b> FOO=1"), 555);
        assert_eq!(code("MAIL FROM:<a@b> SIZE=x"), 501);
        assert_eq!(code("RCPT TO:<a@b> NOTIFY=NEVER"), 555);
        assert_eq!(code("RCPT TO:<>"), 501);
        assert_eq!(code("DATA now"), 501);
        assert_eq!(code("VRFY"), 501);
        assert_eq!(code("VRFY a\x07b"), 501);
        assert_eq!(code("EXPN \u{e9}"), 501);
        assert_eq!(code("RCPT TO:<\u{e9}@b>"), 553);
    }

    #[test]
    fn huge_size_saturates() {
        let c = parse(b"MAIL FROM:<> SIZE=99999999999999999999").unwrap();
        assert!(matches!(
            c,
            Command::Mail {
                size: Some(u64::MAX),
                ..
            }
        ));
    }
}
