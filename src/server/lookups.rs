//! The lookup thread: recipient resolutions that need NSS run here, off the event loop.
//!
//! getpwnam blocks for as long as its backend takes (LDAP, SSSD, NIS, a file on a hung
//! mount). Run in the event loop, one slow answer stalled every session, and a backend that
//! never answered held the server, its stop included (found in review). The event loop
//! answers what it can from the alias table and the cache of found accounts
//! ([`Resolver::resolve_cached`], no system call); the rest comes here, one request at a time
//! and in order (as OpenSMTPD's lookup process does), and the answers go back through a
//! [`mio::Waker`]. Alias reloads (SIGHUP) come here too, because checking the new table
//! (postmaster must reach somebody) looks accounts up.
//!
//! A request whose session stopped waiting (its wait timed out, or the client left) is
//! cancelled: the thread skips it rather than spend a slow backend's time on it (found in
//! review: without that, a backend slower than the requests came made every answer late).
//! One thread in order means one hung lookup holds up every lookup behind it; the cache
//! still answers for accounts found in the last 2 seconds.
//!
//! Owns the thread, its queue and its answers. It must not touch connections or sessions
//! (the server applies the answers, and bounds the wait for them) and holds no lock while it
//! looks up. The thread is started after the receiver has dropped its privileges.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use mio::Waker;

use crate::recipient::{Aliases, RecipientError, Resolution, Resolver};

/// Requests queued at most (each session has at most one outstanding; a session whose wait
/// timed out can ask again while its first request is still queued behind a hung backend,
/// so the queue is bounded on its own). Past it, a recipient gets 451 at once.
pub const MAX_QUEUED: usize = 4096;

enum Request {
    Resolve {
        seq: u64,
        conn: u64,
        local_part: String,
        cancelled: Arc<AtomicBool>,
    },
    Reload(Aliases),
}

/// A queued lookup, as its session keeps it: its number, what it is for (the log), and the
/// flag that cancels it.
#[derive(Debug)]
pub struct Pending {
    pub seq: u64,
    pub local_part: String,
    cancelled: Arc<AtomicBool>,
}

impl Pending {
    /// Nobody waits for this lookup any more: the thread skips it if it has not started it.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Why a lookup could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum NotQueued {
    /// [`MAX_QUEUED`] wait already.
    Full,
    /// The thread is gone (it panicked): no lookup can be answered any more.
    Gone,
}

/// What the thread answered.
pub enum Answer {
    /// A cancelled request, skipped.
    Skipped,
    /// The resolution of request `seq`, asked by connection `conn`.
    Resolved {
        seq: u64,
        conn: u64,
        local_part: String,
        result: Result<Resolution, RecipientError>,
    },
    /// A reload's outcome: the table now in use by the thread, or why the old one stays.
    Reloaded(Result<Aliases, String>),
}

pub struct Lookups {
    requests: Sender<Request>,
    answers: Arc<Mutex<Vec<Answer>>>,
    next_seq: u64,
    /// Requests sent and not yet answered.
    queued: usize,
}

impl Lookups {
    /// Starts the thread with its own copy of `resolver` (the two share the cache).
    pub fn start(mut resolver: Resolver, waker: Arc<Waker>) -> io::Result<Lookups> {
        let (requests, rx) = channel::<Request>();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&answers);
        std::thread::Builder::new()
            .name("lookups".into())
            .spawn(move || {
                // Ends when the server drops its sender; a thread stuck in a lookup is not
                // waited for (the process's exit ends it).
                while let Ok(req) = rx.recv() {
                    let answer = match req {
                        Request::Resolve { cancelled, .. } if cancelled.load(Ordering::Relaxed) => {
                            Answer::Skipped
                        }
                        Request::Resolve {
                            seq,
                            conn,
                            local_part,
                            ..
                        } => {
                            let result = resolver.resolve(&local_part);
                            Answer::Resolved {
                                seq,
                                conn,
                                local_part,
                                result,
                            }
                        }
                        Request::Reload(table) => Answer::Reloaded(
                            resolver
                                .set_aliases(table)
                                .map(|()| resolver.aliases().clone()),
                        ),
                    };
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(answer);
                    // A failed wake (the event loop's eventfd is gone) means the server is
                    // ending: nobody is left to answer.
                    if waker.wake().is_err() {
                        return;
                    }
                }
            })?;
        Ok(Lookups {
            requests,
            answers,
            next_seq: 0,
            queued: 0,
        })
    }

    /// Queues the resolution of `local_part` for connection `conn`.
    pub fn ask(&mut self, conn: u64, local_part: &str) -> Result<Pending, NotQueued> {
        if self.queued >= MAX_QUEUED {
            return Err(NotQueued::Full);
        }
        self.next_seq += 1;
        let cancelled = Arc::new(AtomicBool::new(false));
        let pending = Pending {
            seq: self.next_seq,
            local_part: local_part.to_string(),
            cancelled: Arc::clone(&cancelled),
        };
        self.requests
            .send(Request::Resolve {
                seq: pending.seq,
                conn,
                local_part: local_part.to_string(),
                cancelled,
            })
            .map_err(|_| NotQueued::Gone)?;
        self.queued += 1;
        Ok(pending)
    }

    /// Queues a reload of the alias table; false when the thread is gone.
    pub fn reload(&mut self, table: Aliases) -> bool {
        let sent = self.requests.send(Request::Reload(table)).is_ok();
        if sent {
            self.queued += 1;
        }
        sent
    }

    /// The answers that arrived since the last call, in order.
    pub fn take_answers(&mut self) -> Vec<Answer> {
        let answers = std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()));
        self.queued = self.queued.saturating_sub(answers.len());
        answers
    }
}
