//! Fuzz targets for the protocol: the command parser, the path parser, the DATA decoder and
//! the whole session, each a function that takes arbitrary bytes and panics when an invariant
//! breaks.
//!
//! Owns the invariants, so that the fuzzer (`fuzz/`, AFL++ through cargo-afl) and the
//! regression tests (`tests/fuzz_regressions.rs`, which replay every saved input on each
//! `cargo test`) check exactly the same things. Like the rest of `smtp`, it does no I/O; the
//! session's time starts at an arbitrary instant and moves only as the input says.

use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::command::{self, Command};
use super::data::{DataDecoder, MAX_TEXT_LINE};
use super::path::{self, Domain, ForwardPath, Mailbox, ReversePath, MAX_PATH};
use super::session::{Event, Peer, RcptVerdict, Session, SessionConfig, Transaction};
use super::trace::Trace;
use super::Reply;

/// An envelope string that may reach a header, a log line or a file name must hold no control
/// character (RFC 5321 4.1.2 allows none in a path; inboxd refuses SMTPUTF8, so no octet above
/// 127 either).
fn assert_clean(what: &str, s: &str) {
    assert!(
        s.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "{what} holds a control or non-ASCII octet: {s:?}"
    );
}

fn check_mailbox(m: &Mailbox) {
    assert_clean("local part", &m.local_part);
    assert!(
        m.local_part.len() <= path::MAX_LOCAL_PART,
        "local part too long"
    );
    let shown = m.to_string();
    assert_clean("mailbox", &shown);
    assert!(shown.len() <= MAX_PATH, "path too long: {}", shown.len());
    if let Domain::Name(n) = &m.domain {
        assert!(!n.is_empty(), "empty domain");
    }
    // What we print is what we parsed: the text parses again to the same mailbox (it is
    // written into Return-Path and logs, and must mean there what it meant here).
    let again = format!("<{shown}>");
    match path::parse_reverse_path(again.as_bytes()) {
        Ok((ReversePath::Mailbox(m2), rest)) => {
            assert!(rest.is_empty(), "trailing text after re-parse");
            assert_eq!(&m2, m, "display of {m:?} re-parses differently");
        }
        other => panic!("display {again:?} of {m:?} does not re-parse: {other:?}"),
    }
}

fn check_reply_bytes(bytes: &[u8]) {
    let mut code: Option<&[u8]> = None;
    for line in split_lines(bytes) {
        check_reply_line(line, &mut code);
    }
    assert!(code.is_none(), "a multi-line reply does not end");
}

/// Splits CRLF-terminated lines; a trailing fragment without CRLF is a defect.
fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let i = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("reply output does not end in CRLF: {rest:?}"));
        out.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    out
}

/// One reply line (RFC 5321 4.2): three digits, 2xx-5xx, `-` or space, printable text; lines
/// of one multi-line reply share the code, and an enhanced code (RFC 3463) matches its class.
fn check_reply_line<'a>(line: &'a [u8], open: &mut Option<&'a [u8]>) {
    assert!(line.len() >= 4, "short reply line {line:?}");
    // RFC 5321 4.5.3.1.5: 512 octets including the CRLF, which split_lines removed.
    assert!(line.len() <= 510, "reply line over 512 octets");
    let (code, sep, text) = (&line[..3], line[3], &line[4..]);
    assert!(code.iter().all(u8::is_ascii_digit), "bad code {line:?}");
    assert!((b'2'..=b'5').contains(&code[0]), "bad class {line:?}");
    assert!(sep == b' ' || sep == b'-', "bad separator {line:?}");
    assert!(
        text.iter().all(|&b| (0x20..0x7f).contains(&b)),
        "reply text with control octets: {line:?}"
    );
    if let Some(c) = open {
        assert_eq!(*c, code, "multi-line reply changes its code: {line:?}");
    }
    *open = if sep == b'-' { Some(code) } else { None };
    // An enhanced code, when present, has the reply's class: 2.x.x for 2xx, and so on.
    if text.len() > 2 && text[1] == b'.' && text[0].is_ascii_digit() {
        assert_eq!(text[0], code[0], "enhanced code class differs: {line:?}");
    }
}

