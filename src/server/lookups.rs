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
//! Owns the thread, its queue and its answers. It must not touch connections or sessions
//! (the server applies the answers, and bounds the wait for them) and holds no lock while it
//! looks up. The thread is started after the receiver has dropped its privileges, so it has
//! none either.

use std::io;
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
    },
    Reload(Aliases),
}

/// What the thread answered.
pub enum Answer {
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
    pub fn start(mut resolver: Resolver, waker: Waker) -> io::Result<Lookups> {
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
                        Request::Resolve {
                            seq,
                            conn,
                            local_part,
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

    /// Queues the resolution of `local_part` for connection `conn`: the request's number, or
    /// `None` when it cannot be queued (the queue is full, or the thread is gone).
    pub fn ask(&mut self, conn: u64, local_part: String) -> Option<u64> {
        if self.queued >= MAX_QUEUED {
            return None;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.requests
            .send(Request::Resolve {
                seq,
                conn,
                local_part,
            })
            .ok()?;
        self.queued += 1;
        Some(seq)
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
