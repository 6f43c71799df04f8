//! The receiver's side of the delivery agent: the server's request/outcome interface, carried
//! over the agent socket and answered asynchronously.
//!
//! Owns the transactions in flight. Mail data is held from the start of DATA; a message whose
//! whole request fits one datagram goes out at its end as one Deliver (the agent writes the
//! copies: no descriptors, one round trip). When the held data outgrows that, Begin is sent;
//! data that arrives before the agent's descriptors is still held (the server stops reading
//! from that client once [`AgentClient::wants_data`] says so); once the descriptors arrive
//! the trace fields and data are written straight into the recipients' tmp files, by the
//! transaction's own writer thread ([`super::writer`]; never by the event loop, which a hung
//! filesystem would stall), with at most [`WRITE_AHEAD`] octets waiting for it; at the end
//! of data the writer closes the copies, then Commit goes out. Either way the outcome comes
//! back later. If the agent goes away, every transaction in flight gets 451 4.3.0 and
//! [`AgentClient::on_readable`] reports it. It must not open files itself.
//!
//! Lanes: when Maildirs are in homes ([`AgentClient::route_by_home`]), the requests for the
//! accounts of one filesystem go down a socket of their own, which a thread of the agent
//! serves (see `agent` and `lanes`), so that a filesystem that stops answering holds up only
//! its own accounts' checks and transactions; the others go on, each lane in order. A
//! transaction whose accounts are on different filesystems, an account whose home is not
//! known, and the filesystems beyond the agent's `MAX_LANES` (or whose lane was refused)
//! share one more lane, the general one. The first socket then carries only Lane requests,
//! so that no hung filesystem can keep a lane from being opened (unless the general lane
//! could not be had: then the first socket is the general lane, and it is asked for again
//! every [`MOUNTS_TTL`]). Requests for a lane the agent has not answered yet wait in its
//! outbox; if the agent refuses it, they move, in order, to the general lane, and the
//! filesystem is given another try at the next reading of the mount table.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::agent::MAX_LANES;
use super::channel::{self, Received};
use super::lanes;
use super::protocol::{deliver_size, Request, Response, MAX_ACCOUNTS, MAX_DATAGRAM};
use super::writer::{CopyWriter, Progress, Writers};
use super::DeliveryError;
use crate::smtp::trace::Trace;
use crate::smtp::{DeliveryOutcome, Reply, Transaction};

/// Requests waiting for room on the agent's socket at most (found in review: with the agent
/// stalled, connect-DATA-close loops grew the queue without bound).
const OUTBOX_LIMIT: usize = 65_536;

/// Mail data held per transaction while its descriptors are on their way (one round trip to
/// the agent); beyond it the server stops reading from that client.
const HOLD_LIMIT: usize = 64 * 1024;
/// Mail data given to a transaction's writer and not yet written, beyond which the server
/// stops reading from that client (so with one read, under 128 KiB per session, as while
/// held).
pub const WRITE_AHEAD: usize = 64 * 1024;

/// How long an account whose Maildir was just found able to take mail (by a check or a
/// delivery) is not checked again at RCPT time: as long as the agent keeps that Maildir
/// open (its MAILDIR_TTL), within which the check would find it in the agent's cache anyway.
const CHECKED_TTL: Duration = Duration::from_secs(2);
/// Accounts remembered so at most.
const CHECKED_MAX: usize = 4096;

/// How long the mount table read to place homes on lanes is used before it is read again
/// (a filesystem mounted since then gets its own lane from then on).
const MOUNTS_TTL: Duration = Duration::from_secs(10);
/// Accounts whose lane is remembered at most (beyond, the memory starts again).
const LANE_MEMORY: usize = 4096;
/// A lane that has not answered for this long while requests wait for it is taken for
/// stuck (its filesystem hung): a RCPT whose mailbox check would go down it gets 451 at
/// once, instead of waiting for its own check's timeout (30 s) behind the others.
/// Long enough for a healthy but slow commit (a 100 MiB message on a slow disk): while a
/// lane is taken for stuck, its filesystem's new mail gets 451s it would not have needed.
const LANE_STALL: Duration = Duration::from_secs(20);

/// A check sent to the agent: its accounts, and the connections waiting for its answer
/// (more than one when RCPTs to the same account came while it was out).
struct CheckReq {
    lane: usize,
    accounts: Vec<String>,
    waiters: Vec<u64>,
}

/// What [`AgentClient::check`] did.
#[derive(Debug)]
pub enum CheckStart {
    /// Every account was found able to take mail less than [`CHECKED_TTL`] ago: no check.
    Fresh,
    /// A Check went out with this id (or one for the same accounts was already out, and
    /// this connection waits for it too); its answer comes from
    /// [`AgentClient::take_check_answers`].
    Sent(u64),
    /// The account's check failed less than [`CHECKED_TTL`] ago (that failure is the
    /// answer), or the Check could not be sent (the agent is gone, or too many requests
    /// wait for it).
    Failed(DeliveryError),
}

/// The answer to a Check: (connection, check id, result).
pub type CheckAnswer = (u64, u64, Result<(), DeliveryError>);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Nothing sent yet: the data is held while a Deliver could still carry it.
    Buffering,
    /// Begin sent, descriptors not here yet.
    Opening,
    /// Descriptors here (with the writer), data being written.
    Open,
    /// End of data came before the descriptors: commit as soon as they are written.
    CommitWanted,
    /// End of data: the writer is writing what is left and closing the copies.
    Closing,
    /// Commit sent.
    Committing,
}

struct InFlight {
    conn: u64,
    /// The agent's lane that has the transaction: every request about it goes there.
    lane: usize,
    /// When DATA began: a mailbox check that failed after this is newer news than the
    /// transaction's success (its copies may have been created before the mailbox broke).
    started: Instant,
    tx_id: String,
    /// The accounts of the copies, in the agent's order (for the log).
    accounts: Vec<String>,
    /// When the commit was asked for (the log's timing).
    commit_at: Option<Instant>,
    heads: Vec<Vec<u8>>,
    /// The thread that writes the copies, once their descriptors are here.
    writer: Option<CopyWriter>,
    /// What waits for the writer: the chunks' allocations and their queue overhead.
    queued: usize,
    held: Vec<u8>,
    error: Option<DeliveryError>,
    state: State,
    /// Begin was sent: the data went into descriptors, not into a Deliver (for the log).
    streamed: bool,
}

impl InFlight {
    /// Whether the agent has been asked anything about it (a Begin or a Deliver went out).
    fn told(&self) -> bool {
        self.streamed || self.state == State::Committing
    }
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

/// One socket to the agent: the first one, or a lane.
struct Lane {
    sock: OwnedFd,
    /// Requests the socket had no room for, in order, with their transaction ids. The event
    /// loop never blocks on the agent: they go out when the socket is writable again
    /// ([`AgentClient::flush`]). An Abort whose Begin still waits here removes that Begin
    /// instead of joining it, so what waits belongs to live transactions (or to Begins the
    /// agent already has), and at most [`OUTBOX_LIMIT`] requests wait in all lanes: beyond, a
    /// new transaction gets 451.
    outbox: VecDeque<Queued>,
    state: LaneState,
    /// Requests given to the lane that the agent has not answered yet (queued or sent).
    unanswered: usize,
    /// Since when it has been so with no answer: the first request, or the last answer.
    quiet_since: Option<Instant>,
}

impl Lane {
    fn new(sock: OwnedFd, state: LaneState) -> Lane {
        Lane {
            sock,
            outbox: VecDeque::new(),
            state,
            unanswered: 0,
            quiet_since: None,
        }
    }

    /// One more request that the agent answers.
    fn expect_answers(&mut self, n: usize) {
        if self.unanswered == 0 && n > 0 {
            self.quiet_since = Some(Instant::now());
        }
        self.unanswered += n;
    }

    /// An answer came: the quiet time starts again, if more wait.
    fn answered(&mut self, now: Instant) {
        self.unanswered = self.unanswered.saturating_sub(1);
        self.quiet_since = (self.unanswered > 0).then_some(now);
    }

    /// `n` requests will never go out (taken back, or moved): the agent said nothing, so
    /// the quiet time goes on, if more wait.
    fn withdrawn(&mut self, n: usize) {
        self.unanswered = self.unanswered.saturating_sub(n);
        if self.unanswered == 0 {
            self.quiet_since = None;
        }
    }

