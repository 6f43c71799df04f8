//! The local MTA interface programs expect: `sendmail`, `mailq` and `newaliases`, as the
//! same binary called by those names (symbolic links to inboxd).
//!
//! `sendmail` reads one message on standard input and hands it to the local inboxd over
//! loopback SMTP: no setuid binary, no queue. It never delivers anything itself; the server
//! decides everything and the caller learns the outcome as a sysexits(3) status. `mailq`
//! says there is no queue; `newaliases` checks the aliases file and asks the running inboxd
//! to reload it. This module must not touch Maildirs or credentials.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::recipient::Aliases;

pub const EX_OK: u8 = 0;
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_UNAVAILABLE: u8 = 69;
pub const EX_IOERR: u8 = 74;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_PROTOCOL: u8 = 76;

/// Where `sendmail` finds inboxd: `INBOXD_SMTP` (HOST:PORT), default the local port 25.
const DEFAULT_SERVER: &str = "127.0.0.1:25";
/// Largest message read from standard input (inboxd's own default limit).
const MAX_INPUT: usize = 35 << 20;

/// Dispatches on the name the program was called by; `None` when it is not one of these.
pub fn main_for(name: &str, args: &[String]) -> Option<u8> {
    match name {
        "sendmail" => Some(sendmail(args)),
        "mailq" => Some(mailq()),
        "newaliases" => Some(newaliases()),
        _ => None,
    }
}

fn mailq() -> u8 {
    println!(
        "inboxd has no mail queue: every message is delivered or refused while its sender waits."
    );
    EX_OK
}

/// What the command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub from: Option<String>,
    pub full_name: Option<String>,
    /// -t: recipients from To:, Cc: and Bcc:.
    pub from_headers: bool,
    /// -i / -oi: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    pub recipients: Vec<String>,
    /// -bp / -bi / -q: mailq, newaliases, queue run.
    pub mode: Mode,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Send,
    Mailq,
    Newaliases,
    QueueRun,
    /// -bs: SMTP on standard input and output (alpine, some MUAs), relayed to inboxd.
    Smtp,
}

/// sendmail(8)'s command line, as far as a final-delivery MTA needs it. Options that only
/// tune a queue, a delivery mode or aliasing (-oX..., -odX, -v, -bm, -N, -R, -V, -B, -C,
/// -L, -O, -h, -A, -n, -G, -U) are accepted and ignored, so existing callers (cron, mail(1),
/// mutt) work unchanged. A recipient argument may hold several, separated by commas or
/// spaces (Debian's cron passes `MAILTO="alice,bob"` as one).
pub fn parse_args(args: &[String]) -> Result<Request, String> {
    let mut r = Request::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            for rest in it.by_ref() {
                push_recipients(&mut r.recipients, rest);
            }
            break;
        }
        if !a.starts_with('-') || a == "-" {
            push_recipients(&mut r.recipients, a);
            continue;
        }
        let flag = &a[1..];
        // Options that take a value, attached (-fuser) or separate (-f user).
        let mut value = |attached: &str| -> Result<String, String> {
            if !attached.is_empty() {
                return Ok(attached.to_string());
            }
            it.next()
                .cloned()
                .ok_or_else(|| format!("option -{} needs a value", &flag[..1]))
        };
        match flag.chars().next() {
            Some('f') | Some('r') => r.from = Some(value(&flag[1..])?),
            Some('F') => r.full_name = Some(value(&flag[1..])?),
            Some('N') | Some('R') | Some('V') | Some('B') | Some('C') | Some('L') | Some('X')
            | Some('O') | Some('h') | Some('A') => {
                value(&flag[1..])?;
            }
            // -t and -i, alone or together (-ti, -it).
            Some('t') | Some('i') if flag.chars().all(|c| c == 't' || c == 'i') => {
                r.from_headers |= flag.contains('t');
                r.ignore_dots |= flag.contains('i');
            }
            Some('o') => {
                if flag == "oi" {
                    r.ignore_dots = true;
                }
            }
            Some('b') => match flag {
                "bp" => r.mode = Mode::Mailq,
                "bi" => r.mode = Mode::Newaliases,
                "bs" => r.mode = Mode::Smtp,
                "bm" => {}
                _ => return Err(format!("-{flag} is not supported")),
            },
            Some('q') => r.mode = Mode::QueueRun,
            Some('v') | Some('e') | Some('m') | Some('U') | Some('n') | Some('G') => {}
            _ => return Err(format!("unknown option {a}")),
        }
    }
    Ok(r)
}

