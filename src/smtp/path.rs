//! Reverse-paths and forward-paths (RFC 5321 4.1.2): mailboxes, local parts, domains, address
//! literals and source routes.
//!
//! Owns the syntax of what stands between `<` and `>` in MAIL FROM and RCPT TO. Source routes
//! (`@a,@b:user@dom`) are parsed and dropped, as RFC 5321 4.1.1.3 and Appendix C tell a receiver
//! to do. It must not decide whether a domain is local or a user exists (the session and
//! `recipient` do that) and does no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// RFC 5321 4.5.3.1.1/4.5.3.1.2: local part up to 64 octets, domain up to 255, path 256.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
pub const MAX_PATH: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// A domain name, as the client wrote it (case is compared by the session).
    Name(String),
    /// `[1.2.3.4]` or `[IPv6:...]` (RFC 5321 4.1.3).
    Literal(IpAddr),
    /// A general address literal `[tag:content]` that is not IPv6: never local.
    General(String),
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Literal(IpAddr::V4(a)) => write!(f, "[{a}]"),
            Domain::Literal(IpAddr::V6(a)) => write!(f, "[IPv6:{a}]"),
            Domain::General(g) => write!(f, "[{g}]"),
        }
    }
}

/// `Local-part "@" ( Domain / address-literal )`. `local_part` holds the part with quoting
/// removed; `quoted` records whether the client used the Quoted-string form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub local_part: String,
    pub quoted: bool,
    pub domain: Domain,
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.quoted {
            f.write_str("\"")?;
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        } else {
            f.write_str(&self.local_part)?;
        }
        write!(f, "@{}", self.domain)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`: the null reverse-path of notifications (RFC 5321 4.5.5).
    Null,
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    /// `<Postmaster>` without a domain, which RFC 5321 4.1.1.3 requires servers to accept.
    Postmaster(String),
    Mailbox(Mailbox),
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster(p) => f.write_str(p),
            ForwardPath::Mailbox(m) => m.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not the RFC 5321 4.1.2 syntax.
    Syntax,
    /// Octets above 127 without SMTPUTF8 (RFC 6531 3.5: 553 5.6.7 territory).
    NonAscii,
    /// Longer than RFC 5321 4.5.3.1 allows.
    TooLong,
}

/// Whether `s` is, as a whole, a `Domain` or an `address-literal` (RFC 5321 4.1.2, 4.1.3):
/// what EHLO and HELO should carry.
pub fn is_domain_or_literal(s: &str) -> bool {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
    };
    let ok = if s.starts_with('[') {
        p.address_literal().is_ok()
    } else {
        p.domain().is_ok()
    };
    ok && p.i == s.len()
}

/// Parses `<...>` at the start of `s`. Returns the reverse-path and the rest after `>`.
pub fn parse_reverse_path(s: &[u8]) -> Result<(ReversePath, &[u8]), PathError> {
    if s.starts_with(b"<>") {
        return Ok((ReversePath::Null, &s[2..]));
    }
    let (mb, rest) = parse_path(s)?;
    match mb {
        Some(m) => Ok((ReversePath::Mailbox(m), rest)),
        None => Err(PathError::Syntax),
    }
}

/// Parses `<...>` at the start of `s` as a forward-path; `<Postmaster>` (any case) is allowed.
pub fn parse_forward_path(s: &[u8]) -> Result<(ForwardPath, &[u8]), PathError> {
    if s.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let close = s.iter().position(|&b| b == b'>').ok_or(PathError::Syntax)?;
    let inner = &s[1..close];
    if inner.eq_ignore_ascii_case(b"postmaster") {
        let p = String::from_utf8_lossy(inner).into_owned();
        return Ok((ForwardPath::Postmaster(p), &s[close + 1..]));
    }
    let (mb, rest) = parse_path(s)?;
    match mb {
        Some(m) => Ok((ForwardPath::Mailbox(m), rest)),
        None => Err(PathError::Syntax),
    }
}

/// `Path = "<" [ A-d-l ":" ] Mailbox ">"`.
fn parse_path(s: &[u8]) -> Result<(Option<Mailbox>, &[u8]), PathError> {
    let mut p = Parser { s, i: 0 };
    if !p.eat(b'<') {
        return Err(PathError::Syntax);
    }
    if s.iter().any(|&b| b >= 0x80) {
        // Only the path itself matters, but a non-ASCII byte anywhere in it is the error.
        let end = s.iter().position(|&b| b == b'>').unwrap_or(s.len());
        if s[..end].iter().any(|&b| b >= 0x80) {
            return Err(PathError::NonAscii);
        }
    }
    // A-d-l: source route, parsed for syntax and thrown away (RFC 5321 4.1.1.3, Appendix C).
    if p.peek() == Some(b'@') {
        loop {
            if !p.eat(b'@') {
                return Err(PathError::Syntax);
            }
            p.domain()?;
            if p.eat(b',') {
                continue;
            }
            if p.eat(b':') {
                break;
            }
            return Err(PathError::Syntax);
        }
    }
    let mb = p.mailbox()?;
    if !p.eat(b'>') {
        return Err(PathError::Syntax);
    }
    // RFC 5321 4.5.3.1.3: 256 octets for the whole path, the angle brackets and any source
    // route included (found in review: only the mailbox was measured).
    if p.i > MAX_PATH {
        return Err(PathError::TooLong);
    }
    Ok((Some(mb), &s[p.i..]))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

/// RFC 5322 atext, as RFC 5321 4.1.2 uses it for Atom.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn mailbox(&mut self) -> Result<Mailbox, PathError> {
        let (local_part, quoted) = if self.peek() == Some(b'"') {
            (self.quoted_string()?, true)
        } else {
            (self.dot_string()?, false)
        };
        if local_part.len() > MAX_LOCAL_PART {
            return Err(PathError::TooLong);
        }
        if !self.eat(b'@') {
            return Err(PathError::Syntax);
        }
        let domain = if self.peek() == Some(b'[') {
            self.address_literal()?
        } else {
            Domain::Name(self.domain()?)
        };
        Ok(Mailbox {
            local_part,
            quoted,
            domain,
        })
    }

    /// `Dot-string = Atom *("."  Atom)`
    fn dot_string(&mut self) -> Result<String, PathError> {
        let start = self.i;
        loop {
            let atom = self.i;
            while self.peek().is_some_and(is_atext) {
                self.i += 1;
            }
            if self.i == atom {
                return Err(PathError::Syntax);
            }
            if !self.eat(b'.') {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`, returned without quotes and escapes.
    fn quoted_string(&mut self) -> Result<String, PathError> {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c @ 32..=126) => {
                            out.push(c as char);
                            self.i += 1;
                        }
                        _ => return Err(PathError::Syntax),
                    }
                }
                Some(c @ (32..=33 | 35..=91 | 93..=126)) => {
                    out.push(c as char);
                    self.i += 1;
                }
                _ => return Err(PathError::Syntax),
            }
            if out.len() > MAX_LOCAL_PART {
                return Err(PathError::TooLong);
            }
        }
    }

    /// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`.
    fn domain(&mut self) -> Result<String, PathError> {
        let start = self.i;
        loop {
            let sub = self.i;
            while self
                .peek()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                self.i += 1;
            }
            let label = &self.s[sub..self.i];
            if label.is_empty() || label[0] == b'-' || label[label.len() - 1] == b'-' {
                return Err(PathError::Syntax);
            }
            if !self.eat(b'.') {
                break;
            }
        }
        if self.i - start > MAX_DOMAIN {
            return Err(PathError::TooLong);
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// `address-literal = "[" ( IPv4 / IPv6 / General-address-literal ) "]"` (RFC 5321 4.1.3).
    fn address_literal(&mut self) -> Result<Domain, PathError> {
        self.eat(b'[');
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| b != b']' && (33..=126).contains(&b))
        {
            self.i += 1;
        }
        let inner = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| PathError::Syntax)?;
        if !self.eat(b']') || inner.is_empty() {
            return Err(PathError::Syntax);
        }
        // The tag is case-insensitive, as every ABNF string is (RFC 5234 2.3; found in review:
        // `[IPV6:::1]` was taken as a general literal and refused as relaying).
        if inner.len() > 5 && inner.as_bytes()[..5].eq_ignore_ascii_case(b"IPv6:") {
            let a: Ipv6Addr = inner[5..].parse().map_err(|_| PathError::Syntax)?;
            return Ok(Domain::Literal(IpAddr::V6(a)));
        }
        if inner.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return ipv4_literal(inner)
                .map(|a| Domain::Literal(IpAddr::V4(a)))
                .ok_or(PathError::Syntax);
        }
        // General-address-literal = Standardized-tag ":" 1*dcontent, the tag an Ldh-str and
        // dcontent printable ASCII but "[", "\\" and "]" (found in review: those made a
        // Received field whose literal did not end).
        let ldh = |t: &str| {
            t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && t.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && t.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        match inner.split_once(':') {
            Some((tag, content))
                if ldh(tag)
                    && !content.is_empty()
                    && content.bytes().all(|b| matches!(b, 33..=90 | 94..=126)) =>
            {
                Ok(Domain::General(inner.to_string()))
            }
            _ => Err(PathError::Syntax),
        }
    }
}