    fn stalled(&self, now: Instant) -> bool {
        self.quiet_since
            .is_some_and(|at| now.saturating_duration_since(at) >= LANE_STALL)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneState {
    /// Asked for; the agent has not answered yet: its requests wait in its outbox.
    Opening,
    Ready,
    /// The agent refused it: never used.
    Refused,
}

/// Where an account's home is, if the receiver found it (its resolver's memory).
type Homes = Box<dyn Fn(&str) -> Option<PathBuf>>;

/// Which lane an account's requests take: by the filesystem of its home.
struct Router {
    homes: Homes,
    /// Homes seen, so that a lane does not depend on how long the resolver keeps them.
    known: HashMap<String, PathBuf>,
    mounts: Vec<lanes::Mount>,
    mounts_at: Option<Instant>,
    /// Filesystem (device) -> its lane; `None`: no lane for it (none left, or none could be
    /// made; forgotten when the mount table is read again).
    by_dev: HashMap<String, Option<usize>>,
    by_account: HashMap<String, usize>,
    /// The lane of mixed transactions, unknown homes and filesystems without a lane.
    general: Option<usize>,
}

pub struct AgentClient {
    /// The agent's sockets: the first one, then the lanes opened since, by number.
    lanes: Vec<Lane>,
    router: Option<Router>,
    /// Lanes opened since the server last asked (it registers them with its poller).
    new_lanes: Vec<usize>,
    /// Lane requests not answered yet: request id -> lane.
    opening: HashMap<u64, usize>,
    hostname: String,
    next_id: u64,
    by_conn: HashMap<u64, u64>,
    inflight: HashMap<u64, InFlight>,
    outcomes: VecDeque<(u64, DeliveryOutcome)>,
    /// Connections whose held data was written: they may read again.
    resumed: Vec<u64>,
    /// Streamed transactions' writer threads.
    writers: Writers,
    /// A send failed: the agent is gone; reported by the next `flush` or `on_readable`.
    broken: Option<String>,
    /// The agent is gone and that was reported: nothing is sent any more.
    gone: bool,
    /// Checks sent and not answered, by id.
    checks: HashMap<u64, CheckReq>,
    check_answers: VecDeque<CheckAnswer>,
    /// Accounts whose Maildir took mail, or passed a check, and when.
    checked: HashMap<String, Instant>,
    /// Accounts whose check (of that account alone) failed, when, and why: RCPTs repeated to
    /// a broken mailbox cost the agent one check per [`CHECKED_TTL`], not one each.
    refused: HashMap<String, (Instant, DeliveryError)>,
}

/// What a RCPT or a message gets when the agent's lane for it has been silent for
/// [`LANE_STALL`] (451 4.3.0).
fn silent_lane() -> DeliveryError {
    DeliveryError::Io(format!(
        "the delivery agent's lane for this mailbox has not answered for {}s",
        LANE_STALL.as_secs()
    ))
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
            lanes: vec![Lane::new(sock, LaneState::Ready)],
            router: None,
            new_lanes: Vec::new(),
            opening: HashMap::new(),
            hostname: hostname.to_string(),
            next_id: 0,
            by_conn: HashMap::new(),
            inflight: HashMap::new(),
            outcomes: VecDeque::new(),
            resumed: Vec::new(),
            writers: Writers::new(),
            broken: None,
            gone: false,
            checks: HashMap::new(),
            check_answers: VecDeque::new(),
            checked: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    /// The event loop's waker: writers wake it when they have written or closed (then
    /// [`AgentClient::on_writers`]).
    pub fn set_waker(&mut self, waker: Arc<mio::Waker>) {
        self.writers.set_waker(waker);
    }

    /// Sends each filesystem's accounts down a lane of its own (Maildirs in homes), `homes`
    /// telling where an account's home is. The general lane is asked for at once.
    pub fn route_by_home(&mut self, homes: impl Fn(&str) -> Option<PathBuf> + 'static) {
        self.router = Some(Router {
            homes: Box::new(homes),
            known: HashMap::new(),
            mounts: Vec::new(),
            mounts_at: None,
            by_dev: HashMap::new(),
            by_account: HashMap::new(),
            general: None,
        });
        let general = self.open_lane("mixed filesystems and unknown homes").ok();
        if let Some(r) = self.router.as_mut() {
            r.general = general;
        }
    }

    /// Lane `lane`'s socket, for the poller.
    pub fn raw_fd(&self, lane: usize) -> Option<RawFd> {
        self.lanes.get(lane).map(|l| l.sock.as_raw_fd())
    }

    /// The lanes opened since the last call, for the poller.
    pub fn take_new_lanes(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.new_lanes)
    }

    fn ready(&self, lane: usize) -> bool {
        self.lanes
            .get(lane)
            .is_some_and(|l| l.state == LaneState::Ready)
    }

    /// Whether requests may be given to `lane`: it is ready, or being opened.
    fn usable(&self, lane: usize) -> bool {
        self.lanes
            .get(lane)
            .is_some_and(|l| l.state != LaneState::Refused)
    }

    /// The general lane, unless the agent refused it (or it could not be asked for): then
    /// the first socket.
    fn general(&self) -> usize {
        self.router
            .as_ref()
            .and_then(|r| r.general)
            .filter(|&g| self.usable(g))
            .unwrap_or(0)
    }

    /// Lanes asked for and not refused, the first socket included.
    fn lanes_in_use(&self) -> usize {
        self.lanes
            .iter()
            .filter(|l| l.state != LaneState::Refused)
            .count()
    }

    /// The lane for requests about `accounts`: that of their filesystem if they share one,
    /// else the general one.
    fn lane_for(&mut self, accounts: &[String], now: Instant) -> usize {
        if self.router.is_none() {
            return 0;
        }
        // Every account is looked up (not only up to the first that differs), so that each
        // one's lane is known to `silent_for`.
        let mut lane = None;
        let mut mixed = false;
        for a in accounts {
            match (lane, self.account_lane(a, now)) {
                (_, None) => mixed = true,
                (Some(x), Some(y)) if x != y => mixed = true,
                (_, l) => lane = l,
            }
        }
        match lane {
            Some(l) if !mixed && self.usable(l) => l,
            _ => self.general(),
        }
    }

    /// The lane of the filesystem of `account`'s home (asked for the first time), `None`
    /// when there is none for it.
    fn account_lane(&mut self, account: &str, now: Instant) -> Option<usize> {
        let r = self.router.as_mut()?;
        if r.mounts_at
            .is_none_or(|at| now.saturating_duration_since(at) >= MOUNTS_TTL)
        {
            r.mounts = lanes::read_mounts();
            r.mounts_at = Some(now);
            r.by_account.clear();
            // Filesystems without a lane, or whose lane was refused, get another try, and
            // so does the general lane.
            let lanes = &self.lanes;
            r.by_dev.retain(|_, l| {
                l.is_some_and(|l| lanes.get(l).is_some_and(|x| x.state != LaneState::Refused))
            });
            let general = r.general;
            if general.is_none_or(|g| !self.usable(g)) {
                let g = self.open_lane("mixed filesystems and unknown homes").ok();
                if let Some(r) = self.router.as_mut() {
                    r.general = g.or(r.general);
                }
            }
        }
        let r = self.router.as_mut()?;
        if let Some(&l) = r.by_account.get(account) {
            return Some(l);
        }
        let home = match (r.homes)(account) {
            Some(h) => {
                if r.known.len() >= LANE_MEMORY {
                    r.known.clear();
                }
                r.known.insert(account.to_string(), h.clone());
                h
            }
            None => r.known.get(account)?.clone(),
        };
        let m = lanes::mount_of(&r.mounts, &home)?;
        let (dev, point) = (m.dev.clone(), m.point.clone());
        let lane = match r.by_dev.get(&dev) {
            Some(l) => (*l)?,
            None => {
                let opened = match self.open_lane(&point) {
                    Ok(l) => Some(l),
                    // Not now (the first socket is full): asked again next time.
                    Err(true) => return None,
                    Err(false) => None,
                };
                self.router.as_mut()?.by_dev.insert(dev, opened);
                opened?
            }
        };
        if !self.usable(lane) {
            return None;
        }
        let r = self.router.as_mut()?;
        if r.by_account.len() >= LANE_MEMORY {
            r.by_account.clear();
        }
        r.by_account.insert(account.to_string(), lane);
        Some(lane)
    }

    /// Asks the agent for a lane (for the filesystem mounted at `what`): a socket pair, one
    /// end sent on the first socket. `Err(true)`: not now, ask again; `Err(false)`: no more
    /// lanes, or none could be made (until the mount table is read again).
    fn open_lane(&mut self, what: &str) -> Result<usize, bool> {
        // Refused lanes whose answer is still to come keep their places: at most as many
        // again.
        if self.lanes_in_use() > MAX_LANES
            || self.lanes.len() > 2 * MAX_LANES + 1
            || self.gone
            || self.broken.is_some()
        {
            return Err(false);
        }
        // Behind queued requests it could not go out first; it is asked again later.
        if !self.lanes[0].outbox.is_empty() {
            return Err(true);
        }
        let (ours, theirs) = match channel::pair() {
            Ok(p) => p,
            Err(e) => {
                warn!("cannot open a lane to the delivery agent for {what:?}: {e}");
                return Err(false);
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        let msg = Request::Lane { id }.encode();
        match channel::try_send_with(self.lanes[0].sock.as_fd(), &msg, &[theirs.as_fd()]) {
            Ok(true) => self.lanes[0].expect_answers(1),
            Ok(false) => return Err(true),
            Err(e) => {
                self.broken = Some(format!("delivery agent socket: {e}"));
                return Err(false);
            }
        }
        let lane = Lane::new(ours, LaneState::Opening);
        // A refused lane's place is taken again (its socket closed, which also takes it out
        // of the poller), unless the agent's answer to it is still to come.
        let free = (1..self.lanes.len()).find(|&i| {
            self.lanes[i].state == LaneState::Refused && !self.opening.values().any(|&o| o == i)
        });
        let n = match free {
            Some(i) => {
                self.lanes[i] = lane;
                i
            }
            None => {
                self.lanes.push(lane);
                self.lanes.len() - 1
            }
        };
        // The agent's log names the lane by the request's id.
        info!("event=lane_opening lane={n} request={id} mount={what:?}");
        self.opening.insert(id, n);
        if !self.new_lanes.contains(&n) {
            self.new_lanes.push(n);
        }
        Ok(n)
    }

    /// Lane `lane` was refused: what waits for it, and what is bound to it, goes to the
    /// general lane (nothing of it was sent: a lane is written to only once ready).
    fn lane_refused(&mut self, lane: usize) {
        let Some(l) = self.lanes.get_mut(lane) else {
            return;
        };
        l.state = LaneState::Refused;
        let moved = std::mem::take(&mut l.outbox);
        // All of them wait for an answer (an Abort only ever follows what was sent).
        l.withdrawn(moved.len());
        // Nothing points at its place any more, which another lane may take: its filesystem
        // has no lane until the next reading of the mount table, and if it was the general
        // lane, it is asked for again then.
        if let Some(r) = self.router.as_mut() {
            r.by_account.retain(|_, l| *l != lane);
            for l in r.by_dev.values_mut().filter(|l| **l == Some(lane)) {
                *l = None;
            }
            if r.general == Some(lane) {
                r.general = None;
            }
        }
        let to = self.general();
        for t in self.inflight.values_mut().filter(|t| t.lane == lane) {
            t.lane = to;
        }
        for c in self.checks.values_mut().filter(|c| c.lane == lane) {
            c.lane = to;
        }
        if let Some(g) = self.lanes.get_mut(to) {
            g.expect_answers(moved.len());
            g.outbox.extend(moved);
        }
    }

    /// Sends `r` down `lane`, or queues it behind earlier requests when its socket is full.
    fn send(&mut self, lane: usize, r: &Request) -> Result<(), DeliveryError> {
        if self.gone || self.broken.is_some() {
            return Err(DeliveryError::Io("delivery agent gone".into()));
        }
        // A Check is bounded like a new transaction: it is one more client waiting.
        let starts = matches!(
            r,
            Request::Begin { .. } | Request::Deliver { .. } | Request::Check { .. }
        );
        let waiting: usize = self.lanes.iter().map(|l| l.outbox.len()).sum();
        let Some(l) = self.lanes.get_mut(lane) else {
            return Err(DeliveryError::Io(format!("no lane {lane} to the agent")));
        };
        if let Request::Abort { id } = r {
            // Its Begin (or Deliver) never left (and so nothing after it did): forget both. A
            // Commit is only sent once the Begin was answered, so a queued Begin is all there
            // is.
            if let Some(i) = l.outbox.iter().position(|q| q.id == *id && q.begin) {
                l.outbox.remove(i);
                l.withdrawn(1);
                return Ok(());
            }
        }
        if starts && waiting >= OUTBOX_LIMIT {
            return Err(DeliveryError::Io(
                "too many requests wait for the delivery agent".into(),
            ));
        }
        let msg = r.encode();
        // Every request but Abort is answered.
        let answered = !matches!(r, Request::Abort { .. });
        l.expect_answers(usize::from(answered));
        if l.outbox.is_empty() && l.state == LaneState::Ready {
            match channel::try_send(l.sock.as_fd(), &msg) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let why = format!("delivery agent socket: {e}");
                    self.broken = Some(why.clone());
                    return Err(DeliveryError::Io(why));
                }
            }
        }
        l.outbox.push_back(Queued {
            id: r.id(),
            begin: starts,
            msg,
        });
        Ok(())
    }

    /// Whether requests wait for `lane`'s socket to become writable (not those waiting for
    /// the lane to be answered).
    pub fn wants_write(&self, lane: usize) -> bool {
        self.lanes
            .get(lane)
            .is_some_and(|l| l.state == LaneState::Ready && !l.outbox.is_empty())
    }

    /// Sends what the socket has room for now. `Err` when the agent is gone (every
    /// transaction in flight has then been answered with 451).
    pub fn flush(&mut self) -> Result<(), AgentGone> {
        if let Some(why) = self.broken.take() {
            return Err(self.fail_all(&why));
        }
        for i in 0..self.lanes.len() {
            let l = &mut self.lanes[i];
            if l.state != LaneState::Ready {
                continue;
            }
            while let Some(q) = l.outbox.front() {
                match channel::try_send(l.sock.as_fd(), &q.msg) {
                    Ok(true) => {
                        l.outbox.pop_front();
                    }
                    Ok(false) => break,
                    Err(e) => return Err(self.fail_all(&format!("delivery agent socket: {e}"))),
                }
            }
        }
        Ok(())
    }

    /// RCPT time: asks the agent whether the Maildirs of `accounts` can take mail now (see
    /// protocol's Check), unless each was found able to less than [`CHECKED_TTL`] ago. A
    /// broken mailbox then gets its own 4xx at RCPT, and the others' mail goes through; a
    /// failure found only at the dot fails the whole transaction (one reply to DATA covers
    /// every recipient, RFC 5321 4.2.5).
    pub fn check(&mut self, conn: u64, accounts: &[String], now: Instant) -> CheckStart {
        let refused = accounts.iter().find_map(|a| {
            self.refused
                .get(a)
                .filter(|(at, _)| now.saturating_duration_since(*at) < CHECKED_TTL)
        });
        if let Some((_, e)) = refused {
            return CheckStart::Failed(e.clone());
        }
        let stale: Vec<String> = accounts
            .iter()
            .filter(|a| {
                self.checked
                    .get(*a)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= CHECKED_TTL)
            })
            .cloned()
            .collect();
        // More accounts than a transaction may hold: the session refuses them with 452
        // without any check.
        if stale.is_empty() || stale.len() > MAX_ACCOUNTS {
            return CheckStart::Fresh;
        }
        // The same accounts already being checked (a burst of mail to one account, or a
        // hung home): wait for that answer, asking the agent nothing more.
        if let Some((&id, req)) = self.checks.iter().find(|(_, r)| r.accounts == stale) {
            // Not behind a check stuck on a silent lane.
            if self.silent_for(req.lane, &stale, now) {
                return CheckStart::Failed(silent_lane());
            }
            if let Some(req) = self.checks.get_mut(&id) {
                req.waiters.push(conn);
            }
            return CheckStart::Sent(id);
        }
        self.next_id += 1;
        let id = self.next_id;
        let r = Request::Check {
            id,
            accounts: stale.clone(),
        };
        let lane = self.lane_for(&stale, now);
        if self.silent_for(lane, &stale, now) {
            return CheckStart::Failed(silent_lane());
        }
        match self.send(lane, &r) {
            Ok(()) => {
                self.checks.insert(
                    id,
                    CheckReq {
                        lane,
                        accounts: stale,
                        waiters: vec![conn],
                    },
                );
                CheckStart::Sent(id)
            }
            Err(e) => CheckStart::Failed(e),
        }
    }