/// The recipients of one argument: `alice`, `alice,bob`, `alice, bob`.
fn push_recipients(out: &mut Vec<String>, arg: &str) {
    out.extend(
        arg.split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .map(str::to_string),
    );
}

/// The reverse-path `-f` names: `<>` or nothing is the null reverse-path (RFC 5321 4.5.5,
/// for bounces and auto-replies), a name without a domain is one of this host's users.
fn reverse_path(from: &str, hostname: &str) -> String {
    let from = from.trim();
    let from = from
        .strip_prefix('<')
        .and_then(|f| f.strip_suffix('>'))
        .unwrap_or(from);
    if from.is_empty() || from.contains('@') {
        from.to_string()
    } else {
        format!("{from}@{hostname}")
    }
}

fn sendmail(args: &[String]) -> u8 {
    let req = match parse_args(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sendmail: {e}");
            eprintln!("usage: sendmail [-t] [-i|-oi] [-f sender] [-F name] [recipient ...]");
            return EX_USAGE;
        }
    };
    match req.mode {
        Mode::Mailq => return mailq(),
        Mode::Newaliases => return newaliases(),
        Mode::QueueRun => return EX_OK,
        Mode::Smtp => return smtp_on_stdio(),
        Mode::Send => {}
    }
    let input = match read_message(std::io::stdin().lock(), req.ignore_dots) {
        Ok(Some(m)) => m,
        Ok(None) => {
            eprintln!("sendmail: message larger than {MAX_INPUT} octets");
            return EX_DATAERR;
        }
        Err(e) => {
            eprintln!("sendmail: reading the message: {e}");
            return EX_IOERR;
        }
    };
    let login = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten();
    let hostname = crate::hostname::fqdn();
    let user = login.as_ref().map_or("nobody", |u| u.name.as_str());
    let own = format!("{user}@{hostname}");
    let sender = req
        .from
        .as_deref()
        .map_or_else(|| own.clone(), |f| reverse_path(f, &hostname));
    let full_name = req
        .full_name
        .clone()
        .or_else(|| {
            login
                .as_ref()
                .and_then(|u| u.gecos.to_str().ok())
                .and_then(|g| g.split(',').next())
                .filter(|n| !n.is_empty())
                .map(str::to_string)
        })
        // It goes into the From: field: no control character may start a new line there.
        .map(|n| n.replace(|c: char| c.is_control(), " "));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // The From: field names a mailbox even when the reverse-path is null.
    let header_from = if sender.is_empty() { &own } else { &sender };
    let msg = Message::prepare(
        &input,
        &req,
        header_from,
        full_name.as_deref(),
        now.as_secs() as i64,
        &format!(
            "{}.{}.{}@{hostname}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id()
        ),
    );
    let recipients = msg.recipients;
    if recipients.is_empty() {
        eprintln!("sendmail: no recipients");
        return EX_USAGE;
    }
    // Addresses go into SMTP command lines: nothing that could end or extend one.
    if let Some(bad) = std::iter::once(&sender)
        .filter(|s| !s.is_empty())
        .chain(&recipients)
        .find(|a| !plain_address(a))
    {
        eprintln!("sendmail: {bad:?} is not an address");
        return EX_USAGE;
    }
    let server = std::env::var("INBOXD_SMTP").unwrap_or_else(|_| DEFAULT_SERVER.to_string());
    match submit(&server, &hostname, &sender, &recipients, &msg.data) {
        Ok(status) => status,
        Err((status, why)) => {
            eprintln!("sendmail: {why}");
            status
        }
    }
}

