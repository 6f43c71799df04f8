//! Making a batch of files (and then their directories) durable, fast, without making other
//! writers on the host pay for it: the group-commit engine of the delivery agent.
//!
//! Owns the choice between two ways, per batch (measured in README "Group commit"):
//! - **one syncfs() per filesystem**, when the host has little dirty data besides ours
//!   (`Dirty` + `Writeback` in /proc/meminfo at most [`SYNCFS_DIRTY_LIMIT`]): then it costs
//!   what flushing our own files costs, and it is the fastest way;
//! - otherwise **one fsync per file, all at once** from a small pool of threads, so the disk
//!   sees them together and the journal or cache flushes are shared: syncfs would wait for
//!   everybody's dirty data (measured: 40 files/s beside a streaming writer) and push it out
//!   early.
//!
//! syncfs is used only on filesystems whose syncfs writes every change ([`FsKind`]: ext4, XFS,
//! Btrfs); files and directories anywhere else get an fsync each. Where that filesystem's
//! syncfs does not end with a commit (ext4 without a journal), every syncfs is followed by an
//! fsync, which flushes the disk's cache once more after every write the syncfs made: for the
//! first barrier too, or a directory block that something else writes before the last
//! barrier could reach the disk before the file's inode (found in review). After a syncfs,
//! each file still asks for its own writeback error (sync_file_range), since syncfs reports an
//! error only to its first caller. Directories are fsynced ([`Syncer::sync_dirs`]), except
//! where the store passes a new/ directory to [`Syncer::sync`] with the copies just linked
//! into it, on their filesystem: the syncfs that writes their link counts writes it too, and
//! a failure falls back to an fsync of each.
//!
//! It must not decide what is made durable or in what order: the store calls it for the files
//! of a batch, then links or renames them, then calls it for the new/ directories. The pool's threads only
//! call fsync, which needs no identity; they block the signals the agent blocks (inherited).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use nix::errno::Errno;

use super::fskind::FsKind;

/// Above this much dirty or in-flight page cache on the host (bytes), a batch is not made
/// durable with syncfs, which would write (and wait for) all of it.
pub const SYNCFS_DIRTY_LIMIT: u64 = 4 << 20;
/// Threads that fsync concurrently.
const POOL_THREADS: usize = 16;

/// What to make durable: a descriptor, and the filesystem (st_dev) it is on, if known (a
/// target on an unknown filesystem is always fsynced on its own).
#[derive(Clone)]
pub struct Target {
    pub fd: Arc<OwnedFd>,
    pub dev: Option<u64>,
    /// How syncfs behaves on that filesystem ([`FsKind::FsyncOnly`] when not known).
    pub kind: FsKind,
}

/// How a batch is made durable; `Adaptive` is what the agent uses, the others are for
/// measuring (examples/group_commit.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Adaptive,
    /// Always one fsync per file, concurrently.
    ParallelFsync,
    /// Always one fsync per file, one after the other.
    SerialFsync,
}

type Job = (usize, Arc<OwnedFd>);

struct Pool {
    jobs: Sender<Job>,
    done: Receiver<(usize, Result<(), Errno>)>,
}

pub struct Syncer {
    policy: Policy,
    pool: Option<Pool>,
    stats: SyncStats,
}

/// How the barriers went since the agent started: logged when it ends, so a test or a
/// benchmark can tell which way its batches were made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Barriers made by fsync (one target, a fixed policy, a host with dirty data,
    /// directories alone, or the targets of a syncfs barrier that syncfs does not cover).
    pub fsync_barriers: u64,
    /// syncfs calls, one per filesystem per barrier.
    pub syncfs: u64,
    /// Of those: followed by an fsync for one more flush ...
    pub flush_after_syncfs: u64,
    /// ... or not, on a filesystem whose syncfs ends with a commit.
    pub syncfs_commit_enough: u64,
}

impl std::fmt::Display for SyncStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fsync_barriers={} syncfs={} flush_after_syncfs={} syncfs_commit_enough={}",
            self.fsync_barriers, self.syncfs, self.flush_after_syncfs, self.syncfs_commit_enough
        )
    }
}

