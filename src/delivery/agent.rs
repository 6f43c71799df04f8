//! The delivery agent: a small process that keeps only what delivery needs (the ability to
//! take a recipient's filesystem identity) and serves the receiver over one socket.
//!
//! It does not listen on the network and does not parse SMTP. It reads fixed binary requests
//! (`protocol`), answers Begin with the tmp-file descriptors of a [`Store`] (SCM_RIGHTS),
//! writes the copies of a Deliver (a small message sent whole) itself, answers a Check (can
//! these Maildirs take mail now?) as it comes (up to a budget per pass; the rest after the
//! batch's commit, in later passes), and commits every
//! Commit and Deliver that is waiting when it wakes up in one batch (group commit), then
//! answers each. A malformed request is answered with a failure when its id can be read, and
//! otherwise ignored. SIGHUP, SIGINT and SIGTERM are blocked: the agent ends only when the
//! receiver closes the socket, so a signal meant for the receiver (or for the whole process
//! group) never cuts a commit in half; every open transaction is then removed.
//!
//! Lanes: a Lane request on the first socket brings another socket, which a thread of its
//! own serves the same way, with a store of its own (`Store::for_lane`). The receiver sends
//! there the requests for the accounts of one filesystem (see `lanes`), so that a home whose
//! filesystem stops answering stalls that thread only; the other lanes, and the first
//! socket (mixed transactions, and everything under `--maildir-root`), go on. The thread
//! takes recipients' identities for itself (fsuid is per thread, see `privileges`) and is
//! started with the agent's resting one. The Lane is answered (Done once the thread runs,
//! Failed if refused) on the socket it came on; it is refused (and its socket closed) without exactly one socket,
//! with one that is not SOCK_SEQPACKET, beyond [`MAX_LANES`], when asked on a lane, under
//! `--maildir-root`, or when no thread can be started. The receiver uses a lane only once it
//! has been answered Done, and keeps using another for that filesystem otherwise. With
//! lanes in use the receiver sends the first socket nothing but Lane requests, so that a
//! filesystem that hangs can never stop a lane from being opened. The agent ends once every
//! lane has.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, setsockopt, sockopt, SockType};

use super::channel::{self, Received};
use super::protocol::{Request, Response, LANE_KIND};
use super::store::{Store, MAILDIR_TTL};
use super::{privileges, DeliveryError};

/// Lanes served besides the first socket at most (the receiver asks for no more: see
/// `client`).
pub const MAX_LANES: usize = 8;

/// Requests handled before a batch is committed at most, so a flood cannot grow a batch
/// without bound.
const MAX_BATCH: usize = 256;
/// Accounts whose mailbox check is made per pass of the loop, before the batch's commit (as
/// checks come) and again after it (from those that had to wait). A check is a lookup and a
/// walk (or more, in a slow home) per account, which a client can ask for with RCPT alone:
/// RCPTs to many accounts must not hold up the commits of mail that other clients have
/// finished sending. (One check may take the budget over, by its own accounts.)
const CHECK_BUDGET: usize = 16;
/// Accounts in checks waiting for a later pass at most; beyond, a check is refused at once
/// (451 for its RCPT). The receiver sends one check per session at a time, so only a
/// receiver that was taken over gets there; the bound keeps what the agent holds small.
const MAX_WAITING_ACCOUNTS: usize = 4096;

/// The checks that wait for a later pass, oldest first.
#[derive(Default)]
struct Waiting {
    checks: VecDeque<(u64, Vec<String>)>,
    accounts: usize,
}

