//! What the group commit needs to know about the filesystem a Maildir is on: whether its
//! syncfs(2) can be trusted to write every change made on it, and whether it returns only
//! after a flush of the disk's cache that follows every write it made.
//!
//! Owns that classification and the lookup of an ext4's journal (also used by
//! `inboxd check`). It must not decide what is made durable or when (the store and the
//! syncer do), and it must never trust syncfs on a filesystem it does not recognise: an
//! unknown one gets an fsync per file and per directory, which every filesystem must honour.
//!
//! The kernel's syncfs (sync_filesystem in fs/sync.c) writes the dirty inodes' pages, asks
//! the filesystem to sync (`->sync_fs(sb, 1)`) and only then writes and waits for the block
//! device's own buffers. Read in the kernel's source (README "Group commit"):
//! - ext4 with a journal: `ext4_sync_fs` commits the running transaction, which holds every
//!   inode and directory change made before it, and waits for the commit, whose record goes
//!   to the disk behind a cache flush (and with FUA, or a flush after it where the disk has
//!   no FUA); it adds a flush where the commit would send none;
//! - XFS: `xfs_fs_sync_fs` forces the log synchronously, the same for XFS's log (a
//!   realtime device, where files whose directory says so keep their data, is not flushed
//!   by it, nor by the fsync of new/ that this would save: Maildirs there are not covered);
//! - Btrfs: `btrfs_sync_fs` commits the transaction, whose superblocks are written behind a
//!   flush of every device;
//! - ext4 without a journal (and ext2, same magic): its inodes and directory blocks live in
//!   the block device's buffers, which syncfs writes after the flush (ext2's sends none);
//!   so those changes can still be in a volatile cache when syncfs returns, and one more
//!   flush makes them durable;
//! - anything else is not trusted: FUSE's `fuse_sync_fs` does nothing unless the server
//!   implements FUSE_SYNCFS (only virtiofs asks for it), so its files would never be
//!   fsynced at all (found in review); NFS, tmpfs, overlayfs and the rest are not examined.
use std::os::fd::AsFd;

use nix::sys::statfs::{fstatfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC};

/// How a batch's files on a filesystem are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// syncfs returns after a commit that made every earlier change durable (ext4 with a
    /// journal, XFS, Btrfs): one syncfs, nothing after it.
    Commits,
    /// ext4 without a journal (or ext2): syncfs writes every change, some of them after its
    /// flush, so one syncfs and then one more flush.
    NeedsFlush,
    /// Anything else, or not known: syncfs is not trusted; every file and directory gets
    /// its own fsync.
    FsyncOnly,
}

impl FsKind {
    /// Whether a syncfs of this filesystem writes every change made on it.
    pub fn syncfs_writes_all(self) -> bool {
        self != FsKind::FsyncOnly
    }
}

/// The kind of the filesystem `fd` is on, `dev` being its st_dev. Costs an fstatfs, and for
/// an ext4 a listing of /proc/fs/jbd2 and one readlink.
pub fn of(fd: impl AsFd, dev: u64) -> FsKind {
    let Ok(fs) = fstatfs(fd) else {
        return FsKind::FsyncOnly;
    };
    let t = fs.filesystem_type();
    if t == XFS_SUPER_MAGIC || t == BTRFS_SUPER_MAGIC {
        return FsKind::Commits;
    }
    // ext2, ext3 and ext4 share this magic; only a journal that jbd2 runs counts.
    if t == EXT4_SUPER_MAGIC {
        return match ext4_journal(dev) {
            Some(true) => FsKind::Commits,
            _ => FsKind::NeedsFlush,
        };
    }
    FsKind::FsyncOnly
}

/// Whether the ext4 on device `dev` (st_dev) runs a journal: jbd2 lists each journal it runs
/// in /proc/fs/jbd2 as `<device>-<journal inode>`, and /sys/dev/block/MAJOR:MINOR names the
/// device the same way. `None` when either cannot be read (no /proc or /sys, a restricted
/// view of them, a device that is not a block device such as Btrfs's). A journal on a
/// device of its own is listed under that device's name alone, so such an ext4 reads as
/// `Some(false)`: it keeps the flush, and `inboxd check` notes it as without a journal.
pub fn ext4_journal(dev: u64) -> Option<bool> {
    let journals = std::fs::read_dir("/proc/fs/jbd2").ok()?;
    let device = device_name(dev)?;
    Some(
        journals
            .filter_map(|e| e.ok())
            .any(|e| names_journal_of(&e.file_name().to_string_lossy(), &device)),
    )
}

/// The kernel's name of block device `dev` (`vda`, `loop3`), from the link
/// /sys/dev/block/MAJOR:MINOR.
pub fn device_name(dev: u64) -> Option<String> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let target = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Whether a /proc/fs/jbd2 entry is the journal of `device` (`vda-8` is vda's, not vda1's).
fn names_journal_of(entry: &str, device: &str) -> bool {
    entry
        .strip_prefix(device)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|ino| !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_entry_names_exactly_its_device() {
        assert!(names_journal_of("vda-8", "vda"));
        assert!(names_journal_of("loop3-8", "loop3"));
        assert!(!names_journal_of("vda1-8", "vda"));
        assert!(!names_journal_of("loop13-8", "loop1"));
        assert!(!names_journal_of("vda-", "vda"));
        assert!(!names_journal_of("vda", "vda"));
        assert!(!names_journal_of("vda-8x", "vda"));
    }

    #[test]
    fn tmpfs_and_unknown_filesystems_get_an_fsync_each() {
        // /dev/shm is a tmpfs here and on the CI machine; a socket is on sockfs.
        if let Ok(dir) = std::fs::File::open("/dev/shm") {
            let dev = std::os::unix::fs::MetadataExt::dev(&dir.metadata().unwrap());
            assert_eq!(of(&dir, dev), FsKind::FsyncOnly);
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(of(&a, 0), FsKind::FsyncOnly);
        assert!(!FsKind::FsyncOnly.syncfs_writes_all());
        assert!(FsKind::NeedsFlush.syncfs_writes_all() && FsKind::Commits.syncfs_writes_all());
    }
}