/// `sendmail -bs`: the caller speaks SMTP itself on standard input and output; each side is
/// copied to the local inboxd and back as it comes, so the caller talks to inboxd as any
/// client does (inboxd's replies, limits and checks, unchanged). Ends when inboxd closes
/// the connection (after QUIT) or standard input ends and inboxd has answered.
fn smtp_on_stdio() -> u8 {
    let server = std::env::var("INBOXD_SMTP").unwrap_or_else(|_| DEFAULT_SERVER.to_string());
    let stream = match TcpStream::connect(&server) {
        Ok(s) => s,
        Err(e) => {
            // The caller expects a greeting: a 421 tells it (RFC 5321 3.8) why there is none.
            // (writeln!, not println!: a caller that closed its end must not make this panic.)
            let _ = writeln!(
                std::io::stdout(),
                "421 4.3.0 cannot reach the mail server at {server}: {e}\r"
            );
            return EX_TEMPFAIL;
        }
    };
    let Ok(mut to_server) = stream.try_clone() else {
        let _ = writeln!(std::io::stdout(), "421 4.3.0 socket error\r");
        return EX_TEMPFAIL;
    };
    let input = std::thread::spawn(move || {
        let copied = std::io::copy(&mut std::io::stdin().lock(), &mut to_server);
        // End of input: inboxd sees the end of the connection's sending side and answers
        // what it has, then closes.
        let _ = to_server.shutdown(std::net::Shutdown::Write);
        copied
    });
    let mut from_server = stream;
    let out = std::io::copy(&mut from_server, &mut std::io::stdout().lock());
    // inboxd closed the connection: whatever the caller still sends has no one to read it.
    drop(input);
    match out {
        Ok(_) => EX_OK,
        Err(e) => {
            eprintln!("sendmail: -bs: {e}");
            EX_IOERR
        }
    }
}

/// The message on `input`, up to a line holding a single "." (unless `ignore_dots`: -i) or
/// the end of the input, so that a message typed at a terminal ends at its dot as with
/// sendmail; `None` when it is larger than [`MAX_INPUT`] octets.
pub fn read_message(input: impl Read, ignore_dots: bool) -> std::io::Result<Option<Vec<u8>>> {
    let mut r = BufReader::new(input.take(MAX_INPUT as u64 + 1));
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut total = 0;
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        // Counted before the dot is looked for: the limit may have cut a longer line down
        // to a "." (found in review: a cut message would have been sent).
        total += n;
        if total > MAX_INPUT {
            return Ok(None);
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if !ignore_dots && text.strip_suffix(b"\r").unwrap_or(text) == b"." {
            break;
        }
        out.extend_from_slice(&line);
    }
    Ok(Some(out))
}

/// The message ready to send: CRLF lines, trace-free headers completed, recipients known.
pub struct Message {
    pub data: Vec<u8>,
    pub recipients: Vec<String>,
}

/// RFC 5322 2.1.1: at most 998 octets in a line, without its CRLF. inboxd refuses longer
/// lines, as RFC 5321 4.5.3.1.6 lets it.
const MAX_LINE: usize = 998;

/// A header field's first line: a name of visible characters, then a colon (RFC 5322 2.2).
fn is_field(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(n) if n > 0 => line[..n].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
}

/// The lowercased name of a header field.
fn field_name(field: &[&[u8]]) -> String {
    let first = &field[0];
    let end = first.iter().position(|&b| b == b':').unwrap_or(first.len());
    String::from_utf8_lossy(&first[..end])
        .trim()
        .to_ascii_lowercase()
}

