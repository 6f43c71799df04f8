//! The single-threaded mio event loop: listeners, connections, timers, signals.
//!
//! Owns every socket and the clock. Each connection's session is fed bytes and time; its
//! events go to the recipient resolver (the cache, else the lookup thread of [`lookups`]) and
//! the delivery agent, whose answers go back into the session, each wait bounded here. No accept error and no client error ever ends the loop: EMFILE and friends pause
//! accepting for a moment, a full house (`--max-connections`) leaves new clients in the
//! kernel's backlog until a slot frees. SIGTERM/SIGINT end it cleanly: in-progress DATA is
//! dropped (its tmp files removed) and every client gets 421.
//! It must not parse SMTP (the session does) or touch Maildirs (the delivery agent does).

pub mod connection;
pub mod listener;
pub mod lookups;
pub mod timers;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::delivery::client::{AgentClient, AgentGone, CheckStart};
use crate::delivery::DeliveryError;
use crate::recipient::{Aliases, RecipientError, Resolution, Resolver};
use crate::smtp::trace::Trace;
use crate::smtp::{Event, Peer, RcptVerdict, Reply, Session, SessionConfig};
use crate::systemd::Notifier;
use connection::{CheckWait, Connection, ReadStep, READ_CHUNK};
use lookups::{Answer, Lookups, NotQueued};
use timers::Timers;

const SIGNAL_TOKEN: Token = Token(usize::MAX - 1);
/// The delivery agent's socket of lane i has token `LANE_BASE + i` (lane 0: the first;
/// connection tokens, counted up from 1, never get there).
const LANE_BASE: usize = usize::MAX / 2;
/// The lookup thread and the copy writers wake the loop through one waker (mio allows one
/// per poller).
const WAKE_TOKEN: Token = Token(usize::MAX - 3);
/// Listener i has token `LISTENER_BASE - i`.
const LISTENER_BASE: usize = usize::MAX - 4;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM.
const ACCEPT_PAUSE: Duration = Duration::from_millis(200);
/// Accept errors of other kinds in a row on one listener after which accepting pauses too.
const ODD_ACCEPT_ERRORS: u32 = 64;
/// How long a closing connection may take to take its last reply.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long a connection we ended lingers for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// How long a client waits for the delivery agent's answer before it gets 451.
const AGENT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a client waits for a recipient lookup (an NSS backend that does not answer)
/// before it gets 451 4.3.0: well within the 5 minutes a client waits for its RCPT's reply
/// (RFC 5321 4.5.3.2.3).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Once stopping, how long a session may still wait for its commit's answer before it gets
/// the 451 (found in review: a hung agent held the stop for up to AGENT_TIMEOUT, far beyond
/// the unit's TimeoutStopSec=30s; with CLOSE_GRACE and the wait for the agent's exit, a
/// stop takes at most about 28 s).
const STOP_WAIT: Duration = Duration::from_secs(8);
/// Reads (of up to 64 KiB) one connection may do before the others get their turn.
const READS_PER_TURN: usize = 16;
/// Times per turn a connection's session may go on with buffered input after its replies
/// were written (each time at most OUTPUT_HIGH_WATER of replies): a client pipelining
/// without end gets one step, then the others get theirs.
const RESUMES_PER_TURN: usize = 1;

pub struct Server {
    poll: Poll,
    listeners: Vec<TcpListener>,
    signals: SignalFd,
    conns: HashMap<Token, Connection>,
    /// Connections that stopped reading for fairness, not for lack of data.
    ready: VecDeque<Token>,
    timers: Timers,
    session_config: Rc<SessionConfig>,
    resolver: Resolver,
    /// The lookup thread, for what the cache cannot answer.
    lookups: Lookups,
    /// Alias reloads the lookup thread has not answered yet: READY=1 waits for the last.
    pending_reloads: usize,
    /// The lookup thread is gone (it panicked): the server stops, and exits with an error
    /// for the service manager to restart it.
    lookups_gone: bool,
    delivery: AgentClient,
    max_connections: usize,
    /// Connections from one client address at most (`--max-connections-per-ip`).
    max_per_ip: usize,
    /// Open connections per client address.
    per_ip: HashMap<std::net::IpAddr, usize>,
    next_id: u64,
    /// Accepting is paused until then (resource exhaustion).
    accept_paused_until: Option<Instant>,
    /// Accepting stopped at `max_connections`; resume when a connection ends.
    at_capacity: bool,
    id_prefix: String,
    stopping: bool,
    /// When the stop began: waits for the agent end by then + [`STOP_WAIT`].
    stop_at: Option<Instant>,
    /// Re-read on SIGHUP.
    aliases_path: PathBuf,
    /// Delivery outcomes waiting for their connection to be driven.
    parked: Vec<(u64, crate::smtp::DeliveryOutcome)>,
    /// Set when the delivery agent went away; the server then stops.
    agent_gone: Option<String>,
    /// Whether each of the agent's sockets (lanes) is registered for WRITABLE (requests wait
    /// in its outbox).
    agent_write_interest: Vec<bool>,
    /// A read buffer for new connections' first read (the loop has its own).
    spare_buf: Option<Vec<u8>>,
    /// Tells the service manager about stops and reloads.
    notifier: Option<Notifier>,
}

