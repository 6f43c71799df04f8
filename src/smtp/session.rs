//! The SMTP session: one connection's protocol state machine (RFC 5321 3, 4.1.4, 4.3.2; RFC
//! 2920 pipelining; RFC 1870 SIZE).
//!
//! Bytes from the client and the current time go in ([`Session::receive`],
//! [`Session::handle_timeout`]); reply bytes ([`Session::take_output`]), [`Event`]s
//! ([`Session::poll_event`]), the next deadline and whether it wants to read come out. Answers
//! to events come back as method calls ([`Session::recipient_verdict`],
//! [`Session::delivery_outcome`]) whenever they are ready: the session never assumes they are
//! synchronous. While an answer is outstanding, further pipelined input stays buffered, so
//! replies always come out in command order (RFC 2920 3.1).
//!
//! It must not do I/O, read a clock, know users or files, or log: everything it learns of the
//! world arrives as a method argument.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::command::{self, Body, Command};
use super::data::{DataDecoder, DataFault, HeaderScan};
use super::path::{Domain, ForwardPath, ReversePath};
use super::reply::Reply;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including the CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// Distinct accounts one transaction may reach: each copy's descriptor crosses to the
/// receiver in one datagram, and a datagram carries at most 253 (SCM_MAX_FD).
pub const MAX_ACCOUNTS: usize = 250;
/// RFC 5321 6.3 suggests refusing mail with "more than 100 Received" fields as a loop.
pub const MAX_RECEIVED: usize = 100;
/// Replies waiting to be sent beyond this stop the processing of pipelined input until the
/// server has written them, so a client that never reads cannot grow our memory. It is also
/// the most work one step does for one client (about 500 NOOPs): with 100 clients flooding
/// NOOPs and never reading, 64 KiB let a newcomer wait 2.8 s for its NOOP reply
/// (reliability/abuse-figures).
const OUTPUT_HIGH_WATER: usize = 8 * 1024;
/// Unprocessed input beyond this stops reading until the session has caught up.
const INPUT_BACKLOG: usize = 64 * 1024;

/// Settings a session needs. Domain names in `local_domains` are lower case.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub local_domains: Vec<String>,
    /// Addresses whose literals (`user@[192.0.2.1]`) are local: the addresses inboxd listens
    /// on. The address a client connected to is always local too.
    pub local_addresses: Vec<IpAddr>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// RFC 5321 4.5.3.2.7: the server waits at least 5 minutes for the next command.
    pub command_timeout: Duration,
    /// RFC 5321 4.5.3.2.6 gives the client 3 minutes per data block and 10 for the final dot;
    /// the server waits at least as long.
    pub data_timeout: Duration,
    /// Bad commands (500/501/503/555 replies) before the session is ended with 421.
    pub max_errors: u32,
}

/// Where the connection comes from and which of our addresses it reached.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub remote: IpAddr,
    pub local: IpAddr,
}

/// One accepted forward-path (the accounts it resolved to are in
/// [`Transaction::accounts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub forward_path: ForwardPath,
}

/// A mail transaction (RFC 5321 3.3): reverse-path, forward-paths, and what the trace fields
/// need. The mail data itself travels separately as [`Event::MailData`].
#[derive(Debug, Clone)]
pub struct Transaction {
    /// Counts transactions within the session, from 1.
    pub number: u64,
    pub reverse_path: ReversePath,
    pub recipients: Vec<Recipient>,
    pub body: Option<Body>,
    pub helo: String,
    pub esmtp: bool,
    pub peer: Peer,
    /// The message's size as RFC 1870 counts it (section 4): CRLF line ends, without the
    /// dots of dot-stuffing and without the final dot.
    pub size: u64,
    /// Every account the accepted forward-paths resolved to, each once, in first-seen order
    /// (at most [`MAX_ACCOUNTS`]). Kept as recipients are accepted, not rebuilt per RCPT:
    /// a client naming a large alias again and again must cost a pass over this list, not
    /// over every earlier recipient's accounts (found in review: quadratic, and an account
    /// list held per forward-path).
    pub accounts: Vec<String>,
}

impl Transaction {
    /// Every account this transaction delivers to, each once, in first-seen order.
    pub fn accounts(&self) -> Vec<String> {
        self.accounts.clone()
    }

    /// Whether adding `accounts` would take the transaction over [`MAX_ACCOUNTS`]. Stops at
    /// the first account over the limit, so a huge alias costs at most that many lookups in
    /// a set and comparisons with the (bounded) accounts already held.
    fn over_limit_with(&self, accounts: &[String]) -> bool {
        let mut new = std::collections::HashSet::new();
        for a in accounts {
            if !self.accounts.contains(a)
                && new.insert(a.as_str())
                && self.accounts.len() + new.len() > MAX_ACCOUNTS
            {
                return true;
            }
        }
        false
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Look up this local part (case as the client wrote it) and answer with
    /// [`Session::recipient_verdict`]. Only one is outstanding at a time.
    RecipientToCheck { local_part: String },
    /// DATA was accepted (354 sent): mail data for this transaction follows.
    DataStart(Transaction),
    /// Decoded mail data: LF line ends, dots unstuffed.
    MailData(Vec<u8>),
    /// The final dot arrived and the data is acceptable: deliver it, then answer with
    /// [`Session::delivery_outcome`].
    EndOfData(Transaction),
    /// The data of the transaction started by `DataStart` will never be delivered: drop it.
    DataAborted,
    /// Send what is in the output, then close the connection.
    Close,
}

/// The answer to [`Event::RecipientToCheck`], classified by whoever looked it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    Accept(Vec<String>),
    NoSuchUser,
    /// The name reaches only uid 0, and this host does not deliver as root: a policy
    /// refusal (550 5.7.1), not an unknown user.
    Uid0Refused,
    /// The lookup itself failed (NSS down, aliases unreadable): try later.
    TemporaryFailure,
    /// The recipient exists but its mailbox cannot take mail now (checked by the delivery
    /// layer, which classified the failure): this reply, a 4xx, for this recipient only,
    /// so the transaction goes on for the others.
    Unavailable(Reply),
}