impl Syncer {
    pub fn new(policy: Policy) -> Syncer {
        Syncer {
            policy,
            pool: None,
            stats: SyncStats::default(),
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// Makes directories durable: always one fsync each (concurrently), never syncfs, whose
    /// error reporting cannot be asked per directory afterwards.
    pub fn sync_dirs(&mut self, targets: &[Target]) -> Vec<Result<(), Errno>> {
        if !targets.is_empty() {
            self.stats.fsync_barriers += 1;
        }
        if targets.len() <= 1 {
            return targets.iter().map(|t| fsync(&t.fd)).collect();
        }
        self.parallel_fsync(targets)
    }

    /// Makes every target durable; one result per target, in order.
    pub fn sync(&mut self, targets: &[Target]) -> Vec<Result<(), Errno>> {
        if targets.is_empty() {
            return Vec::new();
        }
        let by_syncfs = targets.iter().filter(|t| syncfs_covers(t)).count();
        if self.policy == Policy::Adaptive && by_syncfs > 1 && little_dirty() {
            return self.by_syncfs(targets);
        }
        self.stats.fsync_barriers += 1;
        if self.policy == Policy::SerialFsync || targets.len() == 1 {
            return targets.iter().map(|t| fsync(&t.fd)).collect();
        }
        self.parallel_fsync(targets)
    }

    /// One syncfs per filesystem whose syncfs writes every change, followed by an fsync of
    /// one of its targets where that filesystem's syncfs does not end with a commit (the
    /// kernel's syncfs, sync_filesystem in fs/sync.c, asks the filesystem to flush, through
    /// ->sync_fs, before it writes the block device's own buffers, where ext4 without a
    /// journal keeps inodes and directory blocks; read in the kernel's source, not seen:
    /// `reliability/power-cut` found no loss at an exact cut, and cannot show a flush
    /// overtaking a write in flight). If either fails, the files on that filesystem are
    /// fsynced one by one, so each gets its own answer; the target whose trailing fsync
    /// failed keeps that failure (found in review: an error an fsync reports is not reported
    /// to the next fsync of the same file, so asking again could answer Ok). Targets on any
    /// other filesystem, or on an unknown one, are fsynced.
    fn by_syncfs(&mut self, targets: &[Target]) -> Vec<Result<(), Errno>> {
        // Per filesystem: the syncfs (and trailing fsync) result, and the index of the target
        // whose trailing fsync failed.
        let mut devs: Vec<(u64, Result<(), Errno>, Option<usize>)> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let Some(dev) = t.dev.filter(|_| syncfs_covers(t)) else {
                continue;
            };
            if devs.iter().any(|(d, _, _)| *d == dev) {
                continue;
            }
            let mut r = nix::unistd::syncfs(t.fd.as_fd());
            self.stats.syncfs += 1;
            let mut failed_flush = None;
            if r.is_ok() {
                // The flush is left out only if every target on this filesystem says its
                // syncfs commits (they all do, or none: the kind is the filesystem's; found in
                // review).
                let commits = targets
                    .iter()
                    .filter(|u| u.dev == Some(dev) && syncfs_covers(u))
                    .all(|u| u.kind == FsKind::Commits);
                if commits {
                    self.stats.syncfs_commit_enough += 1;
                } else {
                    self.stats.flush_after_syncfs += 1;
                    r = fsync(&t.fd);
                    if r.is_err() {
                        failed_flush = Some(i);
                    }
                }
            }
            if let Err(e) = r {
                warn!("syncfs (or the fsync after it) failed ({e}); fsyncing each file instead");
            }
            devs.push((dev, r, failed_flush));
        }
        let mut results: Vec<Option<Result<(), Errno>>> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let dev = t.dev.filter(|_| syncfs_covers(t))?;
                match devs.iter().find(|(d, _, _)| *d == dev) {
                    // syncfs reports a writeback error once, to whoever asks first (an earlier
                    // batch, say), so each file asks for its own (found in review, reproduced
                    // on a failing loop device): waiting on its writeback says whether its
                    // data made it.
                    Some((_, Ok(()), _)) => Some(crate::sys::wait_for_writeback(t.fd.as_fd())),
                    Some((_, Err(e), Some(j))) if *j == i => Some(Err(*e)),
                    _ => None,
                }
            })
            .collect();
        // Everything else: an fsync each, at once.
        let rest: Vec<usize> = (0..targets.len())
            .filter(|&i| results[i].is_none())
            .collect();
        if !rest.is_empty() {
            self.stats.fsync_barriers += 1;
            let rest_targets: Vec<Target> = rest.iter().map(|&i| targets[i].clone()).collect();
            let done = if rest_targets.len() == 1 {
                vec![fsync(&rest_targets[0].fd)]
            } else {
                self.parallel_fsync(&rest_targets)
            };
            for (&i, r) in rest.iter().zip(done) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Errno::EIO)))
            .collect()
    }

    fn parallel_fsync(&mut self, targets: &[Target]) -> Vec<Result<(), Errno>> {
        if self.pool.is_none() {
            self.pool = start_pool();
        }
        let Some(pool) = &self.pool else {
            return targets.iter().map(|t| fsync(&t.fd)).collect();
        };
        let mut results: Vec<Option<Result<(), Errno>>> = vec![None; targets.len()];
        let mut sent = 0;
        for (i, t) in targets.iter().enumerate() {
            if pool.jobs.send((i, t.fd.clone())).is_err() {
                results[i] = Some(fsync(&t.fd));
            } else {
                sent += 1;
            }
        }
        for _ in 0..sent {
            match pool.done.recv() {
                Ok((i, r)) => results[i] = Some(r),
                Err(_) => break,
            }
        }
        // A job whose answer never came (a pool thread died): do it here.
        results
            .into_iter()
            .zip(targets)
            .map(|(r, t)| r.unwrap_or_else(|| fsync(&t.fd)))
            .collect()
    }
}

