//! The delivery agent: a small process that keeps only what delivery needs (the ability to
//! take a recipient's filesystem identity) and serves the receiver over one socket.
//!
//! It does not listen on the network and does not parse SMTP. It reads fixed binary requests
//! (`protocol`), answers Begin with the tmp-file descriptors of a [`Store`] (SCM_RIGHTS),
//! writes the copies of a Deliver (a small message sent whole) itself, answers a Check (can
//! these Maildirs take mail now?) at once, and commits every
//! Commit and Deliver that is waiting when it wakes up in one batch (group commit), then
//! answers each. A malformed request is answered with a failure when its id can be read, and
//! otherwise ignored. SIGHUP, SIGINT and SIGTERM are blocked: the agent ends only when the
//! receiver closes the socket, so a signal meant for the receiver (or for the whole process
//! group) never cuts a commit in half; every open transaction is then removed.

use std::os::fd::{AsFd, OwnedFd};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};

use super::channel::{self, Received};
use super::protocol::{Request, Response};
use super::store::Store;
use super::DeliveryError;

/// Requests handled before a batch is committed at most, so a flood cannot grow a batch
/// without bound.
const MAX_BATCH: usize = 256;
/// Mailbox checks answered in a batch before its commit; the batch's other checks are
/// answered after it. A check is a lookup and a walk (or more, in a slow home) that a client
/// can ask for with RCPT alone: RCPTs to many accounts must not hold up the commits of mail
/// that other clients have finished sending.
const CHECKS_BEFORE_COMMIT: usize = 16;

/// What one batch has: the transactions to commit, and the checks left for after them.
#[derive(Default)]
struct Batch {
    commits: Vec<u64>,
    checks_answered: usize,
    later_checks: Vec<(u64, Vec<String>)>,
}

/// Blocks the signals that stop the receiver, and SIGXFSZ (a file size limit makes writes
/// fail with EFBIG instead of killing the agent); called at the agent's start.
pub fn ignore_stop_signals() -> Result<(), Errno> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGPIPE,
        Signal::SIGXFSZ,
    ] {
        mask.add(s);
    }
    mask.thread_block()
}