#[derive(Debug)]
pub enum ServerError {
    Setup(String, io::Error),
    /// The delivery agent went away; in-flight clients got 4xx, all others 421.
    AgentGone(String),
    /// The lookup thread went away (a panic); clients got 451 for their recipients, then 421.
    LookupsGone,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Setup(what, e) => write!(f, "{what}: {e}"),
            ServerError::AgentGone(why) => write!(f, "{why}"),
            ServerError::LookupsGone => write!(f, "the recipient lookup thread is gone"),
        }
    }
}

impl std::error::Error for ServerError {}

impl Server {
    pub fn new(
        listeners: Vec<TcpListener>,
        session_config: SessionConfig,
        resolver: Resolver,
        delivery: AgentClient,
        (max_connections, max_per_ip): (usize, usize),
        aliases_path: PathBuf,
    ) -> Result<Server, ServerError> {
        let setup = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| ServerError::Setup(what, e)
        };
        let poll = Poll::new().map_err(setup("creating the poller"))?;
        let mut listeners = listeners;
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Token(LISTENER_BASE - i), Interest::READABLE)
                .map_err(setup("registering a listener"))?;
        }
        // A file size limit (RLIMIT_FSIZE, systemd's LimitFSIZE=) must not kill the receiver
        // in the middle of a write: with SIGXFSZ blocked, write(2) fails with EFBIG instead,
        // and that transaction gets 552 5.2.2 like a full mailbox.
        let mut xfsz = SigSet::empty();
        xfsz.add(Signal::SIGXFSZ);
        xfsz.thread_block()
            .map_err(|e| ServerError::Setup("blocking SIGXFSZ".into(), e.into()))?;
        // SIGTERM/SIGINT/SIGHUP arrive through a signalfd, so the loop sees them as events.
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| ServerError::Setup("blocking signals".into(), e.into()))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| ServerError::Setup("creating a signalfd".into(), e.into()))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_raw_fd()),
                SIGNAL_TOKEN,
                Interest::READABLE,
            )
            .map_err(setup("registering the signalfd"))?;
        if let Some(fd) = delivery.raw_fd(0) {
            poll.registry()
                .register(&mut SourceFd(&fd), Token(LANE_BASE), Interest::READABLE)
                .map_err(setup("registering the delivery agent's socket"))?;
        }
        // After the signal masks above: the thread inherits them, so SIGTERM and friends
        // still reach only the signalfd.
        let waker = std::sync::Arc::new(
            Waker::new(poll.registry(), WAKE_TOKEN).map_err(setup("creating a waker"))?,
        );
        let lookups = Lookups::start(resolver.clone(), waker.clone())
            .map_err(setup("starting the lookup thread"))?;
        let mut delivery = delivery;
        delivery.set_waker(waker);
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Server {
            poll,
            listeners,
            signals,
            conns: HashMap::new(),
            ready: VecDeque::new(),
            timers: Timers::default(),
            session_config: Rc::new(session_config),
            resolver,
            lookups,
            pending_reloads: 0,
            lookups_gone: false,
            delivery,
            max_connections: max_connections.max(1),
            max_per_ip: max_per_ip.max(1),
            per_ip: HashMap::new(),
            next_id: 0,
            accept_paused_until: None,
            at_capacity: false,
            id_prefix: format!("{:X}", start.as_secs()),
            stopping: false,
            stop_at: None,
            aliases_path,
            parked: Vec::new(),
            agent_gone: None,
            agent_write_interest: vec![false],
            spare_buf: None,
            notifier: None,
        })
    }

    /// The addresses actually bound (a `:0` port shows the port the kernel chose).
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The service manager to tell about stops and reloads (sd_notify).
    pub fn set_notifier(&mut self, n: Notifier) {
        self.notifier = Some(n);
    }

    fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier {
            n.notify(state);
        }
    }

    /// Runs until SIGTERM or SIGINT, and then until the last connection is gone.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // Requests queued anywhere in the last turn go out (or get WRITABLE interest)
            // before the loop sleeps.
            self.agent_flush(&mut buf);
            let now = Instant::now();
            let mut timeout = self.timers.timeout(now);
            if let Some(until) = self.accept_paused_until {
                let t = until.saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |x| x.min(t)));
            }
            if !self.ready.is_empty() {
                timeout = Some(Duration::ZERO);
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Setup("poll".into(), e));
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    SIGNAL_TOKEN => self.signals(),
                    WAKE_TOKEN => {
                        self.lookup_answers(&mut buf);
                        self.writer_progress(&mut buf);
                    }
                    t if t.0 >= LANE_BASE && t.0 < LANE_BASE + self.agent_write_interest.len() => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.agent_readable(t.0 - LANE_BASE, &mut buf);
                        }
                        if ev.is_writable() {
                            self.agent_flush(&mut buf);
                        }
                    }
                    t if t.0 <= LISTENER_BASE && t.0 > LISTENER_BASE - self.listeners.len() => {
                        self.accept(now)
                    }
                    t => {
                        if ev.is_readable()
                            || ev.is_read_closed()
                            || ev.is_error()
                            || ev.is_priority()
                        {
                            if let Some(c) = self.conns.get_mut(&t) {
                                c.drained = false;
                                c.must_drain |=
                                    ev.is_read_closed() || ev.is_error() || ev.is_priority();
                            }
                        }
                        self.drive(t, &mut buf)
                    }
                }
            }
            self.deliver_parked(&mut buf);
            for _ in 0..self.ready.len() {
                if let Some(t) = self.ready.pop_front() {
                    self.drive(t, &mut buf);
                }
            }
            let now = Instant::now();
            self.fire_timers(now, &mut buf);
            if self.accept_paused_until.is_some_and(|u| now >= u) {
                self.accept_paused_until = None;
                self.accept(now);
            }
            if self.lookups_gone && !self.stopping {
                error!("the recipient lookup thread is gone: stopping (a service manager restarts inboxd)");
                self.stop();
            }
            if self.stopping && self.conns.is_empty() {
                if let Some(why) = self.agent_gone.take() {
                    return Err(ServerError::AgentGone(why));
                }
                if self.lookups_gone {
                    return Err(ServerError::LookupsGone);
                }
                info!("stopped");
                return Ok(());
            }
        }
    }

    fn signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let sig = Signal::try_from(info.ssi_signo as i32).ok();
            match sig {
                // While stopping, a reload would announce READY=1 after STOPPING=1 (found in
                // review): the aliases no longer matter.
                Some(Signal::SIGHUP) if self.stopping => {}
                Some(Signal::SIGHUP) => {
                    self.notify("RELOADING=1\nSTATUS=reloading the aliases");
                    if self.reload_aliases() {
                        self.pending_reloads += 1;
                    } else if self.pending_reloads == 0 {
                        self.reloaded();
                    }
                }
                _ => {
                    if !self.stopping {
                        info!("signal {sig:?}: shutting down");
                        self.stop();
                    }
                }
            }
        }
    }

    /// SIGHUP: re-read the aliases file and hand it to the lookup thread, which checks it
    /// (true; the table is put in when its answer comes). A file that cannot be read keeps
    /// the old table (false).
    fn reload_aliases(&mut self) -> bool {
        let table = match Aliases::load(&self.aliases_path) {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                info!("SIGHUP: {} not found", self.aliases_path.display());
                Aliases::default()
            }
            Err(e) => {
                error!(
                    "SIGHUP: {}: {e}; keeping the aliases loaded before",
                    self.aliases_path.display()
                );
                return false;
            }
        };
        if !self.lookups.reload(table) {
            error!("SIGHUP: the lookup thread is gone; keeping the aliases loaded before");
            // As when a lookup finds it gone: inboxd stops, for the service manager to
            // restart it (found in review: only a later lookup noticed).
            self.lookups_gone = true;
            return false;
        }
        true
    }

    /// A reload is over (done or refused): the service manager hears that we are ready,
    /// unless another reload is still being checked, or we are stopping (READY=1 after
    /// STOPPING=1 would undo it; found in review).
    fn reloaded(&self) {
        if self.pending_reloads > 0 || self.stopping {
            return;
        }
        self.notify(&format!(
            "READY=1\nSTATUS=accepting mail; {} connection(s)",
            self.conns.len()
        ));
    }

    /// The lookup thread answered: verdicts go to the sessions still waiting for them (a
    /// session whose wait timed out has moved on, and its late answer is dropped), a checked
    /// alias table is put in.
    fn lookup_answers(&mut self, buf: &mut [u8]) {
        for answer in self.lookups.take_answers() {
            match answer {
                Answer::Skipped => {}
                Answer::Resolved {
                    seq,
                    conn,
                    local_part,
                    result,
                } => {
                    let token = Token(conn as usize);
                    let Some(c) = self.conns.get_mut(&token) else {
                        continue;
                    };
                    if c.lookup.as_ref().map(|p| p.seq) != Some(seq) {
                        continue;
                    }
                    c.lookup = None;
                    c.waiting_since = None;
                    recipient_found(&mut self.delivery, c, &local_part, result);
                    self.drive(token, buf);
                }
                Answer::Reloaded(Ok(table)) => {
                    self.pending_reloads = self.pending_reloads.saturating_sub(1);
                    info!(
                        "SIGHUP: {} reloaded, {} aliases",
                        self.aliases_path.display(),
                        table.len()
                    );
                    self.resolver.adopt_aliases(table);
                    self.reloaded();
                }
                Answer::Reloaded(Err(e)) => {
                    self.pending_reloads = self.pending_reloads.saturating_sub(1);
                    error!(
                        "SIGHUP: {}: {e}; keeping the aliases loaded before",
                        self.aliases_path.display()
                    );
                    self.reloaded();
                }
            }
        }
    }

    fn stop(&mut self) {
        self.stopping = true;
        self.stop_at = Some(Instant::now());
        self.notify(&format!(
            "STOPPING=1\nSTATUS=stopping: {} connection(s) get 421",
            self.conns.len()
        ));
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l);
        }
        self.listeners.clear();
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        let mut buf = vec![0u8; READ_CHUNK];
        for t in tokens {
            if let Some(c) = self.conns.get_mut(&t) {
                c.session.shutdown();
            }
            self.drive(t, &mut buf);
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.stopping || self.accept_paused_until.is_some() {
            return;
        }
        for i in 0..self.listeners.len() {
            let mut odd_errors = 0;
            loop {
                if self.conns.len() >= self.max_connections {
                    if !self.at_capacity {
                        warn!(
                            "{} connections: new clients wait in the backlog",
                            self.conns.len()
                        );
                    }
                    self.at_capacity = true;
                    return;
                }
                match self.listeners[i].accept() {
                    Ok((socket, addr))
                        if self.per_ip.get(&addr.ip()).copied().unwrap_or(0) >= self.max_per_ip =>
                    {
                        refuse_busy(socket, addr, self.max_per_ip)
                    }
                    Ok((socket, addr)) => {
                        odd_errors = 0;
                        self.add_connection(socket, addr, now)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        match e.raw_os_error() {
                            Some(
                                nix::libc::EMFILE
                                | nix::libc::ENFILE
                                | nix::libc::ENOBUFS
                                | nix::libc::ENOMEM,
                            ) => {
                                error!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?}");
                                self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                                return;
                            }
                            // ECONNABORTED and friends concern one client only; an error
                            // that keeps coming is the listener's, and must not spin the
                            // loop (found in review).
                            _ => {
                                odd_errors += 1;
                                if odd_errors >= ODD_ACCEPT_ERRORS {
                                    error!(
                                        "accept: {e} ({odd_errors} times in a row); pausing \
                                         accepts for {ACCEPT_PAUSE:?}"
                                    );
                                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                                    return;
                                }
                                debug!("accept: {e}");
                                continue;
                            }
                        }
                    }
                }
            }
        }
    }

    fn add_connection(
        &mut self,
        socket: mio::net::TcpStream,
        addr: std::net::SocketAddr,
        now: Instant,
    ) {
        self.next_id += 1;
        let id = self.next_id;
        let token = Token(id as usize);
        let local = socket
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let peer = Peer {
            remote: addr.ip(),
            local,
        };
        let _ = socket.set_nodelay(true);
        let session = Session::new(self.session_config.clone(), peer, now);
        info!("event=connect session={id:x} peer={addr}");
        *self.per_ip.entry(addr.ip()).or_insert(0) += 1;
        let conn = Connection::new(id, token, socket, session, addr);
        self.conns.insert(token, conn);
        // The first read uses the server's spare buffer: a fresh 64 KiB buffer per
        // connection was zeroed for nothing.
        let mut buf = self
            .spare_buf
            .take()
            .unwrap_or_else(|| vec![0u8; READ_CHUNK]);
        self.drive(token, &mut buf);
        self.spare_buf = Some(buf);
    }

    fn fire_timers(&mut self, now: Instant, buf: &mut [u8]) {
        while let Some((at, token)) = self.timers.pop_due(now) {
            let stop_at = self.stop_at;
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            if c.timer_at != Some(at) {
                continue; // stale entry
            }
            c.timer_at = None;
            if linger_end(c).is_some_and(|end| now >= end) {
                debug!("event=linger_end session={:x}", c.id);
                let c = self.conns.remove(&token);
                self.finish(c);
                continue;
            }
            if c.closing_since.is_some_and(|t| now >= t + CLOSE_GRACE) {
                info!(
                    "event=drop session={:x} reason=\"client did not take its last reply\"",
                    c.id
                );
                let c = self.conns.remove(&token);
                self.finish(c);
                continue;
            }
            let rcpt_wait = c.waits_for_recipient();
            if c.waiting_since
                .is_some_and(|w| now >= wait_deadline(stop_at, w, rcpt_wait))
            {
                // A recipient's wait: 451 for this recipient, within the 5 minutes a client
                // waits for a RCPT reply (RFC 5321 4.5.3.2.3).
                let rcpt_wait = if let Some(p) = c.lookup.take() {
                    // An NSS backend that does not answer. The thread skips the request if
                    // it has not started it; a late answer is dropped (the sequence number
                    // no longer matches).
                    p.cancel();
                    Some((
                        "lookup timed out",
                        p.local_part,
                        RcptVerdict::TemporaryFailure,
                    ))
                } else if let Some(w) = c.check.take() {
                    // The agent does not answer the mailbox check (a hung home, an NSS
                    // backend that never answers); its late answer is dropped.
                    self.delivery.forget_check(w.id, c.id);
                    let reply =
                        Reply::new(451, "4.3.0", "Mailbox check timed out, try again later");
                    Some((
                        "mailbox check timed out",
                        w.local_part,
                        RcptVerdict::Unavailable(reply),
                    ))
                } else {
                    None
                };
                if let Some((error, local_part, verdict)) = rcpt_wait {
                    warn!(
                        "event=rcpt session={:x} rcpt={local_part:?} result=tempfail \
                         error={error:?} waited={:?} stopping={}",
                        c.id,
                        c.waiting_since
                            .map(|w| now.saturating_duration_since(w))
                            .unwrap_or_default(),
                        stop_at.is_some()
                    );
                    c.waiting_since = None;
                    c.session.recipient_verdict(verdict, now);
                    self.drive(token, buf);
                    continue;
                }
                // The agent is stuck (a hung NFS home, an NSS backend that never answers):
                // the client gets a 4xx instead of waiting for ever. Should the commit still
                // complete, the client's retry makes a duplicate, never a loss.
                let waited = c.waiting_since.map(|w| now.saturating_duration_since(w));
                warn!(
                    "event=agent_timeout session={:x} waited={:?} stopping={}",
                    c.id,
                    waited.unwrap_or_default(),
                    stop_at.is_some()
                );
                c.waiting_since = None;
                c.session.delivery_outcome(
                    Err(Reply::new(
                        451,
                        "4.3.0",
                        "Local delivery timed out, try again later",
                    )),
                    now,
                );
                let id = c.id;
                self.delivery.abort(id);
            } else {
                c.session.handle_timeout(now);
            }
            self.drive(token, buf);
        }
    }

    /// Moves one connection forward as far as it can go without blocking.
    fn drive(&mut self, token: Token, buf: &mut [u8]) {
        let Some(mut c) = self.conns.remove(&token) else {
            return;
        };
        let mut reads = 0;
        let mut resumes = 0;
        loop {
            let now = Instant::now();
            let mut progress = false;
            if reads < READS_PER_TURN && self.delivery.wants_data(c.id) {
                if let ReadStep::Data = c.read_once(buf, now) {
                    reads += 1;
                    progress = true;
                }
            } else if reads >= READS_PER_TURN && c.session.wants_read() && !c.eof {
                // Fairness: this client has had its share of this turn. Its socket may still
                // hold data, and edge-triggered readiness will not say so again, so it goes on
                // the ready list and is driven again after the others.
                if !self.ready.contains(&token) {
                    self.ready.push_back(token);
                }
            }
            while let Some(ev) = c.session.poll_event() {
                progress = true;
                self.handle_event(&mut c, ev);
            }
            let flushed = c.flush();
            if (flushed || c.resume_pending) && !c.session.is_closed() && !c.session.is_waiting() {
                // Replies were held back by the output limit: let the session go on with
                // the input it has buffered (it may answer, or ask for a lookup), once per
                // turn; then it waits on the ready list behind the others.
                if resumes < RESUMES_PER_TURN {
                    resumes += 1;
                    c.resume_pending = false;
                    c.session.receive(&[], now);
                    progress = true;
                } else {
                    c.resume_pending = true;
                    if !self.ready.contains(&token) {
                        self.ready.push_back(token);
                    }
                }
            }
            if c.done() || !progress {
                break;
            }
        }
        let now = Instant::now();
        if c.done() {
            if c.lingering_since.is_none() && c.should_linger() {
                c.start_linger(now);
            }
            let lingering = c.lingering_since;
            match lingering {
                Some(t) if !c.discard(buf) => {
                    let end = linger_end(&c).unwrap_or(t + LINGER);
                    c.timer_at = self.timers.arm(token, end, c.timer_at);
                    if c.update_interest(self.poll.registry()).is_ok() {
                        self.conns.insert(token, c);
                        return;
                    }
                    self.finish(Some(c));
                }
                _ => self.finish(Some(c)),
            }
            return;
        }
        if c.session.is_closed() && c.closing_since.is_none() {
            c.closing_since = Some(now);
        }
        if c.session.is_waiting() {
            c.waiting_since.get_or_insert(now);
        } else {
            c.waiting_since = None;
        }
        let deadline = match (c.closing_since, c.waiting_since) {
            (Some(t), _) => Some(t + CLOSE_GRACE),
            (None, Some(w)) => Some(wait_deadline(self.stop_at, w, c.waits_for_recipient())),
            (None, None) => c.session.next_deadline(),
        };
        if let Some(d) = deadline {
            c.timer_at = self.timers.arm(token, d, c.timer_at);
        }
        if let Err(e) = c.update_interest(self.poll.registry()) {
            warn!(
                "conn={:x} cannot register with the poller: {e}; dropped",
                c.id
            );
            self.finish(Some(c));
            return;
        }
        self.conns.insert(token, c);
    }

    fn handle_event(&mut self, c: &mut Connection, ev: Event) {
        match ev {
            Event::RecipientToCheck { local_part } => {
                // The cache answers without a system call; what it cannot answer goes to the
                // lookup thread, and the session waits (the wait is bounded in fire_timers).
                if let Some(r) = self.resolver.resolve_cached(&local_part) {
                    recipient_found(&mut self.delivery, c, &local_part, Ok(r));
                } else {
                    match self.lookups.ask(c.id, &local_part) {
                        Ok(p) => c.lookup = Some(p),
                        Err(why) => {
                            let error = if why == NotQueued::Full {
                                format!("{} lookups already queued", lookups::MAX_QUEUED)
                            } else {
                                self.lookups_gone = true;
                                "the lookup thread is gone".to_string()
                            };
                            warn!(
                                "event=rcpt session={:x} rcpt={local_part:?} result=tempfail \
                                 error={error:?}",
                                c.id
                            );
                            c.session
                                .recipient_verdict(RcptVerdict::TemporaryFailure, Instant::now());
                        }
                    }
                }
            }
            Event::DataStart(tx) => {
                // An Atom (RFC 5321 4.4, the Received field's ID): start time, connection, transaction.
                let id = format!("{}-{:X}-{}", self.id_prefix, c.id, tx.number);
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let trace = Trace::new(&tx, &self.session_config.hostname, &id, unix);
                info!(
                    "event=transaction session={:x} tx={id} from={:?} rcpts={}",
                    c.id,
                    format!("<{}>", tx.reverse_path),
                    tx.recipients.len()
                );
                self.delivery.begin(c.id, &tx, &trace, &id);
            }
            Event::MailData(chunk) => self.delivery.write(c.id, chunk),
            Event::DataAborted => {
                debug!("event=data_aborted session={:x}", c.id);
                self.delivery.abort(c.id);
            }
            Event::EndOfData(_) => {
                self.delivery.finish(c.id);
                self.take_outcomes(c);
            }
            Event::Close => debug!("event=closing session={:x}", c.id),
        }
    }

    /// Takes the delivery outcomes that are ready: the one for `current` (the connection
    /// being driven, which is out of the map) is applied now, the others are parked for
    /// [`Server::deliver_parked`].
    fn take_outcomes(&mut self, current: &mut Connection) {
        while let Some((id, outcome)) = self.delivery.poll_outcome() {
            if let Err(r) = &outcome {
                info!(
                    "event=reply session={id:x} status={} reply={:?}",
                    r.code,
                    String::from_utf8_lossy(&r.to_bytes()).trim_end()
                );
            }
            if id == current.id {
                // The wait is over: a next commit in this same drive times its own (found
                // in review).
                current.waiting_since = None;
                current.session.delivery_outcome(outcome, Instant::now());
            } else {
                self.parked.push((id, outcome));
            }
        }
    }

    /// Applies parked outcomes and drives their connections.
    fn deliver_parked(&mut self, buf: &mut [u8]) {
        while let Some((id, outcome)) = self.delivery.poll_outcome() {
            if let Err(r) = &outcome {
                info!(
                    "event=reply session={id:x} status={} reply={:?}",
                    r.code,
                    String::from_utf8_lossy(&r.to_bytes()).trim_end()
                );
            }
            self.parked.push((id, outcome));
        }
        for (id, outcome) in std::mem::take(&mut self.parked) {
            let token = Token(id as usize);
            if let Some(c) = self.conns.get_mut(&token) {
                c.waiting_since = None;
                c.session.delivery_outcome(outcome, Instant::now());
                self.drive(token, buf);
            }
        }
        // Answers to mailbox checks go to the sessions still waiting for them.
        for (conn, id, result) in self.delivery.take_check_answers() {
            let token = Token(conn as usize);
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            let Some(w) = c.check.take_if(|w| w.id == id) else {
                continue;
            };
            c.waiting_since = None;
            let verdict = match result {
                Ok(()) => rcpt_verdict(conn, &w.local_part, Ok(Resolution::Accounts(w.accounts))),
                Err(e) => unavailable(conn, &w.local_part, &e),
            };
            c.session.recipient_verdict(verdict, Instant::now());
            self.drive(token, buf);
        }
    }

    /// Copy writers wrote or closed: clients held back may send again, closed copies are
    /// committed (or their write error answered).
    fn writer_progress(&mut self, buf: &mut [u8]) {
        self.delivery.on_writers();
        let resumed = self.delivery.take_resumed();
        self.deliver_parked(buf);
        for id in resumed {
            self.drive(Token(id as usize), buf);
        }
    }

    /// The agent's socket is readable: its answers go to their connections.
    fn agent_readable(&mut self, lane: usize, buf: &mut [u8]) {
        let result = self.delivery.on_readable(lane);
        let resumed = self.delivery.take_resumed();
        self.deliver_parked(buf);
        for id in resumed {
            self.drive(Token(id as usize), buf);
        }
        if let Err(gone) = result {
            self.agent_failed(gone);
        }
    }

    /// Sends the requests that waited for room on the agent's socket, and asks the poller
    /// for WRITABLE only while some still wait.
    fn agent_flush(&mut self, buf: &mut [u8]) {
        if self.agent_gone.is_some() {
            return;
        }
        if let Err(gone) = self.delivery.flush() {
            self.deliver_parked(buf);
            self.agent_failed(gone);
            return;
        }
        // Lanes opened since (see delivery::lanes) are watched from now on.
        for lane in self.delivery.take_new_lanes() {
            let Some(fd) = self.delivery.raw_fd(lane) else {
                continue;
            };
            let (token, interest) = (Token(LANE_BASE + lane), Interest::READABLE);
            let r = match self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, interest)
            {
                // Should the descriptor number still be watched, it is watched anew.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self
                    .poll
                    .registry()
                    .reregister(&mut SourceFd(&fd), token, interest),
                r => r,
            };
            if let Err(e) = r {
                return self.agent_failed(AgentGone(format!(
                    "cannot watch the delivery agent's lane {lane}: {e}"
                )));
            }
            if self.agent_write_interest.len() <= lane {
                self.agent_write_interest.resize(lane + 1, false);
            }
            // A refused lane's place taken again: a new socket, registered READABLE only.
            self.agent_write_interest[lane] = false;
        }
        for lane in 0..self.agent_write_interest.len() {
            let want = self.delivery.wants_write(lane);
            if want == self.agent_write_interest[lane] {
                continue;
            }
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let Some(fd) = self.delivery.raw_fd(lane) else {
                continue;
            };
            match self.poll.registry().reregister(
                &mut SourceFd(&fd),
                Token(LANE_BASE + lane),
                interest,
            ) {
                Ok(()) => self.agent_write_interest[lane] = want,
                Err(e) => {
                    return self.agent_failed(AgentGone(format!(
                        "cannot watch the delivery agent's socket: {e}"
                    )))
                }
            }
        }
    }

    fn agent_failed(&mut self, AgentGone(why): AgentGone) {
        if self.agent_gone.is_none() {
            error!("{why}: stopping (a service manager restarts inboxd)");
            self.notify(&format!("STATUS=delivery agent gone ({why}); stopping"));
            self.agent_gone = Some(why);
            for lane in 0..self.agent_write_interest.len() {
                if let Some(fd) = self.delivery.raw_fd(lane) {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
            }
            self.stop();
        }
    }

    fn finish(&mut self, c: Option<Connection>) {
        let Some(c) = c else {
            return;
        };
        // Whatever was in progress is dropped: a transaction without its final reply was
        // never accepted; a lookup nobody waits for is skipped.
        self.delivery.abort(c.id);
        if let Some(p) = &c.lookup {
            p.cancel();
        }
        if let Some(w) = &c.check {
            self.delivery.forget_check(w.id, c.id);
        }
        if let Some(n) = self.per_ip.get_mut(&c.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&c.ip);
            }
        }
        // No EPOLL_CTL_DEL: closing the socket (its only descriptor) removes it from the
        // epoll set, one system call fewer per connection.
        info!("event=close session={:x}", c.id);
        drop(c);
        // The closed connection's timer entry stays in the heap until it comes due; when
        // such entries outnumber the live ones, they go (linear, so amortized per close).
        if self.timers.entries() > 2 * self.conns.len() + 1024 {
            let conns = &self.conns;
            self.timers
                .retain(|tok, at| conns.get(&tok).is_some_and(|c| c.timer_at == Some(at)));
        }
        if self.at_capacity && self.conns.len() < self.max_connections {
            self.at_capacity = false;
            self.accept(Instant::now());
        }
    }
}

