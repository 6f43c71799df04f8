//! The receiver's side of the delivery agent: the server's request/outcome interface, carried
//! over the agent socket and answered asynchronously.
//!
//! Owns the transactions in flight. Mail data is held from the start of DATA; a message whose
//! whole request fits one datagram goes out at its end as one Deliver (the agent writes the
//! copies: no descriptors, one round trip). When the held data outgrows that, Begin is sent;
//! data that arrives before the agent's descriptors is still held (the server stops reading
//! from that client once [`AgentClient::wants_data`] says so); once the descriptors arrive
//! the trace fields and data are written straight into the recipients' tmp files; Commit goes
//! out at the end of data. Either way the outcome comes back later. If the agent goes away,
//! every transaction in flight gets 451 4.3.0 and [`AgentClient::on_readable`] reports it. It
//! must not open files itself.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use log::{error, info, warn};

use super::channel::{self, Received};
use super::protocol::{deliver_size, Request, Response, MAX_DATAGRAM};
use super::DeliveryError;
use crate::smtp::trace::Trace;
use crate::smtp::{DeliveryOutcome, Reply, Transaction};

/// Requests waiting for room on the agent's socket at most (found in review: with the agent
/// stalled, connect-DATA-close loops grew the queue without bound).
const OUTBOX_LIMIT: usize = 65_536;

/// Mail data held per transaction while its descriptors are on their way (one round trip to
/// the agent); beyond it the server stops reading from that client.
const HOLD_LIMIT: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Nothing sent yet: the data is held while a Deliver could still carry it.
    Buffering,
    /// Begin sent, descriptors not here yet.
    Opening,
    /// Descriptors here, data being written.
    Open,
    /// End of data came before the descriptors: commit as soon as they are written.
    CommitWanted,
    /// Commit sent.
    Committing,
}

struct InFlight {
    conn: u64,
    tx_id: String,
    /// The accounts of the copies, in the agent's order (for the log).
    accounts: Vec<String>,
    /// When the commit was asked for (the log's timing).
    commit_at: Option<Instant>,
    heads: Vec<Vec<u8>>,
    files: Vec<File>,
    held: Vec<u8>,
    error: Option<DeliveryError>,
    state: State,
    /// Begin was sent: the data went into descriptors, not into a Deliver (for the log).
    streamed: bool,
}

impl InFlight {
    /// Whether the held data and the trace fields still fit one Deliver.
    fn fits_one_request(&self) -> bool {
        deliver_size(&self.accounts, &self.heads, self.held.len()) <= MAX_DATAGRAM
    }
}

/// A request waiting for room on the agent's socket.
struct Queued {
    id: u64,
    /// It starts a transaction (Begin or Deliver).
    begin: bool,
    msg: Vec<u8>,
}

/// The agent went away (or spoke nonsense): the server must stop.
#[derive(Debug)]
pub struct AgentGone(pub String);

pub struct AgentClient {
    sock: OwnedFd,
    hostname: String,
    next_id: u64,
    by_conn: HashMap<u64, u64>,
    inflight: HashMap<u64, InFlight>,
    outcomes: VecDeque<(u64, DeliveryOutcome)>,
    /// Connections whose held data was written: they may read again.
    resumed: Vec<u64>,
    /// Requests the socket had no room for, in order, with their transaction ids. The event
    /// loop never blocks on the agent: they go out when the socket is writable again
    /// ([`AgentClient::flush`]). An Abort whose Begin still waits here removes that Begin
    /// instead of joining it, so what waits belongs to live transactions (or to Begins the
    /// agent already has), and at most [`OUTBOX_LIMIT`] requests wait: beyond, a new
    /// transaction gets 451.
    outbox: VecDeque<Queued>,
    /// A send failed: the agent is gone; reported by the next `flush` or `on_readable`.
    broken: Option<String>,
    /// The agent is gone and that was reported: nothing is sent any more.
    gone: bool,
}

fn gone_reply() -> Reply {
    Reply::new(
        451,
        "4.3.0",
        "Local delivery agent unavailable, try again later",
    )
}