/// Serves the receiver on `sock` until it closes. Errors are socket errors; the store's
/// open transactions are removed on every way out (see `Store`'s Drop).
pub fn serve(sock: OwnedFd, mut store: Store) -> Result<(), Errno> {
    loop {
        // Everything already waiting joins the batch of the first request. Each request is
        // handled as it is read, so at most one (up to 64 KiB) is held at a time.
        let mut batch = Batch::default();
        let mut closed = false;
        let mut handled = 0;
        while handled < MAX_BATCH {
            match channel::recv(sock.as_fd(), handled == 0)? {
                Received::Message(m, _) => {
                    handled += 1;
                    request(&sock, &mut store, &m, &mut batch)?;
                }
                Received::TooLong(head) => {
                    // The receiver never sends one; it is refused, not a reason to end the
                    // agent (found in review).
                    handled += 1;
                    warn!("delivery agent: a request longer than a datagram");
                    refuse(&sock, &head, "request too long")?;
                }
                Received::Empty if handled == 0 => continue,
                Received::Empty => break,
                Received::Closed => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.commits.is_empty() {
            for (id, r) in store.commit(&batch.commits) {
                let resp = match r {
                    Ok(copies) => {
                        // The receiver logs each delivery, with its session; here only
                        // with -v.
                        for (account, name) in &copies {
                            debug!("event=stored agent_tx={id} account={account} file=new/{name}");
                        }
                        Response::Done {
                            id,
                            names: copies.into_iter().map(|(_, name)| name).collect(),
                        }
                    }
                    Err(e) => {
                        error!("event=agent_failed agent_tx={id} error={:?}", e.to_string());
                        Response::failed(id, &e)
                    }
                };
                channel::send(sock.as_fd(), &resp.encode(), &[])?;
            }
        }
        for (id, accounts) in std::mem::take(&mut batch.later_checks) {
            check(&sock, &mut store, id, &accounts)?;
        }
        if closed {
            break;
        }
    }
    store.abort_all();
    info!("delivery agent: receiver closed");
    info!("event=sync_stats {}", store.sync_stats());
    Ok(())
}

/// Handles one request; Commit, and Deliver once written, join the batch's commits, and a
/// check beyond [`CHECKS_BEFORE_COMMIT`] waits for them. `Err` when the socket failed.
fn request(sock: &OwnedFd, store: &mut Store, m: &[u8], batch: &mut Batch) -> Result<(), Errno> {
    let commits = &mut batch.commits;
    match Request::decode(m) {
        Err(e) => {
            warn!("delivery agent: {e} ({} octets)", m.len());
            refuse(sock, m, "malformed request")?;
        }
        Ok(Request::Begin { id, accounts }) => begin(sock, store, id, &accounts)?,
        Ok(Request::Abort { id }) => {
            debug!("delivery agent: abort {id}");
            store.abort(id);
        }
        Ok(Request::Commit { id }) => commits.push(id),
        Ok(Request::Check { id, accounts }) => {
            // Answered at once, not at the batch's end (a client waits for its RCPT reply),
            // unless this batch has answered enough checks already.
            if batch.checks_answered < CHECKS_BEFORE_COMMIT {
                batch.checks_answered += 1;
                check(sock, store, id, &accounts)?;
            } else {
                batch.later_checks.push((id, accounts));
            }
        }
        Ok(Request::Deliver {
            id,
            accounts,
            heads,
            data,
        }) => {
            // A failed open leaves nothing (and must not touch a transaction already open
            // under a reused id); a failed write removes the copies.
            let written = match store.open(id, &accounts) {
                Err(e) => Err(e),
                Ok(_) => store
                    .write(id, &heads, &data)
                    .inspect_err(|_| store.abort(id)),
            };
            match written {
                Ok(()) => commits.push(id),
                Err(e) => {
                    warn!("event=agent_failed agent_tx={id} error={:?}", e.to_string());
                    channel::send(sock.as_fd(), &Response::failed(id, &e).encode(), &[])?;
                }
            }
        }
    }
    Ok(())
}

/// Answers a mailbox check.
fn check(sock: &OwnedFd, store: &mut Store, id: u64, accounts: &[String]) -> Result<(), Errno> {
    debug!("delivery agent: check {id}");
    let resp = match store.check(accounts) {
        Ok(()) => Response::Done {
            id,
            names: Vec::new(),
        },
        Err(e) => Response::failed(id, &e),
    };
    channel::send(sock.as_fd(), &resp.encode(), &[])
}

/// Answers a request that cannot be handled with a failure, by its id when its first octets
/// hold one (kind, then id); otherwise it is ignored.
fn refuse(sock: &OwnedFd, m: &[u8], why: &str) -> Result<(), Errno> {
    let Some(id) = m.get(1..9).and_then(|b| b.try_into().ok()) else {
        return Ok(());
    };
    let e = DeliveryError::Io(why.into());
    let resp = Response::failed(u64::from_le_bytes(id), &e);
    channel::send(sock.as_fd(), &resp.encode(), &[])
}

/// Opens a transaction and answers with its descriptors; if they cannot be sent (too many,
/// or the socket refuses them), the transaction is removed and a failure is sent instead.
fn begin(sock: &OwnedFd, store: &mut Store, id: u64, accounts: &[String]) -> Result<(), Errno> {
    let e = match store.open(id, accounts) {
        Ok(files) => {
            let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            let r = Response::Opened {
                id,
                count: fds.len() as u16,
            };
            match channel::send(sock.as_fd(), &r.encode(), &fds) {
                Ok(()) => return Ok(()),
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(Errno::EPIPE),
                Err(e) => {
                    store.abort(id);
                    DeliveryError::io(e, "passing the descriptors")
                }
            }
        }
        Err(e) => e,
    };
    channel::send(sock.as_fd(), &Response::failed(id, &e).encode(), &[])
}
