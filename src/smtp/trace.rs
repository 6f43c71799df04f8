//! Trace fields inboxd prepends to each delivered copy (RFC 5321 4.4): `Return-Path:`,
//! `Delivered-To:` and `Received:`, with LF line ends (the Maildir convention).
//!
//! Owns their exact text. Times come in as seconds since the epoch: this module reads no clock
//! and does no I/O. The Received field names the client and us, never any recipient, so a
//! copy does not reveal who else the message went to.

use super::path::{is_domain_or_literal, ReversePath};
use super::session::{delivered_to, Transaction};

/// `Return-Path:` and `Received:` for a transaction; `Delivered-To:` is added per account by
/// [`for_account`].
#[derive(Debug, Clone)]
pub struct Trace {
    return_path: String,
    received: String,
}

impl Trace {
    pub fn new(tx: &Transaction, hostname: &str, id: &str, unix_time: i64) -> Trace {
        let rp = match &tx.reverse_path {
            ReversePath::Null => String::new(),
            p => p.to_string(),
        };
        let with = if tx.esmtp { "ESMTP" } else { "SMTP" };
        // RFC 5321 4.4: "from" the client's greeting name and address, "by" us, "with" the
        // protocol (RFC 3848), an id, then the date after ";". A greeting name that is not a
        // domain or an address literal would break that syntax (found in review: an
        // unbalanced "(" swallowed the rest of the field), so the client's address stands in
        // for it and the name goes into a comment, quoted (RFC 5322 3.2.2).
        let ip = address_literal(tx.peer.remote);
        let from = if is_domain_or_literal(&tx.helo) {
            format!("{} ({ip})", tx.helo)
        } else {
            // RFC 5321 4.4: address-literal FWS "(" TCP-info ")", then the name as a
            // comment (found in review: "(helo=...)" alone is no TCP-info).
            format!("{ip} ({ip}) (helo={})", comment_text(&tx.helo))
        };
        let received = format!(
            "Received: from {}\n\tby {} (inboxd) with {} id {};\n\t{}\n",
            from,
            hostname,
            with,
            id,
            rfc5322_date(unix_time)
        );
        Trace {
            return_path: format!("Return-Path: <{}>\n", sanitize(&rp)),
            received,
        }
    }

    /// The header block for one account's copy.
    pub fn for_account(&self, account: &str, hostname: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.return_path.len() + self.received.len() + 64);
        v.extend_from_slice(self.return_path.as_bytes());
        v.extend_from_slice(b"Delivered-To: ");
        v.extend_from_slice(delivered_to(account, hostname).as_bytes());
        v.push(b'\n');
        v.extend_from_slice(self.received.as_bytes());
        v
    }
}

fn address_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("[{a}]"),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{a}]"),
        },
    }
}

/// Client-supplied text inside a comment: [`sanitize`]d, with `(`, `)` and `\` escaped
/// as quoted-pairs so that the comment ends where ours does.
fn comment_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in sanitize(s).chars() {
        if matches!(c, '(' | ')' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Client-supplied text in a header field: visible ASCII only, so nothing can end the field
/// or start another.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// RFC 5322 3.3 date-time in UTC, e.g. `Mon, 23 Nov 2026 23:05:01 +0000`.
pub fn rfc5322_date(unix_time: i64) -> String {
    let days = unix_time.div_euclid(86_400);
    let secs = unix_time.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d} {month} {y} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic Gregorian calendar
/// (the well-known era-based conversion).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_474_501),
            "Mon, 23 Nov 2026 22:55:01 +0000"
        );
    }

    fn received_for(helo: &str) -> String {
        let tx = Transaction {
            number: 1,
            reverse_path: ReversePath::Null,
            recipients: Vec::new(),
            body: None,
            helo: helo.to_string(),
            esmtp: true,
            peer: crate::smtp::session::Peer {
                remote: "192.0.2.1".parse().unwrap(),
                local: "192.0.2.2".parse().unwrap(),
            },
            size: 0,
            accounts: Vec::new(),
        };
        Trace::new(&tx, "mx.test", "ID1", 0).received
    }

    #[test]
    fn a_greeting_name_that_is_no_domain_goes_into_a_comment() {
        assert_eq!(
            received_for("client.example"),
            "Received: from client.example ([192.0.2.1])\n\tby mx.test (inboxd) with ESMTP \
             id ID1;\n\tThu, 1 Jan 1970 00:00:00 +0000\n"
        );
        assert!(received_for("[192.0.2.9]").starts_with("Received: from [192.0.2.9] ([192.0.2.1])"));
        // Found in review: an unbalanced "(" or a ";" broke the field's syntax.
        assert_eq!(
            received_for("x(y\"z;\\)"),
            "Received: from [192.0.2.1] ([192.0.2.1]) (helo=x\\(y\"z;\\\\\\))\n\tby mx.test \
             (inboxd) with \
             ESMTP id ID1;\n\tThu, 1 Jan 1970 00:00:00 +0000\n"
        );
    }

    #[test]
    fn sanitize_strips_line_breaks() {
        assert_eq!(sanitize("a\r\nb\u{e9}"), "a??b?");
    }
}
