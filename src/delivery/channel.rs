//! The socket between the receiver and the delivery agent: an AF_UNIX SOCK_SEQPACKET pair
//! (message boundaries kept, so one datagram is one protocol message), close-on-exec on both
//! ends and on every descriptor received.
//!
//! Owns sending and receiving datagrams with descriptors attached (SCM_RIGHTS). It must not
//! interpret the messages (see `protocol`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

use super::protocol::MAX_DATAGRAM;

/// Descriptors one datagram may carry (one per account of a Begin).
pub const MAX_FDS: usize = 253;

/// A connected pair; both ends close-on-exec.
pub fn pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Sends one datagram with `fds` attached (the receiver gets its own copies).
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(msg)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// Sends one datagram without descriptors unless the socket's buffer is full: `Ok(false)`
/// then, and nothing was sent (the caller queues it and waits for the socket to drain).
pub fn try_send(sock: BorrowedFd<'_>, msg: &[u8]) -> Result<bool, Errno> {
    try_send_with(sock, msg, &[])
}

/// [`try_send`] with `fds` attached.
pub fn try_send_with(
    sock: BorrowedFd<'_>,
    msg: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<bool, Errno> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(msg)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    loop {
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e),
            Ok(_) => return Ok(true),
        }
    }
}

/// What one receive got.
#[derive(Debug)]
pub enum Received {
    Message(Vec<u8>, Vec<OwnedFd>),
    /// The other end closed.
    Closed,
    /// Nothing there (non-blocking receive only).
    Empty,
    /// A datagram longer than [`MAX_DATAGRAM`]: only its first octets (at most 16, enough
    /// for a request's kind and id), so that it can be refused by id; its descriptors are
    /// closed.
    TooLong(Vec<u8>),
}

/// Receives one datagram; `wait` blocks until one arrives. A datagram longer than
/// [`MAX_DATAGRAM`] is [`Received::TooLong`].
pub fn recv(sock: BorrowedFd<'_>, wait: bool) -> Result<Received, Errno> {
    // One receive buffer per thread, allocated once: zeroing 64 KiB for every datagram was a
    // measurable part of each message's CPU.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
    }
    BUF.with(|b| recv_into(sock, wait, &mut b.borrow_mut()))
}

fn recv_into(sock: BorrowedFd<'_>, wait: bool, buf: &mut [u8]) -> Result<Received, Errno> {
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if !wait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let r = recvmsg::<UnixAddr>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags);
        let msg = match r {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(Received::Empty),
            Err(e) => return Err(e),
            Ok(m) => m,
        };
        let mut raw = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw.extend(fds);
                }
            }
        }
        let fds = crate::sys::adopt_fds(raw);
        let len = msg.bytes;
        // A cut datagram cannot be trusted. Cut descriptors (MSG_CTRUNC: we are out of
        // them) are not an error here: the caller sees fewer than announced.
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Ok(Received::TooLong(buf[..len.min(16)].to_vec()));
        }
        if len == 0 && fds.is_empty() {
            return Ok(Received::Closed);
        }
        // Only what arrived is kept, not the whole receive buffer.
        return Ok(Received::Message(buf[..len].to_vec(), fds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn datagrams_and_descriptors_cross() {
        let (a, b) = pair().unwrap();
        let mut f = std::fs::File::from(
            nix::fcntl::open(
                &std::env::temp_dir(),
                nix::fcntl::OFlag::O_TMPFILE | nix::fcntl::OFlag::O_RDWR,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .unwrap(),
        );
        f.write_all(b"hello").unwrap();
        send(a.as_fd(), b"one", &[f.as_fd()]).unwrap();
        send(a.as_fd(), b"two", &[]).unwrap();
        let Received::Message(m, fds) = recv(b.as_fd(), true).unwrap() else {
            panic!("no message")
        };
        assert_eq!(m, b"one");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(matches!(recv(b.as_fd(), false).unwrap(), Received::Message(m, _) if m == b"two"));
        assert!(matches!(recv(b.as_fd(), false).unwrap(), Received::Empty));
        drop(a);
        assert!(matches!(recv(b.as_fd(), true).unwrap(), Received::Closed));
    }
}