impl Message {
    /// Cuts the input at a lone "." line (unless -i), makes every line end in CRLF, adds
    /// From:, Date: and Message-ID: when missing, removes Bcc:, and with -t takes the
    /// recipients from To:, Cc: and Bcc: in addition to the command line's. The octets are
    /// kept as they came (8-bit text included), except what the server would refuse: a CR
    /// inside a line (a progress bar's, in cron's mail) ends that line, and a line longer
    /// than 998 octets is split (a header field folded before a space or tab, or, with
    /// none, cut with a space added to start the next piece). An mbox `From ` first line is
    /// left out; input that then does not start with a header field is all body.
    pub fn prepare(
        input: &[u8],
        req: &Request,
        sender: &str,
        full_name: Option<&str>,
        unix_time: i64,
        message_id: &str,
    ) -> Message {
        let mut lines: Vec<&[u8]> = Vec::new();
        for line in input.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !req.ignore_dots && line == b"." {
                break;
            }
            lines.extend(line.split(|&b| b == b'\r'));
        }
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        // An mbox separator ("From sender date", formail's and mail archives' first line) is
        // no header field and would make the whole message body: it is left out.
        if lines.first().is_some_and(|l| l.starts_with(b"From ")) {
            lines.remove(0);
        }
        // The header: fields and their continuation lines, up to a blank line (dropped) or
        // the first line that is neither (the body's first).
        let mut fields: Vec<Vec<&[u8]>> = Vec::new();
        let mut body_at = lines.len();
        for (i, l) in lines.iter().enumerate() {
            if l.is_empty() {
                body_at = i + 1;
                break;
            }
            if l.starts_with(b" ") || l.starts_with(b"\t") {
                if let Some(f) = fields.last_mut() {
                    f.push(l);
                    continue;
                }
            }
            if !is_field(l) {
                body_at = i;
                break;
            }
            fields.push(vec![l]);
        }
        let body = &lines[body_at.min(lines.len())..];
        let mut recipients: Vec<String> = req.recipients.clone();
        if req.from_headers {
            for f in &fields {
                if matches!(field_name(f).as_str(), "to" | "cc" | "bcc") {
                    let value = String::from_utf8_lossy(&f.join(&b" "[..])).into_owned();
                    let value = value.split_once(':').map_or("", |(_, v)| v);
                    recipients.extend(addresses(value));
                }
            }
        }
        // Bcc: names recipients the others must not see, with or without -t (a client that
        // writes it, mutt with write_bcc, relies on the MTA to remove it).
        fields.retain(|f| field_name(f) != "bcc");
        let mut added = Vec::new();
        let has = |n: &str| fields.iter().any(|f| field_name(f) == n);
        if !has("from") {
            match full_name {
                Some(name) => added.push(format!("From: {} <{sender}>", quote_phrase(name))),
                None => added.push(format!("From: {sender}")),
            }
        }
        if !has("date") {
            added.push(format!(
                "Date: {}",
                crate::smtp::trace::rfc5322_date(unix_time)
            ));
        }
        if !has("message-id") {
            added.push(format!("Message-ID: <{message_id}>"));
        }
        let mut data = Vec::new();
        let mut put = |line: &[u8], fold: bool| {
            let mut rest = line;
            // Octets the output line being written may still take.
            let mut room = MAX_LINE;
            loop {
                if rest.len() <= room {
                    data.extend_from_slice(rest);
                    data.extend_from_slice(b"\r\n");
                    return;
                }
                // In the header, folded before a space or tab (RFC 5322 2.2.3: unfolding
                // removes only the CRLF, so the field is unchanged); where there is none
                // within the line's limit, cut, and the next piece starts with a space.
                let wsp = if fold {
                    rest[1..=room]
                        .iter()
                        .rposition(|&b| b == b' ' || b == b'\t')
                        .map(|p| p + 1)
                } else {
                    None
                };
                let at = wsp.unwrap_or(room);
                data.extend_from_slice(&rest[..at]);
                data.extend_from_slice(b"\r\n");
                rest = &rest[at..];
                room = MAX_LINE;
                if fold && wsp.is_none() {
                    data.push(b' ');
                    room -= 1;
                }
            }
        };
        for l in &added {
            put(l.as_bytes(), true);
        }
        for l in fields.iter().flatten() {
            put(l, true);
        }
        put(b"", false);
        for l in body {
            put(l, false);
        }
        let mut seen = Vec::new();
        recipients.retain(|r| {
            let new = !seen.contains(r);
            seen.push(r.clone());
            new
        });
        Message { data, recipients }
    }
}

/// Visible ASCII without angle brackets, at most 256 octets: safe inside `<...>` on an SMTP
/// command line (the server checks the syntax itself).
pub fn plain_address(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 256
        && a.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
}

/// RFC 5322 phrase: quoted unless it is plain atoms and spaces.
fn quote_phrase(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c))
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The addresses of an address-list header value: `a@b, Name <c@d>, "x, y" <e@f>`, groups
/// included (`team: a@b, c@d;`, `undisclosed-recipients:;`, RFC 5322 3.4), comments left out
/// (`j@x (Smith, J)`, RFC 5322 3.2.2), quoted local parts kept (`"j.doe"@x`). An address the
/// server could not take (a space in quotes, say) is kept too: sendmail then refuses it by
/// name (64) rather than leave a recipient out without a word.
pub fn addresses(value: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut angle, mut bracket, mut comment) = (false, false, false, 0usize);
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if comment > 0 {
            match c {
                '\\' => {
                    chars.next();
                }
                '(' => comment += 1,
                ')' => comment -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
                continue;
            }
            '"' => quoted = !quoted,
            '(' if !quoted => {
                comment = 1;
                cur.push(' ');
                continue;
            }
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            '[' if !quoted => bracket = true,
            ']' if !quoted => bracket = false,
            ',' | ';' if !quoted && !angle && !bracket => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            // A group's display name ends at its colon: what came before is no address.
            ':' if !quoted && !angle && !bracket => {
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    items.push(cur);
    let mut out = Vec::new();
    for item in items {
        let item = item.trim();
        let addr = match (item.rfind('<'), item.rfind('>')) {
            (Some(a), Some(b)) if a < b => item[a + 1..b].trim(),
            // A bare addr-spec, whose local part may be quoted (and hold spaces).
            _ => item,
        };
        if !addr.is_empty() {
            out.push(addr.to_string());
        }
    }
    out
}

/// One SMTP reply: code and text.
fn reply(r: &mut impl BufRead) -> Result<(u16, String), String> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading from the server: {e}")),
        }
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("malformed reply from the server: {:?}", line.trim_end()))?;
        text.push_str(line.trim_end());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text));
        }
        text.push(' ');
    }
}

