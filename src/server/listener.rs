//! Listening sockets: IPv4 and IPv6, with the backlog and flags a busy MTA needs.
//!
//! Owns turning `--listen` addresses into non-blocking, close-on-exec mio listeners
//! (SO_REUSEADDR, IPV6_V6ONLY so `0.0.0.0:25` and `[::]:25` can both be bound, a backlog of
//! 1024 so bursts are not dropped). It must not accept connections (the loop does).

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::TcpListener;
use nix::errno::Errno;
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};

pub const BACKLOG: i32 = 1024;

#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub errno: Errno,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.errno {
            Errno::EACCES => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            Errno::EADDRINUSE => " (another program, perhaps another MTA, is listening there)",
            Errno::EADDRNOTAVAIL => " (no interface of this host has that address)",
            _ => "",
        };
        write!(
            f,
            "cannot listen on {}: {}{hint}",
            self.addr,
            self.errno.desc()
        )
    }
}

impl std::error::Error for BindError {}

pub fn bind_listener(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |errno| BindError { addr, errno };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
    listen(&fd, Backlog::new(BACKLOG).map_err(err)?).map_err(err)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(fd)))
}