/// The answer to [`Event::EndOfData`]: Ok when every recipient's copy is durable, or the
/// reply to give, classified (4xx/5xx, RFC 3463) where the failure was detected.
pub type DeliveryOutcome = Result<(), Reply>;

#[derive(Debug)]
enum Phase {
    Command,
    AwaitRecipient(ForwardPath),
    Data(Box<DataState>),
    AwaitDelivery,
    Closed,
}

#[derive(Debug)]
struct DataState {
    decoder: DataDecoder,
    headers: HeaderScan,
    fault: Option<Reply>,
    /// DataAborted was sent: a fault in the data, then a timeout or shutdown before its end,
    /// must not abort twice (found by fuzzing).
    aborted: bool,
}

#[derive(Debug)]
pub struct Session {
    config: std::rc::Rc<SessionConfig>,
    peer: Peer,
    phase: Phase,
    /// `Some((name, esmtp))` after HELO/EHLO.
    greeted: Option<(String, bool)>,
    tx: Option<Transaction>,
    transactions: u64,
    /// Bytes from the client; `input[consumed..]` is not processed yet. Processed bytes are
    /// dropped once per read, not once per command (pipelined groups cost no quadratic copying).
    input: Vec<u8>,
    consumed: usize,
    /// How much of the unprocessed input is known to hold no CRLF (no rescans of a long line).
    scanned: usize,
    /// True while throwing away an over-long command line up to its CRLF.
    discarding: bool,
    output: Vec<u8>,
    events: VecDeque<Event>,
    errors: u32,
    deadline: Option<Instant>,
    /// The client closed its sending side.
    peer_eof: bool,
    /// The server is shutting down while a lookup or delivery is outstanding: its answer
    /// goes out first, then the 421.
    shutdown_pending: bool,
    /// The last MAIL was refused and no transaction has started since: the RCPTs and DATA a
    /// pipelining client sent behind it get 503 without counting as errors (RFC 2920 3.1;
    /// found in review: 20 recipients behind a refused MAIL ended the session).
    mail_refused: bool,
    /// The client said QUIT: it closed the session, and expects nothing after the 221.
    quit: bool,
}

impl Session {
    /// A new session; the 220 greeting (RFC 5321 4.3.1) is already in the output.
    pub fn new(config: std::rc::Rc<SessionConfig>, peer: Peer, now: Instant) -> Session {
        let mut s = Session {
            config,
            peer,
            phase: Phase::Command,
            greeted: None,
            tx: None,
            transactions: 0,
            input: Vec::new(),
            consumed: 0,
            scanned: 0,
            discarding: false,
            output: Vec::new(),
            events: VecDeque::new(),
            errors: 0,
            deadline: None,
            peer_eof: false,
            shutdown_pending: false,
            mail_refused: false,
            quit: false,
        };
        let greeting = format!("{} ESMTP inboxd ready", s.config.hostname);
        s.reply(Reply::plain(220, vec![greeting]));
        s.touch(now);
        s
    }

