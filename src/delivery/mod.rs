//! Delivery: mail data of an accepted transaction becomes one durable file per account in
//! that account's Maildir, all or nothing.
//!
//! The session hands over a transaction through a request/outcome interface: [`Deliverer::begin`]
//! when DATA starts, [`Deliverer::write`] per chunk, then [`Deliverer::finish`] or
//! [`Deliverer::abort`]; outcomes come back through [`Deliverer::poll_outcome`]. Today the loop
//! drives it synchronously, but callers must not assume that (a later design moves it into a
//! separate privileged process).
//!
//! The protocol per copy: `tmp/<unique>` created O_EXCL 0600 as the recipient, written as the
//! data streams in, then at the end every copy is fsynced *before any* is moved into new/; only
//! then are they renamed and each new/ fsynced. If anything fails before the renames, every tmp
//! file is removed and the client gets a 4xx (or 552 for a full quota): nothing is delivered.
//! It must not speak SMTP beyond classifying its failures as replies, and never writes as root
//! into a directory that belongs to somebody else.

pub mod maildir;
pub mod privileges;
pub mod protocol;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{info, warn};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::recipient::lookup_account;
use crate::smtp::trace::Trace;
use crate::smtp::{DeliveryOutcome, Reply, Transaction};
use maildir::{Maildir, Owner};

/// Why a delivery failed, classified where it was detected (RFC 3463; Postfix's mbox_dsn).
#[derive(Debug)]
pub enum DeliveryError {
    /// ENOSPC: 452 4.3.1, try later.
    NoSpace(String),
    /// EDQUOT: 552 5.2.2, the mailbox is full.
    Quota(String),
    /// Any other system error: 451 4.3.0, try later.
    Io(String),
    /// The Maildir or home is a symlink, not a directory, or belongs to someone else:
    /// 450 4.2.0 until the user or admin repairs it. Nothing is written.
    Unsafe(String),
    /// The account vanished or its lookup failed between RCPT and delivery: 451 4.3.0.
    Account(String),
}

impl DeliveryError {
    pub fn io(e: Errno, what: impl fmt::Display) -> DeliveryError {
        let msg = format!("{what}: {e}");
        match e {
            Errno::ENOSPC => DeliveryError::NoSpace(msg),
            Errno::EDQUOT => DeliveryError::Quota(msg),
            _ => DeliveryError::Io(msg),
        }
    }

    /// Opening a directory with O_NOFOLLOW|O_DIRECTORY: ELOOP and ENOTDIR mean something
    /// other than a real directory is in the way.
    pub fn open(e: Errno, what: &str) -> DeliveryError {
        match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                DeliveryError::Unsafe(format!("{what} is a symlink or not a directory"))
            }
            _ => DeliveryError::io(e, format!("open {what}")),
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
            DeliveryError::Unsafe(m) => (4, m),
            DeliveryError::Account(m) => (5, m),
        }
    }

    /// The inverse of [`DeliveryError::to_wire`]; an unknown class is an I/O error.
    pub fn from_wire(class: u8, detail: String) -> DeliveryError {
        match class {
            1 => DeliveryError::NoSpace(detail),
            2 => DeliveryError::Quota(detail),
            4 => DeliveryError::Unsafe(detail),
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
            DeliveryError::Unsafe(_) => Reply::new(
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
            DeliveryError::Unsafe(m) => write!(f, "unsafe mailbox: {m}"),
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
    pub fn root(path: &Path) -> std::io::Result<Layout> {
        std::fs::create_dir_all(path)?;
        let fd = open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        let st = nix::sys::stat::fstat(&fd).map_err(std::io::Error::from)?;
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "must belong to uid {me} and not be writable by group or others (it is uid {}, mode {:o})",
                st.st_uid,
                st.st_mode & 0o7777
            )));
        }
        Ok(Layout::Root(fd))
    }
}

/// One account's copy of the message in progress.
struct Copy {
    account: String,
    maildir: Maildir,
    tmp_name: String,
    file: File,
    size: u64,
}

#[derive(Default)]
struct Pending {
    copies: Vec<Copy>,
    error: Option<DeliveryError>,
}

impl Pending {
    fn fail(&mut self, e: DeliveryError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Removes every tmp file (nothing of this transaction becomes visible).
    fn discard(self) {
        for c in self.copies {
            drop(c.file);
            c.maildir.remove_tmp(&c.tmp_name);
        }
    }
}

/// The Maildir writer. `conn` keys identify the connection a transaction belongs to.
pub struct Deliverer {
    hostname: String,
    /// The hostname with `/` and `:` escaped, as it goes into file names (maildir(5)).
    name_host: String,
    layout: Layout,
    pending: HashMap<u64, Pending>,
    outcomes: VecDeque<(u64, DeliveryOutcome)>,
    counter: u64,
    pid: u32,
}

impl Deliverer {
    pub fn new(hostname: &str, layout: Layout) -> Deliverer {
        Deliverer {
            hostname: hostname.to_string(),
            name_host: escape_host(hostname),
            layout,
            pending: HashMap::new(),
            outcomes: VecDeque::new(),
            counter: 0,
            pid: std::process::id(),
        }
    }

    /// Maildir unique name: `<secs>.M<usecs>P<pid>Q<n>.<host>` (maildir(5), Dovecot's form).
    fn unique(&mut self) -> String {
        self.counter += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            self.pid,
            self.counter,
            self.name_host
        )
    }

