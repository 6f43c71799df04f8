//! The delivery agent: a small process that keeps only what delivery needs (the ability to
//! take a recipient's filesystem identity) and serves the receiver over one socket.
//!
//! It does not listen on the network and does not parse SMTP. It reads fixed binary requests
//! (`protocol`), answers Begin with the tmp-file descriptors of a [`Store`] (SCM_RIGHTS), and
//! commits every Commit that is waiting when it wakes up in one batch (group commit), then
//! answers each. A malformed request is logged and ignored; when the receiver goes away, every
//! open transaction is removed and the agent exits.

use std::os::fd::{AsFd, OwnedFd};

use log::{debug, error, info, warn};
use nix::errno::Errno;

use super::channel::{self, Received};
use super::protocol::{Request, Response};
use super::store::Store;

/// Serves the receiver on `sock` until it closes. Errors are socket errors.
pub fn serve(sock: OwnedFd, mut store: Store) -> Result<(), Errno> {
    loop {
        let mut batch = Vec::new();
        match channel::recv(sock.as_fd(), true)? {
            Received::Closed => break,
            Received::Empty => continue,
            Received::Message(m, _) => batch.push(m),
        }
        // Everything else already waiting joins this batch.
        loop {
            match channel::recv(sock.as_fd(), false)? {
                Received::Message(m, _) => batch.push(m),
                Received::Empty => break,
                Received::Closed => {
                    store.abort_all();
                    info!("delivery agent: receiver closed");
                    return Ok(());
                }
            }
        }
        let mut commits = Vec::new();
        for m in batch {
            match Request::decode(&m) {
                Err(e) => warn!("delivery agent: {e} ({} octets), ignored", m.len()),
                Ok(Request::Begin { id, accounts }) => {
                    let reply = match store.open(id, &accounts) {
                        Ok(files) => {
                            let fds = Store::into_fds(files);
                            let r = Response::Opened {
                                id,
                                count: fds.len() as u16,
                            };
                            channel::send(sock.as_fd(), &r.encode(), &fds)
                        }
                        Err(e) => {
                            channel::send(sock.as_fd(), &Response::failed(id, &e).encode(), &[])
                        }
                    };
                    reply?;
                }
                Ok(Request::Abort { id }) => {
                    debug!("delivery agent: abort {id}");
                    store.abort(id);
                }
                Ok(Request::Commit { id }) => commits.push(id),
            }
        }
        if !commits.is_empty() {
            for (id, r) in store.commit(&commits) {
                let resp = match r {
                    Ok(copies) => {
                        for (account, name) in copies {
                            debug!("delivery agent: {id}: {account} new/{name}");
                        }
                        Response::Done { id }
                    }
                    Err(e) => {
                        error!("delivery agent: transaction {id} failed: {e}");
                        Response::failed(id, &e)
                    }
                };
                channel::send(sock.as_fd(), &resp.encode(), &[])?;
            }
        }
    }
    store.abort_all();
    info!("delivery agent: receiver closed");
    Ok(())
}