/// Talks SMTP to inboxd. Ok(status) when the conversation ended normally (EX_OK, or
/// EX_NOUSER when some recipients were refused and the others got the message).
fn submit(
    server: &str,
    hostname: &str,
    sender: &str,
    recipients: &[String],
    data: &[u8],
) -> Result<u8, (u8, String)> {
    let stream = TcpStream::connect(server).map_err(|e| {
        (
            EX_TEMPFAIL,
            format!("cannot reach the mail server at {server}: {e}; nothing was sent"),
        )
    })?;
    // Longer than the 10 minutes inboxd gives a commit before its 451 (found in review: with
    // the same 10 minutes, sendmail could give up, 75, on a message that was delivered).
    let timeout = Some(Duration::from_secs(660));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut w = stream
        .try_clone()
        .map_err(|e| (EX_TEMPFAIL, format!("socket: {e}")))?;
    let mut r = BufReader::new(stream);
    let io = |e: std::io::Error| (EX_TEMPFAIL, format!("writing to the server: {e}"));
    let proto = |e: String| (EX_TEMPFAIL, e);
    let expect =
        |r: &mut BufReader<TcpStream>, what: &str| -> Result<(u16, String), (u8, String)> {
            let (code, text) = reply(r).map_err(proto)?;
            if code >= 400 {
                let status = if code >= 500 {
                    EX_UNAVAILABLE
                } else {
                    EX_TEMPFAIL
                };
                return Err((status, format!("{what}: {text}")));
            }
            Ok((code, text))
        };
    expect(&mut r, "greeting")?;
    w.write_all(format!("EHLO {hostname}\r\n").as_bytes())
        .map_err(io)?;
    expect(&mut r, "EHLO")?;
    w.write_all(format!("MAIL FROM:<{sender}>\r\n").as_bytes())
        .map_err(io)?;
    expect(&mut r, "MAIL FROM")?;
    let mut accepted = 0;
    let mut refused = 0;
    let mut temporary = 0;
    for rcpt in recipients {
        // An address without a domain is a local account: the literal of the address we
        // connected to is always a local domain for inboxd, whatever its --domain list.
        let addr = if rcpt.contains('@') {
            rcpt.clone()
        } else {
            let ip = w
                .peer_addr()
                .map(|a| a.ip())
                .map_err(|e| (EX_TEMPFAIL, e.to_string()))?;
            match ip {
                std::net::IpAddr::V4(v4) => format!("{rcpt}@[{v4}]"),
                std::net::IpAddr::V6(v6) => format!("{rcpt}@[IPv6:{v6}]"),
            }
        };
        w.write_all(format!("RCPT TO:<{addr}>\r\n").as_bytes())
            .map_err(io)?;
        let (code, text) = reply(&mut r).map_err(proto)?;
        match code {
            200..=299 => accepted += 1,
            400..=499 => {
                eprintln!("sendmail: {rcpt}: {text}");
                temporary += 1;
            }
            _ => {
                eprintln!("sendmail: {rcpt}: {text}");
                refused += 1;
            }
        }
    }
    if accepted == 0 {
        let _ = w.write_all(b"QUIT\r\n");
        let status = if temporary > 0 {
            EX_TEMPFAIL
        } else {
            EX_NOUSER
        };
        return Err((
            status,
            "no recipient accepted the message; nothing was sent".into(),
        ));
    }
    w.write_all(b"DATA\r\n").map_err(io)?;
    expect(&mut r, "DATA")?;
    let mut out = Vec::with_capacity(data.len() + 64);
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    w.write_all(&out).map_err(io)?;
    let (code, text) = reply(&mut r).map_err(proto)?;
    let _ = w.write_all(b"QUIT\r\n");
    match code {
        200..=299 if refused + temporary == 0 => Ok(EX_OK),
        200..=299 => Ok(if temporary > 0 {
            EX_TEMPFAIL
        } else {
            EX_NOUSER
        }),
        400..=499 => Err((EX_TEMPFAIL, format!("message not accepted: {text}"))),
        500..=599 => Err((EX_DATAERR, format!("message refused: {text}"))),
        _ => Err((EX_PROTOCOL, format!("unexpected reply: {text}"))),
    }
}

