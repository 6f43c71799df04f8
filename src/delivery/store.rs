//! The transaction store of the delivery side: opens recipients' tmp files, and later makes
//! them durable and visible, several transactions at a time (group commit).
//!
//! Owns every decision about *where* and *as whom* a copy is written: each account is looked
//! up again through NSS (the store trusts no name it is given), must have a usable name, and
//! uid 0 is refused unless explicitly allowed; the Maildir is opened by `maildir`, which walks
//! the path safely as the recipient. The bytes of the message are written by whoever holds the
//! descriptors [`Store::open`] hands out; the store itself never parses mail.
//! All or nothing per transaction: every copy is made durable before any is renamed or
//! linked into new/, and a failure at any step removes every copy of that transaction.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use nix::errno::Errno;
use nix::sys::stat::fstat;

use super::fskind::{self, FsKind};
use super::lookup::Lookups;
use super::maildir::{Maildir, Owner};
use super::syncer::{Policy, Syncer, Target};
use super::{escape_host, privileges, DeliveryError, Layout};
use crate::recipient::is_account_name;

/// What a committed transaction became: (account, file name in new/) per copy.
pub type Delivered = Vec<(String, String)>;

/// The copies of a transaction already linked or renamed into new/: (index, name in new/).
type Published = Vec<(usize, String)>;

/// How long an opened Maildir (account looked up, path walked and checked) is reused for
/// further deliveries to the same account. Within it, a Maildir that was moved away still
/// gets mail at its new place; one that was removed makes the delivery fail (4xx) and is
/// opened afresh. A burst of mail to one account costs one NSS lookup and one walk.
pub const MAILDIR_TTL: Duration = Duration::from_secs(2);
/// Opened Maildirs kept at most (two descriptors each), by all the agent's lanes together.
const MAILDIR_CACHE: usize = 256;

/// A new/ directory's identity: (st_dev, st_ino), when its fstat worked.
type DirKey = Option<(u64, u64)>;

/// maildir(5): files left in tmp/ for 36 hours are removed.
const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);
/// How often one Maildir's tmp/ is looked at for such files.
const TMP_CLEAN_EVERY: Duration = Duration::from_secs(3600);

/// An opened Maildir and the identity of its new/ directory.
struct Opened {
    maildir: Arc<Maildir>,
    new_key: DirKey,
    /// How syncfs behaves on new/'s filesystem, learnt when the Maildir was opened (its
    /// descriptors keep that filesystem mounted for as long as the answer is used).
    kind: FsKind,
    at: Instant,
}

/// One account's copy in progress.
struct Copy {
    account: String,
    maildir: Arc<Maildir>,
    new_key: DirKey,
    kind: FsKind,
    /// The unique name: of the file in tmp/ if `in_tmp`, and the start of its name in new/.
    name: String,
    /// Whether the copy has a name in tmp/ (to rename); otherwise it has none (to link).
    in_tmp: bool,
    fd: Arc<OwnedFd>,
}

pub struct Store {
    /// The hostname with `/` and `:` escaped, as it goes into file names (maildir(5)).
    name_host: String,
    layout: Layout,
    allow_root: bool,
    pending: HashMap<u64, Vec<Copy>>,
    /// Copies (open descriptors) in `pending`, and how many may be open at once: half the
    /// agent's descriptor limit, so that a flood of open transactions (or a receiver that
    /// was taken over) gets a 451 for the next one rather than leaving the agent without
    /// descriptors for anybody's delivery (found in review). The count is shared with the
    /// stores of the agent's other lanes (see [`Store::for_lane`]): one process, one limit.
    open_copies: Arc<AtomicUsize>,
    max_open_copies: usize,
    maildirs: HashMap<String, Opened>,
    /// Opened Maildirs kept by this store and its lanes' stores together (see
    /// [`MAILDIR_CACHE`]).
    cached_maildirs: Arc<AtomicUsize>,
    /// When each account's tmp/ was last cleaned.
    cleaned: HashMap<String, Instant>,
    syncer: Syncer,
    /// Whether copies may be created unnamed: linking them needs /proc/self/fd.
    unnamed: bool,
    /// Filesystems (st_dev of new/) without O_TMPFILE: copies there are named.
    named_devs: HashSet<u64>,
    /// Accounts whose last link into new/ failed (a security module, a new/ the user made
    /// unwritable, ...): their copies are named, so the retry takes the classic path and
    /// one account's trouble does not change anyone else's delivery.
    named_accounts: HashSet<String>,
    pid: u32,
    /// Account lookups, in a thread, waited for a bounded time.
    lookups: Lookups,
}