fn fsync(fd: &OwnedFd) -> Result<(), Errno> {
    nix::unistd::fsync(fd.as_fd())
}

/// Whether a syncfs of the target's filesystem writes the target's changes.
fn syncfs_covers(t: &Target) -> bool {
    t.dev.is_some() && t.kind.syncfs_writes_all()
}

/// Whether the host's dirty and under-writeback page cache is small enough that syncfs costs
/// about what our own files cost. Unknown (no /proc) counts as not small.
fn little_dirty() -> bool {
    // One read(2) into a buffer large enough for the whole file (about 1.5 KiB) rather than
    // read_to_string's growing reads: this runs before every batch.
    use std::io::Read;
    let mut buf = [0u8; 8192];
    let Ok(mut f) = std::fs::File::open("/proc/meminfo") else {
        return false;
    };
    let Ok(n) = f.read(&mut buf) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&buf[..n]) else {
        return false;
    };
    match dirty_bytes(text) {
        Some(b) => b <= SYNCFS_DIRTY_LIMIT,
        None => false,
    }
}

/// `Dirty` + `Writeback` of /proc/meminfo, in bytes.
fn dirty_bytes(meminfo: &str) -> Option<u64> {
    let mut sum = 0;
    let mut found = 0;
    for line in meminfo.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        if key == "Dirty" || key == "Writeback" {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            sum += kb * 1024;
            found += 1;
        }
    }
    (found == 2).then_some(sum)
}