/// Command parser: any line parses to a command or to a well-formed 5xx reply, and paths and
/// parameters it accepts are clean.
pub fn command_line(data: &[u8]) {
    match command::parse(data) {
        Ok(cmd) => match cmd {
            Command::Ehlo(s) | Command::Helo(s) => assert_clean("greeting name", &s),
            // SIZE saturates at u64::MAX by design (huge_size_saturates).
            Command::Mail {
                path: ReversePath::Mailbox(m),
                ..
            } => check_mailbox(&m),
            Command::Rcpt(fp) => match &fp {
                ForwardPath::Mailbox(m) => check_mailbox(m),
                ForwardPath::Postmaster(p) => {
                    assert!(p.eq_ignore_ascii_case("postmaster"), "postmaster is {p:?}")
                }
            },
            Command::Vrfy(s) | Command::Expn(s) => assert_clean("VRFY/EXPN argument", &s),
            _ => {}
        },
        Err(r) => {
            assert!(
                r.code >= 500 && r.code < 600,
                "parse error is not 5xx: {r:?}"
            );
            check_reply_bytes(&r.to_bytes());
        }
    }
}

/// Path parser: both entry points, on any input; what they accept is clean, re-parses to
/// itself, and `rest` is what followed the path.
pub fn paths(data: &[u8]) {
    if let Ok((rp, rest)) = path::parse_reverse_path(data) {
        assert!(data.ends_with(rest), "rest is not a suffix");
        if let ReversePath::Mailbox(m) = &rp {
            check_mailbox(m);
        }
    }
    if let Ok((fp, rest)) = path::parse_forward_path(data) {
        assert!(data.ends_with(rest), "rest is not a suffix");
        if let ForwardPath::Mailbox(m) = &fp {
            check_mailbox(m);
        }
    }
}

/// What the decoder must find, computed the simple way over the whole input at once: where the
/// data ends (the first `CRLF.CRLF`, or `.CRLF` at the very start), whether it has a fault,
/// and, when it has none, the decoded text.
struct Expected {
    end: Option<usize>,
    fault: bool,
    text: Vec<u8>,
}

fn expected(input: &[u8]) -> Expected {
    let end = if input.starts_with(b".\r\n") {
        Some(3)
    } else {
        input
            .windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|i| i + 5)
    };
    // The data proper: everything before the terminating ".CRLF" line.
    let body = match end {
        Some(e) => &input[..e - 3],
        None => input,
    };
    let mut fault = false;
    let mut text = Vec::new();
    let mut rest = body;
    loop {
        let (line, complete) = match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => (&rest[..i], true),
            None => (rest, false),
        };
        // A CR at the very end of unfinished input may still get its LF.
        let inner = if !complete && line.ends_with(b"\r") {
            &line[..line.len() - 1]
        } else {
            line
        };
        if inner.contains(&b'\r') || inner.contains(&b'\n') {
            fault = true;
        }
        let stuffed = line.first() == Some(&b'.') && line.len() > 1;
        let wire = line.len() + if complete { 2 } else { 0 };
        if wire - usize::from(stuffed) > MAX_TEXT_LINE {
            fault = true;
        }
        if complete {
            text.extend_from_slice(if stuffed { &line[1..] } else { line });
            text.push(b'\n');
            rest = &rest[line.len() + 2..];
            if rest.is_empty() {
                break;
            }
        } else {
            // Unfinished input: the decoder has passed on what it could, less a leading dot
            // (stuffing or the start of the end) and a CR still waiting for its LF.
            text.extend_from_slice(inner.strip_prefix(b".").unwrap_or(inner));
            break;
        }
    }
    Expected { end, fault, text }
}