/// When a lingering connection is closed: LINGER after it began, but no later than the
/// CLOSE_GRACE its last reply had, which bounds a stop (found in review: that earlier timer
/// cut the linger short, logged as a client that did not take its last reply).
fn linger_end(c: &Connection) -> Option<Instant> {
    let end = c.lingering_since? + LINGER;
    Some(c.closing_since.map_or(end, |t| end.min(t + CLOSE_GRACE)))
}

/// When a session waiting (since `since`) for the agent's answer, or for a recipient's
/// lookup or mailbox check, gets a 451 instead: after AGENT_TIMEOUT (LOOKUP_TIMEOUT), or once
/// stopping (since `stop_at`), after STOP_WAIT.
fn wait_deadline(stop_at: Option<Instant>, since: Instant, lookup: bool) -> Instant {
    let d = since
        + if lookup {
            LOOKUP_TIMEOUT
        } else {
            AGENT_TIMEOUT
        };
    stop_at.map_or(d, |s| d.min(s + STOP_WAIT))
}

/// A recipient's lookup answered: an account list goes on to the mailbox check (unless its
/// accounts took mail or passed one a moment ago), and the session waits for its answer;
/// anything else is the verdict now.
fn recipient_found(
    delivery: &mut AgentClient,
    c: &mut Connection,
    local_part: &str,
    result: Result<Resolution, RecipientError>,
) {
    // A recipient the session will refuse for the transaction's limits (452, or 550 for an
    // address that alone reaches too many accounts) is not checked, and is logged as
    // refused, with a count rather than every name (found in review: it was logged as
    // accepted, with a line of every account of a large alias).
    if let Ok(Resolution::Accounts(accounts)) = &result {
        if c.session.would_exceed(accounts) {
            info!(
                "event=rcpt session={:x} rcpt={local_part:?} result=too_many accounts={}",
                c.id,
                accounts.len()
            );
            if let Ok(Resolution::Accounts(accounts)) = result {
                c.session
                    .recipient_verdict(RcptVerdict::Accept(accounts), Instant::now());
            }
            return;
        }
        match delivery.check(c.id, accounts, Instant::now()) {
            CheckStart::Fresh => {}
            CheckStart::Sent(id) => {
                c.check = Some(CheckWait {
                    id,
                    local_part: local_part.to_string(),
                    accounts: accounts.clone(),
                });
                return;
            }
            CheckStart::Failed(e) => {
                let verdict = unavailable(c.id, local_part, &e);
                c.session.recipient_verdict(verdict, Instant::now());
                return;
            }
        }
    }
    let verdict = rcpt_verdict(c.id, local_part, result);
    c.session.recipient_verdict(verdict, Instant::now());
}