    /// `conn` no longer waits for check `id` (the client timed out or went away). Once
    /// nobody does, its answer, if it comes, is dropped.
    pub fn forget_check(&mut self, id: u64, conn: u64) {
        let Some(req) = self.checks.get_mut(&id) else {
            return;
        };
        if let Some(i) = req.waiters.iter().position(|&c| c == conn) {
            req.waiters.swap_remove(i);
        }
        if !req.waiters.is_empty() {
            return;
        }
        // Still waiting for room on the socket: it never goes out, so clients that hang up
        // while a stalled agent has their checks leave nothing piled up for it. Already
        // sent, it stays (with nobody waiting) until the agent answers, so that later RCPTs
        // to the same accounts join it instead of queueing another behind it (found in
        // review: a hung home got a new check every 30 s).
        let Some(l) = self.lanes.get_mut(req.lane) else {
            return;
        };
        if let Some(i) = l.outbox.iter().position(|q| q.id == id) {
            l.outbox.remove(i);
            l.withdrawn(1);
            self.checks.remove(&id);
        }
    }

    /// The checks answered since the last call.
    pub fn take_check_answers(&mut self) -> Vec<CheckAnswer> {
        self.check_answers.drain(..).collect()
    }

    /// `accounts` took mail, or passed a check, at `now`.
    fn mark_checked(&mut self, accounts: &[String], now: Instant) {
        if self.checked.len() >= CHECKED_MAX {
            self.checked
                .retain(|_, at| now.saturating_duration_since(*at) < CHECKED_TTL);
            if self.checked.len() >= CHECKED_MAX {
                self.checked.clear();
            }
        }
        for a in accounts {
            self.refused.remove(a);
            // Every delivery comes here: no new key while the account is known.
            match self.checked.get_mut(a) {
                Some(at) => *at = now,
                None => {
                    self.checked.insert(a.clone(), now);
                }
            }
        }
    }

