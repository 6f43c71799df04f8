//! One client connection: its socket, its SMTP session and its unsent output.
//!
//! Owns moving bytes between the socket and the session: reads go on while the session wants
//! input and the socket may hold more (see [`Connection::drained`]), output is written until
//! WouldBlock, and the mio interest is recomputed from the session's state after every step. It must not interpret SMTP (the
//! session does) or deliver (the server hands the session's events to the deliverer).

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::smtp::Session;

/// Bytes read per read(2).
pub const READ_CHUNK: usize = 64 * 1024;
/// Octets a lingering connection may have read and dropped before it is closed anyway. It
/// counts what was already waiting in the socket when the 421 went out, which can be the
/// whole receive buffer (Linux grows it up to tcp_rmem's maximum, 6 MiB by default): a
/// smaller cap closed such a connection at the first read, with that input unread, which
/// resets it, the very thing lingering is for (found in review with 1 MiB).
pub const LINGER_MAX: usize = 8 * 1024 * 1024;

pub struct Connection {
    pub id: u64,
    pub token: Token,
    pub socket: TcpStream,
    pub session: Session,
    pub peer: String,
    /// The client's address, for the per-address connection count.
    pub ip: std::net::IpAddr,
    out: Vec<u8>,
    out_pos: usize,
    /// The client closed its sending side (or reading failed).
    pub eof: bool,
    /// Nothing is left to read until the next readiness event, which clears this. Set by a
    /// read that said EAGAIN, and by a short read (fewer octets than asked for: tcp_recvmsg
    /// stops only when the receive queue is empty) unless [`Connection::must_drain`] is set.
    /// Not reading on to EAGAIN saves one read(2) per command (a third of the receiver's
    /// system calls). Data arriving after the event was taken brings a new event.
    pub drained: bool,
    /// The event that made this connection readable also said FIN, urgent data or an error:
    /// then a read returns short with more to read (the EOF, the data past the urgent mark)
    /// and no new event comes (found in review, reproduced with TCP_CORK and MSG_OOB), so
    /// reads go on until EAGAIN or EOF.
    pub must_drain: bool,
    /// Its session may go on with buffered input, but had its share of this turn: the next
    /// turn (from the ready list) resumes it.
    pub resume_pending: bool,
    /// Writing failed: nothing more can reach the client.
    write_failed: bool,
    interest: Option<Interest>,
    /// Time of this connection's live entry in the timer heap.
    pub timer_at: Option<Instant>,
    /// Set once the session asked to close: the last replies are being flushed.
    pub closing_since: Option<Instant>,
    /// Since when the session has been waiting for the delivery agent or a lookup.
    pub waiting_since: Option<Instant>,
    /// The lookup this session waits for, if it waits for one (an answer with another
    /// number came too late and is dropped).
    pub lookup: Option<super::lookups::Pending>,
    /// The mailbox check (at RCPT time) this session waits for, if it waits for one.
    pub check: Option<CheckWait>,
    /// Since when a connection we ended (421) has been lingering: writing shut down, what
    /// the client still sends read and dropped, until it closes.
    pub lingering_since: Option<Instant>,
    /// Octets dropped while lingering.
    lingered: usize,
}

/// An accepted recipient whose mailboxes the delivery agent is checking: the RCPT's reply
/// waits for the answer to check `id`.
pub struct CheckWait {
    pub id: u64,
    pub local_part: String,
    pub accounts: Vec<String>,
}

/// What one read step did.
pub enum ReadStep {
    Data,
    Nothing,
}