fn start_pool() -> Option<Pool> {
    let (jobs, job_rx) = channel::<Job>();
    let (done_tx, done) = channel();
    let job_rx = Arc::new(Mutex::new(job_rx));
    for n in 0..POOL_THREADS {
        let rx = job_rx.clone();
        let tx = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fsync{n}"))
            .stack_size(64 * 1024)
            .spawn(move || {
                // Only fsyncs descriptors, which no identity changes; it rests like every
                // thread of the agent rather than keep the recipient's its creator had taken
                // (failing that, it keeps that one: it opens nothing).
                let _ = super::privileges::rest();
                loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok((i, fd)) = job else { return };
                    if tx.send((i, fsync(&fd))).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            if n == 0 {
                warn!("cannot start fsync threads ({e}); fsyncing one by one");
                return None;
            }
            debug!("started {n} fsync threads ({e})");
            break;
        }
    }
    Some(Pool { jobs, done })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    #[test]
    fn meminfo_dirty_and_writeback_are_summed() {
        let m = "MemTotal:       24000000 kB\nDirty:              1200 kB\nWriteback:            24 kB\n";
        assert_eq!(dirty_bytes(m), Some(1224 * 1024));
        assert_eq!(dirty_bytes("MemTotal: 1 kB\n"), None);
        assert_eq!(dirty_bytes("Dirty: x kB\nWriteback: 0 kB\n"), None);
    }

    /// (syncfs calls, flushes after them, syncfs calls trusted to commit)
    fn counts(st: &SyncStats) -> (u64, u64, u64) {
        (st.syncfs, st.flush_after_syncfs, st.syncfs_commit_enough)
    }

    /// The syncfs path on `targets`: the first answers `first`, the others Ok, with these
    /// counts.
    fn expect(targets: &[Target], first: Errno, want: (u64, u64, u64)) {
        let mut s = Syncer::new(Policy::Adaptive);
        let r = s.by_syncfs(targets);
        assert_eq!(r[0], Err(first));
        assert!(r[1..].iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(counts(&s.stats()), want);
    }

    #[test]
    fn every_policy_answers_each_target_in_order() {
        let dir = std::env::temp_dir().join(format!("inboxd-syncer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut targets = Vec::new();
        for i in 0..40 {
            let mut f = File::create(dir.join(format!("f{i}"))).unwrap();
            f.write_all(b"x").unwrap();
            targets.push(Target {
                fd: Arc::new(OwnedFd::from(f)),
                dev: Some(1),
                kind: FsKind::NeedsFlush,
            });
        }
        for policy in [Policy::Adaptive, Policy::ParallelFsync, Policy::SerialFsync] {
            let mut s = Syncer::new(policy);
            let r = s.sync(&targets);
            assert_eq!(r.len(), 40);
            assert!(r.iter().all(|r| r.is_ok()), "{policy:?}: {r:?}");
        }
        // The syncfs path answers each target too.
        let mut s = Syncer::new(Policy::Adaptive);
        let r = s.by_syncfs(&targets);
        assert_eq!(r.len(), 40);
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(counts(&s.stats()), (1, 1, 0));
        // A trailing fsync that fails (a socket: syncfs of its filesystem works, fsync is
        // EINVAL) fails that target, and the others on its "filesystem" are fsynced one by
        // one. (That the failure is kept rather than asked again cannot be told apart here:
        // a socket fails every fsync; a disk's writeback error is reported once.)
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut mixed = vec![Target {
            fd: Arc::new(OwnedFd::from(sock)),
            dev: Some(2),
            kind: FsKind::NeedsFlush,
        }];
        mixed.extend(targets.iter().take(3).map(|t| Target {
            fd: t.fd.clone(),
            dev: Some(2),
            kind: FsKind::NeedsFlush,
        }));
        expect(&mixed, Errno::EINVAL, (1, 1, 0));
        // On a filesystem whose syncfs ends with a commit there is no fsync after it: the
        // socket's answer is then its own writeback wait's (sync_file_range: ESPIPE).
        for t in &mut mixed {
            t.kind = FsKind::Commits;
        }
        expect(&mixed, Errno::ESPIPE, (1, 0, 1));
        // One target on that filesystem not known to commit is enough to keep the flush,
        // whichever comes first.
        mixed[2].kind = FsKind::NeedsFlush;
        expect(&mixed, Errno::EINVAL, (1, 1, 0));
        // On a filesystem whose syncfs is not trusted (FUSE, say) there is no syncfs at all:
        // each target is fsynced (the socket: EINVAL), and the others are answered too.
        for t in &mut mixed {
            t.kind = FsKind::FsyncOnly;
        }
        expect(&mixed, Errno::EINVAL, (0, 0, 0));
        // Mixed in one batch: syncfs for the trusted filesystem's targets only.
        mixed[1].kind = FsKind::Commits;
        mixed[2].kind = FsKind::Commits;
        expect(&mixed, Errno::EINVAL, (1, 0, 1));
        // A descriptor that cannot be fsynced gets its own error, whatever the others do.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        targets[7] = Target {
            fd: Arc::new(OwnedFd::from(a)),
            dev: None,
            kind: FsKind::NeedsFlush,
        };
        let mut s = Syncer::new(Policy::ParallelFsync);
        let r = s.sync(&targets);
        assert!(r[7].is_err());
        assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 39);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