/// A mailbox check's failure as a verdict for the session (its 4xx, for this recipient
/// only), logged.
fn unavailable(session: u64, local_part: &str, e: &DeliveryError) -> RcptVerdict {
    // At RCPT a quota (EDQUOT making a missing Maildir) is temporary: a 552 there may be
    // read as "too many recipients" (RFC 5321 4.5.3.1.10), and the mailbox may be emptied.
    let reply = match e {
        DeliveryError::Quota(_) => Reply::new(452, "4.2.2", "Mailbox full, try again later"),
        e => e.reply(),
    };
    warn!(
        "event=rcpt session={session:x} rcpt={local_part:?} result=unavailable status={} \
         error={:?}",
        reply.code,
        e.to_string()
    );
    RcptVerdict::Unavailable(reply)
}

/// A lookup's result as a verdict for the session, logged.
fn rcpt_verdict(
    session: u64,
    local_part: &str,
    result: Result<Resolution, RecipientError>,
) -> RcptVerdict {
    match result {
        Ok(Resolution::Accounts(accounts)) => {
            info!(
                "event=rcpt session={session:x} rcpt={local_part:?} result=accepted accounts={}",
                accounts.join(",")
            );
            RcptVerdict::Accept(accounts)
        }
        Ok(Resolution::Unknown) => {
            info!("event=rcpt session={session:x} rcpt={local_part:?} result=unknown");
            RcptVerdict::NoSuchUser
        }
        Ok(Resolution::Uid0Refused) => {
            warn!(
                "event=rcpt session={session:x} rcpt={local_part:?} result=refused \
                 reason=\"reaches only uid 0 (alias it to a person, or \
                 --allow-root-delivery)\""
            );
            RcptVerdict::Uid0Refused
        }
        Err(e) => {
            warn!(
                "event=rcpt session={session:x} rcpt={local_part:?} result=tempfail error={:?}",
                e.to_string()
            );
            RcptVerdict::TemporaryFailure
        }
    }
}

/// A client over its address's connection limit: one 421 (RFC 5321 3.8: a server may refuse
/// at the greeting) written without waiting, and the connection closed.
fn refuse_busy(mut socket: mio::net::TcpStream, addr: std::net::SocketAddr, limit: usize) {
    use std::io::Write;
    warn!("event=refused peer={addr} reason=\"more than {limit} connections from this address\"");
    let reply = Reply::new(
        421,
        "4.7.0",
        "Too many connections from your address, try again later",
    );
    let _ = socket.write_all(&reply.to_bytes());
}