    /// The check of `account` alone failed at `now` with `e`. (A check of several accounts
    /// does not say which one failed: nothing is remembered for it.)
    fn mark_refused(&mut self, account: &str, now: Instant, e: &DeliveryError) {
        if self.refused.len() >= CHECKED_MAX {
            self.refused
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < CHECKED_TTL);
            if self.refused.len() >= CHECKED_MAX {
                self.refused.clear();
            }
        }
        self.checked.remove(account);
        self.refused.insert(account.to_string(), (now, e.clone()));
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
        let now = Instant::now();
        let lane = self.lane_for(&accounts, now);
        self.by_conn.insert(conn, id);
        self.inflight.insert(
            id,
            InFlight {
                conn,
                lane,
                started: now,
                tx_id: tx_id.to_string(),
                accounts,
                commit_at: None,
                heads,
                writer: None,
                queued: 0,
                held: Vec::new(),
                error: None,
                state: State::Buffering,
                streamed: false,
            },
        );
    }

    /// Whether a message to `accounts` taking `lane` would wait behind a silent lane: its
    /// own, or that of one of its accounts (a message mixing filesystems takes the general
    /// lane, which one hung filesystem among them stalls).
    fn silent_for(&self, lane: usize, accounts: &[String], now: Instant) -> bool {
        let silent = |l: usize| self.lanes.get(l).is_some_and(|x| x.stalled(now));
        silent(lane)
            || self.router.as_ref().is_some_and(|r| {
                accounts
                    .iter()
                    .any(|a| r.by_account.get(a).is_some_and(|&l| silent(l)))
            })
    }

