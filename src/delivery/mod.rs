//! Delivery: mail data of an accepted transaction becomes one durable file per account in
//! that account's Maildir, all or nothing.
//!
//! Two processes share this module. The receiver uses [`client::AgentClient`], the server's
//! request/outcome interface (begin when DATA starts, write per chunk, finish or abort,
//! outcomes later). The delivery agent ([`agent`]) runs a [`store::Store`]: it creates each
//! recipient's copy in tmp/ (unnamed where the filesystem allows, else `tmp/<unique>` with
//! O_EXCL; 0600, as the recipient, path walked safely by [`maildir`]), writes it or hands
//! the descriptors to the receiver over [`channel`] in the fixed [`protocol`], and at the end
//! makes every copy durable *before any* is linked or renamed into new/, then makes new/
//! (and each linked copy's link count) durable. If anything fails before that, every copy is
//! removed and the client gets a 4xx (or 552 for a full quota): nothing is delivered.
//! Only [`privileges`] changes credentials. Nothing here speaks SMTP beyond classifying
//! failures as replies, and nothing writes as root into a directory that belongs to somebody
//! else.

pub mod agent;
pub mod channel;
pub mod client;
pub mod fskind;
pub mod fuzz;
pub mod lanes;
pub mod lookup;
pub mod maildir;
pub mod privileges;
pub mod protocol;
pub mod store;
pub mod syncer;
pub mod writer;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::smtp::Reply;

/// Why a delivery failed, classified where it was detected (RFC 3463; Postfix's mbox_dsn).
#[derive(Debug, Clone)]
pub enum DeliveryError {
    /// ENOSPC: 452 4.3.1, try later.
    NoSpace(String),
    /// EDQUOT: 552 5.2.2, the mailbox is full.
    Quota(String),
    /// Any other system error: 451 4.3.0, try later.
    Io(String),
    /// The mailbox cannot be used as it is: the home is missing or belongs to someone else,
    /// the Maildir (or a directory in it) is a symlink or not a directory, or the recipient
    /// may not write there (EACCES/EPERM). 450 4.2.0 until the user or admin repairs it: a
    /// fixable fault, so the sender retries rather than bounces. Nothing is written.
    Unavailable(String),
    /// The account vanished or its lookup failed between RCPT and delivery: 451 4.3.0.
    Account(String),
}

impl DeliveryError {
    pub fn io(e: Errno, what: impl fmt::Display) -> DeliveryError {
        let msg = format!("{what}: {e}");
        match e {
            Errno::ENOSPC => DeliveryError::NoSpace(msg),
            // Postfix's mbox_dsn classes EFBIG with EDQUOT: the mailbox is full (5.2.2).
            Errno::EDQUOT | Errno::EFBIG => DeliveryError::Quota(msg),
            _ => DeliveryError::Io(msg),
        }
    }

    /// For operations done as the recipient inside their home or Maildir (mkdir, create,
    /// open): EACCES/EPERM there mean the recipient may not write where their mail goes, a
    /// fault of the mailbox (450), not of inboxd. Elsewhere (setfsuid, chown, link) an EPERM
    /// is inboxd's own and stays a 451 through [`DeliveryError::io`].
    pub fn access(e: Errno, what: impl fmt::Display) -> DeliveryError {
        match e {
            Errno::EACCES | Errno::EPERM => DeliveryError::Unavailable(format!("{what}: {e}")),
            e => DeliveryError::io(e, what),
        }
    }

    /// Opening a directory with O_NOFOLLOW|O_DIRECTORY: ELOOP and ENOTDIR mean something
    /// other than a real directory is in the way.
    pub fn open(e: Errno, what: &str) -> DeliveryError {
        match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                DeliveryError::Unavailable(format!("{what} is a symlink or not a directory"))
            }
            _ => DeliveryError::access(e, format!("open {what}")),
        }
    }

    fn from_io(e: std::io::Error, what: &str) -> DeliveryError {
        DeliveryError::io(
            Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio())),
            what,
        )
    }

    /// The class byte and detail that carry this error over the agent protocol.
    pub fn to_wire(&self) -> (u8, &str) {
        match self {
            DeliveryError::NoSpace(m) => (1, m),
            DeliveryError::Quota(m) => (2, m),
            DeliveryError::Io(m) => (3, m),
            DeliveryError::Unavailable(m) => (4, m),
            DeliveryError::Account(m) => (5, m),
        }
    }

    /// The inverse of [`DeliveryError::to_wire`]; an unknown class is an I/O error.
    pub fn from_wire(class: u8, detail: String) -> DeliveryError {
        match class {
            1 => DeliveryError::NoSpace(detail),
            2 => DeliveryError::Quota(detail),
            4 => DeliveryError::Unavailable(detail),
            5 => DeliveryError::Account(detail),
            _ => DeliveryError::Io(detail),
        }
    }

    pub fn reply(&self) -> Reply {
        match self {
            DeliveryError::NoSpace(_) => {
                Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
            }
            DeliveryError::Quota(_) => Reply::new(552, "5.2.2", "Mailbox full"),
            DeliveryError::Io(_) | DeliveryError::Account(_) => {
                Reply::new(451, "4.3.0", "Local error in delivery, try again later")
            }
            DeliveryError::Unavailable(_) => Reply::new(
                450,
                "4.2.0",
                "Recipient's mailbox is unavailable, try again later",
            ),
        }
    }
}