    fn open_maildir(&self, account: &str) -> Result<Maildir, DeliveryError> {
        // The recipient is looked up again here, by the writer: it trusts only NSS, not the
        // session, for the identity it writes with.
        let acct = lookup_account(account)
            .map_err(|e| DeliveryError::Account(e.to_string()))?
            .ok_or_else(|| {
                DeliveryError::Account(format!("{account}: no such account any more"))
            })?;
        // The name NSS returns becomes a path component under --maildir-root: it must be
        // one we would accept from a client (no '/', no '..'), whatever the backend says.
        if !crate::recipient::is_account_name(&acct.name) {
            return Err(DeliveryError::Account(format!(
                "NSS returned the unusable account name {:?}",
                acct.name
            )));
        }
        let owner = if privileges::privileged() {
            Owner {
                uid: acct.uid,
                gid: acct.gid,
            }
        } else {
            Owner {
                uid: nix::unistd::geteuid(),
                gid: nix::unistd::getegid(),
            }
        };
        match &self.layout {
            Layout::Home => Maildir::open_in_home(&acct.home, owner),
            Layout::Root(fd) => Maildir::open_in_root(fd, &acct.name, owner),
        }
    }

    /// DATA began: create a tmp file per account and write its trace fields.
    pub fn begin(&mut self, conn: u64, tx: &Transaction, trace: &Trace) {
        let mut p = Pending::default();
        for account in tx.accounts() {
            let name = self.unique();
            let r = self
                .open_maildir(&account)
                .and_then(|md| md.create_tmp(&name).map(|file| (md, file)));
            let (maildir, file) = match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("delivery to {account} cannot start: {e}");
                    p.fail(e);
                    break;
                }
            };
            // Listed before anything is written, so a failure from here on removes it.
            let head = trace.for_account(&account, &self.hostname);
            p.copies.push(Copy {
                account,
                maildir,
                tmp_name: name,
                file,
                size: 0,
            });
            if let Some(c) = p.copies.last_mut() {
                match c.file.write_all(&head) {
                    Ok(()) => c.size = head.len() as u64,
                    Err(e) => {
                        let e = DeliveryError::from_io(e, &format!("write tmp/{}", c.tmp_name));
                        warn!("delivery to {} cannot start: {e}", c.account);
                        p.fail(e);
                        break;
                    }
                }
            }
        }
        if let Some(old) = self.pending.insert(conn, p) {
            old.discard();
        }
    }

    /// More mail data for the transaction of `conn`.
    pub fn write(&mut self, conn: u64, data: &[u8]) {
        let Some(p) = self.pending.get_mut(&conn) else {
            return;
        };
        if p.error.is_some() {
            return;
        }
        let mut failed = None;
        for c in &mut p.copies {
            if let Err(e) = c.file.write_all(data) {
                failed = Some(DeliveryError::from_io(
                    e,
                    &format!("write tmp/{}", c.tmp_name),
                ));
                break;
            }
            c.size += data.len() as u64;
        }
        if let Some(e) = failed {
            p.fail(e);
        }
    }

    /// The transaction of `conn` will not be delivered: remove its tmp files.
    pub fn abort(&mut self, conn: u64) {
        if let Some(p) = self.pending.remove(&conn) {
            p.discard();
        }
    }

    /// End of data: make every copy durable, then visible; queue the outcome.
    pub fn finish(&mut self, conn: u64, tx_id: &str) {
        let outcome = match self.pending.remove(&conn) {
            None => Err(Reply::new(
                451,
                "4.3.0",
                "Local error: no data for transaction",
            )),
            Some(p) => Self::commit(p, tx_id).map_err(|e| e.reply()),
        };
        self.outcomes.push_back((conn, outcome));
    }

    fn commit(mut p: Pending, tx_id: &str) -> Result<(), DeliveryError> {
        // Phase 1: every tmp file durable. Nothing is visible yet, so a failure here loses
        // nothing: remove all and answer 4xx.
        if p.error.is_none() {
            for c in &mut p.copies {
                let r = c
                    .file
                    .flush()
                    .and_then(|()| c.file.sync_all())
                    .map_err(|e| DeliveryError::from_io(e, &format!("fsync tmp/{}", c.tmp_name)));
                if let Err(e) = r {
                    p.fail(e);
                    break;
                }
            }
        }
        if let Some(e) = p.error.take() {
            warn!("transaction {tx_id}: delivery failed, nothing delivered: {e}");
            p.discard();
            return Err(e);
        }
        // Phase 2: move each into new/ and make the directory entry durable.
        let mut done: Vec<(usize, String)> = Vec::new();
        let mut failure = None;
        for (i, c) in p.copies.iter().enumerate() {
            let new_name = format!("{},S={}", c.tmp_name, c.size);
            if let Err(e) = c.maildir.publish(&c.tmp_name, &new_name) {
                failure = Some(e);
                break;
            }
            // Visible from here on: listed first, so a failed fsync below rolls it back too.
            done.push((i, new_name));
            if let Err(e) = c.maildir.sync_new() {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            // Roll back what was published so the client's retry does not duplicate it.
            for (i, name) in &done {
                p.copies[*i].maildir.remove_new(name);
            }
            warn!("transaction {tx_id}: delivery failed while publishing, rolled back: {e}");
            p.discard();
            return Err(e);
        }
        for (i, name) in done {
            let c = &p.copies[i];
            info!(
                "transaction {tx_id}: delivered to {} as new/{name} ({} octets)",
                c.account, c.size
            );
        }
        Ok(())
    }

    pub fn poll_outcome(&mut self) -> Option<(u64, DeliveryOutcome)> {
        self.outcomes.pop_front()
    }
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
        assert_eq!(DeliveryError::open(Errno::ELOOP, "new").reply().code, 450);
    }
}
