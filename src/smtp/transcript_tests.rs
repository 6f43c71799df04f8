//! Golden SMTP transcripts (`transcripts/*.txt`) replayed byte-for-byte against the session.
//!
//! Format, one item per line:
//! - `S: text`: a line the server must send (CRLF added). Consecutive `S:` lines are compared
//!   at once against everything the session produced since the last comparison.
//! - `C: text`: a line the client sends, CRLF added; `C-: text` sends it without CRLF.
//!   Consecutive `C` lines go in one write (pipelining). `\r`, `\n`, `\\`, `\xHH` are escapes
//!   and `{X*N}` stands for N copies of the character X.
//! - `M: text`: a line of the message content handed to delivery (LF line ends).
//! - `A: names`: the accounts the transaction was delivered to.
//! - `! closed`, `! aborted N`, `! max_errors N`, `! max_size N`: directives.
//!
//! The fake world: accounts alice, bob, Carol, Jones, Brown, root; postmaster is root;
//! `tempfail` makes the lookup fail; every delivery succeeds.

use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::session::*;

fn expand(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let h = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(h, 16).unwrap());
                    i += 2;
                }
                c => panic!("unknown escape \\{}", c as char),
            }
            i += 2;
        } else if b[i] == b'{' && b.get(i + 2) == Some(&b'*') {
            let end = i + s[i..].find('}').unwrap();
            let n: usize = s[i + 3..end].parse().unwrap();
            out.extend(std::iter::repeat_n(b[i + 1], n));
            i = end + 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

struct World {
    session: Session,
    now: Instant,
    message: Vec<u8>,
    in_data: bool,
    accounts: Vec<String>,
    aborted: usize,
    closed: bool,
}

impl World {
    fn verdict(local_part: &str) -> RcptVerdict {
        let known = ["alice", "bob", "Carol", "Jones", "Brown", "root"];
        if local_part.eq_ignore_ascii_case("postmaster") {
            RcptVerdict::Accept(vec!["root".into()])
        } else if local_part == "tempfail" {
            RcptVerdict::TemporaryFailure
        } else if local_part == "broken" {
            // A mailbox the delivery layer's check at RCPT time found broken.
            RcptVerdict::Unavailable(super::Reply::new(
                450,
                "4.2.0",
                "Recipient's mailbox is unavailable, try again later",
            ))
        } else if known.contains(&local_part) {
            RcptVerdict::Accept(vec![local_part.into()])
        } else {
            RcptVerdict::NoSuchUser
        }
    }

    /// Answers every event, as the server would.
    fn pump(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::RecipientToCheck { local_part } => self
                    .session
                    .recipient_verdict(World::verdict(&local_part), self.now),
                Event::DataStart(_) => {
                    self.message.clear();
                    self.in_data = true;
                }
                Event::MailData(d) => {
                    assert!(self.in_data, "MailData outside DATA");
                    self.message.extend_from_slice(&d);
                }
                Event::DataAborted => {
                    self.aborted += 1;
                    self.in_data = false;
                }
                Event::EndOfData(tx) => {
                    self.accounts = tx.accounts();
                    self.in_data = false;
                    self.session.delivery_outcome(Ok(()), self.now);
                }
                Event::Close => self.closed = true,
            }
        }
    }
}

fn run(name: &str, text: &str) {
    let mut max_errors = 20;
    let mut max_size = 1_000_000;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("! max_errors ") {
            max_errors = v.parse().unwrap();
        }
        if let Some(v) = line.strip_prefix("! max_size ") {
            max_size = v.parse().unwrap();
        }
    }
    let config = Rc::new(SessionConfig {
        hostname: "mx.test".into(),
        local_domains: vec!["mx.test".into(), "localhost".into()],
        local_addresses: vec![
            "192.0.2.25".parse().unwrap(),
            "2001:db8::25".parse().unwrap(),
        ],
        max_message_size: max_size,
        max_recipients: 100,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        max_errors,
    });
    let peer = Peer {
        remote: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        local: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let now = Instant::now();
    let mut w = World {
        session: Session::new(config, peer, now),
        now,
        message: Vec::new(),
        in_data: false,
        accounts: Vec::new(),
        aborted: 0,
        closed: false,
    };
    let mut client: Vec<u8> = Vec::new();
    let mut expected: Vec<u8> = Vec::new();
    let mut message: Vec<u8> = Vec::new();
    let mut got: Vec<u8> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let flush_client = |w: &mut World, client: &mut Vec<u8>| {
        if !client.is_empty() {
            w.session.receive(client, w.now);
            client.clear();
        }
        w.pump();
    };
    for (n, line) in lines.iter().enumerate() {
        let at = format!("{name}:{}", n + 1);
        let next = lines.get(n + 1).copied().unwrap_or("");
        if let Some(t) = line
            .strip_prefix("C: ")
            .or(line.strip_prefix("C:").filter(|r| r.is_empty()))
        {
            client.extend(expand(t));
            client.extend_from_slice(b"\r\n");
        } else if let Some(t) = line.strip_prefix("C-: ") {
            client.extend(expand(t));
        } else if let Some(t) = line.strip_prefix("S: ") {
            expected.extend(expand(t));
            expected.extend_from_slice(b"\r\n");
            if !next.starts_with("S:") {
                flush_client(&mut w, &mut client);
                got.extend(w.session.take_output());
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&expected),
                    "{at}: server output differs"
                );
                got.clear();
                expected.clear();
            }
        } else if let Some(t) = line
            .strip_prefix("M: ")
            .or(line.strip_prefix("M:").filter(|r| r.is_empty()))
        {
            message.extend(expand(t));
            message.push(b'\n');
        } else if let Some(t) = line.strip_prefix("A: ") {
            flush_client(&mut w, &mut client);
            got.extend(w.session.take_output());
            assert_eq!(
                String::from_utf8_lossy(&w.message),
                String::from_utf8_lossy(&message),
                "{at}: delivered content differs"
            );
            let want: Vec<String> = t.split_whitespace().map(String::from).collect();
            assert_eq!(w.accounts, want, "{at}: accounts differ");
            message.clear();
        } else if *line == "! closed" {
            flush_client(&mut w, &mut client);
            assert!(
                w.closed && w.session.is_closed(),
                "{at}: session not closed"
            );
            assert!(
                !w.session.wants_read(),
                "{at}: closed session wants to read"
            );
        } else if let Some(v) = line.strip_prefix("! aborted ") {
            flush_client(&mut w, &mut client);
            assert_eq!(
                w.aborted,
                v.parse::<usize>().unwrap(),
                "{at}: DataAborted count"
            );
        }
    }
    assert!(
        client.is_empty(),
        "{name}: client lines after the last S: line"
    );
    assert!(!w.in_data || w.closed, "{name}: data left in progress");
}

macro_rules! transcript {
    ($name:ident) => {
        #[test]
        fn $name() {
            let file = concat!(stringify!($name), ".txt");
            run(
                file,
                include_str!(concat!("transcripts/", stringify!($name), ".txt")),
            );
        }
    };
}

transcript!(rfc821_appendix_f);
transcript!(sequencing);
transcript!(recipients);
transcript!(pipelining);
transcript!(data);
transcript!(loops);
transcript!(errors);
transcript!(relay_and_escaping);
