//! The validated configuration of one inboxd process.
//!
//! Owns the settings and their defaults. It is built by `cli` from the command line and
//! read by `main` to assemble the server; it must not parse arguments or open anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// 35 MiB: what large mail providers accept, well above RFC 5321 4.5.3.1.7's 64K minimum.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 35 * 1024 * 1024;
/// RFC 5321 4.5.3.1.8 requires at least 100.
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;
pub const MIN_MAX_RECIPIENTS: usize = 100;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Concurrent connections from one client address: a tenth of the global cap, room for a busy
/// relaying host (and the conformance suite's 50 concurrent sessions).
pub const DEFAULT_MAX_PER_IP: usize = 100;
/// RFC 5321 4.5.3.2.7: at least 5 minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// One day: long enough for anything, short enough that deadlines cannot overflow.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// Bad commands before 421.
pub const DEFAULT_MAX_ERRORS: u32 = 20;
pub const DEFAULT_ALIASES: &str = "/etc/aliases";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:25";
pub const DEFAULT_USER: &str = "inboxd";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// Whether `--listen` was given (not the default): under socket activation it is
    /// ignored, and inboxd says so.
    pub listen_given: bool,
    /// Lower case, without a trailing dot.
    pub domains: Vec<String>,
    pub hostname: String,
    /// `--maildir-root`: deliver to `<root>/<account>/` instead of `~account/Maildir/`.
    pub maildir_root: Option<PathBuf>,
    pub aliases: PathBuf,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// `--max-connections-per-ip`: concurrent connections from one client address.
    pub max_connections_per_ip: usize,
    pub max_errors: u32,
    pub timeout: Duration,
    pub lowercase_fallback: bool,
    /// `--allow-root-delivery`: write copies as uid 0 (root's own Maildir). Off by default:
    /// started as root, inboxd refuses mail that would be written as root.
    pub allow_root_delivery: bool,
    /// The unprivileged user the receiver runs as when started as root.
    pub user: String,
    /// 0: info, 1: debug, 2+: trace.
    pub verbose: usize,
}