/// What one batch has: the transactions to commit, and what is left of its check budget.
struct Batch {
    commits: Vec<u64>,
    check_budget: usize,
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

/// Serves the receiver on `sock` until it closes, and the lanes it asks for until they
/// close. Errors are socket errors of `sock`; the stores' open transactions are removed on
/// every way out (see `Store`'s Drop).
pub fn serve(sock: OwnedFd, store: Store) -> Result<(), Errno> {
    let mut lanes = Vec::new();
    let r = serve_lane(sock, store, 0, Some(&mut lanes));
    // Not root's identity while waiting for the lanes, whichever way the first socket ended.
    let _ = privileges::settle();
    // The receiver closes every lane as it closes the first socket; a lane stuck in a hung
    // filesystem keeps the agent until it returns (main's AGENT_EXIT_WAIT bounds the wait).
    for h in lanes {
        let _ = h.join();
    }
    r
}

/// Serves one lane (`lane` 0: the first socket, which alone may start others into `lanes`).
fn serve_lane(
    sock: OwnedFd,
    mut store: Store,
    lane: u64,
    mut lanes: Option<&mut Vec<JoinHandle<()>>>,
) -> Result<(), Errno> {
    let mut waiting = Waiting::default();
    // A blocking receive ends after MAILDIR_TTL with nothing (EAGAIN).
    let timeout = nix::sys::time::TimeVal::new(MAILDIR_TTL.as_secs() as i64, 0);
    if let Err(e) = setsockopt(&sock, sockopt::ReceiveTimeout, &timeout) {
        warn!(
            "delivery agent: lane {lane}: no receive timeout ({e}): idle lanes keep their Maildirs"
        );
    }
    loop {
        // Everything already waiting joins the batch of the first request. Each request is
        // handled as it is read, so at most one (up to 64 KiB) is held at a time, besides
        // the checks that wait (their account names). With checks waiting, the socket is
        // only looked at, not waited on.
        let mut batch = Batch {
            commits: Vec::new(),
            check_budget: CHECK_BUDGET,
        };
        let mut closed = false;
        let mut handled = 0;
        let block = waiting.checks.is_empty();
        while handled < MAX_BATCH {
            match channel::recv(sock.as_fd(), handled == 0 && block)? {
                Received::Message(m, fds) => {
                    handled += 1;
                    if m.first() == Some(&LANE_KIND) {
                        start_lane(&sock, &store, &m, fds, lanes.as_deref_mut())?;
                        continue;
                    }
                    request(&sock, &mut store, &m, &mut batch, &mut waiting)?;
                }
                Received::TooLong(head) => {
                    // The receiver never sends one; it is refused, not a reason to end the
                    // agent (found in review).
                    handled += 1;
                    warn!("delivery agent: a request longer than a datagram");
                    refuse(&sock, &head, "request too long")?;
                }
                // The receive timeout (set below) ran out with nothing to do: Maildirs kept
                // past their time are let go (they count against every lane's share; see
                // store::MAILDIR_CACHE), at no cost while requests come.
                Received::Empty if handled == 0 && block => {
                    store.prune();
                    continue;
                }
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
        // Nobody waits for the checks any more (found in review: they were still made).
        if closed {
            break;
        }
        // Checks that waited: one budget's worth, oldest first; then the socket again.
        let mut budget = CHECK_BUDGET;
        while budget > 0 {
            let Some((id, accounts)) = waiting.checks.pop_front() else {
                break;
            };
            waiting.accounts = waiting.accounts.saturating_sub(accounts.len());
            budget = budget.saturating_sub(accounts.len());
            check(&sock, &mut store, id, &accounts)?;
        }
        // Before waiting again: a recipient's identity is kept for the next burst, root's
        // (a uid-0 or gid-0 recipient under --allow-root-delivery, a gid-0 one) is not.
        if let Err(e) = privileges::settle() {
            error!("delivery agent: lane {lane}: giving up root's filesystem identity: {e}");
        }
    }
    store.abort_all();
    info!("delivery agent: receiver closed lane {lane}");
    info!("event=sync_stats lane={lane} {}", store.sync_stats());
    Ok(())
}

/// A Lane request (`m`, with `fds`) that came on `on`: a thread serves the socket it
/// brought, and Done says so; or it is refused with Failed (see the module's doc for when).
/// `Err` when `on` failed.
fn start_lane(
    on: &OwnedFd,
    store: &Store,
    m: &[u8],
    fds: Vec<OwnedFd>,
    lanes: Option<&mut Vec<JoinHandle<()>>>,
) -> Result<(), Errno> {
    let Ok(Request::Lane { id }) = Request::decode(m) else {
        warn!("delivery agent: a malformed lane request");
        return refuse(on, m, "malformed request");
    };
    let answer = match lane_thread(store, id, fds, lanes) {
        Ok(()) => Response::Done {
            id,
            names: Vec::new(),
        },
        Err(why) => {
            warn!("delivery agent: lane {id} refused: {why}");
            Response::failed(id, &DeliveryError::Io(format!("lane refused: {why}")))
        }
    };
    channel::send(on.as_fd(), &answer.encode(), &[])
}

/// Starts the thread of a lane, or says why not.
fn lane_thread(
    store: &Store,
    id: u64,
    mut fds: Vec<OwnedFd>,
    lanes: Option<&mut Vec<JoinHandle<()>>>,
) -> Result<(), String> {
    let Some(lanes) = lanes else {
        return Err("asked on a lane".into());
    };
    if fds.len() != 1 {
        return Err(format!("{} sockets with it", fds.len()));
    }
    if lanes.len() >= MAX_LANES {
        return Err(format!("{MAX_LANES} lanes already"));
    }
    let Some(sock) = fds.pop() else {
        return Err("no socket with it".into());
    };
    if getsockopt(&sock, sockopt::SockType) != Ok(SockType::SeqPacket) {
        return Err("not a SOCK_SEQPACKET socket".into());
    }
    let Some(lane_store) = store.for_lane() else {
        return Err("every Maildir is under --maildir-root".into());
    };
    // A new thread starts with its creator's filesystem identity: the resting one.
    privileges::rest().map_err(|e| format!("taking the agent's own identity: {e}"))?;
    let spawned = std::thread::Builder::new()
        .name(format!("lane {id}"))
        .spawn(move || {
            if let Err(e) = serve_lane(sock, lane_store, id, None) {
                error!("delivery agent: lane {id}: {e}");
            }
        });
    match spawned {
        Ok(h) => {
            info!("event=lane_started lane={id}");
            lanes.push(h);
            Ok(())
        }
        Err(e) => Err(format!("no thread: {e}")),
    }
}

/// Handles one request; Commit, and Deliver once written, join the batch's commits; a check
/// beyond the batch's budget (or behind others) waits for a later pass. `Err` when the
/// socket failed.
fn request(
    sock: &OwnedFd,
    store: &mut Store,
    m: &[u8],
    batch: &mut Batch,
    waiting: &mut Waiting,
) -> Result<(), Errno> {
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
        // Handled by `start_lane` before it gets here.
        Ok(Request::Lane { .. }) => {}
        Ok(Request::Check { id, accounts }) => {
            // Answered as it comes, not at the batch's end (a client waits for its RCPT
            // reply), unless this pass has checked enough accounts already.
            if batch.check_budget > 0 && waiting.checks.is_empty() {
                batch.check_budget = batch.check_budget.saturating_sub(accounts.len());
                check(sock, store, id, &accounts)?;
            } else if waiting.accounts + accounts.len() > MAX_WAITING_ACCOUNTS {
                let e = DeliveryError::Io(format!(
                    "{} accounts already wait for their check",
                    waiting.accounts
                ));
                channel::send(sock.as_fd(), &Response::failed(id, &e).encode(), &[])?;
            } else {
                waiting.accounts += accounts.len();
                waiting.checks.push_back((id, accounts));
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