impl AgentClient {
    pub fn new(sock: OwnedFd, hostname: &str) -> AgentClient {
        AgentClient {
            sock,
            hostname: hostname.to_string(),
            next_id: 0,
            by_conn: HashMap::new(),
            inflight: HashMap::new(),
            outcomes: VecDeque::new(),
            resumed: Vec::new(),
            outbox: VecDeque::new(),
            broken: None,
            gone: false,
        }
    }

    /// The socket, for the poller.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends `r`, or queues it behind earlier requests when the socket is full.
    fn send(&mut self, r: &Request) -> Result<(), DeliveryError> {
        if self.gone || self.broken.is_some() {
            return Err(DeliveryError::Io("delivery agent gone".into()));
        }
        let starts = matches!(r, Request::Begin { .. } | Request::Deliver { .. });
        if let Request::Abort { id } = r {
            // Its Begin (or Deliver) never left (and so nothing after it did): forget both. A
            // Commit is only sent once the Begin was answered, so a queued Begin is all there
            // is.
            if let Some(i) = self.outbox.iter().position(|q| q.id == *id && q.begin) {
                self.outbox.remove(i);
                return Ok(());
            }
        }
        if starts && self.outbox.len() >= OUTBOX_LIMIT {
            return Err(DeliveryError::Io(
                "too many requests wait for the delivery agent".into(),
            ));
        }
        let msg = r.encode();
        if self.outbox.is_empty() {
            match channel::try_send(self.sock.as_fd(), &msg) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let why = format!("delivery agent socket: {e}");
                    self.broken = Some(why.clone());
                    return Err(DeliveryError::Io(why));
                }
            }
        }
        self.outbox.push_back(Queued {
            id: r.id(),
            begin: starts,
            msg,
        });
        Ok(())
    }

    /// Whether requests wait for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Sends what the socket has room for now. `Err` when the agent is gone (every
    /// transaction in flight has then been answered with 451).
    pub fn flush(&mut self) -> Result<(), AgentGone> {
        if let Some(why) = self.broken.take() {
            return Err(self.fail_all(&why));
        }
        while let Some(q) = self.outbox.front() {
            match channel::try_send(self.sock.as_fd(), &q.msg) {
                Ok(true) => {
                    self.outbox.pop_front();
                }
                Ok(false) => break,
                Err(e) => return Err(self.fail_all(&format!("delivery agent socket: {e}"))),
            }
        }
        Ok(())
    }

    /// DATA began.
    pub fn begin(&mut self, conn: u64, tx: &Transaction, trace: &Trace, tx_id: &str) {
        self.abort(conn);
        self.next_id += 1;
        let id = self.next_id;
        let accounts = tx.accounts();
        let heads = accounts
            .iter()
            .map(|a| trace.for_account(a, &self.hostname))
            .collect();
        self.by_conn.insert(conn, id);
        self.inflight.insert(
            id,
            InFlight {
                conn,
                tx_id: tx_id.to_string(),
                accounts,
                commit_at: None,
                heads,
                files: Vec::new(),
                held: Vec::new(),
                error: None,
                state: State::Buffering,
                streamed: false,
            },
        );
    }

    /// The held data no longer fits a Deliver: open the copies the streaming way.
    fn begin_streaming(&mut self, id: u64) {
        let Some(t) = self.inflight.get(&id) else {
            return;
        };
        let accounts = t.accounts.clone();
        let error = self.send(&Request::Begin { id, accounts }).err();
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        t.streamed = true;
        // No answer can come for a Begin that was not sent: the end of data fails at once.
        if let Some(e) = error {
            t.error = Some(e);
            t.held = Vec::new();
            t.state = State::Open;
        } else {
            t.state = State::Opening;
        }
    }

    /// Whether the server may read more mail data from `conn` now.
    pub fn wants_data(&self, conn: u64) -> bool {
        match self.by_conn.get(&conn).and_then(|id| self.inflight.get(id)) {
            Some(t) => t.state != State::Opening || t.held.len() < HOLD_LIMIT,
            None => true,
        }
    }

    pub fn write(&mut self, conn: u64, data: &[u8]) {
        let Some(&id) = self.by_conn.get(&conn) else {
            return;
        };
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        if t.error.is_some() {
            return;
        }
        match t.state {
            State::Buffering => {
                t.held.extend_from_slice(data);
                if !t.fits_one_request() {
                    self.begin_streaming(id);
                }
            }
            State::Opening => t.held.extend_from_slice(data),
            _ => write_each(t, data),
        }
    }

    pub fn abort(&mut self, conn: u64) {
        if let Some(id) = self.by_conn.remove(&conn) {
            if let Some(t) = self.inflight.remove(&id) {
                if t.state == State::Buffering {
                    return; // the agent never heard of it
                }
            }
            // The agent handles requests in order: an Abort after a Begin it has not answered
            // yet still finds the transaction.
            let _ = self.send(&Request::Abort { id });
        }
    }

    /// End of data: commit (now, or once the descriptors are here and written).
    pub fn finish(&mut self, conn: u64) {
        let Some(&id) = self.by_conn.get(&conn) else {
            self.outcomes.push_back((
                conn,
                Err(Reply::new(
                    451,
                    "4.3.0",
                    "Local error: no data for transaction",
                )),
            ));
            return;
        };
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        match t.state {
            State::Opening => t.state = State::CommitWanted,
            State::Buffering => self.deliver(id),
            _ => self.commit(id),
        }
    }

    /// End of data of a message held whole: one Deliver carries it, if it fits one request.
    /// Trace fields alone can outgrow it (hundreds of accounts, a long HELO and MAIL FROM)
    /// with a body too small to have switched in `write` (found in review: an empty body
    /// never reaches it); then the copies are opened the streaming way and committed once
    /// written.
    fn deliver(&mut self, id: u64) {
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        if !t.fits_one_request() {
            self.begin_streaming(id);
            match self.inflight.get_mut(&id) {
                Some(t) if t.state == State::Opening => t.state = State::CommitWanted,
                Some(_) => self.commit(id),
                None => {}
            }
            return;
        }
        t.state = State::Committing;
        t.commit_at = Some(Instant::now());
        let r = Request::Deliver {
            id,
            accounts: t.accounts.clone(),
            heads: std::mem::take(&mut t.heads),
            data: std::mem::take(&mut t.held),
        };
        if let Err(e) = self.send(&r) {
            if let Some(t) = self.inflight.remove(&id) {
                self.by_conn.remove(&t.conn);
                self.outcomes.push_back((t.conn, Err(e.reply())));
            }
        }
    }

    fn commit(&mut self, id: u64) {
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        if let Some(e) = t.error.take() {
            warn!(
                "event=not_delivered session={:x} tx={} status={} error={:?}",
                t.conn,
                t.tx_id,
                e.reply().code,
                e.to_string()
            );
            let conn = t.conn;
            self.by_conn.remove(&conn);
            self.inflight.remove(&id);
            let _ = self.send(&Request::Abort { id });
            self.outcomes.push_back((conn, Err(e.reply())));
            return;
        }
        // Our descriptors are not needed any more: the agent fsyncs its own.
        t.files.clear();
        t.state = State::Committing;
        t.commit_at = Some(Instant::now());
        if let Err(e) = self.send(&Request::Commit { id }) {
            if let Some(t) = self.inflight.remove(&id) {
                self.by_conn.remove(&t.conn);
                self.outcomes.push_back((t.conn, Err(e.reply())));
            }
        }
    }

    /// Reads the agent's answers. `Err` when the agent is gone: every transaction in flight
    /// has then been answered with 451.
    pub fn on_readable(&mut self) -> Result<(), AgentGone> {
        if let Some(why) = self.broken.take() {
            return Err(self.fail_all(&why));
        }
        loop {
            let (msg, fds) = match channel::recv(self.sock.as_fd(), false) {
                Ok(Received::Message(m, fds)) => (m, fds),
                Ok(Received::Empty) => return Ok(()),
                Ok(Received::TooLong(_)) => {
                    return Err(self.fail_all("the delivery agent sent a datagram too long"))
                }
                Ok(Received::Closed) => {
                    return Err(self.fail_all("the delivery agent closed its socket"))
                }
                Err(e) => return Err(self.fail_all(&format!("delivery agent socket: {e}"))),
            };
            let Ok(resp) = Response::decode(&msg) else {
                return Err(self.fail_all("malformed answer from the delivery agent"));
            };
            self.handle(resp, fds);
        }
    }

    fn handle(&mut self, resp: Response, fds: Vec<OwnedFd>) {
        let id = resp.id();
        let Some(t) = self.inflight.get_mut(&id) else {
            return; // aborted meanwhile; its descriptors are dropped here
        };
        match resp {
            Response::Opened { count, .. } => {
                if fds.len() != usize::from(count) || fds.len() != t.heads.len() {
                    t.error = Some(DeliveryError::Io(
                        "delivery agent sent the wrong descriptors".into(),
                    ));
                } else {
                    t.files = fds.into_iter().map(File::from).collect();
                    let heads = std::mem::take(&mut t.heads);
                    for (f, h) in t.files.iter_mut().zip(&heads) {
                        if let Err(e) = f.write_all(h) {
                            t.error = Some(DeliveryError::from_io(e, "write of the trace fields"));
                            break;
                        }
                    }
                    let held = std::mem::take(&mut t.held);
                    if t.error.is_none() && !held.is_empty() {
                        write_each(t, &held);
                    }
                }
                self.opened(id);
            }
            Response::Failed { class, detail, .. } => {
                let e = DeliveryError::from_wire(class, detail);
                if t.state == State::Committing {
                    let conn = t.conn;
                    error!(
                        "event=not_delivered session={:x} tx={} status={} error={:?}",
                        conn,
                        t.tx_id,
                        e.reply().code,
                        e.to_string()
                    );
                    self.inflight.remove(&id);
                    self.by_conn.remove(&conn);
                    self.outcomes.push_back((conn, Err(e.reply())));
                } else {
                    // Begin failed: nothing was opened; the data is discarded as it comes.
                    t.held = Vec::new();
                    t.error = Some(e);
                    self.opened(id);
                }
            }
            Response::Done { names, .. } => {
                let conn = t.conn;
                let ms = t
                    .commit_at
                    .map_or(0.0, |at| at.elapsed().as_secs_f64() * 1000.0);
                // One line per copy; the name and size come from the agent (maildir(5)
                // names end in ",S=<size>"); only printable ASCII reaches the log.
                for (account, name) in t.accounts.iter().zip(&names) {
                    let name: String = name
                        .chars()
                        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                        .collect();
                    let size = name.rsplit_once(",S=").map_or("?", |(_, s)| s);
                    let via = if t.streamed { "stream" } else { "whole" };
                    info!(
                        "event=delivered session={conn:x} tx={} account={account} file=new/{name} size={size} status=250 commit_ms={ms:.1} via={via}",
                        t.tx_id
                    );
                }
                self.inflight.remove(&id);
                self.by_conn.remove(&conn);
                self.outcomes.push_back((conn, Ok(())));
            }
        }
    }

    /// The Begin of `id` was answered: its client may send data again, and an end of data
    /// that came first is committed now.
    fn opened(&mut self, id: u64) {
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        let wanted = t.state == State::CommitWanted;
        t.state = State::Open;
        self.resumed.push(t.conn);
        if wanted {
            self.commit(id);
        }
    }

    fn fail_all(&mut self, why: &str) -> AgentGone {
        error!(
            "{why}: {} transaction(s) in flight get 451",
            self.inflight.len()
        );
        for (_, t) in self.inflight.drain() {
            if matches!(t.state, State::Committing | State::CommitWanted) {
                self.outcomes.push_back((t.conn, Err(gone_reply())));
            }
        }
        self.by_conn.clear();
        self.outbox.clear();
        self.gone = true;
        AgentGone(why.to_string())
    }

    pub fn poll_outcome(&mut self) -> Option<(u64, DeliveryOutcome)> {
        self.outcomes.pop_front()
    }

    /// Connections that may read again since the last call.
    pub fn take_resumed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.resumed)
    }
}