fn libc_eio() -> i32 {
    Errno::EIO as i32
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::NoSpace(m) => write!(f, "no space: {m}"),
            DeliveryError::Quota(m) => write!(f, "quota exceeded: {m}"),
            DeliveryError::Io(m) => write!(f, "I/O error: {m}"),
            DeliveryError::Unavailable(m) => write!(f, "mailbox unavailable: {m}"),
            DeliveryError::Account(m) => write!(f, "account: {m}"),
        }
    }
}

impl std::error::Error for DeliveryError {}

/// Where Maildirs are.
#[derive(Debug)]
pub enum Layout {
    /// `~account/Maildir`.
    Home,
    /// `<root>/<account>` (`--maildir-root`); the descriptor of `<root>`.
    Root(OwnedFd),
}

impl Layout {
    /// Opens (creating if missing, 0755 so accounts' own directories can be reached)
    /// a `--maildir-root` directory. It must belong to the user running inboxd and be
    /// writable by nobody else: as root, inboxd creates the accounts' directories in it, and
    /// root must not work inside a directory that another user controls.
    /// The directory itself must not be a symlink, and every directory above it must
    /// belong to root or that user and be writable by nobody else (or be sticky, like /tmp),
    /// so that nobody can put a symlink in its place (found in review: a symlink to /etc in a
    /// directory a user controls would have had root create and chown /etc/<account>).
    pub fn root(path: &Path) -> std::io::Result<Layout> {
        let me = nix::unistd::geteuid().as_raw();
        let absolute = Layout::check_above_root(path)?;
        create_dirs_0755(&absolute)?;
        if let Some(parent) = std::fs::canonicalize(path)?.parent() {
            check_from(parent, me)?;
        }
        let fd = open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::other(format!("cannot be opened without following a symlink: {e}"))
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(std::io::Error::from)?;
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "must belong to uid {me} and not be writable by group or others (it is uid {}, mode {:o})",
                st.st_uid,
                st.st_mode & 0o7777
            )));
        }
        Ok(Layout::Root(fd))
    }

    /// The directories above a `--maildir-root` (the path made absolute): checked before
    /// anything is created (found in review), from the deepest directory that exists
    /// (symlinks and ".." resolved). Creates nothing: `inboxd check` runs it too. The path
    /// itself, if it exists, is checked by [`Layout::root`] (it must be ours alone).
    pub fn check_above_root(path: &Path) -> std::io::Result<std::path::PathBuf> {
        let me = nix::unistd::geteuid().as_raw();
        let absolute = std::path::absolute(path)?;
        let existing = absolute
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let resolved = std::fs::canonicalize(existing)?;
        let first = match resolved.parent() {
            Some(parent) if existing == absolute => parent,
            _ => &resolved,
        };
        check_from(first, me)?;
        Ok(absolute)
    }
}

/// Creates the missing directories of `path` with mode 0755 whatever the umask (found in
/// review: under the unit's UMask=0077 a new root came out 0700, and the accounts' own
/// mail readers could not pass through it).
fn create_dirs_0755(path: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = path.ancestors().take_while(|a| !a.exists()).collect();
    for dir in missing.into_iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `dir` and every existing directory above it belong to root or `me` and are writable by
/// nobody else, or are sticky.
fn check_from(dir: &Path, me: u32) -> std::io::Result<()> {
    for dir in dir.ancestors() {
        let m = match std::fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(&m.permissions());
        let owner = std::os::unix::fs::MetadataExt::uid(&m);
        if (owner != 0 && owner != me) || (mode & 0o022 != 0 && mode & 0o1000 == 0) {
            return Err(std::io::Error::other(format!(
                "{} (uid {owner}, mode {:o}) must belong to root or uid {me} and be writable \
                 by nobody else, or be sticky",
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// maildir(5): in the host part of a unique name, `/` becomes `\057` and `:` becomes `\072`.
pub fn escape_host(h: &str) -> String {
    let mut s = String::with_capacity(h.len());
    for c in h.chars() {
        match c {
            '/' => s.push_str("\\057"),
            ':' => s.push_str("\\072"),
            c if c.is_ascii_graphic() => s.push(c),
            _ => s.push('_'),
        }
    }
    s
}

/// The Maildir of an account in the home layout, for tools and tests.
pub fn home_maildir(home: &Path) -> PathBuf {
    home.join("Maildir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_escaping() {
        assert_eq!(escape_host("a/b:c.example"), "a\\057b\\072c.example");
    }

    #[test]
    fn errno_classification() {
        assert_eq!(DeliveryError::io(Errno::ENOSPC, "x").reply().code, 452);
        assert_eq!(DeliveryError::io(Errno::EDQUOT, "x").reply().code, 552);
        assert_eq!(DeliveryError::io(Errno::EIO, "x").reply().code, 451);
        assert_eq!(DeliveryError::io(Errno::EFBIG, "x").reply().code, 552);
        assert_eq!(DeliveryError::io(Errno::EPERM, "x").reply().code, 451);
        assert_eq!(DeliveryError::access(Errno::EACCES, "x").reply().code, 450);
        assert_eq!(DeliveryError::access(Errno::ENOSPC, "x").reply().code, 452);
        assert_eq!(DeliveryError::open(Errno::ELOOP, "new").reply().code, 450);
    }
}