    /// The held data no longer fits a Deliver: open the copies the streaming way.
    fn begin_streaming(&mut self, id: u64) {
        let Some(t) = self.inflight.get(&id) else {
            return;
        };
        let (lane, accounts) = (t.lane, t.accounts.clone());
        // Behind a silent lane it would wait for minutes: refused at the end of data.
        let error = if self.silent_for(lane, &accounts, Instant::now()) {
            Some(silent_lane())
        } else {
            self.send(lane, &Request::Begin { id, accounts }).err()
        };
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        t.streamed = error.is_none();
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
            Some(t) if t.state == State::Opening => t.held.len() < HOLD_LIMIT,
            Some(t) if t.state == State::Open => t.queued < WRITE_AHEAD,
            _ => true,
        }
    }

    pub fn write(&mut self, conn: u64, data: Vec<u8>) {
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
                t.held.extend_from_slice(&data);
                if !t.fits_one_request() {
                    self.begin_streaming(id);
                }
            }
            State::Opening => t.held.extend_from_slice(&data),
            _ => give_writer(t, data),
        }
    }

    pub fn abort(&mut self, conn: u64) {
        if let Some(id) = self.by_conn.remove(&conn) {
            let Some(t) = self.inflight.remove(&id) else {
                return;
            };
            if !t.told() {
                return; // the agent never heard of it
            }
            // The agent handles a lane's requests in order: an Abort after a Begin it has not
            // answered yet still finds the transaction.
            let _ = self.send(t.lane, &Request::Abort { id });
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
            State::Open => self.close_copies(id),
            // One end of data per transaction: a second is ignored, never a second commit.
            State::CommitWanted | State::Closing | State::Committing => {}
        }
    }

    /// End of data of a message held whole: one Deliver carries it, if it fits one request.
    /// Trace fields alone can outgrow it (hundreds of accounts, a long HELO and MAIL FROM)
    /// with a body too small to have switched in `write` (found in review: an empty body
    /// never reaches it); then the copies are opened the streaming way and committed once
    /// written.
    fn deliver(&mut self, id: u64) {
        let Some(t) = self.inflight.get(&id) else {
            return;
        };
        // Behind a silent lane it would wait for up to AGENT_TIMEOUT (10 minutes): 451 now,
        // and the next RCPT to its accounts asks again (and gets its own 451 at once).
        if t.fits_one_request() && self.silent_for(t.lane, &t.accounts, Instant::now()) {
            let e = silent_lane();
            if let Some(t) = self.inflight.remove(&id) {
                warn!(
                    "event=not_delivered session={:x} tx={} status={} error={:?}",
                    t.conn,
                    t.tx_id,
                    e.reply().code,
                    e.to_string()
                );
                forget_checked(&mut self.checked, &t.accounts);
                self.by_conn.remove(&t.conn);
                self.outcomes.push_back((t.conn, Err(e.reply())));
            }
            return;
        }
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
        let lane = t.lane;
        let r = Request::Deliver {
            id,
            accounts: t.accounts.clone(),
            heads: std::mem::take(&mut t.heads),
            data: std::mem::take(&mut t.held),
        };
        if let Err(e) = self.send(lane, &r) {
            if let Some(t) = self.inflight.remove(&id) {
                self.by_conn.remove(&t.conn);
                self.outcomes.push_back((t.conn, Err(e.reply())));
            }
        }
    }

    /// End of data of a streamed transaction: its writer writes what it still has, closes
    /// the copies and reports ([`AgentClient::on_writers`] then commits).
    fn close_copies(&mut self, id: u64) {
        let Some(t) = self.inflight.get_mut(&id) else {
            return;
        };
        match &t.writer {
            Some(w) if t.error.is_none() => {
                if w.close() {
                    t.state = State::Closing;
                } else {
                    t.writer = None;
                    t.error = Some(DeliveryError::Io(
                        "the copies' writer thread is gone".into(),
                    ));
                    self.commit(id);
                }
            }
            _ => self.commit(id),
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
            let (conn, lane, told) = (t.conn, t.lane, t.told());
            self.by_conn.remove(&conn);
            // Its writer, if any, closes the copies as it goes.
            if let Some(t) = self.inflight.remove(&id) {
                forget_checked(&mut self.checked, &t.accounts);
            }
            // Nothing to take back when its Begin never went (a silent lane, say).
            if told {
                let _ = self.send(lane, &Request::Abort { id });
            }
            self.outcomes.push_back((conn, Err(e.reply())));
            return;
        }
        t.writer = None;
        t.state = State::Committing;
        t.commit_at = Some(Instant::now());
        let lane = t.lane;
        if let Err(e) = self.send(lane, &Request::Commit { id }) {
            if let Some(t) = self.inflight.remove(&id) {
                self.by_conn.remove(&t.conn);
                self.outcomes.push_back((t.conn, Err(e.reply())));
            }
        }
    }

    /// Reads the agent's answers on `lane`. `Err` when the agent is gone (any of its lanes
    /// closed): every transaction in flight has then been answered with 451.
    pub fn on_readable(&mut self, lane: usize) -> Result<(), AgentGone> {
        if let Some(why) = self.broken.take() {
            return Err(self.fail_all(&why));
        }
        if self.gone {
            return Ok(());
        }
        if lane >= self.lanes.len() {
            return Ok(());
        }
        loop {
            let received = channel::recv(self.lanes[lane].sock.as_fd(), false);
            let (msg, fds) = match received {
                Ok(Received::Message(m, fds)) => (m, fds),
                Ok(Received::Empty) => return Ok(()),
                Ok(Received::TooLong(_)) => {
                    return Err(self.fail_all("the delivery agent sent a datagram too long"))
                }
                // A lane not in use (refused, or not answered yet: the answer may come later
                // on the first socket) closing is not the agent going away.
                Ok(Received::Closed) if lane != 0 && !self.ready(lane) => {
                    self.lane_refused(lane);
                    return Ok(());
                }
                Ok(Received::Closed) => {
                    return Err(self.fail_all("the delivery agent closed its socket"))
                }
                Err(e) => return Err(self.fail_all(&format!("delivery agent socket: {e}"))),
            };
            let Ok(resp) = Response::decode(&msg) else {
                return Err(self.fail_all("malformed answer from the delivery agent"));
            };
            self.lanes[lane].answered(Instant::now());
            self.handle(resp, fds);
        }
    }

    fn handle(&mut self, resp: Response, fds: Vec<OwnedFd>) {
        let id = resp.id();
        if let Some(lane) = self.opening.remove(&id) {
            let Some(l) = self.lanes.get_mut(lane) else {
                return;
            };
            match resp {
                Response::Done { .. } if l.state == LaneState::Opening => {
                    // What waited for it goes out with the next flush.
                    l.state = LaneState::Ready;
                    info!("event=lane_ready lane={lane}");
                }
                Response::Done { .. } => {}
                Response::Failed { detail, .. } => {
                    warn!("event=lane_refused lane={lane} error={detail:?}: its requests take the general lane");
                    self.lane_refused(lane);
                }
                Response::Opened { .. } => self.lane_refused(lane),
            }
            return;
        }
        if let Some(req) = self.checks.remove(&id) {
            if !fds.is_empty() {
                self.writers
                    .discard(fds.into_iter().map(File::from).collect());
            }
            let now = Instant::now();
            let r = match resp {
                Response::Done { .. } => {
                    self.mark_checked(&req.accounts, now);
                    Ok(())
                }
                Response::Failed { class, detail, .. } => {
                    let e = DeliveryError::from_wire(class, detail);
                    // Only what is about the mailbox itself; an agent-wide condition (a
                    // stuck lookup of someone else, too many checks waiting) is not
                    // remembered against this account (found in review).
                    let about_the_mailbox = matches!(
                        e,
                        DeliveryError::Unavailable(_)
                            | DeliveryError::Quota(_)
                            | DeliveryError::NoSpace(_)
                    );
                    if let ([account], true) = (&req.accounts[..], about_the_mailbox) {
                        self.mark_refused(account, now, &e);
                    }
                    Err(e)
                }
                Response::Opened { .. } => Err(DeliveryError::Io(
                    "the delivery agent answered a check with descriptors".into(),
                )),
            };
            for conn in req.waiters {
                self.check_answers.push_back((conn, id, r.clone()));
            }
            return;
        }
        let Some(t) = self.inflight.get_mut(&id) else {
            // Aborted meanwhile: its copies are closed off the event loop (a close can block
            // on a hung home; found in review).
            self.writers
                .discard(fds.into_iter().map(File::from).collect());
            return;
        };
        match resp {
            Response::Opened { count, .. } => {
                if fds.len() != usize::from(count) || fds.len() != t.heads.len() {
                    t.error = Some(DeliveryError::Io(
                        "delivery agent sent the wrong descriptors".into(),
                    ));
                    self.writers
                        .discard(fds.into_iter().map(File::from).collect());
                } else {
                    let files = fds.into_iter().map(File::from).collect();
                    let heads = std::mem::take(&mut t.heads);
                    match self.writers.start(id, files, heads) {
                        Ok(w) => {
                            t.writer = Some(w);
                            let held = std::mem::take(&mut t.held);
                            if !held.is_empty() {
                                give_writer(t, held);
                            }
                        }
                        Err(e) => {
                            t.held = Vec::new();
                            t.error = Some(DeliveryError::Io(format!(
                                "cannot start a thread to write the copies: {e}"
                            )));
                        }
                    }
                }
                self.opened(id);
            }
            Response::Failed { class, detail, .. } => {
                let e = DeliveryError::from_wire(class, detail);
                forget_checked(&mut self.checked, &t.accounts);
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
                if let Some(mut t) = self.inflight.remove(&id) {
                    // Not over a check that failed while this transaction was under way
                    // (found in review: a commit of copies created before tmp/ was made
                    // unwritable cleared that failure).
                    t.accounts
                        .retain(|a| self.refused.get(a).is_none_or(|(at, _)| *at < t.started));
                    self.mark_checked(&t.accounts, Instant::now());
                }
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
        if t.queued < WRITE_AHEAD {
            self.resumed.push(t.conn);
        }
        if wanted {
            self.close_copies(id);
        }
    }

    /// The writers' progress: a client whose data waiting for its writer fell below
    /// [`WRITE_AHEAD`] may send again ([`AgentClient::take_resumed`]); closed copies are
    /// committed, or their write error answered.
    pub fn on_writers(&mut self) {
        for p in self.writers.take_progress() {
            match p {
                Progress::Written { id, cost } => {
                    let Some(t) = self.inflight.get_mut(&id) else {
                        continue;
                    };
                    let was_full = t.queued >= WRITE_AHEAD;
                    t.queued = t.queued.saturating_sub(cost);
                    if was_full && t.queued < WRITE_AHEAD && t.state == State::Open {
                        self.resumed.push(t.conn);
                    }
                }
                Progress::Closed { id, result } => {
                    let Some(t) = self.inflight.get_mut(&id) else {
                        continue;
                    };
                    if t.state != State::Closing {
                        continue;
                    }
                    t.writer = None;
                    t.queued = 0;
                    if let Err(e) = result {
                        t.error = Some(e);
                    }
                    self.commit(id);
                }
            }
        }
    }

    fn fail_all(&mut self, why: &str) -> AgentGone {
        error!(
            "{why}: {} transaction(s) in flight get 451",
            self.inflight.len()
        );
        for (_, t) in self.inflight.drain() {
            if matches!(
                t.state,
                State::Committing | State::CommitWanted | State::Closing
            ) {
                self.outcomes.push_back((t.conn, Err(gone_reply())));
            }
        }
        for (id, req) in self.checks.drain() {
            for conn in req.waiters {
                self.check_answers
                    .push_back((conn, id, Err(DeliveryError::Io(why.to_string()))));
            }
        }
        self.by_conn.clear();
        for l in &mut self.lanes {
            l.outbox.clear();
        }
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

/// A delivery to `accounts` failed: the next RCPT to them asks the agent again.
fn forget_checked(checked: &mut HashMap<String, Instant>, accounts: &[String]) {
    for a in accounts {
        checked.remove(a);
    }
}

/// Hands `data` to the transaction's writer (counted until it is written).
fn give_writer(t: &mut InFlight, data: Vec<u8>) {
    if t.error.is_some() {
        return;
    }
    match t.writer.as_ref().and_then(|w| w.write(data)) {
        Some(cost) => t.queued += cost,
        None => {
            t.writer = None;
            t.error = Some(DeliveryError::Io(
                "the copies' writer thread is gone".into(),
            ));
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

    /// Answers one request as the agent would.
    fn answer(agent: &OwnedFd, r: Response) {
        channel::send(agent.as_fd(), &r.encode(), &[]).unwrap();
    }

    /// Takes the Lane request the client sent on `first`: its number and its socket.
    fn lane_opened(first: &OwnedFd) -> (u64, OwnedFd) {
        match channel::recv(first.as_fd(), false).unwrap() {
            Received::Message(m, mut fds) => {
                let Ok(Request::Lane { id }) = Request::decode(&m) else {
                    panic!("not a Lane: {m:?}");
                };
                assert_eq!(fds.len(), 1);
                (id, fds.pop().unwrap())
            }
            other => panic!("no Lane: {other:?}"),
        }
    }

    /// Answers lane `id`'s Lane request on the first socket (`ok`: Done, else Failed) and
    /// lets the client read it.
    fn answer_lane(c: &mut AgentClient, first: &OwnedFd, id: u64, ok: bool) {
        let r = if ok {
            Response::Done {
                id,
                names: Vec::new(),
            }
        } else {
            Response::failed(id, &DeliveryError::Io("lane refused: test".into()))
        };
        answer(first, r);
        c.on_readable(0).unwrap();
    }

    /// A client routing by home with a fixed mount table: `/` (device 1:1) and `/proc`
    /// (device 0:5). Its general lane is asked for at once (on `first`).
    fn routed(first: OwnedFd, homes: impl Fn(&str) -> Option<PathBuf> + 'static) -> AgentClient {
        let mut c = AgentClient::new(first, "mx.test");
        c.route_by_home(homes);
        let router = c.router.as_mut().unwrap();
        router.mounts = vec![
            lanes::Mount {
                point: "/".into(),
                dev: "1:1".into(),
            },
            lanes::Mount {
                point: "/proc".into(),
                dev: "0:5".into(),
            },
        ];
        router.mounts_at = Some(Instant::now());
        c
    }

    /// [`routed`], its general lane answered: the client, the agent's end of the first
    /// socket and of the general lane.
    fn routed_and_ready(
        homes: impl Fn(&str) -> Option<PathBuf> + 'static,
    ) -> (AgentClient, OwnedFd, OwnedFd) {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = routed(ours, homes);
        let (gid, general) = lane_opened(&agent);
        answer_lane(&mut c, &agent, gid, true);
        (c, agent, general)
    }

    #[test]
    fn each_filesystem_of_homes_gets_a_lane_and_the_rest_the_general_one() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = routed(ours, |a| match a {
            "rooted" | "rooted2" | "rooted3" => Some(PathBuf::from("/nonexistent/rooted")),
            "procish" | "procish2" => Some(PathBuf::from("/proc/procish")),
            "srvish" => Some(PathBuf::from("/srv/srvish")),
            _ => None,
        });
        c.router.as_mut().unwrap().mounts.push(lanes::Mount {
            point: "/srv".into(),
            dev: "3:3".into(),
        });
        let (gid, general) = lane_opened(&agent);
        assert_eq!(c.take_new_lanes(), vec![1]);
        answer_lane(&mut c, &agent, gid, true);
        let now = Instant::now();
        let one = |a: &str| vec![a.to_string()];
        let check = |c: &mut AgentClient, conn: u64, accounts: &[String]| {
            let CheckStart::Sent(id) = c.check(conn, accounts, now) else {
                panic!("a Check must go out");
            };
            Request::Check {
                id,
                accounts: accounts.to_vec(),
            }
        };
        // The first account of a filesystem: its lane is asked for, and the check waits for
        // the agent's answer in that lane (not in the general one, which a hung filesystem
        // could then stall for everybody).
        let r1 = check(&mut c, 1, &one("rooted"));
        let (l1id, lane1) = lane_opened(&agent);
        assert_eq!(c.take_new_lanes(), vec![2]);
        c.flush().unwrap();
        assert!(
            !c.wants_write(2),
            "no WRITABLE interest for a lane being opened"
        );
        assert!(sent(&lane1).is_empty() && sent(&general).is_empty());
        answer_lane(&mut c, &agent, l1id, true);
        c.flush().unwrap();
        assert_eq!(sent(&lane1), vec![r1]);
        let r2 = check(&mut c, 2, &one("rooted2"));
        assert_eq!(sent(&lane1), vec![r2]);
        // A lane the agent refuses: what waited for it goes to the general lane, in order,
        // and its filesystem's accounts take the general lane from then on.
        let r3 = check(&mut c, 3, &one("procish"));
        let (l2id, _lane2) = lane_opened(&agent);
        answer_lane(&mut c, &agent, l2id, false);
        let r4 = check(&mut c, 4, &one("procish2"));
        // Mixed filesystems, or a home not known: the general lane.
        let r5 = check(&mut c, 5, &["rooted".to_string(), "procish".to_string()]);
        let r6 = check(&mut c, 6, &one("stranger"));
        // A lane the agent closes before answering is refused too. (It takes the refused
        // lane's place: lane 3, a new socket.)
        let r7 = check(&mut c, 7, &one("srvish"));
        let (_, lane3) = lane_opened(&agent);
        assert_eq!(c.take_new_lanes(), vec![3]);
        drop(lane3);
        c.on_readable(3).unwrap();
        c.flush().unwrap();
        assert_eq!(sent(&general), vec![r3, r4, r5, r6, r7]);
        assert!(sent(&lane1).is_empty());
        // The first socket carries Lane requests only.
        assert!(sent(&agent).is_empty());
        // Answers come back on their lanes.
        let Request::Check { id: id8, .. } = check(&mut c, 8, &one("rooted3")) else {
            unreachable!()
        };
        assert_eq!(sent(&lane1).len(), 1);
        answer(
            &lane1,
            Response::Done {
                id: id8,
                names: Vec::new(),
            },
        );
        c.on_readable(2).unwrap();
        assert!(c
            .take_check_answers()
            .iter()
            .any(|(conn, id, r)| *conn == 8 && *id == id8 && r.is_ok()));
        // A lane in use closing is the agent going away.
        drop(lane1);
        assert!(c.on_readable(2).is_err());
    }

    /// A transaction and a check bound to a lane the agent refuses follow their requests to
    /// the general lane: the transaction's Abort still takes back its queued Deliver there,
    /// and forgetting the check still takes it back (found in review: nothing tested it).
    #[test]
    fn what_waited_for_a_refused_lane_follows_it_to_the_general_lane() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = routed(ours, |a| match a {
            "user0" | "procish" => Some(PathBuf::from("/proc/x")),
            _ => None,
        });
        let (gid, general) = lane_opened(&agent);
        answer_lane(&mut c, &agent, gid, true);
        let now = Instant::now();
        let CheckStart::Sent(cid) = c.check(1, &["procish".to_string()], now) else {
            panic!("a Check must go out");
        };
        let (lid, _lane) = lane_opened(&agent);
        let tx = transaction(1, "client.example");
        start(&mut c, 2, &tx);
        c.write(2, b"Subject: x\r\n\r\nhi\r\n".to_vec());
        c.finish(2);
        c.flush().unwrap();
        assert!(
            sent(&general).is_empty(),
            "sent before the lane was answered"
        );
        answer_lane(&mut c, &agent, lid, false);
        c.forget_check(cid, 1);
        c.abort(2);
        let CheckStart::Sent(other) = c.check(3, &["stranger".to_string()], now) else {
            panic!("a Check must go out");
        };
        c.flush().unwrap();
        assert_eq!(
            sent(&general),
            vec![Request::Check {
                id: other,
                accounts: vec!["stranger".to_string()]
            }]
        );
    }

    #[test]
    fn a_refused_general_lane_gives_way_to_the_first_socket_and_is_asked_again() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = routed(ours, |_| None);
        let (gid, _refused) = lane_opened(&agent);
        assert_eq!(c.take_new_lanes(), vec![1]);
        answer_lane(&mut c, &agent, gid, false);
        let now = Instant::now();
        let one = |a: &str| vec![a.to_string()];
        let CheckStart::Sent(id) = c.check(1, &one("stranger"), now) else {
            panic!("a Check must go out");
        };
        assert_eq!(
            sent(&agent),
            vec![Request::Check {
                id,
                accounts: one("stranger")
            }]
        );
        // At the next reading of the mount table it is asked for again, in the refused
        // one's place.
        let later = now + MOUNTS_TTL;
        let CheckStart::Sent(id2) = c.check(2, &one("stranger2"), later) else {
            panic!("a Check must go out");
        };
        let (gid2, general) = lane_opened(&agent);
        assert_eq!(c.take_new_lanes(), vec![1]);
        answer_lane(&mut c, &agent, gid2, true);
        c.flush().unwrap();
        assert_eq!(
            sent(&general),
            vec![Request::Check {
                id: id2,
                accounts: one("stranger2")
            }]
        );
        assert!(sent(&agent).is_empty());
    }

    /// A lane that has not answered for LANE_STALL while requests wait for it: RCPTs whose
    /// check would go down it get a 451 at once; other lanes are not affected, and once it
    /// answers again checks go down it again.
    #[test]
    fn a_lane_silent_too_long_refuses_new_checks_at_once() {
        let (mut c, agent, _general) = routed_and_ready(|a| match a {
            "procish" | "procish2" => Some(PathBuf::from("/proc/x")),
            "rooted" => Some(PathBuf::from("/nonexistent/rooted")),
            _ => None,
        });
        let now = Instant::now();
        // The fixed mount table stays for the whole test (not read again from this host).
        c.router.as_mut().unwrap().mounts_at = Some(now + Duration::from_secs(3600));
        let one = |a: &str| vec![a.to_string()];
        let CheckStart::Sent(id1) = c.check(1, &one("procish"), now) else {
            panic!("a Check must go out");
        };
        let (lid, lane) = lane_opened(&agent);
        answer_lane(&mut c, &agent, lid, true);
        c.flush().unwrap();
        assert_eq!(sent(&lane).len(), 1);
        // Not yet: a second check goes down it and waits.
        let CheckStart::Sent(id2) = c.check(2, &one("procish2"), now + LANE_STALL / 2) else {
            panic!("a Check must go out");
        };
        let later = now + LANE_STALL + Duration::from_secs(1);
        // The same account: not even behind the check already out on the silent lane.
        match c.check(3, &one("procish2"), later) {
            CheckStart::Failed(DeliveryError::Io(_)) => {}
            other => panic!("{other:?}"),
        }
        c.forget_check(id1, 1);
        let stuck = c.check(4, &["procish".to_string(), "procish2".to_string()], later);
        assert!(
            matches!(stuck, CheckStart::Failed(DeliveryError::Io(_))),
            "{stuck:?}"
        );
        // Another filesystem's lane is not stuck.
        assert!(matches!(
            c.check(5, &one("rooted"), later),
            CheckStart::Sent(_)
        ));
        // It answers everything: checks go down it again.
        for id in [id1, id2] {
            answer(
                &lane,
                Response::Done {
                    id,
                    names: Vec::new(),
                },
            );
        }
        c.on_readable(2).unwrap();
        let again = c.check(6, &["procish".to_string(), "procish2".to_string()], later);
        assert!(matches!(again, CheckStart::Sent(_)), "{again:?}");
    }

    #[test]
    fn a_lane_is_quiet_until_an_answer_and_a_request_taken_back_is_none() {
        let (ours, _agent) = channel::pair().unwrap();
        let mut l = Lane::new(ours, LaneState::Ready);
        assert!(l.quiet_since.is_none());
        l.expect_answers(3);
        let t0 = l.quiet_since.expect("quiet from the first request");
        l.expect_answers(1);
        l.withdrawn(1);
        assert_eq!(l.quiet_since, Some(t0), "taking one back is no answer");
        assert!(l.stalled(t0 + LANE_STALL));
        let t1 = t0 + Duration::from_secs(3);
        l.answered(t1);
        assert_eq!(l.quiet_since, Some(t1));
        assert!(!l.stalled(t0 + LANE_STALL));
        l.withdrawn(1);
        l.answered(t1);
        assert_eq!((l.unanswered, l.quiet_since), (0, None));
        assert!(!l.stalled(t1 + LANE_STALL * 10));
    }

    /// A message whose lane, or one of whose accounts' lanes, has been silent too long is
    /// answered 451 at its end instead of waiting behind it (up to 10 minutes); a message
    /// mixing filesystems takes the general lane, which the hung one would stall.
    #[test]
    fn a_message_that_would_wait_behind_a_silent_lane_gets_451_at_its_end() {
        let (mut c, agent, general) = routed_and_ready(|a| match a {
            "user0" | "procish" => Some(PathBuf::from("/proc/x")),
            "user1" => Some(PathBuf::from("/nonexistent/user1")),
            _ => None,
        });
        let now = Instant::now();
        assert!(matches!(
            c.check(9, &["procish".to_string()], now),
            CheckStart::Sent(_)
        ));
        let (lid, lane) = lane_opened(&agent);
        answer_lane(&mut c, &agent, lid, true);
        c.flush().unwrap();
        assert_eq!(sent(&lane).len(), 1, "the check, unanswered");
        // Before the lane is silent, a message goes down it.
        let send = |c: &mut AgentClient, conn: u64, accounts: usize| {
            start(c, conn, &transaction(accounts, "client.example"));
            c.write(conn, b"Subject: x\r\n\r\nhi\r\n".to_vec());
            c.finish(conn);
        };
        send(&mut c, 1, 1);
        c.flush().unwrap();
        assert!(matches!(sent(&lane).as_slice(), [Request::Deliver { .. }]));
        assert!(c.poll_outcome().is_none(), "it waits for the agent");
        c.lanes[2].quiet_since = Some(Instant::now() - LANE_STALL);
        // On the silent lane, and mixed with another filesystem: 451 at once.
        send(&mut c, 2, 1);
        send(&mut c, 3, 2);
        for conn in [2, 3] {
            match c.poll_outcome() {
                Some((got, Err(r))) if got == conn && r.code == 451 => {}
                other => panic!("{conn}: {other:?}"),
            }
        }
        // Too large to go whole: no Begin, and 451 at its end.
        start(&mut c, 4, &transaction(1, "client.example"));
        c.write(4, vec![b'x'; MAX_DATAGRAM + 1]);
        c.finish(4);
        match c.poll_outcome() {
            Some((4, Err(r))) if r.code == 451 => {}
            other => panic!("4: {other:?}"),
        }
        c.flush().unwrap();
        assert!(sent(&lane).is_empty() && sent(&general).is_empty());
    }

    #[test]
    fn no_more_lanes_than_the_agent_serves() {
        let (ours, agent) = channel::pair().unwrap();
        // "u2b" lives on u2's filesystem.
        let mut c = routed(ours, |a| {
            Some(PathBuf::from(format!("/mnt/{}", a.trim_end_matches('b'))))
        });
        let (gid, general) = lane_opened(&agent);
        answer_lane(&mut c, &agent, gid, true);
        let now = Instant::now();
        // Pretend each account's home is a filesystem of its own.
        let router = c.router.as_mut().unwrap();
        router.mounts = (0..MAX_LANES + 3)
            .map(|i| lanes::Mount {
                point: format!("/mnt/u{i}"),
                dev: format!("9:{i}"),
            })
            .collect();
        router.mounts_at = Some(now);
        let mut kept = Vec::new();
        for i in 0..MAX_LANES + 3 {
            assert!(matches!(
                c.check(i as u64, &[format!("u{i}")], now),
                CheckStart::Sent(_)
            ));
            // The general lane is one of MAX_LANES.
            if i + 1 < MAX_LANES {
                let (id, l) = lane_opened(&agent);
                answer_lane(&mut c, &agent, id, true);
                c.flush().unwrap();
                assert_eq!(sent(&l).len(), 1, "u{i}'s check in its lane");
                kept.push(l);
            }
        }
        assert_eq!(c.take_new_lanes().len(), MAX_LANES);
        assert!(sent(&agent).is_empty(), "more lanes asked for");
        // The last four, for want of lanes, took the general lane.
        assert_eq!(sent(&general).len(), 4);
        let again = c.check(100, &["u2b".to_string()], now);
        assert!(matches!(again, CheckStart::Sent(_)));
        assert_eq!(sent(&kept[2]).len(), 1, "a lane in use");
    }

    #[test]
    fn a_mailbox_check_is_asked_once_and_its_success_remembered() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let t0 = Instant::now();
        let accounts = vec!["alice".to_string(), "bob".to_string()];
        let CheckStart::Sent(id) = c.check(7, &accounts, t0) else {
            panic!("nothing checked yet: a Check must go out");
        };
        assert_eq!(
            sent(&agent),
            vec![Request::Check {
                id,
                accounts: accounts.clone()
            }]
        );
        answer(&agent, Response::Done { id, names: vec![] });
        c.on_readable(0).unwrap();
        let got = c.take_check_answers();
        assert!(matches!(&got[..], [(7, i, Ok(()))] if *i == id), "{got:?}");
        // Within CHECKED_TTL no new check; bob's is fresh, carol alone is asked about.
        assert!(matches!(c.check(8, &accounts, t0), CheckStart::Fresh));
        let more = vec!["bob".to_string(), "carol".to_string()];
        let CheckStart::Sent(id2) = c.check(8, &more, t0) else {
            panic!("carol was never checked");
        };
        assert_eq!(
            sent(&agent),
            vec![Request::Check {
                id: id2,
                accounts: vec!["carol".to_string()]
            }]
        );
        // A failure is answered, and remembered for CHECKED_TTL: a RCPT that reaches carol
        // meanwhile gets it without asking the agent.
        let e = DeliveryError::Unavailable("tmp/ is not writable by its owner".into());
        answer(&agent, Response::failed(id2, &e));
        c.on_readable(0).unwrap();
        let got = c.take_check_answers();
        assert!(
            matches!(&got[..], [(8, _, Err(DeliveryError::Unavailable(m)))] if m.contains("not writable")),
            "{got:?}"
        );
        assert!(matches!(
            c.check(9, &more, Instant::now()),
            CheckStart::Failed(DeliveryError::Unavailable(_))
        ));
        assert!(sent(&agent).is_empty(), "asked again within CHECKED_TTL");
        let after = Instant::now() + CHECKED_TTL;
        assert!(matches!(c.check(9, &more, after), CheckStart::Sent(_)));
        // CHECKED_TTL after the answer (remembered when it came), alice is asked again.
        let later = Instant::now() + CHECKED_TTL;
        assert!(matches!(
            c.check(9, &accounts[..1], later),
            CheckStart::Sent(_)
        ));
    }

    #[test]
    fn a_failed_check_outlives_the_success_of_an_older_transaction_and_agent_trouble_is_not_remembered(
    ) {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        // A transaction to user0 begins; then a check of user0 fails (tmp/ made unwritable).
        let tx = transaction(1, "client.example");
        start(&mut c, 1, &tx);
        c.write(1, b"Subject: x\n\nhello\n".to_vec());
        let CheckStart::Sent(id) = c.check(2, &["user0".to_string()], Instant::now()) else {
            panic!()
        };
        let e = DeliveryError::Unavailable("tmp/ is not writable by its owner".into());
        answer(&agent, Response::failed(id, &e));
        c.on_readable(0).unwrap();
        assert_eq!(c.take_check_answers().len(), 1);
        // The older transaction still commits (its copy was made before).
        c.finish(1);
        let deliver = sent(&agent)
            .into_iter()
            .find_map(|r| match r {
                Request::Deliver { id, .. } => Some(id),
                _ => None,
            })
            .unwrap();
        answer(
            &agent,
            Response::Done {
                id: deliver,
                names: vec!["1.M1P1Q1.mx,S=5".into()],
            },
        );
        c.on_readable(0).unwrap();
        assert!(matches!(c.poll_outcome(), Some((1, Ok(())))));
        // The failure is the newer news: still refused, without asking the agent.
        assert!(matches!(
            c.check(3, &["user0".to_string()], Instant::now()),
            CheckStart::Failed(DeliveryError::Unavailable(_))
        ));
        assert!(sent(&agent).is_empty());
        // A failure that is the agent's, not the mailbox's, is not remembered.
        let CheckStart::Sent(id) = c.check(4, &["user1".to_string()], Instant::now()) else {
            panic!()
        };
        let busy = DeliveryError::Io("4096 accounts already wait for their check".into());
        answer(&agent, Response::failed(id, &busy));
        c.on_readable(0).unwrap();
        assert_eq!(c.take_check_answers().len(), 1);
        assert!(matches!(
            c.check(5, &["user1".to_string()], Instant::now()),
            CheckStart::Sent(_)
        ));
    }

    #[test]
    fn rcpts_to_an_account_being_checked_wait_for_the_same_check() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let t0 = Instant::now();
        let alice = vec!["alice".to_string()];
        let CheckStart::Sent(id) = c.check(1, &alice, t0) else {
            panic!()
        };
        for conn in [2, 3] {
            assert!(matches!(c.check(conn, &alice, t0), CheckStart::Sent(i) if i == id));
        }
        assert_eq!(sent(&agent).len(), 1, "one Check for three RCPTs");
        // One of them leaves: the others still get the answer.
        c.forget_check(id, 2);
        answer(&agent, Response::Done { id, names: vec![] });
        c.on_readable(0).unwrap();
        let mut got: Vec<u64> = c
            .take_check_answers()
            .into_iter()
            .map(|(conn, i, r)| {
                assert!(i == id && r.is_ok());
                conn
            })
            .collect();
        got.sort();
        assert_eq!(got, vec![1, 3]);
    }

    #[test]
    fn a_forgotten_check_is_dropped_and_the_agent_going_away_answers_the_others() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let t0 = Instant::now();
        let CheckStart::Sent(gone) = c.check(1, &["alice".to_string()], t0) else {
            panic!()
        };
        let CheckStart::Sent(waiting) = c.check(2, &["bob".to_string()], t0) else {
            panic!()
        };
        c.forget_check(gone, 1);
        // Sent already, it stays out: a later RCPT to alice joins it, asking nothing more.
        assert!(matches!(c.check(3, &["alice".to_string()], t0), CheckStart::Sent(i) if i == gone));
        assert_eq!(
            sent(&agent).len(),
            2,
            "alice's and bob's checks, and no other"
        );
        c.forget_check(gone, 3);
        answer(
            &agent,
            Response::Done {
                id: gone,
                names: vec![],
            },
        );
        c.on_readable(0).unwrap();
        assert!(c.take_check_answers().is_empty(), "nobody waits for it");
        drop(agent);
        assert!(c.on_readable(0).is_err());
        let got = c.take_check_answers();
        assert!(
            matches!(&got[..], [(2, i, Err(DeliveryError::Io(_)))] if *i == waiting),
            "{got:?}"
        );
        // Gone: a new check fails at once.
        assert!(matches!(
            c.check(3, &["carol".to_string()], t0),
            CheckStart::Failed(_)
        ));
    }

    #[test]
    fn requests_of_hung_up_clients_still_waiting_for_the_socket_never_go_out() {
        // A stalled agent: its socket fills, requests wait in the outbox. A client that
        // hangs up takes its waiting Check (forget_check) or Begin (abort) back, so they
        // do not pile up for the agent (found in review for Begins; Checks since RCPT
        // waits for them).
        let (ours, _agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let t0 = Instant::now();
        let mut last = None;
        for i in 0..1_000_000u64 {
            if c.wants_write(0) {
                break;
            }
            match c.check(i, &[format!("u{i}")], t0) {
                CheckStart::Sent(id) => last = Some((id, i)),
                other => panic!("{other:?}"),
            }
        }
        assert!(c.wants_write(0), "the socket never filled");
        let (id, conn) = last.unwrap();
        c.forget_check(id, conn);
        assert!(
            !c.wants_write(0),
            "the forgotten check still waits to go out"
        );
        // A streamed transaction's Begin, waiting likewise, then the client hangs up.
        let tx = transaction(1, "client.example");
        start(&mut c, 77, &tx);
        c.write(77, vec![b'x'; MAX_DATAGRAM]);
        assert!(c.wants_write(0), "the Begin waits for room");
        c.abort(77);
        assert!(!c.wants_write(0), "the aborted Begin still waits to go out");
    }

    #[test]
    fn a_message_that_fits_goes_whole_and_a_larger_one_switches_to_descriptors() {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let tx = transaction(1, "client.example");
        start(&mut c, 1, &tx);
        c.write(1, b"Subject: small\n\nhello\n".to_vec());
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
        c.write(2, vec![b'x'; 40 * 1024]);
        c.write(2, vec![b'y'; 30 * 1024]);
        assert!(matches!(&sent(&agent)[..], [Request::Begin { .. }]));
        c.finish(2);
        assert!(sent(&agent).is_empty());
    }

    /// A client whose connection `conn` has sent 70 KiB of `byte`: the Begin went out.
    /// Returns the client, the agent's end of the socket and the transaction's id.
    fn streaming(conn: u64, byte: u8) -> (AgentClient, OwnedFd, u64) {
        let (ours, agent) = channel::pair().unwrap();
        let mut c = AgentClient::new(ours, "mx.test");
        let tx = transaction(1, "client.example");
        start(&mut c, conn, &tx);
        c.write(conn, vec![byte; 70 * 1024]);
        let id = match &sent(&agent)[..] {
            [Request::Begin { id, .. }] => *id,
            other => panic!("{other:?}"),
        };
        (c, agent, id)
    }

    /// The agent's answer to the Begin of `id`: one copy, `copy`.
    fn opened(c: &mut AgentClient, agent: &OwnedFd, id: u64, copy: OwnedFd) {
        let answer = Response::Opened { id, count: 1 }.encode();
        channel::send(agent.as_fd(), &answer, &[copy.as_fd()]).unwrap();
        drop(copy);
        c.on_readable(0).unwrap();
    }

    /// The progress of `c`'s writers, once `done` says so (bounded wait).
    fn progress_until(c: &mut AgentClient, done: impl Fn(&AgentClient) -> bool) {
        let until = Instant::now() + std::time::Duration::from_secs(10);
        while !done(c) {
            assert!(Instant::now() < until, "the writer did not report");
            std::thread::sleep(std::time::Duration::from_millis(5));
            c.on_writers();
        }
    }

    /// A streamed message is written by its writer thread, never by the caller: the client
    /// stops asking for data while WRITE_AHEAD octets wait for the writer, and Commit goes out
    /// only once the writer has written everything and closed the copies.
    #[test]
    fn streamed_data_goes_through_the_writer_and_commit_waits_for_its_close() {
        let (mut c, agent, id) = streaming(7, b'a');
        assert!(
            !c.wants_data(7),
            "70 KiB held while the descriptors are on their way"
        );
        // The agent's answer: one copy, a pipe here, so the test controls when writes go
        // through (a full pipe blocks its writer, as a hung filesystem would).
        let (rd, wr) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(&wr, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
        opened(&mut c, &agent, id, wr);
        // The writer is stuck on the full pipe: the caller was not, and holds back the client.
        assert!(!c.wants_data(7), "70 KiB wait for the writer");
        c.finish(7);
        assert!(
            sent(&agent).is_empty(),
            "no Commit before the copies are closed"
        );
        // Drain the pipe: the writer finishes, closes, and the Commit goes out.
        let reader = std::thread::spawn(move || {
            let mut f = File::from(rd);
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut all).unwrap();
            all
        });
        progress_until(&mut c, |c| {
            c.inflight
                .get(&id)
                .is_some_and(|t| t.state == State::Committing)
        });
        assert!(matches!(&sent(&agent)[..], [Request::Commit { id: i }] if *i == id));
        let all = reader.join().unwrap();
        let text = String::from_utf8_lossy(&all[..all.len() - 70 * 1024]).into_owned();
        assert!(text.starts_with("Return-Path: <>\n"), "{text}");
        assert!(text.contains("\nDelivered-To: user0@mx.test\n"), "{text}");
        assert!(all.ends_with(&[b'a'; 70 * 1024]));
    }

    /// A client held back for its writer may read again once the writer has caught up, and
    /// is named by `take_resumed` then, not before (the server drives it again only then).
    #[test]
    fn a_client_held_back_for_its_writer_is_resumed_once_it_caught_up() {
        let (mut c, agent, id) = streaming(9, b'c');
        let (rd, wr) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(&wr, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
        opened(&mut c, &agent, id, wr);
        assert!(!c.wants_data(9));
        assert!(c.take_resumed().is_empty(), "resumed while 70 KiB wait");
        let reader = std::thread::spawn(move || {
            let mut f = File::from(rd);
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut all).unwrap();
            all.len()
        });
        progress_until(&mut c, |c| c.wants_data(9));
        assert_eq!(c.take_resumed(), vec![9]);
        // The end of data closes the copies (and the reader sees their end).
        c.finish(9);
        progress_until(&mut c, |c| {
            c.inflight
                .get(&id)
                .is_some_and(|t| t.state == State::Committing)
        });
        assert!(reader.join().unwrap() > 70 * 1024);
    }

    /// A write error (here EPIPE: the copy's reader went away) fails the transaction at the
    /// end of data with the error's reply, and no Commit is sent.
    #[test]
    fn a_writer_error_is_the_transactions_answer() {
        let (mut c, agent, id) = streaming(8, b'b');
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        opened(&mut c, &agent, id, wr);
        c.finish(8);
        progress_until(&mut c, |c| !c.inflight.contains_key(&id));
        assert!(matches!(&sent(&agent)[..], [Request::Abort { .. }]));
        match c.poll_outcome() {
            Some((8, Err(r))) => assert_eq!(r.code, 451, "{r:?}"),
            other => panic!("{other:?}"),
        }
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