fn write_each(t: &mut InFlight, data: &[u8]) {
    for f in &mut t.files {
        if let Err(e) = f.write_all(data) {
            t.error = Some(DeliveryError::from_io(e, "write of mail data"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::path::{ForwardPath, ReversePath};
    use crate::smtp::session::{Peer, Recipient};

    fn transaction(accounts: usize, helo: &str) -> Transaction {
        Transaction {
            number: 1,
            reverse_path: ReversePath::Null,
            recipients: (0..accounts)
                .map(|i| Recipient {
                    forward_path: ForwardPath::Postmaster(format!("p{i}")),
                })
                .collect(),
            body: None,
            helo: helo.to_string(),
            esmtp: true,
            peer: Peer {
                remote: "192.0.2.1".parse().unwrap(),
                local: "192.0.2.2".parse().unwrap(),
            },
            size: 0,
            accounts: (0..accounts).map(|i| format!("user{i}")).collect(),
        }
    }

    /// The requests the client sent so far, decoded; each must fit a datagram.
    fn sent(agent: &OwnedFd) -> Vec<Request> {
        let mut out = Vec::new();
        loop {
            match channel::recv(agent.as_fd(), false).unwrap() {
                Received::Message(m, _) => out.push(Request::decode(&m).unwrap()),
                Received::Empty => return out,
                other => panic!("{other:?}"),
            }
        }
    }

    fn start(c: &mut AgentClient, conn: u64, tx: &Transaction) {
        let trace = Trace::new(tx, "mx.test", "T1.1", 0);
        c.begin(conn, tx, &trace, "T1.1");
    }

    #[test]
    fn a_message_that_fits_goes_whole_and_a_larger_one_switches_to_descriptors() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let tx = transaction(1, "client.example");
        start(&mut c, 1, &tx);
        c.write(1, b"Subject: small\n\nhello\n");
        assert!(
            sent(&agent).is_empty(),
            "nothing goes out before the end of data"
        );
        c.finish(1);
        match &sent(&agent)[..] {
            [Request::Deliver { accounts, data, .. }] => {
                assert_eq!(accounts, &["user0".to_string()]);
                assert_eq!(data, b"Subject: small\n\nhello\n");
            }
            other => panic!("{other:?}"),
        }
        // 70 KiB: Begin goes out when the data outgrows a request; no Commit before the
        // descriptors are answered.
        start(&mut c, 2, &tx);
        c.write(2, &[b'x'; 40 * 1024]);
        c.write(2, &[b'y'; 30 * 1024]);
        assert!(matches!(&sent(&agent)[..], [Request::Begin { .. }]));
        c.finish(2);
        assert!(sent(&agent).is_empty());
    }

    /// Found in review: an empty body never reaches `write`, so trace fields too long for a
    /// request (hundreds of accounts, a long HELO) made an oversized Deliver, which the agent
    /// could not read.
    #[test]
    fn trace_fields_too_long_for_one_request_go_the_descriptor_way() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let tx = transaction(200, &"h".repeat(500));
        let trace = Trace::new(&tx, "mx.test", "T1.1", 0);
        let heads: Vec<Vec<u8>> = tx
            .accounts()
            .iter()
            .map(|a| trace.for_account(a, "mx.test"))
            .collect();
        assert!(deliver_size(&tx.accounts(), &heads, 0) > MAX_DATAGRAM);
        c.begin(1, &tx, &trace, "T1.1");
        c.finish(1);
        match &sent(&agent)[..] {
            [Request::Begin { accounts, .. }] => assert_eq!(accounts.len(), 200),
            other => panic!("{other:?}"),
        }
    }
}