/// DATA decoder: fed the input in pieces whose sizes the input itself chooses, it must end
/// exactly where a whole-input scan says the data ends (no smuggled end of data, RFC 5321
/// 4.1.1.4), agree on whether there is a fault, and decode fault-free data exactly.
pub fn data_decoder(data: &[u8]) {
    let Some((&sizes, input)) = data.split_first() else {
        return;
    };
    let want = expected(input);
    let mut d = DataDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut ended = None;
    let mut k = 0u32;
    while pos < input.len() {
        // Piece sizes from 1 to 64, varied by the first byte.
        let n = 1 + ((u32::from(sizes).wrapping_mul(k + 7) >> 2) % 64) as usize;
        k += 1;
        let piece = &input[pos..(pos + n).min(input.len())];
        let before = out.len();
        let (used, done) = d.feed(piece, &mut out);
        assert!(used <= piece.len(), "consumed more than given");
        assert!(
            out.len() - before <= used + 1,
            "output grew faster than input"
        );
        pos += used;
        if done {
            ended = Some(pos);
            break;
        }
        assert_eq!(used, piece.len(), "stopped early without an end of data");
    }
    assert_eq!(ended, want.end, "end of data found at a different place");
    assert!(out.len() <= pos, "more decoded than consumed");
    let fault = d.fault().is_some();
    if ended.is_some() || !want.fault {
        // On unfinished input a line may still be growing past its limit; compare faults only
        // where both have seen the same complete picture.
        if ended.is_some() {
            assert_eq!(fault, want.fault, "fault disagrees: {:?}", d.fault());
        } else {
            assert!(!fault, "fault on clean unfinished input: {:?}", d.fault());
        }
    }
    if !want.fault {
        assert_eq!(out, want.text, "decoded text differs");
    }
}

/// Settings for fuzzed sessions: small limits, so the fuzzer reaches them.
fn fuzz_config() -> Rc<SessionConfig> {
    Rc::new(SessionConfig {
        hostname: "mx.test".into(),
        local_domains: vec!["mx.test".into(), "localhost".into()],
        local_addresses: vec!["192.0.2.25"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))],
        max_message_size: 4096,
        max_recipients: 5,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        max_errors: 10,
    })
}

/// Bounds the session must keep whatever the client does: replies waiting to be sent, and
/// unprocessed input, each stay near their high-water marks.
const OUTPUT_BOUND: usize = 8 * 1024 + 4 * 1024;
/// The server reads at most this much at once (server::connection::READ_CHUNK), and only
/// while less than 64 KiB waits unprocessed.
const READ_CHUNK: usize = 64 * 1024;
const INPUT_BOUND: usize = 64 * 1024 + READ_CHUNK;

fn check_transaction(tx: &Transaction) {
    if let ReversePath::Mailbox(m) = &tx.reverse_path {
        check_mailbox(m);
    }
    assert_clean("HELO name", &tx.helo);
    assert!(
        !tx.recipients.is_empty(),
        "a transaction without recipients"
    );
    for r in &tx.recipients {
        if let ForwardPath::Mailbox(m) = &r.forward_path {
            check_mailbox(m);
        }
    }
    assert!(!tx.accounts.is_empty(), "a transaction without accounts");
    assert!(tx.accounts.len() <= crate::smtp::session::MAX_ACCOUNTS);
    // The trace fields built from it hold only printable ASCII and tabs, and every line after
    // the first of a field is a continuation: nothing the client sent can start a header.
    let header = Trace::new(tx, "mx.test", "ID", 0).for_account("alice", "mx.test");
    for line in header.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            line.iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)),
            "trace line with control octets: {line:?}"
        );
        let field = [&b"Return-Path: "[..], b"Delivered-To: ", b"Received: "]
            .iter()
            .any(|f| line.starts_with(f));
        assert!(
            field || line[0] == b'\t',
            "trace line starts a field: {line:?}"
        );
    }
}