/// Checks the aliases file, prints what is wrong in it, and asks every running inboxd to
/// reload it (SIGHUP, as root). Non-zero when the file has problems or cannot be read.
fn newaliases() -> u8 {
    // INBOXD_ALIASES names another file, for a server started with --aliases.
    let path = std::env::var_os("INBOXD_ALIASES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::config::DEFAULT_ALIASES.into());
    let path = path.as_path();
    let aliases = match Aliases::load(path) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("newaliases: {}: {e}", path.display());
            return EX_IOERR;
        }
    };
    for p in aliases.problems() {
        println!("newaliases: {p}");
    }
    println!("newaliases: {}: {} aliases", path.display(), aliases.len());
    let mut told = 0;
    for pid in running_servers() {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        ) {
            Ok(()) => told += 1,
            Err(e) => eprintln!("newaliases: cannot tell inboxd (pid {pid}) to reload: {e}"),
        }
    }
    if told > 0 {
        println!("newaliases: asked {told} running inboxd to reload");
    } else {
        println!("newaliases: no running inboxd to reload");
    }
    if aliases.problems().is_empty() {
        EX_OK
    } else {
        EX_DATAERR
    }
}

/// The pids of running inboxd receivers (not their delivery agents).
fn running_servers() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if comm.trim() != "inboxd" {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|a| a == b"--delivery-agent") {
            continue;
        }
        // Only a process that blocks SIGHUP reads it (a running server, through its
        // signalfd); to any other inboxd (one still starting, which reads the aliases file
        // afresh anyway, or `inboxd check`) it would be fatal (found in review).
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        if !blocks_sighup(&status) {
            continue;
        }
        out.push(pid);
    }
    out
}

