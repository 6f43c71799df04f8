//! The service manager's interface: readiness notification (the sd_notify protocol) and
//! socket activation (LISTEN_FDS), written here rather than taken from a crate: the
//! sd-notify crate fails on abstract (`@`) NOTIFY_SOCKETs and listenfd skips the LISTEN_PID
//! check (../shared/design/dependencies.md), and each is a few lines.
//!
//! Owns the environment variables systemd sets (NOTIFY_SOCKET, LISTEN_PID, LISTEN_FDS,
//! LISTEN_FDNAMES): they are read once and removed, so the delivery agent (a child) neither
//! sees them nor inherits a passed socket. It must not bind, accept or parse anything else.

use std::net::TcpListener;
use std::os::fd::{AsFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::{debug, warn};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// Sends sd_notify(3) state lines (`READY=1`, `STATUS=...`, `STOPPING=1`, `RELOADING=1`) to
/// the service manager, if one asked for them. Without NOTIFY_SOCKET it does nothing.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads (and removes) NOTIFY_SOCKET: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        std::env::remove_var("NOTIFY_SOCKET");
        let value = value.to_string_lossy().into_owned();
        let addr = if let Some(name) = value.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            SocketAddr::from_pathname(&value)
        };
        let target = match (addr, UnixDatagram::unbound()) {
            (Ok(addr), Ok(sock)) => Some((sock, addr)),
            (Err(e), _) | (_, Err(e)) => {
                warn!("NOTIFY_SOCKET={value:?} cannot be used: {e}");
                None
            }
        };
        Notifier { target }
    }

    /// Sends `state` (one or more `KEY=VALUE` lines). Failures are logged, never fatal: the
    /// service manager is told, not asked.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                warn!("cannot notify the service manager: {e}");
            } else {
                debug!("notified the service manager: {state:?}");
            }
        }
    }
}

/// The listening TCP sockets systemd passed (socket activation), as non-blocking, close-on-
/// exec listeners; empty when none were passed to this process. LISTEN_PID must be our pid
/// (sd_listen_fds(3)): variables meant for another process are ignored. Anything passed that
/// is not a listening stream socket is an error.
pub fn listen_fds() -> Result<Vec<TcpListener>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        debug!("LISTEN_PID={pid} is not ours; no sockets taken");
        return Ok(Vec::new());
    }
    let n: RawFd = count
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={count:?} is not a number"))?;
    if !(0..=1024).contains(&n) {
        return Err(format!("LISTEN_FDS={n} is out of range"));
    }
    let fds = crate::sys::adopt_passed_fds(LISTEN_FDS_START, n);
    if fds.len() != n as usize {
        return Err(format!(
            "LISTEN_FDS={n}, but only {} of those descriptors are open",
            fds.len()
        ));
    }
    let mut out = Vec::new();
    for fd in fds {
        let number = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let what = || format!("passed descriptor {number}");
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|e| format!("{}: {e}", what()))?;
        let stream = getsockopt(&fd.as_fd(), sockopt::SockType)
            .map_err(|e| format!("{}: not a socket ({e})", what()))?;
        let listening = getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false);
        if stream != SockType::Stream || !listening {
            return Err(format!(
                "{} is not a listening stream socket (inboxd.socket needs ListenStream=)",
                what()
            ));
        }
        // A Unix socket would pass the checks above and then fail every accept (found in
        // review): SMTP here is TCP.
        let family = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
        )
        .ok()
        .and_then(|a| nix::sys::socket::SockaddrLike::family(&a));
        if !matches!(
            family,
            Some(nix::sys::socket::AddressFamily::Inet | nix::sys::socket::AddressFamily::Inet6)
        ) {
            return Err(format!(
                "{} is not a TCP socket (inboxd.socket needs ListenStream=ADDRESS:PORT or PORT)",
                what()
            ));
        }
        let l = TcpListener::from(fd);
        l.set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", what()))?;
        out.push(l);
    }
    Ok(out)
}