/// `IPv4-address-literal = Snum 3("."  Snum)`, `Snum = 1*3DIGIT` of at most 255: leading
/// zeros allowed (found in review: `[127.000.000.001]` was refused; Rust's parser rejects
/// them).
fn ipv4_literal(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 {
            return None;
        }
        *o = p.parse::<u8>().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_measured_whole() {
        let path = |n: usize| format!("<{}@{}.example>", "l".repeat(64), "d".repeat(n));
        // 1 + 64 + 1 + n + 8 + 1 octets.
        assert_eq!(path(181).len(), 256);
        assert!(fwd(&path(181)).is_ok());
        assert_eq!(fwd(&path(182)), Err(PathError::TooLong));
        assert_eq!(
            fwd(&format!("<@relay.example:{}", &path(170)[1..])),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn helo_names_are_domains_or_address_literals() {
        for ok in [
            "mx.example",
            "a",
            "[192.0.2.1]",
            "[IPv6:::1]",
            "x-1.example.",
        ] {
            assert_eq!(is_domain_or_literal(ok), !ok.ends_with('.'), "{ok}");
        }
        for bad in [
            "x(y\"z;", "a..b", "-a", "[1.2.3]", "a b", "", "[x]", "[a:\\]", "[a:[b]", "[-a:b]",
        ] {
            assert!(!is_domain_or_literal(bad), "{bad}");
        }
    }

    #[test]
    fn ipv4_literals_take_leading_zeros_and_ipv6_tags_any_case() {
        assert_eq!(ipv4_literal("127.000.000.001"), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(ipv4_literal("256.0.0.1"), None);
        assert_eq!(ipv4_literal("1.2.3"), None);
        assert_eq!(ipv4_literal("1.2.3.4.5"), None);
        assert_eq!(ipv4_literal("0001.2.3.4"), None);
        let m = mb("<alice@[IPV6:::1]>");
        assert_eq!(m.domain, Domain::Literal("::1".parse().unwrap()));
    }

    fn fwd(s: &str) -> Result<ForwardPath, PathError> {
        parse_forward_path(s.as_bytes()).map(|(p, _)| p)
    }

    fn mb(s: &str) -> Mailbox {
        match fwd(s) {
            Ok(ForwardPath::Mailbox(m)) => m,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn plain_mailbox_keeps_case() {
        let m = mb("<Carol@Example.COM>");
        assert_eq!(m.local_part, "Carol");
        assert_eq!(m.domain, Domain::Name("Example.COM".into()));
    }

    #[test]
    fn null_reverse_path() {
        let (p, rest) = parse_reverse_path(b"<> SIZE=10").unwrap();
        assert_eq!(p, ReversePath::Null);
        assert_eq!(rest, b" SIZE=10");
    }

    #[test]
    fn null_forward_path_is_an_error() {
        assert_eq!(fwd("<>"), Err(PathError::Syntax));
    }

    #[test]
    fn source_route_is_dropped() {
        let m = mb("<@relay.example,@b.example:jones@local>");
        assert_eq!(m.local_part, "jones");
        assert_eq!(m.domain, Domain::Name("local".into()));
    }

    #[test]
    fn postmaster_without_domain_any_case() {
        assert_eq!(
            fwd("<PostMaster>"),
            Ok(ForwardPath::Postmaster("PostMaster".into()))
        );
    }

    #[test]
    fn quoted_local_part_is_unquoted() {
        let m = mb("<\"u@h\"@local>");
        assert_eq!(m.local_part, "u@h");
        assert!(m.quoted);
        assert_eq!(m.to_string(), "\"u@h\"@local");
    }

    #[test]
    fn double_at_is_syntax_error() {
        assert_eq!(fwd("<u@h@local>"), Err(PathError::Syntax));
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            mb("<a@[127.0.0.1]>").domain,
            Domain::Literal("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            mb("<a@[IPv6:::1]>").domain,
            Domain::Literal("::1".parse().unwrap())
        );
        assert_eq!(
            mb("<a@[x-tag:abc]>").domain,
            Domain::General("x-tag:abc".into())
        );
        assert_eq!(fwd("<a@[300.1.1.1]>"), Err(PathError::Syntax));
    }

    #[test]
    fn bad_forms() {
        for s in [
            ">", "", "a@b", "<a@b", "<a.@b>", "<.a@b>", "<a@-b>", "<a@b.>", "<a b@c>", "<@b:>",
        ] {
            assert!(fwd(s).is_err(), "{s}");
        }
        assert_eq!(fwd("<\u{e9}@b>"), Err(PathError::NonAscii));
        let long = format!("<{}@b>", "a".repeat(65));
        assert_eq!(fwd(&long), Err(PathError::TooLong));
    }
}