/// Whether a /proc/PID/status says SIGHUP (signal 1, the mask's lowest bit) is blocked.
fn blocks_sighup(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_process_blocking_sighup_is_signalled() {
        assert!(blocks_sighup("Name:\tinboxd\nSigBlk:\t0000000000014003\n"));
        assert!(!blocks_sighup("Name:\tinboxd\nSigBlk:\t0000000000000000\n"));
        assert!(!blocks_sighup("Name:\tinboxd\nSigBlk:\t0000000000000002\n"));
        assert!(!blocks_sighup("Name:\tinboxd\n"));
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn command_lines_of_common_callers() {
        // cron: sendmail -FCronDaemon -i -B8BITMIME -oem root
        let r = parse_args(&args("-FCronDaemon -i -B8BITMIME -oem root")).unwrap();
        assert_eq!(r.full_name.as_deref(), Some("CronDaemon"));
        assert!(r.ignore_dots);
        assert_eq!(r.recipients, vec!["root"]);
        // mutt: sendmail -oem -oi -- alice@example.org
        let r = parse_args(&args("-oem -oi -- alice@example.org")).unwrap();
        assert!(r.ignore_dots);
        assert_eq!(r.recipients, vec!["alice@example.org"]);
        let r = parse_args(&args("-t -f bob@example.org")).unwrap();
        assert!(r.from_headers);
        assert_eq!(r.from.as_deref(), Some("bob@example.org"));
        assert_eq!(parse_args(&args("-bp")).unwrap().mode, Mode::Mailq);
        assert_eq!(parse_args(&args("-bi")).unwrap().mode, Mode::Newaliases);
        assert_eq!(parse_args(&args("-bs")).unwrap().mode, Mode::Smtp);
        assert!(parse_args(&args("-Z")).is_err());
        assert!(parse_args(&args("-bt")).is_err());
        assert!(parse_args(&args("-f")).is_err());
    }

    #[test]
    fn headers_recipients_and_dots() {
        let req = Request {
            from_headers: true,
            recipients: vec!["carol".into()],
            ..Default::default()
        };
        let input = b"To: Alice <alice@example.org>, bob\nCc: \"Doe, J\" <j@example.org>\nBcc: hidden@example.org\nSubject: hi\n\nline\n.\nnot sent\n";
        let m = Message::prepare(input, &req, "root@host", Some("Root User"), 0, "id@host");
        let text = String::from_utf8(m.data).unwrap();
        assert_eq!(
            m.recipients,
            vec![
                "carol",
                "alice@example.org",
                "bob",
                "j@example.org",
                "hidden@example.org"
            ]
        );
        assert!(!text.contains("Bcc"), "{text}");
        assert!(text.starts_with("From: Root User <root@host>\r\nDate: Thu, 1 Jan 1970"));
        assert!(text.contains("Message-ID: <id@host>\r\n"));
        assert!(text.ends_with("Subject: hi\r\n\r\nline\r\n"), "{text}");
        // -i: the lone dot is data.
        let req = Request {
            ignore_dots: true,
            recipients: vec!["alice".into()],
            ..Default::default()
        };
        let m = Message::prepare(b"From: x@y\n\n.\nmore\n", &req, "s@h", None, 0, "i@h");
        let text = String::from_utf8(m.data).unwrap();
        assert!(text.ends_with("From: x@y\r\n\r\n.\r\nmore\r\n"), "{text}");
    }

    fn prepared(input: &[u8], req: &Request) -> (Vec<u8>, Vec<String>) {
        let m = Message::prepare(input, req, "s@h", None, 0, "i@h");
        (m.data, m.recipients)
    }

    /// What the server refuses never reaches it, and nothing of the text is lost: a CR
    /// inside a line ends it, long lines are cut (folded in the header), 8-bit octets pass
    /// unchanged.
    #[test]
    fn what_the_server_would_refuse_is_made_acceptable_and_nothing_is_lost() {
        let req = Request::default();
        let (data, _) = prepared(b"Subject: x\n\n10%\r50%\r100%\r\n\xe9t\xe9\n", &req);
        assert!(
            data.ends_with(b"Subject: x\r\n\r\n10%\r\n50%\r\n100%\r\n\xe9t\xe9\r\n"),
            "{:?}",
            String::from_utf8_lossy(&data)
        );
        let long = "y".repeat(2500);
        let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let words = words.join(" ");
        let exact = "x".repeat(MAX_LINE - "X-Exact: ".len());
        let input = format!("Subject: {words}\nX-Exact: {exact}\nX-Long: {long}\n\n{long}\n");
        let (data, _) = prepared(input.as_bytes(), &req);
        for line in data.split(|&b| b == b'\n') {
            assert!(
                line.len() <= MAX_LINE + 1,
                "a line of {} octets",
                line.len()
            );
        }
        let text = String::from_utf8(data).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        // Unfolded as RFC 5322 2.2.3 says (the CRLFs removed, nothing else), the field
        // with spaces is whole; one of exactly 998 octets is left alone; one with no
        // space is cut, each piece after the first starting with an added space.
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
        assert!(
            unfolded.contains(&format!("\nSubject: {words}\r")),
            "{head}"
        );
        assert!(head.contains(&format!("\nX-Exact: {exact}\r\n")), "{head}");
        // (Its only space, after the colon, is where it is folded first.)
        let x_long = head.split("X-Long:").nth(1).unwrap();
        assert!(x_long.starts_with("\r\n y"), "{x_long}");
        assert_eq!(x_long.replace("\r\n ", ""), long);
        assert_eq!(body.replace("\r\n", ""), long);
    }

    /// `echo "disk full" | sendmail root`: no header section, so it is all body.
    #[test]
    fn input_without_a_header_is_the_body() {
        let (data, _) = prepared(b"disk full\nsecond line\n", &Request::default());
        let text = String::from_utf8(data).unwrap();
        assert!(text.starts_with("From: s@h\r\n"), "{text}");
        assert!(
            text.ends_with("Message-ID: <i@h>\r\n\r\ndisk full\r\nsecond line\r\n"),
            "{text}"
        );
        // An mbox separator first (formail, archives) is left out: the header follows.
        let req = Request {
            from_headers: true,
            ..Default::default()
        };
        let (data, rcpts) = prepared(b"From a@x Thu Jan  1 00:00:00 1970\nTo: b@x\n\nhi\n", &req);
        assert_eq!(rcpts, vec!["b@x"]);
        assert!(!String::from_utf8(data).unwrap().contains("From a@x"));
        // A header that ends without a blank line, then text: that text is the body.
        let (data, _) = prepared(b"Subject: s\nnot a field\n", &Request::default());
        let text = String::from_utf8(data).unwrap();
        assert!(
            text.ends_with("Subject: s\r\n\r\nnot a field\r\n"),
            "{text}"
        );
    }

    /// Bcc: goes even without -t (mutt with write_bcc writes it and sends the recipients
    /// on the command line); groups are read with -t.
    #[test]
    fn bcc_always_goes_and_groups_are_read() {
        let req = Request {
            recipients: vec!["alice".into()],
            ..Default::default()
        };
        let (data, rcpts) = prepared(b"To: alice\nBcc: boss\n\nhi\n", &req);
        assert!(!String::from_utf8(data).unwrap().contains("boss"));
        assert_eq!(rcpts, vec!["alice"]);
        let req = Request {
            from_headers: true,
            ..Default::default()
        };
        let input = b"To: team: a@x, B <b@x>;, c@x\nCc: undisclosed-recipients:;\nBcc: d@[IPv6:::1]\n\nhi\n";
        let (_, rcpts) = prepared(input, &req);
        assert_eq!(rcpts, vec!["a@x", "b@x", "c@x", "d@[IPv6:::1]"]);
    }

    #[test]
    fn a_lone_dot_ends_the_input_unless_told_otherwise() {
        let input = b"Subject: x\n\nline\n.\r\nafter\n";
        assert_eq!(
            read_message(&input[..], false).unwrap().unwrap(),
            b"Subject: x\n\nline\n"
        );
        assert_eq!(read_message(&input[..], true).unwrap().unwrap(), input);
        let big = vec![b'a'; MAX_INPUT + 1];
        assert!(read_message(&big[..], true).unwrap().is_none());
        // The limit falls just after a newline, on a line that starts with a dot: the cut
        // line reads as ".", and must not pass for the end of a shorter message.
        let mut edge = vec![b'a'; MAX_INPUT - 1];
        edge.extend_from_slice(b"\n.more\n");
        assert!(read_message(&edge[..], false).unwrap().is_none());
    }

    #[test]
    fn senders_and_recipients_as_callers_write_them() {
        assert_eq!(reverse_path("www-data", "h.example"), "www-data@h.example");
        assert_eq!(reverse_path("<>", "h.example"), "");
        assert_eq!(reverse_path("", "h.example"), "");
        assert_eq!(reverse_path("<a@b>", "h.example"), "a@b");
        // Debian's cron: MAILTO="alice,bob" is one argument; "alice, bob" too.
        let r = parse_args(&["alice,bob".to_string(), "carol, dave".to_string()]).unwrap();
        assert_eq!(r.recipients, vec!["alice", "bob", "carol", "dave"]);
        let r = parse_args(&args("-ti -O DeliveryMode=b -h 5 -n -Ac")).unwrap();
        assert!(r.from_headers && r.ignore_dots);
        assert!(r.recipients.is_empty());
        let r = parse_args(&args("-it")).unwrap();
        assert!(r.from_headers && r.ignore_dots);
        assert!(parse_args(&args("-tx")).is_err());
    }

    #[test]
    fn addresses_cannot_carry_commands() {
        assert!(plain_address("alice@example.org"));
        assert!(plain_address("root"));
        for bad in ["a\r\nRSET", "a b", "a>", "", "\u{e9}@x"] {
            assert!(!plain_address(bad), "{bad:?}");
        }
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            addresses(" a@b, Name <c@d>, \"x, y\" <e@f>,, g "),
            vec!["a@b", "c@d", "e@f", "g"]
        );
        // Comments (nested, with commas and colons) are left out; quoted local parts kept,
        // and one with a space too, for sendmail to refuse by name.
        assert_eq!(
            addresses("j@x (Smith, J), k@x (re: y (z)), \"j.doe\"@x, <\"john doe\"@x>"),
            vec!["j@x", "k@x", "\"j.doe\"@x", "\"john doe\"@x"]
        );
        assert!(plain_address("\"j.doe\"@x"));
        assert!(!plain_address("\"john doe\"@x"));
    }
}