impl Connection {
    pub fn new(
        id: u64,
        token: Token,
        socket: TcpStream,
        session: Session,
        peer: std::net::SocketAddr,
    ) -> Self {
        Connection {
            id,
            token,
            socket,
            session,
            peer: peer.to_string(),
            ip: peer.ip(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            // Data that came before the socket was registered makes registering report it.
            drained: true,
            must_drain: false,
            resume_pending: false,
            write_failed: false,
            interest: None,
            timer_at: None,
            closing_since: None,
            waiting_since: None,
            lookup: None,
            check: None,
            lingering_since: None,
            lingered: 0,
        }
    }

    /// Whether the session waits for its RCPT's answer (a lookup or a mailbox check), which
    /// has its own time limit.
    pub fn waits_for_recipient(&self) -> bool {
        self.lookup.is_some() || self.check.is_some()
    }

    /// One read(2) into the session, if it wants input.
    pub fn read_once(&mut self, buf: &mut [u8], now: Instant) -> ReadStep {
        if self.eof || self.drained || !self.session.wants_read() {
            return ReadStep::Nothing;
        }
        match self.socket.read(buf) {
            Ok(0) => {
                self.eof = true;
                self.session.peer_closed();
                ReadStep::Data
            }
            Ok(n) => {
                if n < buf.len() && !self.must_drain {
                    self.drained = true;
                }
                self.session.receive(&buf[..n], now);
                ReadStep::Data
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.drained = true;
                self.must_drain = false;
                ReadStep::Nothing
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadStep::Data,
            Err(_) => {
                // Reset by peer and the like: the same as a close.
                self.eof = true;
                self.session.peer_closed();
                ReadStep::Data
            }
        }
    }

    /// Writes replies until WouldBlock. The session's replies are taken only once ours are
    /// all written, so while the client does not read, they pile up in the session, whose
    /// limit then stops it from reading more input. Returns true if something was written
    /// and nothing is left to write.
    pub fn flush(&mut self) -> bool {
        let mut wrote = false;
        loop {
            if self.out_pos == self.out.len() {
                if self.write_failed || !self.session.has_output() {
                    return wrote;
                }
                self.out = self.session.take_output();
                self.out_pos = 0;
            }
            match self.socket.write(&self.out[self.out_pos..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out_pos += n;
                    wrote = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    // The client is gone; nothing more can reach it.
                    self.out.clear();
                    self.out_pos = 0;
                    self.write_failed = true;
                    self.eof = true;
                    self.session.client_gone();
                    return false;
                }
            }
        }
    }

    pub fn output_pending(&self) -> bool {
        !self.write_failed && (self.out_pos < self.out.len() || self.session.has_output())
    }

    /// Whether the connection is finished: the session closed and every reply was written
    /// (or can no longer be). A client that only closed its sending side still gets its
    /// replies.
    pub fn done(&self) -> bool {
        self.session.is_closed() && !self.output_pending()
    }

    /// Whether the connection should linger before it is closed: we ended it (a 421: a
    /// timeout, too many errors, a stop) while the client may still be sending. Closing a
    /// socket with unread input makes the kernel reset the connection, and a client still
    /// writing (its mail data, say) then sees the reset, not our 421 (RFC 5321 3.8 wants the
    /// client to read it). After a QUIT, or once the client closed or vanished, nothing is
    /// waited for.
    pub fn should_linger(&self) -> bool {
        !self.eof && !self.write_failed && !self.session.ended_by_quit()
    }

    /// Starts lingering: our side of the connection is shut down (the client reads the end
    /// after the 421), its side is read and dropped.
    pub fn start_linger(&mut self, now: Instant) {
        self.lingering_since = Some(now);
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
    }

    /// Reads and drops what the client sent, until it would block. True when lingering is
    /// over: the client closed (or reset), or more than [`LINGER_MAX`] octets came.
    pub fn discard(&mut self, buf: &mut [u8]) -> bool {
        loop {
            match self.socket.read(buf) {
                Ok(0) => return true,
                Ok(n) => {
                    self.lingered += n;
                    if self.lingered > LINGER_MAX {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    /// Registers or re-registers with the interest the session's state calls for: readable
    /// while it wants input (or to notice a close), writable while output waits.
    pub fn update_interest(&mut self, registry: &Registry) -> io::Result<()> {
        // PRIORITY: urgent data must show in the event (see `must_drain`).
        let want = if self.output_pending() {
            Interest::READABLE | Interest::PRIORITY | Interest::WRITABLE
        } else {
            Interest::READABLE | Interest::PRIORITY
        };
        match self.interest {
            None => registry.register(&mut self.socket, self.token, want)?,
            Some(i) if i != want => registry.reregister(&mut self.socket, self.token, want)?,
            _ => {}
        }
        self.interest = Some(want);
        Ok(())
    }
}