/// The whole session, driven by a script of steps. The input is cut at 0xFF bytes; a piece's
/// first byte says what to do with it:
/// - `R`: the client sends the rest of the piece (if the server is reading);
/// - `T` n: n×10 seconds pass, and the server calls `handle_timeout` if the deadline passed;
/// - `A`, `N`, `F`, `U`: answer an outstanding recipient check with accept, no such user,
///   temporary failure, uid 0 refused;
/// - `D`, `E`: answer an outstanding delivery with success or a 452;
/// - `H`: hold answers (until the next `A`..`E`), `W`: stop reading replies (flip);
/// - `C`: the client closes its side; `S`: the server shuts down;
/// - anything else: sent as is, like `R` without its letter.
///
/// Unless held, outstanding questions are answered "yes" after each step. Invariants: no
/// panic, replies well-formed and in their classes, buffers bounded, events in a legal order,
/// envelope strings clean, nothing after the close.
pub fn session(data: &[u8]) {
    let t0 = Instant::now();
    let mut now = t0;
    let peer = Peer {
        remote: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        local: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25)),
    };
    let mut s = Session::new(fuzz_config(), peer, now);
    let mut output = Vec::new();
    let mut reading_replies = true;
    let mut hold = false;
    let mut pending_rcpt = false;
    let mut pending_delivery = false;
    let mut in_data = false;
    let mut closed = false;
    let mut data_bytes = 0usize;
    for piece in data.split(|&b| b == 0xff) {
        let (op, arg) = match piece.split_first() {
            Some((&op, arg)) => (op, arg),
            None => continue,
        };
        match op {
            b'T' => {
                let secs = u64::from(arg.first().copied().unwrap_or(1)) * 10;
                now += Duration::from_secs(secs);
                if s.next_deadline().is_some_and(|d| now >= d) {
                    s.handle_timeout(now);
                }
            }
            b'A' | b'N' | b'F' | b'U' if pending_rcpt => {
                hold = false;
                pending_rcpt = false;
                s.recipient_verdict(
                    match op {
                        b'A' => RcptVerdict::Accept(vec!["alice".into()]),
                        b'N' => RcptVerdict::NoSuchUser,
                        b'F' => RcptVerdict::TemporaryFailure,
                        _ => RcptVerdict::Uid0Refused,
                    },
                    now,
                );
            }
            b'D' | b'E' if pending_delivery => {
                hold = false;
                pending_delivery = false;
                s.delivery_outcome(
                    if op == b'D' {
                        Ok(())
                    } else {
                        Err(Reply::new(452, "4.3.1", "Insufficient system storage"))
                    },
                    now,
                );
            }
            b'A' | b'N' | b'F' | b'U' | b'D' | b'E' => {}
            b'H' => hold = true,
            b'W' => reading_replies = !reading_replies,
            b'C' => s.peer_closed(),
            b'S' => s.shutdown(),
            _ => {
                let bytes = if op == b'R' { arg } else { piece };
                // As the server reads: at most READ_CHUNK at a time, and only while the
                // session wants input; the rest stays in the client's socket (dropped here).
                for chunk in bytes.chunks(READ_CHUNK) {
                    if !s.wants_read() {
                        break;
                    }
                    s.receive(chunk, now);
                }
            }
        }
        // The server's side of each turn: take events, answer unless held, send replies.
        loop {
            while let Some(ev) = s.poll_event() {
                if std::env::var_os("FUZZ_TRACE").is_some() {
                    eprintln!("event {ev:?}");
                }
                assert!(!closed, "event after Close: {ev:?}");
                match ev {
                    Event::RecipientToCheck { local_part } => {
                        assert!(!pending_rcpt, "two recipient checks outstanding");
                        assert_clean("local part", &local_part);
                        pending_rcpt = true;
                    }
                    Event::DataStart(tx) => {
                        assert!(!in_data, "DataStart inside DATA");
                        check_transaction(&tx);
                        in_data = true;
                        data_bytes = 0;
                    }
                    Event::MailData(d) => {
                        assert!(in_data, "MailData outside DATA");
                        data_bytes += d.len();
                    }
                    Event::EndOfData(tx) => {
                        assert!(in_data, "EndOfData outside DATA");
                        check_transaction(&tx);
                        assert!(
                            data_bytes as u64 <= tx.size,
                            "more data decoded than counted"
                        );
                        in_data = false;
                        pending_delivery = true;
                    }
                    Event::DataAborted => {
                        assert!(in_data, "DataAborted outside DATA");
                        in_data = false;
                    }
                    Event::Close => {
                        // The server frees the transaction only on EndOfData or DataAborted.
                        assert!(!in_data, "Close with a DATA neither ended nor aborted");
                        closed = true;
                    }
                }
            }
            if hold || !(pending_rcpt || pending_delivery) {
                break;
            }
            if pending_rcpt {
                pending_rcpt = false;
                s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), now);
            } else {
                pending_delivery = false;
                s.delivery_outcome(Ok(()), now);
            }
        }
        assert_eq!(closed, s.is_closed(), "Close event and state disagree");
        assert!(s.buffered_input() <= INPUT_BOUND, "input backlog unbounded");
        assert!(s.output_len() <= OUTPUT_BOUND, "output backlog unbounded");
        if reading_replies || closed {
            output.extend_from_slice(&s.take_output());
        }
        if closed {
            // Nothing more, whatever arrives.
            s.receive(b"NOOP\r\n", now);
            assert!(!s.has_output(), "output after the close");
        }
    }
    output.extend_from_slice(&s.take_output());
    assert!(output.starts_with(b"220 "), "no greeting first");
    check_reply_bytes(&output);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so these tests need no crate and always run the same.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, alphabet: &[u8], n: usize) -> Vec<u8> {
            (0..n)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn decoder_model_agrees_on_known_cases() {
        let e = expected(b"a\r\n..b\r\n.\r\nMAIL");
        assert_eq!(e.end, Some(11));
        assert!(!e.fault);
        assert_eq!(e.text, b"a\n.b\n");
        assert!(expected(b"a\nb\r\n.\r\n").fault);
        assert_eq!(
            expected(b"a\n.\r\n").end,
            None,
            "bare LF then dot ends nothing"
        );
        data_decoder(b"\x05a\r\n..b\r\n.\r\nMAIL");
    }

    /// The invariants hold over a few thousand generated inputs drawn from the protocol's
    /// alphabet (the real search is the fuzzer's; this keeps the targets themselves honest).
    #[test]
    fn targets_hold_on_generated_inputs() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let alpha: &[u8] = b"<>@:.,\"\\[] \r\n.MAILFROMRCPTOData=SIZEBODY%abc\x00\x7f\xff";
        for _ in 0..3000 {
            let n = (rng.next() % 80) as usize;
            let b = rng.bytes(alpha, n);
            command_line(&b);
            paths(&b);
            data_decoder(&b);
        }
        let script: &[&[u8]] = &[
            b"EHLO a\r\n",
            b"MAIL FROM:<a@b> SIZE=10\r\n",
            b"RCPT TO:<alice@mx.test>\r\n",
            b"DATA\r\n",
            b"x\r\n.\r\n",
            b"T\x40",
            b"H",
            b"N",
            b"W",
            b"C",
            b"RSET\r\n",
            b"\r\n\r\n",
        ];
        for _ in 0..500 {
            let mut input = Vec::new();
            for _ in 0..(rng.next() % 20) {
                input.extend_from_slice(script[(rng.next() % script.len() as u64) as usize]);
                input.push(0xff);
            }
            session(&input);
        }
    }

    #[test]
    fn a_bad_reply_is_caught() {
        let caught = std::panic::catch_unwind(|| check_reply_bytes(b"250-a\r\n354 b\r\n"));
        assert!(
            caught.is_err(),
            "a multi-line reply changing code must fail"
        );
        let caught = std::panic::catch_unwind(|| check_reply_bytes(b"250 5.1.1 x\r\n"));
        assert!(caught.is_err(), "a 250 with a 5.x.x code must fail");
    }
}