/// Whether copies can be created unnamed: linking one into new/ goes through /proc/self/fd.
fn unnamed_possible() -> bool {
    let ok = std::path::Path::new("/proc/self/fd").is_dir();
    if !ok {
        info!("event=named_copies reason=\"no /proc/self/fd\": every copy is created in tmp/ with a name and renamed");
    }
    ok
}

/// Undoes a transaction that failed while publishing: its copies already in new/ are
/// removed again (so the client's retry does not duplicate them), then its tmp files.
fn rollback(id: u64, copies: Vec<Copy>, done: &Published, e: &DeliveryError) {
    for (i, name) in done {
        // Found in review: a copy a mail reader has already moved out of new/ cannot be
        // taken back, and the client's retry after the 4xx will deliver it again. Said here,
        // so the postmaster can tell a duplicate's origin.
        if let Err(err) = copies[*i].maildir.remove_new(name) {
            warn!(
                "event=rollback_incomplete transaction={id} account={} file=new/{name} \
                 error={err:?}: this copy stays delivered; the client's retry will \
                 deliver it again",
                copies[*i].account
            );
        }
    }
    warn!("transaction {id}: delivery failed while publishing, rolled back: {e}");
    discard(copies);
}

fn discard(copies: Vec<Copy>) {
    for c in copies {
        drop(c.fd);
        // An unnamed copy goes with its last descriptor.
        if c.in_tmp {
            c.maildir.remove_tmp(&c.name);
        }
    }
}

/// The Q part of unique names: one counter for the whole process, whose lanes' threads
/// create files in the same second and microsecond.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Takes `n` from a shared count, never below zero.
fn release(count: &AtomicUsize, n: usize) {
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        Some(c.saturating_sub(n))
    });
}

/// Half the soft limit on open descriptors (at least 64): the copies of open transactions
/// may use that many, the rest is left for Maildirs, the syncer and the channel.
fn max_open_copies() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 2).unwrap_or(usize::MAX).max(64)
}

impl Drop for Store {
    /// However the agent ends, no tmp file of an unfinished transaction stays behind.
    fn drop(&mut self) {
        self.abort_all();
        release(&self.cached_maildirs, self.maildirs.len());
    }
}

impl Store {
    /// `allow_root`: whether copies may be written as uid 0 (root's own Maildir).
    pub fn new(hostname: &str, layout: Layout, allow_root: bool) -> Store {
        Store::with(
            escape_host(hostname),
            layout,
            allow_root,
            (Arc::default(), Arc::default()),
        )
    }

    /// `shared`: the counts of open copies and of kept Maildirs, shared with other lanes.
    fn with(
        name_host: String,
        layout: Layout,
        allow_root: bool,
        shared: (Arc<AtomicUsize>, Arc<AtomicUsize>),
    ) -> Store {
        Store {
            name_host,
            layout,
            allow_root,
            pending: HashMap::new(),
            open_copies: shared.0,
            max_open_copies: max_open_copies(),
            maildirs: HashMap::new(),
            cached_maildirs: shared.1,
            cleaned: HashMap::new(),
            syncer: Syncer::new(Policy::Adaptive),
            unnamed: unnamed_possible(),
            named_devs: HashSet::new(),
            named_accounts: HashSet::new(),
            pid: std::process::id(),
            lookups: Lookups::default(),
        }
    }

    /// A store for another lane of the agent (a thread serving the accounts of one
    /// filesystem): the same host name and rules, its own Maildirs, transactions, barriers
    /// and lookups, the limit on open copies shared. Homes only: under `--maildir-root` every
    /// Maildir is on one filesystem, and the receiver asks for no lane.
    pub fn for_lane(&self) -> Option<Store> {
        match self.layout {
            Layout::Home => Some(Store::with(
                self.name_host.clone(),
                Layout::Home,
                self.allow_root,
                (self.open_copies.clone(), self.cached_maildirs.clone()),
            )),
            Layout::Root(_) => None,
        }
    }