    /// Feeds bytes read from the client (possibly none, to resume after output was drained).
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        if !bytes.is_empty() {
            if self.consumed > 0 {
                self.input.drain(..self.consumed);
                self.consumed = 0;
            }
            self.input.extend_from_slice(bytes);
        }
        let consumed_before = self.consumed;
        self.process();
        // Only progress moves the deadline: in the command phase a complete command, in DATA
        // any mail data taken. A client dripping a byte at a time into a command that never
        // ends (slowloris) still meets the command timeout (RFC 5321 4.5.3.2.7: the time
        // allowed for the next command, not between two bytes of it). After processing, so
        // the timeout is the one of the phase the bytes led to (the 354 starts the DATA
        // timeout, the final dot ends it).
        if !bytes.is_empty() && self.consumed > consumed_before {
            self.touch(now);
        }
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
        }
    }

    /// The client closed its side. An unfinished DATA is dropped, never delivered.
    ///
    /// Commands it sent before closing are still answered (a half-closed socket can still
    /// take our replies); the session closes once they are, or once an outstanding lookup or
    /// delivery has been answered.
    pub fn peer_closed(&mut self) {
        self.peer_eof = true;
        self.process();
    }

    /// Nothing more can reach the client (a write to it failed): its unprocessed commands
    /// are dropped, not answered, and the session closes now, or once an outstanding lookup
    /// or delivery has been answered (found in review: a pipelined backlog stopped
    /// [`Session::peer_closed`] at the reply limit, and the dead session kept its slot until
    /// its timeout).
    pub fn client_gone(&mut self) {
        self.peer_eof = true;
        self.output.clear();
        self.input.clear();
        self.consumed = 0;
        self.scanned = 0;
        if !self.is_waiting() {
            self.abort_data();
            self.close();
        }
    }

    /// Ends the session with 421 if its deadline has passed (RFC 5321 4.5.3.2).
    pub fn handle_timeout(&mut self, now: Instant) {
        // While a lookup or delivery is outstanding the client is not the one being waited
        // for (RFC 5321 4.5.3.2.7 times the wait for its next command); the server bounds
        // that wait, and the answer starts the command timeout afresh.
        if self.is_closed() || self.is_waiting() {
            return;
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.abort_data();
            let text = format!(
                "{} Timeout waiting for client input, closing",
                self.config.hostname
            );
            self.reply(Reply::new(421, "4.4.2", text));
            self.close();
        }
    }

    /// Tells the session that the server is shutting down: 421 and close (RFC 5321 3.8).
    /// A session waiting for its delivery's outcome (or a lookup) gets that answer first:
    /// a commit already sent to the agent completes, and a 421 in its place would make the
    /// client send the message again (found in review).
    pub fn shutdown(&mut self) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        if self.is_waiting() {
            self.shutdown_pending = true;
            return;
        }
        self.abort_data();
        let text = format!("{} Service shutting down, closing", self.config.hostname);
        self.reply(Reply::new(421, "4.3.2", text));
        self.close();
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes the reply bytes produced so far.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// When [`Session::handle_timeout`] should be called; `None` while the session waits on
    /// the server (a lookup or a delivery), which is the server's to bound.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Command | Phase::Data(_) => self.deadline,
            _ => None,
        }
    }

    /// Whether the server should read more from the client now: not while replies or
    /// unprocessed input pile up (a pipelining client is taken a step at a time, and its
    /// backlog stays in the kernel's socket buffer, not in ours).
    pub fn wants_read(&self) -> bool {
        matches!(self.phase, Phase::Command | Phase::Data(_))
            && !self.peer_eof
            && self.output.len() < OUTPUT_HIGH_WATER
            && self.input.len() - self.consumed < INPUT_BACKLOG
    }

    /// Unprocessed client input held by the session (bounded by the read back-pressure).
    pub fn buffered_input(&self) -> usize {
        self.input.len() - self.consumed
    }

    /// Reply bytes waiting to be taken.
    pub fn output_len(&self) -> usize {
        self.output.len()
    }

    /// Whether events wait in [`Session::poll_event`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether the session ended with the client's QUIT (not with a 421 of ours).
    pub fn ended_by_quit(&self) -> bool {
        self.quit
    }

    /// Whether a lookup or delivery answer is outstanding.
    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::AwaitRecipient(_) | Phase::AwaitDelivery)
    }

    /// The answer to the outstanding [`Event::RecipientToCheck`], at `now`. Ignored if none
    /// is.
    pub fn recipient_verdict(&mut self, verdict: RcptVerdict, now: Instant) {
        let Phase::AwaitRecipient(_) = self.phase else {
            return;
        };
        let Phase::AwaitRecipient(forward_path) =
            std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return;
        };
        let r = match verdict {
            // One address (an alias) that alone reaches more accounts than a message may:
            // no later transaction could take it, so the refusal is permanent (found in
            // review: a 452 had senders retry it for days). RFC 3463 X.5.3: too many
            // recipients.
            // (The resolver lists each account once.)
            RcptVerdict::Accept(accounts) if accounts.len() > MAX_ACCOUNTS => Reply::new(
                550,
                "5.5.3",
                "Too many recipients: this address alone reaches more accounts than one message may",
            ),
            RcptVerdict::Accept(accounts) if !accounts.is_empty() && self.too_many(&accounts) => {
                // RFC 5321 4.5.3.1.10: 452 for too many recipients.
                Reply::new(452, "4.5.3", "Too many recipients")
            }
            RcptVerdict::Accept(accounts) if !accounts.is_empty() => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.recipients.push(Recipient { forward_path });
                    for a in accounts {
                        if !tx.accounts.contains(&a) {
                            tx.accounts.push(a);
                        }
                    }
                }
                Reply::new(250, "2.1.5", "Recipient OK")
            }
            RcptVerdict::Accept(_) | RcptVerdict::NoSuchUser => {
                Reply::new(550, "5.1.1", "No such user here")
            }
            // RFC 3463 X.7.1: delivery not authorized. The text tells the postmaster the fix.
            RcptVerdict::Uid0Refused => Reply::new(
                550,
                "5.7.1",
                "Mail for root is not delivered here; the administrator must alias it",
            ),
            RcptVerdict::TemporaryFailure => Reply::new(
                451,
                "4.3.0",
                "Recipient lookup failed temporarily, try again later",
            ),
            RcptVerdict::Unavailable(r) => r,
        };
        self.reply(r);
        // The wait for the client's next command starts now (found in review: a slow lookup
        // or commit left the deadline set at the command that started it, so the answer
        // could be followed at once by a 421 timeout).
        self.touch(now);
        self.after_answer();
    }

    /// Goes on after a lookup's or a delivery's answer: with the client's next commands,
    /// or, if the server began shutting down meanwhile, with the 421.
    fn after_answer(&mut self) {
        if self.shutdown_pending {
            self.shutdown_pending = false;
            self.shutdown();
        } else {
            self.process();
        }
    }

    /// The answer to the outstanding [`Event::EndOfData`], at `now`. Ignored if none is.
    pub fn delivery_outcome(&mut self, outcome: DeliveryOutcome, now: Instant) {
        let Phase::AwaitDelivery = self.phase else {
            return;
        };
        self.phase = Phase::Command;
        self.touch(now);
        let number = self.tx.as_ref().map_or(0, |t| t.number);
        self.tx = None;
        let r = match outcome {
            Ok(()) => Reply::new(250, "2.0.0", format!("Delivered, transaction {number}")),
            Err(r) => r,
        };
        self.reply(r);
        self.after_answer();
    }

    // ---- internals ----

    /// Whether accepting a recipient that reaches `accounts` would take the transaction over
    /// its limits (it would get 452): the server asks before any further check of them.
    pub fn would_exceed(&self, accounts: &[String]) -> bool {
        self.too_many(accounts)
    }

    /// Whether adding `accounts` would take the transaction over [`MAX_ACCOUNTS`].
    fn too_many(&self, accounts: &[String]) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.over_limit_with(accounts))
    }

    fn touch(&mut self, now: Instant) {
        let t = match self.phase {
            Phase::Closed => return,
            Phase::Data(_) => self.config.data_timeout,
            _ => self.config.command_timeout,
        };
        self.deadline = Some(now + t);
    }

    /// Tells the server, once, that the data being received will never be delivered.
    fn abort_data(&mut self) {
        if let Phase::Data(st) = &mut self.phase {
            if !st.aborted {
                st.aborted = true;
                self.events.push_back(Event::DataAborted);
            }
        }
    }

    fn reply(&mut self, r: Reply) {
        r.write_to(&mut self.output);
    }

    fn close(&mut self) {
        if !matches!(self.phase, Phase::Closed) {
            self.phase = Phase::Closed;
            self.tx = None;
            self.input = Vec::new();
            self.consumed = 0;
            self.deadline = None;
            self.events.push_back(Event::Close);
        }
    }

    /// A RCPT or DATA without a transaction: an error, unless it followed a refused MAIL.
    fn out_of_sequence(&mut self, r: Reply) {
        if self.mail_refused {
            self.reply(r);
        } else {
            self.error(r);
        }
    }

    /// A command error: counted, and the session is ended with 421 once there are too many
    /// (an abusive or broken client; the counted reply is replaced, so every command still gets
    /// exactly one reply).
    fn error(&mut self, r: Reply) {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            let text = format!(
                "{} Too many errors, closing connection",
                self.config.hostname
            );
            self.reply(Reply::new(421, "4.7.0", text));
            self.abort_data();
            self.close();
        } else {
            self.reply(r);
        }
    }

    fn process(&mut self) {
        loop {
            if self.output.len() >= OUTPUT_HIGH_WATER {
                return;
            }
            let more = match self.phase {
                Phase::Command => self.next_command(),
                Phase::Data(_) => self.data(),
                _ => return,
            };
            if !more {
                // The input is used up. If the client has closed its side, nothing more can
                // come: an unfinished DATA is dropped, never delivered.
                if self.peer_eof {
                    self.abort_data();
                    self.close();
                }
                return;
            }
        }
    }

    /// Takes one command line from the input and runs it. False when the input holds no
    /// complete line.
    fn next_command(&mut self) -> bool {
        let pending = &self.input[self.consumed..];
        let from = self.scanned.saturating_sub(1);
        let Some(pos) = pending[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + from)
        else {
            if pending.len() > MAX_COMMAND_LINE {
                // Over-long line: forget what we have (keeping a trailing CR, which may be half
                // of the CRLF), and answer once when its end arrives (RFC 5321 4.5.3.1.4).
                let keep = pending.last() == Some(&b'\r');
                self.input.clear();
                self.consumed = 0;
                if keep {
                    self.input.push(b'\r');
                }
                self.discarding = true;
            }
            self.scanned = self.input.len() - self.consumed;
            return false;
        };
        let line = pending[..pos].to_vec();
        self.consumed += pos + 2;
        self.scanned = 0;
        let is_mail = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL");
        let transactions = self.transactions;
        if std::mem::take(&mut self.discarding) || line.len() + 2 > MAX_COMMAND_LINE {
            self.error(Reply::new(500, "5.5.2", "Line too long"));
        } else if line.iter().any(|&b| b == b'\r' || b == b'\n') {
            // RFC 5321 2.3.8: CR and LF only as the CRLF pair. A bare LF must not end a
            // command, or commands could be smuggled past a front end that sees one line.
            self.error(Reply::new(
                500,
                "5.5.2",
                "Bare CR or LF in command line not allowed",
            ));
        } else {
            match command::parse(&line) {
                Ok(c) => self.execute(c),
                Err(r) => self.error(r),
            }
        }
        if is_mail {
            // Refused means no transaction now: a MAIL refused because one is open already
            // leaves RCPTs in sequence (found in review).
            self.mail_refused = self.tx.is_none() && self.transactions == transactions;
        }
        true
    }

    fn execute(&mut self, c: Command) {
        let host = self.config.hostname.clone();
        match c {
            Command::Ehlo(name) => {
                // RFC 5321 4.1.4: EHLO also resets the transaction.
                self.tx = None;
                self.mail_refused = false;
                self.greeted = Some((name.clone(), true));
                let lines = vec![
                    format!("{host} greets {name}"),
                    "PIPELINING".to_string(),
                    format!("SIZE {}", self.config.max_message_size),
                    "8BITMIME".to_string(),
                    "ENHANCEDSTATUSCODES".to_string(),
                    "HELP".to_string(),
                ];
                self.reply(Reply::plain(250, lines));
            }
            Command::Helo(name) => {
                self.tx = None;
                self.mail_refused = false;
                self.greeted = Some((name.clone(), false));
                self.reply(Reply::plain(250, vec![format!("{host} greets {name}")]));
            }
            Command::Mail { path, size, body } => self.mail(path, size, body),
            Command::Rcpt(path) => self.rcpt(path),
            Command::Data => self.data_command(),
            Command::Rset => {
                self.tx = None;
                self.mail_refused = false;
                self.reply(Reply::new(250, "2.0.0", "Reset OK"));
            }
            Command::Noop => self.reply(Reply::new(250, "2.0.0", "OK")),
            Command::Quit => {
                self.quit = true;
                self.reply(Reply::new(
                    221,
                    "2.0.0",
                    format!("{host} closing connection"),
                ));
                self.close();
            }
            // RFC 5321 3.5.3: 252 when we will not verify but will accept the message.
            Command::Vrfy(_) => self.reply(Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            // RFC 5321 3.5.3: 502 (not implemented) is permitted; we disclose no lists.
            Command::Expn(_) => self.reply(Reply::new(502, "5.5.1", "EXPN not available")),
            Command::Help => self.reply(Reply {
                code: 214,
                enhanced: Some("2.0.0"),
                lines: vec![
                    "inboxd delivers mail for local users; it does not relay".to_string(),
                    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP".to_string(),
                    "End of HELP info".to_string(),
                ],
            }),
        }
    }

    fn mail(&mut self, path: ReversePath, size: Option<u64>, body: Option<Body>) {
        let Some((helo, esmtp)) = self.greeted.clone() else {
            // RFC 5321 4.1.4: a client must greet before a mail transaction.
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        };
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Sender already specified"));
        }
        if size.is_some_and(|s| s > self.config.max_message_size) {
            // RFC 1870 6.1: 552 when the declared size exceeds the fixed maximum.
            return self.reply(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message size exceeds fixed maximum of {} octets",
                    self.config.max_message_size
                ),
            ));
        }
        self.transactions += 1;
        self.tx = Some(Transaction {
            number: self.transactions,
            reverse_path: path,
            recipients: Vec::new(),
            body,
            helo,
            esmtp,
            peer: self.peer,
            size: 0,
            accounts: Vec::new(),
        });
        self.reply(Reply::new(250, "2.1.0", "Sender OK"));
    }

    fn rcpt(&mut self, path: ForwardPath) {
        let Some(tx) = self.tx.as_ref() else {
            return self.out_of_sequence(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if tx.recipients.len() >= self.config.max_recipients {
            // RFC 5321 4.5.3.1.10: 452 for too many recipients; not counted as an error.
            return self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        let local_part = match &path {
            ForwardPath::Postmaster(p) => p.clone(),
            ForwardPath::Mailbox(m) => {
                if !self.is_local(&m.domain) {
                    return self.reply(Reply::new(
                        550,
                        "5.7.1",
                        format!("Relaying denied: {} is not a local domain", m.domain),
                    ));
                }
                // `u%h@local`, `"u@h"@local`, `h!u@local`: old relay syntaxes, never honoured.
                if m.local_part
                    .bytes()
                    .any(|b| matches!(b, b'@' | b'%' | b'!'))
                {
                    return self.reply(Reply::new(
                        550,
                        "5.7.1",
                        "Relaying denied: routing in the local part is not supported",
                    ));
                }
                m.local_part.clone()
            }
        };
        // The same forward-path again (RFC 5321 allows it): its accounts are already in the
        // transaction, so it is not looked up again; a client repeating a large alias costs
        // one comparison per recipient, not one expansion (found in review).
        if let Some(tx) = self.tx.as_mut() {
            if tx.recipients.iter().any(|r| r.forward_path == path) {
                tx.recipients.push(Recipient { forward_path: path });
                return self.reply(Reply::new(250, "2.1.5", "Recipient OK"));
            }
        }
        self.phase = Phase::AwaitRecipient(path);
        self.events
            .push_back(Event::RecipientToCheck { local_part });
    }

    /// Domains compare case-insensitively (RFC 5321 2.4); a trailing root dot is ignored.
    /// An address literal is local when it names the address the client connected to.
    fn is_local(&self, d: &Domain) -> bool {
        match d {
            Domain::Name(n) => {
                let n = n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase();
                self.config.local_domains.contains(&n)
            }
            Domain::Literal(ip) => {
                let unmap = |a: IpAddr| match a {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                *ip == unmap(self.peer.local)
                    || self.config.local_addresses.iter().any(|a| unmap(*a) == *ip)
            }
            Domain::General(_) => false,
        }
    }

    fn data_command(&mut self) {
        let Some(tx) = self.tx.as_ref() else {
            return self.out_of_sequence(Reply::new(503, "5.5.1", "Need MAIL before DATA"));
        };
        if tx.recipients.is_empty() {
            // RFC 2920 3.1: 554 to DATA when no recipient was accepted.
            return self.reply(Reply::new(554, "5.5.1", "No valid recipients"));
        }
        let tx = tx.clone();
        self.reply(Reply::plain(
            354,
            vec!["End data with <CR><LF>.<CR><LF>".into()],
        ));
        self.phase = Phase::Data(Box::new(DataState {
            decoder: DataDecoder::new(),
            headers: HeaderScan::new(),
            fault: None,
            aborted: false,
        }));
        self.events.push_back(Event::DataStart(tx));
    }

    /// Decodes buffered mail data. False when more input is needed.
    fn data(&mut self) -> bool {
        let Phase::Data(st) = &mut self.phase else {
            return false;
        };
        if self.consumed == self.input.len() {
            return false;
        }
        let Some(tx) = self.tx.as_mut() else {
            return false;
        };
        let pending = &self.input[self.consumed..];
        let mut chunk = Vec::with_capacity(pending.len());
        let (used, end) = st.decoder.feed(pending, &mut chunk);
        self.consumed += used;
        // The decoded data has LF line ends: each counts as the CRLF it was (found in review:
        // the wire octets, stuffing dots and final dot included, refused a message of
        // exactly the size advertised).
        let lines = chunk.iter().filter(|&&b| b == b'\n').count();
        tx.size += (chunk.len() + lines) as u64;
        let mut newly_failed = false;
        if st.fault.is_none() {
            let fault = if tx.size > self.config.max_message_size {
                // RFC 1870 6.3: the size limit is checked while reading; one 552 at the end.
                Some(Reply::new(
                    552,
                    "5.3.4",
                    format!(
                        "Message size exceeds fixed maximum of {} octets",
                        self.config.max_message_size
                    ),
                ))
            } else {
                st.decoder.fault().map(|f| match f {
                    DataFault::BareLf | DataFault::BareCr => Reply::new(
                        550,
                        "5.6.0",
                        "Bare CR or LF in message data not allowed (RFC 5321 2.3.8); message refused",
                    ),
                    DataFault::LineTooLong => Reply::new(
                        550,
                        "5.6.0",
                        "Line longer than 1000 octets in message data (RFC 5321 4.5.3.1.6); message refused",
                    ),
                })
            };
            if fault.is_some() {
                st.fault = fault;
                newly_failed = true;
            } else {
                st.headers.feed(&chunk);
                if !chunk.is_empty() {
                    self.events.push_back(Event::MailData(chunk));
                }
            }
        }
        if newly_failed {
            self.abort_data();
        }
        if !end {
            return false;
        }
        let Phase::Data(mut st) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return false;
        };
        if let Some(r) = st.fault.take() {
            self.tx = None;
            self.reply(r);
            return true;
        }
        st.headers.finish();
        if let Some(r) = self.loop_check(&st.headers) {
            self.events.push_back(Event::DataAborted);
            self.tx = None;
            self.reply(r);
            return true;
        }
        if let Some(tx) = self.tx.clone() {
            self.phase = Phase::AwaitDelivery;
            self.events.push_back(Event::EndOfData(tx));
        }
        true
    }

    /// RFC 5321 6.3: a mail loop shows as too many Received fields, or as our own
    /// Delivered-To for an account this message is for.
    fn loop_check(&self, h: &HeaderScan) -> Option<Reply> {
        if h.received > MAX_RECEIVED {
            return Some(Reply::new(
                554,
                "5.4.6",
                "Too many Received fields: mail loop",
            ));
        }
        let tx = self.tx.as_ref()?;
        for account in &tx.accounts {
            let ours = delivered_to(account, &self.config.hostname);
            if h.delivered_to.contains(&ours) {
                return Some(Reply::new(
                    554,
                    "5.4.6",
                    format!("Mail loop: message was already delivered to {ours}"),
                ));
            }
        }
        None
    }
}

/// The `Delivered-To:` value inboxd writes for an account (and looks for to detect loops).
pub fn delivered_to(account: &str, hostname: &str) -> String {
    format!("{account}@{hostname}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::rc::Rc;

    fn session(now: Instant) -> Session {
        session_with(now, |_| {})
    }

    /// A session whose configuration `change` has changed from the tests' usual one.
    fn session_with(now: Instant, change: impl FnOnce(&mut SessionConfig)) -> Session {
        let mut config = SessionConfig {
            hostname: "mx.test".into(),
            local_domains: vec!["localhost".into()],
            local_addresses: Vec::new(),
            max_message_size: 1_000_000,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_errors: 20,
        };
        change(&mut config);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peer = Peer {
            remote: ip,
            local: ip,
        };
        let mut s = Session::new(Rc::new(config), peer, now);
        s.take_output();
        s
    }

    fn text(s: &mut Session) -> String {
        String::from_utf8(s.take_output()).unwrap()
    }

    /// HELO, MAIL and an accepted RCPT for alice.
    fn with_recipient(s: &mut Session, now: Instant) {
        s.receive(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@localhost>\r\n",
            now,
        );
        assert!(matches!(
            s.poll_event(),
            Some(Event::RecipientToCheck { .. })
        ));
        s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), now);
    }

    #[test]
    fn a_command_dripped_byte_by_byte_still_times_out() {
        let t0 = Instant::now();
        let mut s = session(t0);
        for (i, b) in b"HELO slowly.example".iter().enumerate() {
            s.receive(&[*b], t0 + Duration::from_secs(10 * i as u64 + 10));
        }
        s.handle_timeout(t0 + Duration::from_secs(300));
        assert!(
            text(&mut s).starts_with("421 4.4.2 "),
            "a byte every 10 s kept it alive"
        );
        assert!(s.is_closed());
    }

    #[test]
    fn idle_timeout_ends_with_421() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(300)));
        s.receive(b"NOOP\r\n", t0 + Duration::from_secs(100));
        s.take_output();
        s.handle_timeout(t0 + Duration::from_secs(300));
        assert!(!s.is_closed(), "input at t+100 moved the deadline");
        s.handle_timeout(t0 + Duration::from_secs(400));
        assert!(text(&mut s).starts_with("421 4.4.2 "));
        assert!(s.is_closed());
        assert!(matches!(s.poll_event(), Some(Event::Close)));
    }

    #[test]
    fn pipelined_input_waits_for_the_recipient_verdict() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@localhost>\r\nNOOP\r\n",
            t0,
        );
        assert!(matches!(
            s.poll_event(),
            Some(Event::RecipientToCheck { .. })
        ));
        assert!(s.is_waiting() && !s.wants_read());
        assert_eq!(s.next_deadline(), None);
        // The NOOP is not answered before the RCPT.
        assert_eq!(
            text(&mut s),
            "250 mx.test greets c\r\n250 2.1.0 Sender OK\r\n"
        );
        s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), t0);
        assert_eq!(text(&mut s), "250 2.1.5 Recipient OK\r\n250 2.0.0 OK\r\n");
        assert!(s.wants_read());
    }

    #[test]
    fn disconnect_during_data_aborts_it() {
        let t0 = Instant::now();
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.receive(b"DATA\r\nSubject: x\r\n\r\npartial line", t0);
        assert!(matches!(s.poll_event(), Some(Event::DataStart(_))));
        assert!(matches!(s.poll_event(), Some(Event::MailData(_))));
        s.peer_closed();
        assert!(matches!(s.poll_event(), Some(Event::DataAborted)));
        assert!(matches!(s.poll_event(), Some(Event::Close)));
        assert!(s.poll_event().is_none());
    }

    #[test]
    fn a_client_that_never_reads_cannot_grow_the_output() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let flood = b"NOOP\r\n".repeat(100_000);
        s.receive(&flood, t0);
        assert!(!s.wants_read());
        let first = s.take_output().len();
        assert!(first < OUTPUT_HIGH_WATER + 100, "{first}");
        // Draining the output lets it go on with what is buffered.
        s.receive(&[], t0);
        assert!(s.has_output());
    }

    #[test]
    fn half_close_answers_what_was_sent_then_closes() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let flood = b"NOOP\r\n".repeat(20_000);
        s.receive(&flood, t0);
        s.peer_closed();
        assert!(!s.is_closed(), "buffered commands are still owed replies");
        let mut replies = 0;
        while !s.is_closed() {
            replies += text(&mut s).matches("250 2.0.0 OK").count();
            s.receive(&[], t0);
        }
        replies += text(&mut s).matches("250 2.0.0 OK").count();
        assert_eq!(replies, 20_000);
    }

    #[test]
    fn data_phase_uses_the_data_timeout() {
        let t0 = Instant::now();
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.receive(b"DATA\r\n", t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(600)));
        s.receive(b".\r\n", t0);
        while let Some(ev) = s.poll_event() {
            if let Event::EndOfData(_) = ev {
                s.delivery_outcome(Ok(()), t0);
            }
        }
        s.receive(b"NOOP\r\n", t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(300)));
        s.handle_timeout(t0 + Duration::from_secs(300));
        s.take_output();
        s.handle_timeout(t0 + Duration::from_secs(900));
        assert!(s.take_output().is_empty(), "no second 421 after close");
    }

    #[test]
    fn the_wait_for_the_next_command_starts_at_the_answer() {
        // Found in review: a commit slower than the command timeout was answered with its
        // 250 and, at once, a 421 timeout.
        let t0 = Instant::now();
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.receive(b"DATA\r\nx\r\n.\r\n", t0);
        assert!(s.is_waiting());
        assert_eq!(s.next_deadline(), None);
        let later = t0 + Duration::from_secs(1000);
        s.handle_timeout(later);
        s.delivery_outcome(Ok(()), later);
        s.handle_timeout(later + Duration::from_secs(1));
        let out = text(&mut s);
        assert!(
            out.ends_with("250 2.0.0 Delivered, transaction 1\r\n"),
            "{out}"
        );
        assert_eq!(s.next_deadline(), Some(later + Duration::from_secs(300)));
        // The same after a slow recipient lookup.
        s.receive(b"MAIL FROM:<>\r\nRCPT TO:<bob@localhost>\r\n", later);
        while s.poll_event().is_some() {}
        let later2 = later + Duration::from_secs(1000);
        s.handle_timeout(later2);
        s.recipient_verdict(RcptVerdict::NoSuchUser, later2);
        assert!(!text(&mut s).contains("421"));
        assert_eq!(s.next_deadline(), Some(later2 + Duration::from_secs(300)));
    }

    #[test]
    fn a_shutdown_during_a_commit_waits_for_its_outcome() {
        let t0 = Instant::now();
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.receive(b"DATA\r\nx\r\n.\r\nNOOP\r\n", t0);
        while s.poll_event().is_some() {}
        s.take_output();
        s.shutdown();
        assert!(!s.is_closed());
        assert!(s.take_output().is_empty(), "no 421 before the outcome");
        s.delivery_outcome(Ok(()), t0);
        let out = text(&mut s);
        assert!(
            out.starts_with("250 2.0.0 Delivered") && out.contains("\r\n421 4.3.2"),
            "{out}"
        );
        assert!(
            !out.contains("250 2.0.0 OK"),
            "the pipelined NOOP is not answered"
        );
        assert!(s.is_closed());
    }

    #[test]
    fn a_client_that_is_gone_ends_the_session_whatever_it_had_pipelined() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(&b"NOOP\r\n".repeat(10_000), t0);
        assert!(!s.is_closed());
        s.client_gone();
        assert!(s.is_closed());
        // While a commit is outstanding it waits for the outcome, then closes.
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.receive(b"DATA\r\nx\r\n.\r\nNOOP\r\n", t0);
        while s.poll_event().is_some() {}
        s.client_gone();
        assert!(!s.is_closed());
        s.delivery_outcome(Ok(()), t0);
        assert!(s.is_closed());
    }

    #[test]
    fn recipients_pipelined_behind_a_refused_mail_are_not_errors() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.take_output();
        let mut group = b"EHLO c\r\nMAIL FROM:<> SIZE=999999999\r\n".to_vec();
        for _ in 0..30 {
            group.extend_from_slice(b"RCPT TO:<alice@localhost>\r\n");
        }
        group.extend_from_slice(b"DATA\r\nNOOP\r\n");
        s.receive(&group, t0);
        let out = text(&mut s);
        assert!(out.contains("552 5.3.4"), "{out}");
        assert_eq!(out.matches("503 5.5.1 Need MAIL before RCPT").count(), 30);
        assert!(!out.contains("421"), "{out}");
        assert!(out.ends_with("250 2.0.0 OK\r\n"), "{out}");
        // Without a refused MAIL before them, they are errors as before.
        let mut s = session(t0);
        s.take_output();
        s.receive(b"EHLO c\r\n", t0);
        for _ in 0..30 {
            s.receive(b"RCPT TO:<alice@localhost>\r\n", t0);
        }
        assert!(text(&mut s).contains("421 4.7.0"));
    }

    #[test]
    fn a_repeated_forward_path_is_not_looked_up_again() {
        // Found in review: each RCPT to a large alias re-expanded it, and the check of the
        // account limit was quadratic.
        let t0 = Instant::now();
        let mut s = session(t0);
        with_recipient(&mut s, t0);
        s.take_output();
        for _ in 0..50 {
            s.receive(b"RCPT TO:<alice@localhost>\r\n", t0);
        }
        assert!(s.poll_event().is_none(), "no second lookup");
        assert_eq!(text(&mut s).matches("250 2.1.5").count(), 50);
        // A single alias over the account limit is refused (for good: no transaction could
        // take it) without comparing every name with every other.
        s.receive(b"RCPT TO:<everyone@localhost>\r\n", t0);
        assert!(matches!(
            s.poll_event(),
            Some(Event::RecipientToCheck { .. })
        ));
        let huge: Vec<String> = (0..100_000).map(|i| format!("user{i}")).collect();
        s.recipient_verdict(RcptVerdict::Accept(huge), t0);
        assert!(text(&mut s).starts_with("550 5.5.3"));
    }

    #[test]
    fn a_message_of_exactly_the_size_limit_is_accepted() {
        // RFC 1870 4: the size counts CRLF line ends but neither stuffing dots nor the final
        // dot (found in review: the wire octets were counted).
        let t0 = Instant::now();
        for (body, ok) in [
            (format!("{}\r\n", "a".repeat(98)), true),
            (format!("{}\r\n", "a".repeat(99)), false),
            (format!("..{}\r\n", "a".repeat(97)), true),
        ] {
            let mut s = session_with(t0, |c| c.max_message_size = 100);
            with_recipient(&mut s, t0);
            s.take_output();
            s.receive(format!("DATA\r\n{body}.\r\n").as_bytes(), t0);
            let mut size = None;
            while let Some(ev) = s.poll_event() {
                if let Event::EndOfData(tx) = ev {
                    size = Some(tx.size);
                }
            }
            let out = text(&mut s);
            assert_eq!(size.is_some(), ok, "{body:?}: {out}");
            assert_eq!(size.is_none(), out.contains("552 5.3.4"), "{out}");
            if let Some(n) = size {
                assert_eq!(n, 100);
            }
        }
    }

    #[test]
    fn an_unavailable_mailbox_is_refused_alone() {
        // The delivery layer's check at RCPT time: its reply for that recipient, and the
        // transaction goes on without it.
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<bob@localhost>\r\n", t0);
        assert!(matches!(
            s.poll_event(),
            Some(Event::RecipientToCheck { .. })
        ));
        let r = Reply::new(450, "4.2.0", "Recipient's mailbox is unavailable");
        s.recipient_verdict(RcptVerdict::Unavailable(r), t0);
        assert!(text(&mut s)
            .ends_with("250 2.1.0 Sender OK\r\n450 4.2.0 Recipient's mailbox is unavailable\r\n"));
        s.receive(b"RCPT TO:<alice@localhost>\r\n", t0);
        assert!(matches!(
            s.poll_event(),
            Some(Event::RecipientToCheck { .. })
        ));
        s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), t0);
        s.receive(b"DATA\r\nhi\r\n.\r\n", t0);
        let mut accounts = None;
        while let Some(ev) = s.poll_event() {
            if let Event::EndOfData(tx) = ev {
                accounts = Some(tx.accounts());
            }
        }
        assert_eq!(accounts, Some(vec!["alice".to_string()]));
    }

    #[test]
    fn an_address_reaching_too_many_accounts_alone_is_550() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<everyone@localhost>\r\n",
            t0,
        );
        while let Some(ev) = s.poll_event() {
            if let Event::RecipientToCheck { .. } = ev {
                let all = (0..=MAX_ACCOUNTS).map(|i| format!("user{i}")).collect();
                s.recipient_verdict(RcptVerdict::Accept(all), t0);
            }
        }
        let out = text(&mut s);
        assert!(out.trim_end().ends_with("550 5.5.3 Too many recipients: this address alone reaches more accounts than one message may"), "{out}");
        // The session goes on: another recipient is taken.
        s.receive(b"RCPT TO:<alice@localhost>\r\n", t0);
        while let Some(ev) = s.poll_event() {
            if let Event::RecipientToCheck { .. } = ev {
                s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), t0);
            }
        }
        assert!(text(&mut s).contains("250 2.1.5"));
    }

    #[test]
    fn too_many_distinct_accounts_is_452() {
        let t0 = Instant::now();
        let mut s = session_with(t0, |c| c.max_recipients = 1000);
        s.receive(b"HELO c\r\nMAIL FROM:<>\r\n", t0);
        for i in 0..MAX_ACCOUNTS + 1 {
            s.receive(format!("RCPT TO:<u{i}@localhost>\r\n").as_bytes(), t0);
        }
        let mut n = 0;
        while let Some(ev) = s.poll_event() {
            if let Event::RecipientToCheck { .. } = ev {
                n += 1;
                s.recipient_verdict(RcptVerdict::Accept(vec![format!("user{n}")]), t0);
            }
        }
        let out = text(&mut s);
        assert_eq!(out.matches("250 2.1.5").count(), MAX_ACCOUNTS);
        assert!(
            out.trim_end().ends_with("452 4.5.3 Too many recipients"),
            "{out}"
        );
    }

    #[test]
    fn too_many_recipients_is_452_not_an_error() {
        let t0 = Instant::now();
        let mut s = session(t0);
        s.receive(b"HELO c\r\nMAIL FROM:<>\r\n", t0);
        for _ in 0..150 {
            s.receive(b"RCPT TO:<alice@localhost>\r\n", t0);
            if let Some(Event::RecipientToCheck { .. }) = s.poll_event() {
                s.recipient_verdict(RcptVerdict::Accept(vec!["alice".into()]), t0);
            }
        }
        let out = text(&mut s);
        assert_eq!(out.matches("250 2.1.5").count(), 100);
        assert_eq!(out.matches("452 4.5.3").count(), 50);
        assert!(!s.is_closed());
    }

    #[test]
    fn more_than_100_received_fields_is_a_loop() {
        let t0 = Instant::now();
        for (n, verdict) in [(100, "250 2.0.0"), (101, "554 5.4.6")] {
            let mut s = session(t0);
            with_recipient(&mut s, t0);
            let mut data = b"DATA\r\n".to_vec();
            for i in 0..n {
                data.extend_from_slice(format!("Received: from hop{i}\r\n").as_bytes());
            }
            data.extend_from_slice(b"\r\nbody\r\n.\r\n");
            s.receive(&data, t0);
            while let Some(ev) = s.poll_event() {
                if let Event::EndOfData(_) = ev {
                    s.delivery_outcome(Ok(()), t0);
                }
            }
            let out = text(&mut s);
            let last = out.lines().last().unwrap();
            assert!(last.starts_with(verdict), "{n} Received: {last}");
        }
    }
}