    /// Maildir unique name: `<secs>.M<usecs>P<pid>Q<n>.<host>` (maildir(5), Dovecot's form).
    fn unique(&mut self) -> String {
        let q = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            self.pid,
            q,
            self.name_host
        )
    }

    /// The account's Maildir: reused if opened less than [`MAILDIR_TTL`] ago.
    fn maildir(&mut self, account: &str) -> Result<(Arc<Maildir>, DirKey, FsKind), DeliveryError> {
        let now = Instant::now();
        if let Some(o) = self.maildirs.get(account) {
            if now.duration_since(o.at) < MAILDIR_TTL {
                return Ok((o.maildir.clone(), o.new_key, o.kind));
            }
        }
        let maildir = Arc::new(self.open_maildir(account)?);
        let new_key = maildir.new_dir_key();
        let kind = match new_key {
            Some((dev, _)) => fskind::of(maildir.new_fd().as_fd(), dev),
            None => FsKind::FsyncOnly,
        };
        if self
            .cleaned
            .get(account)
            .is_none_or(|at| now.duration_since(*at) >= TMP_CLEAN_EVERY)
        {
            if self.cleaned.len() >= 4096 {
                self.cleaned.clear();
            }
            self.cleaned.insert(account.to_string(), now);
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let n = maildir.clean_tmp(TMP_MAX_AGE, unix);
            if n > 0 {
                info!("event=tmp_cleaned account={account} files={n} older_than=36h");
            }
        }
        let full = || self.cached_maildirs.load(Ordering::Relaxed) >= MAILDIR_CACHE;
        if full() {
            let before = self.maildirs.len();
            self.maildirs
                .retain(|_, o| now.duration_since(o.at) < MAILDIR_TTL);
            release(&self.cached_maildirs, before - self.maildirs.len());
            if full() {
                release(&self.cached_maildirs, self.maildirs.len());
                self.maildirs.clear();
            }
        }
        // Other lanes may keep all there is room for: then this one is not kept.
        if !full() || self.maildirs.contains_key(account) {
            let opened = Opened {
                maildir: maildir.clone(),
                new_key,
                kind,
                at: now,
            };
            if self.maildirs.insert(account.to_string(), opened).is_none() {
                self.cached_maildirs.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok((maildir, new_key, kind))
    }

    /// Whether any opened Maildir is kept (see [`Store::prune`]).
    pub fn keeps_maildirs(&self) -> bool {
        !self.maildirs.is_empty()
    }

    /// Lets go of the opened Maildirs kept longer than [`MAILDIR_TTL`]: called by a lane
    /// with nothing to do, so that what it no longer uses does not count against the
    /// others' share of [`MAILDIR_CACHE`].
    pub fn prune(&mut self) {
        let now = Instant::now();
        let before = self.maildirs.len();
        self.maildirs
            .retain(|_, o| now.duration_since(o.at) < MAILDIR_TTL);
        release(&self.cached_maildirs, before - self.maildirs.len());
    }

    /// Forgets an opened Maildir after a failure in it: the next delivery walks afresh.
    fn forget(&mut self, account: &str) {
        if self.maildirs.remove(account).is_some() {
            release(&self.cached_maildirs, 1);
        }
    }

    fn open_maildir(&mut self, account: &str) -> Result<Maildir, DeliveryError> {
        // NSS may read files and talk to a daemon over a socket: with the agent's resting
        // identity, not as the last recipient, nor as root.
        privileges::rest().map_err(|e| DeliveryError::io(e, "taking the agent's own identity"))?;
        if !is_account_name(account) {
            return Err(DeliveryError::Account(format!(
                "{account:?} is not an account name"
            )));
        }
        let acct = self
            .lookups
            .account(account)?
            .ok_or_else(|| DeliveryError::Account(format!("{account}: no such account")))?;
        // The name NSS returns becomes a path component under --maildir-root: it must be
        // one we would accept from a client (no '/', no '..'), whatever the backend says.
        if !is_account_name(&acct.name) {
            return Err(DeliveryError::Account(format!(
                "NSS returned the unusable account name {:?}",
                acct.name
            )));
        }
        // Only a privileged agent takes the account's identity; unprivileged, every copy is
        // written as ourselves whatever the account's uid.
        if acct.uid.is_root() && privileges::privileged() && !self.allow_root {
            return Err(DeliveryError::Unavailable(format!(
                "{account} is uid 0 and delivery as root is not allowed"
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

    /// One copy in `md`: unnamed where that works on its filesystem (`false`), otherwise
    /// `tmp/<name>` (`true`). A filesystem of unknown identity gets named copies.
    fn create_copy(
        &mut self,
        account: &str,
        md: &Maildir,
        key: DirKey,
        name: &str,
    ) -> Result<(std::fs::File, bool), DeliveryError> {
        if let Some((dev, _)) = key {
            if self.unnamed
                && !self.named_devs.contains(&dev)
                && !self.named_accounts.contains(account)
            {
                match md.create_unnamed()? {
                    Ok(file) => return Ok((file, false)),
                    Err(e) => self.use_named(dev, &format!("O_TMPFILE: {e}")),
                }
            }
        }
        Ok((md.create_tmp(name)?, true))
    }

    /// From now on, copies on filesystem `dev` are created named (logged once per filesystem).
    fn use_named(&mut self, dev: u64, why: &str) {
        if self.named_devs.insert(dev) {
            info!("event=named_copies dev={dev} reason={why:?}: copies on this filesystem are created in tmp/ with a name and renamed");
        }
    }

    /// From now on, `account`'s copies are created named (logged once per account).
    fn use_named_for(&mut self, account: &str, why: &str) {
        if self.named_accounts.len() >= 4096 {
            self.named_accounts.clear();
        }
        if self.named_accounts.insert(account.to_string()) {
            info!("event=named_copies account={account} reason={why:?}: this account's copies are created in tmp/ with a name and renamed");
        }
    }

    /// Whether each account's Maildir can take mail now (the Check request, at RCPT time): it
    /// is opened as a delivery opens it (and kept, so the delivery that follows reuses it),
    /// and the recipient must be able to write in tmp/ and new/. The first failure is the
    /// answer; the Maildir that failed is forgotten, so the next try walks afresh.
    pub fn check(&mut self, accounts: &[String]) -> Result<(), DeliveryError> {
        for account in accounts {
            let r = self
                .maildir(account)
                .and_then(|(md, _, _)| md.check_writable());
            if let Err(e) = r {
                warn!(
                    "event=check_failed account={account:?} error={:?}",
                    e.to_string()
                );
                self.forget(account);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Creates a copy in tmp/ for each account (each once) and returns a descriptor of each,
    /// in order, for the writer. On any failure nothing is left behind.
    pub fn open(
        &mut self,
        id: u64,
        accounts: &[String],
    ) -> Result<Vec<Arc<OwnedFd>>, DeliveryError> {
        if self.pending.contains_key(&id) {
            return Err(DeliveryError::Io(format!(
                "transaction {id} is already open"
            )));
        }
        // At most one copy per account named (the loop below skips a repeated one).
        // Taken before any is opened, so lanes opening at the same time cannot all pass.
        let (want, max) = (accounts.len(), self.max_open_copies);
        let taken = self
            .open_copies
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c + want <= max).then_some(c + want)
            });
        if let Err(open) = taken {
            return Err(DeliveryError::Io(format!(
                "{open} copies already open, at most {max} at once"
            )));
        }
        let mut copies: Vec<Copy> = Vec::new();
        let mut out = Vec::new();
        for account in accounts {
            if copies.iter().any(|c| &c.account == account) {
                continue;
            }
            let name = self.unique();
            let r = match self.maildir(account) {
                Ok((md, key, kind)) => self
                    .create_copy(account, &md, key, &name)
                    .map(|(file, in_tmp)| (md, key, kind, file, in_tmp)),
                Err(e) => Err(e),
            };
            let (maildir, new_key, kind, file, in_tmp) = match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("delivery to {account:?} cannot start: {e}");
                    self.forget(account);
                    discard(copies);
                    release(&self.open_copies, want);
                    return Err(e);
                }
            };
            let fd = Arc::new(OwnedFd::from(file));
            out.push(fd.clone());
            copies.push(Copy {
                account: account.clone(),
                maildir,
                new_key,
                kind,
                name,
                in_tmp,
                fd,
            });
        }
        // A repeated account got no copy of its own.
        release(&self.open_copies, want - copies.len());
        self.pending.insert(id, copies);
        Ok(out)
    }

    /// Writes a whole small message into the copies of `id` (see protocol's Deliver): each
    /// copy gets its account's trace fields, then the data. On failure the caller aborts.
    pub fn write(&mut self, id: u64, heads: &[Vec<u8>], data: &[u8]) -> Result<(), DeliveryError> {
        let Some(copies) = self.pending.get(&id) else {
            return Err(DeliveryError::Io(format!("no open transaction {id}")));
        };
        // The receiver sends one head per account it asked for, duplicates removed; a
        // mismatch is a confused (or forged) request.
        if copies.len() != heads.len() {
            return Err(DeliveryError::Io(format!(
                "transaction {id}: {} trace headers for {} copies",
                heads.len(),
                copies.len()
            )));
        }
        for (c, head) in copies.iter().zip(heads) {
            c.maildir.write_copy(&c.fd, head, data)?;
        }
        Ok(())
    }

    /// Removes the tmp files of `id` (nothing of it becomes visible).
    pub fn abort(&mut self, id: u64) {
        if let Some(c) = self.pending.remove(&id) {
            release(&self.open_copies, c.len());
            discard(c);
        }
    }

    /// How the group commit's barriers went so far (logged when the agent's receiver
    /// closes).
    pub fn sync_stats(&self) -> super::syncer::SyncStats {
        self.syncer.stats()
    }

    /// Removes the tmp files of every open transaction.
    pub fn abort_all(&mut self) {
        for (_, c) in self.pending.drain() {
            release(&self.open_copies, c.len());
            discard(c);
        }
    }

    /// Makes the copies of every transaction in `ids` durable and visible, together: first
    /// every copy is made durable (see `syncer`: one syncfs, or concurrent fsyncs), then each
    /// is linked or renamed into new/ (named with its size), then each new/ directory involved
    /// is made durable once, with the link counts of the copies linked into it. Each
    /// transaction succeeds or fails as a whole; a failed one leaves nothing behind. A
    /// delivered one reports, per copy, the account and the file name in new/.
    pub fn commit(&mut self, ids: &[u64]) -> Vec<(u64, Result<Delivered, DeliveryError>)> {
        let mut results = Vec::with_capacity(ids.len());
        let mut batch: Vec<(u64, Vec<Copy>)> = Vec::new();
        for &id in ids {
            match self.pending.remove(&id) {
                Some(copies) => {
                    release(&self.open_copies, copies.len());
                    batch.push((id, copies))
                }
                None => results.push((
                    id,
                    Err(DeliveryError::Io(format!("no open transaction {id}"))),
                )),
            }
        }
        // Phase 1: every file durable. Nothing is visible yet: a failure loses nothing.
        let targets: Vec<Target> = batch
            .iter()
            .flat_map(|(_, copies)| copies.iter())
            .map(|c| Target {
                fd: c.fd.clone(),
                dev: c.new_key.map(|k| k.0),
                kind: c.kind,
            })
            .collect();
        let mut synced = self.syncer.sync(&targets).into_iter();
        let mut ready: Vec<(u64, Vec<Copy>)> = Vec::new();
        for (id, copies) in batch {
            let mut failure = None;
            for c in &copies {
                if let Some(Err(e)) = synced.next() {
                    failure.get_or_insert(DeliveryError::io(e, format!("sync of copy {}", c.name)));
                }
            }
            match failure {
                None => ready.push((id, copies)),
                Some(e) => {
                    warn!("transaction {id}: nothing delivered: {e}");
                    discard(copies);
                    results.push((id, Err(e)));
                }
            }
        }
        // Phase 2: every copy of every transaction linked or renamed into new/. A failure
        // rolls back that transaction's copies already there.
        let mut published: Vec<(u64, Vec<Copy>, Published)> = Vec::new();
        for (id, copies) in ready {
            let mut done: Vec<(usize, String)> = Vec::new();
            let mut failure = None;
            for (i, c) in copies.iter().enumerate() {
                let size = match fstat(c.fd.as_fd()) {
                    Ok(st) => st.st_size,
                    Err(e) => {
                        failure = Some(DeliveryError::io(e, "stat of the tmp file"));
                        break;
                    }
                };
                let new_name = format!("{},S={size}", c.name);
                let r = if c.in_tmp {
                    c.maildir.publish(&c.name, &new_name)
                } else {
                    match c.maildir.link_new(&c.fd, &new_name) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            // Space or quota, a name taken, a failing or read-only disk:
                            // this link failed. Anything else (a security module, a new/
                            // the user made unwritable, EXDEV, EPERM...): this account's
                            // later copies, the client's retry among them, are named, and
                            // meet the classic path's own checks (found in review).
                            if !matches!(
                                e,
                                Errno::EEXIST
                                    | Errno::ENOSPC
                                    | Errno::EDQUOT
                                    | Errno::EIO
                                    | Errno::EROFS
                            ) {
                                self.use_named_for(&c.account, &format!("linkat: {e}"));
                            }
                            Err(DeliveryError::access(
                                e,
                                format!("link into new/{new_name}"),
                            ))
                        }
                        Err(e) => Err(e),
                    }
                };
                if let Err(e) = r {
                    self.forget(&c.account);
                    failure = Some(e);
                    break;
                }
                // Visible from here on: listed first, so a failure below rolls it back too.
                done.push((i, new_name));
            }
            match failure {
                None => published.push((id, copies, done)),
                Some(e) => {
                    rollback(id, copies, &done, &e);
                    results.push((id, Err(e)));
                }
            }
        }
        // Phase 3: each new/ directory involved made durable once, *after* every rename or
        // link into it, so no answer goes out before its directory entry is durable; and
        // with them every linked copy, whose new link count an fsync of new/ does not
        // promise to write (one syncfs covers both where the syncer chooses it, followed by
        // one more flush where that filesystem's syncfs does not end with a commit:
        // `Syncer::sync`, `fskind`). A directory whose identity is unknown is
        // synced on its own.
        let mut dirs: Vec<(DirKey, Arc<Maildir>, FsKind)> = Vec::new();
        for (_, copies, _) in &published {
            for c in copies {
                if c.new_key.is_none() || !dirs.iter().any(|(k, _, _)| *k == c.new_key) {
                    dirs.push((c.new_key, c.maildir.clone(), c.kind));
                }
            }
        }
        let dir_targets: Vec<Target> = dirs
            .iter()
            .map(|(k, md, kind)| Target {
                fd: md.new_fd(),
                dev: k.map(|k| k.0),
                kind: *kind,
            })
            .collect();
        let linked: Vec<Target> = published
            .iter()
            .flat_map(|(_, copies, _)| copies.iter())
            .filter(|c| !c.in_tmp)
            .map(|c| Target {
                fd: c.fd.clone(),
                dev: c.new_key.map(|k| k.0),
                kind: c.kind,
            })
            .collect();
        // A new/ directory on a filesystem where copies were linked is synced with them (one
        // syncfs covers both where the syncer chooses it, and a failed one falls back to an
        // fsync of each); any other directory is fsynced (found in review: a named copy's
        // new/ on FUSE must not count on a syncfs that does not reach it).
        let linked_devs: Vec<u64> = linked.iter().filter_map(|t| t.dev).collect();
        let (with_links, alone): (Vec<usize>, Vec<usize>) = (0..dir_targets.len())
            .partition(|&i| dir_targets[i].dev.is_some_and(|d| linked_devs.contains(&d)));
        let mut by_dir: Vec<Option<Result<(), Errno>>> = vec![None; dir_targets.len()];
        let alone_targets: Vec<Target> = alone.iter().map(|&i| dir_targets[i].clone()).collect();
        for (&i, r) in alone.iter().zip(self.syncer.sync_dirs(&alone_targets)) {
            by_dir[i] = Some(r);
        }
        let together: Vec<Target> = with_links
            .iter()
            .map(|&i| dir_targets[i].clone())
            .chain(linked.iter().cloned())
            .collect();
        let mut together_results = if together.is_empty() {
            Vec::new()
        } else {
            self.syncer.sync(&together)
        };
        let mut linked_results = together_results
            .split_off(with_links.len().min(together_results.len()))
            .into_iter();
        for (&i, r) in with_links.iter().zip(together_results) {
            by_dir[i] = Some(r);
        }
        // A directory without a result (a syncer that answered short) counts as failed.
        let dir_results: Vec<Result<(), Errno>> = by_dir
            .into_iter()
            .map(|r| r.unwrap_or(Err(Errno::EIO)))
            .collect();
        let failed_dir = |md: &Arc<Maildir>, key: DirKey| -> Option<String> {
            dirs.iter()
                .zip(&dir_results)
                .find(|((k, m, _), _)| {
                    if key.is_some() {
                        *k == key
                    } else {
                        Arc::ptr_eq(m, md)
                    }
                })
                .and_then(|(_, r)| r.as_ref().err().map(|e| format!("sync of new/: {e}")))
        };
        for (id, copies, done) in published {
            // Every linked copy's result is taken, in the order `linked` was built.
            let link_failed: Vec<String> = copies
                .iter()
                .filter(|c| !c.in_tmp)
                .filter_map(|c| match linked_results.next() {
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(format!("sync of linked copy {}: {e}", c.name)),
                    None => Some(format!("sync of linked copy {}: no result", c.name)),
                })
                .collect();
            let failed = copies
                .iter()
                .find_map(|c| failed_dir(&c.maildir, c.new_key))
                .or(link_failed.into_iter().next());
            if let Some(why) = failed {
                let e = DeliveryError::Io(why);
                rollback(id, copies, &done, &e);
                results.push((id, Err(e)));
                continue;
            }
            let delivered = done
                .into_iter()
                .map(|(i, name)| (copies[i].account.clone(), name))
                .collect();
            results.push((id, Ok(delivered)));
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store delivering under a fresh `--maildir-root` in the temporary directory, and
    /// the account this test runs as, its one recipient.
    fn scratch_store(tag: &str) -> (std::path::PathBuf, Store, [String; 1]) {
        let dir = std::env::temp_dir().join(format!("inboxd-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layout = Layout::root(&dir).unwrap();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        (dir, Store::new("host.test", layout, true), [me])
    }

    /// A commit that fails in new/ forgets the Maildir, and its place in the count shared
    /// by the lanes (found in review: it was kept counted for good, and after 256 such
    /// failures no lane kept any Maildir).
    #[test]
    fn a_failed_commit_lets_go_of_its_maildir() {
        let (dir, mut store, one) = scratch_store("fail");
        let me = one[0].clone();
        assert!(store.open(1, &one).is_ok());
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), 1);
        // new/ goes away under the opened Maildir: the link into it fails.
        std::fs::remove_dir(dir.join(&me).join("new")).unwrap();
        store.write(1, &[Vec::new()], b"x\n").unwrap();
        let r = store.commit(&[1]);
        assert!(r[0].1.is_err(), "{:?}", r[0].1);
        assert!(store.maildirs.is_empty());
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), 0);
        assert_eq!(store.open_copies.load(Ordering::Relaxed), 0);
        // What an idle lane kept longer than MAILDIR_TTL is let go by prune.
        assert!(store.open(3, &one).is_ok(), "the walk makes new/ again");
        assert!(store.keeps_maildirs());
        store.prune();
        assert_eq!(
            store.cached_maildirs.load(Ordering::Relaxed),
            1,
            "not expired yet"
        );
        for o in store.maildirs.values_mut() {
            o.at -= MAILDIR_TTL;
        }
        store.prune();
        assert!(!store.keeps_maildirs());
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), 0);
        store.abort_all();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_copies_are_capped() {
        let (dir, mut store, one) = scratch_store("cap");
        store.max_open_copies = 3;
        for id in 1..=3 {
            assert!(store.open(id, &one).is_ok(), "transaction {id}");
        }
        assert!(matches!(store.open(4, &one), Err(DeliveryError::Io(_))));
        store.abort(1);
        assert!(store.open(4, &one).is_ok());
        assert_eq!(store.open_copies.load(Ordering::Relaxed), 3);
        // Another lane's store shares the limit.
        let mut lane = Store::new("host.test", Layout::Home, true);
        lane.open_copies = store.open_copies.clone();
        lane.max_open_copies = 3;
        assert!(matches!(lane.open(5, &one), Err(DeliveryError::Io(_))));
        store.abort_all();
        assert_eq!(store.open_copies.load(Ordering::Relaxed), 0);
        // Kept Maildirs are counted for all lanes together: one kept, then forgotten; with
        // the count full (other lanes keep all there is room for) none is kept.
        assert_eq!(store.maildirs.len(), 1);
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), 1);
        store.forget(&one[0]);
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), 0);
        store
            .cached_maildirs
            .store(MAILDIR_CACHE, Ordering::Relaxed);
        assert!(store.open(6, &one).is_ok());
        assert!(store.maildirs.is_empty());
        assert_eq!(store.cached_maildirs.load(Ordering::Relaxed), MAILDIR_CACHE);
        store.abort_all();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
