//! One Maildir, opened safely, and the delivery protocol into it. Where the filesystem
//! allows, a copy is created in tmp/ without a name (O_TMPFILE), written, made durable and
//! linked into new/: no reader ever sees it before it is complete, and a copy abandoned by a
//! killed agent leaves nothing behind. Otherwise, maildir(5) and qmail's maildir.5: create
//! in tmp/ with O_EXCL, write, fsync, move into new/, then fsync new/.
//!
//! Owns the path walk: every directory is opened relative to the one before it with
//! O_NOFOLLOW|O_DIRECTORY, and must belong to the recipient, so a symlink or a foreign
//! directory planted in a home or Maildir can never redirect a write. Missing Maildir
//! directories are created (0700) and their parent fsynced. It must not decide who the
//! recipient is or reply to anyone; all work inside the Maildir runs under the recipient's
//! filesystem identity (see `privileges`).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags, AT_FDCWD};
use nix::libc as libc_mode;
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode};
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::unistd::{fsync, linkat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::privileges::{as_user, with_root};
use super::DeliveryError;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Entries of tmp/ one cleaning pass looks at ([`Maildir::clean_tmp`]).
pub const TMP_SCAN_LIMIT: usize = 1000;
/// Files one cleaning pass removes at most.
pub const TMP_REMOVE_LIMIT: usize = 100;

/// A directory held only to walk from and to fstat: no read or search permission needed.
const PATH_FLAGS: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Who owns the Maildir and whose identity we write with.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
}

/// An opened Maildir: descriptors of tmp/ and new/.
#[derive(Debug)]
pub struct Maildir {
    pub owner: Owner,
    tmp: OwnedFd,
    /// Shared with the syncer, which may fsync it from another thread.
    new: Arc<OwnedFd>,
}

/// Writes all of `a`, then all of `b`.
fn write_two(fd: &OwnedFd, mut a: &[u8], mut b: &[u8]) -> Result<(), Errno> {
    use std::io::IoSlice;
    while !a.is_empty() || !b.is_empty() {
        let r = if a.is_empty() {
            nix::unistd::write(fd, b)
        } else {
            nix::sys::uio::writev(fd, &[IoSlice::new(a), IoSlice::new(b)])
        };
        let n = match r {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Opens `name` in `parent` as a directory that must belong to `owner`, creating it (0700)
/// when missing. Must be called under the identity that should create it.
fn open_dir(parent: &OwnedFd, name: &str, owner: Owner) -> Result<OwnedFd, DeliveryError> {
    let fd = match openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            match mkdirat(parent, name, Mode::S_IRWXU) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(DeliveryError::access(e, format!("mkdir {name}"))),
            }
            // The new entry must survive a crash before anything inside it is trusted. A
            // parent held with O_PATH (a home) cannot be fsynced: it is opened for that, as
            // the recipient, who owns it.
            let synced = match fsync(parent) {
                Err(Errno::EBADF) => {
                    openat(parent, ".", DIR_FLAGS, Mode::empty()).and_then(|p| fsync(&p))
                }
                r => r,
            };
            synced.map_err(|e| DeliveryError::io(e, "fsync of parent directory"))?;
            openat(parent, name, DIR_FLAGS, Mode::empty())
                .map_err(|e| open_error(e, parent, name, name))?
        }
        Err(e) => return Err(open_error(e, parent, name, name)),
    };
    check_owner(&fd, owner, name)?;
    Ok(fd)
}

/// chown of a directory held with O_PATH (fchown needs a descriptor opened for I/O).
fn hand_over(dir: &OwnedFd, owner: Owner, what: &str) -> Result<(), DeliveryError> {
    nix::unistd::fchownat(
        dir,
        c"",
        Some(owner.uid),
        Some(owner.gid),
        AtFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| DeliveryError::io(e, format!("chown {what}")))
}

/// Whether the directory (one root may read: its own) holds nothing but `.` and `..`.
fn is_empty_dir(dir: &OwnedFd) -> bool {
    nix::dir::Dir::openat(dir, ".", DIR_FLAGS, Mode::empty()).is_ok_and(|mut d| {
        d.iter()
            .filter_map(Result::ok)
            .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."))
    })
}

/// [`DeliveryError::open`], told precisely what is in the way: opening a symlink or a file
/// with O_NOFOLLOW|O_DIRECTORY gives ENOTDIR for both, and the log should say which. `entry`
/// is what was opened relative to `parent`; `what` names it in the message.
fn open_error<Fd: std::os::fd::AsFd, P: ?Sized + nix::NixPath>(
    e: Errno,
    parent: Fd,
    entry: &P,
    what: &str,
) -> DeliveryError {
    if !matches!(e, Errno::ELOOP | Errno::ENOTDIR) {
        return DeliveryError::open(e, what);
    }
    let kind = match fstatat(parent, entry, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => match st.st_mode & libc_mode::S_IFMT {
            libc_mode::S_IFLNK => "a symlink",
            libc_mode::S_IFREG => "a regular file",
            // Replaced by a directory since the open failed: say what the open said.
            libc_mode::S_IFDIR => return DeliveryError::open(e, what),
            _ => "a special file",
        },
        Err(_) => return DeliveryError::open(e, what),
    };
    DeliveryError::Unavailable(format!("{what} is {kind}, not a directory"))
}

/// The home directory as it must be opened. O_NOFOLLOW applies to the last component only,
/// and a trailing slash would make the kernel follow that one too: "/home/x/" is opened as
/// "/home/x". The components before it are the administrator's (/home and the like) and are
/// followed. A relative home (a broken passwd entry) would depend on our working directory.
pub fn home_path(home: &Path) -> Result<&Path, DeliveryError> {
    let bytes = home.as_os_str().as_bytes();
    let end = bytes.iter().rposition(|&b| b != b'/').map_or(1, |i| i + 1);
    let home = Path::new(std::ffi::OsStr::from_bytes(&bytes[..end.min(bytes.len())]));
    if !home.is_absolute() {
        return Err(DeliveryError::Unavailable(format!(
            "home {} is not an absolute path",
            home.display()
        )));
    }
    Ok(home)
}

fn check_owner(fd: &OwnedFd, owner: Owner, what: &str) -> Result<(), DeliveryError> {
    let st = fstat(fd).map_err(|e| DeliveryError::io(e, format!("stat {what}")))?;
    if st.st_uid != owner.uid.as_raw() {
        return Err(DeliveryError::Unavailable(format!(
            "{what} belongs to uid {}, not to the recipient (uid {})",
            st.st_uid, owner.uid
        )));
    }
    Ok(())
}

impl Maildir {
    /// The Maildir at `home/Maildir`. The home must belong to the recipient (qmail-getpw's
    /// rule): root never writes into a directory another user controls.
    pub fn open_in_home(home: &Path, owner: Owner) -> Result<Maildir, DeliveryError> {
        let home = home_path(home)?;
        let what = format!("home {}", home.display());
        // Opened with root's filesystem identity, which the agent keeps for this step alone:
        // the recipient may reach the home through a supplementary group, which the agent
        // does not have (found in review). O_PATH: no permission is asked for on the home
        // itself, so a 0700 home, or one on NFS with root_squash (where root is nobody),
        // still opens, as long as the path can be walked (found in review); nothing is
        // read or written through it as root.
        let home_fd = with_root(|| {
            openat(AT_FDCWD, home, PATH_FLAGS, Mode::empty()).map_err(|e| match e {
                // Not an I/O fault: the account has no home to deliver into (a 4xx, so mail
                // waits at the sender while the administrator creates it).
                Errno::ENOENT => DeliveryError::Unavailable(format!("{what} does not exist")),
                e => open_error(e, AT_FDCWD, home, &what),
            })
        })
        .map_err(|e| DeliveryError::io(e, "taking root's identity"))??;
        check_owner(&home_fd, owner, &what)?;
        as_user(owner.uid, owner.gid, || {
            let md = open_dir(&home_fd, "Maildir", owner)?;
            Maildir::open_subdirs(md, owner)
        })
        .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?
    }

    /// The Maildir `root/<account>` (the `--maildir-root` layout). `root/<account>` is made by
    /// us (as root: then handed to the recipient) if it is missing. Only these steps take
    /// root's filesystem identity ([`with_root`]): `root` may be root's alone.
    pub fn open_in_root(
        root: &OwnedFd,
        account: &str,
        owner: Owner,
    ) -> Result<Maildir, DeliveryError> {
        let md = with_root(|| Maildir::enter_root(root, account, owner))
            .map_err(|e| DeliveryError::io(e, "taking root's identity"))??;
        as_user(owner.uid, owner.gid, || Maildir::open_subdirs(md, owner))
            .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?
    }

    /// `root/<account>`, opened with O_PATH, created and handed over if missing, checked to
    /// belong to the account: run as root (see [`Maildir::open_in_root`]).
    fn enter_root(root: &OwnedFd, account: &str, owner: Owner) -> Result<OwnedFd, DeliveryError> {
        // O_PATH: the account's directory is its own (0700), and the agent, which keeps no
        // file override, may not read it as root (found by reliability/crash-test once
        // CAP_DAC_READ_SEARCH was given up: every opening after the first got EACCES).
        let md = match openat(root, account, PATH_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(root, account, Mode::S_IRWXU) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(DeliveryError::io(e, format!("mkdir {account}"))),
                }
                let fd = openat(root, account, PATH_FLAGS, Mode::empty())
                    .map_err(|e| open_error(e, root, account, account))?;
                if super::privileges::privileged() {
                    hand_over(&fd, owner, account)?;
                }
                fsync(root).map_err(|e| DeliveryError::io(e, "fsync of maildir root"))?;
                fd
            }
            Err(e) => return Err(open_error(e, root, account, account)),
        };
        // An empty directory of root's here is one we made and could not hand over (the
        // agent was killed between mkdir and chown, found in review): nobody else may write
        // in the Maildir root. Hand it over now rather than refuse the account for ever.
        // (The subdirectories then made in it are fsynced with it, chown included.)
        if super::privileges::privileged()
            && owner.uid.as_raw() != 0
            && fstat(&md).is_ok_and(|st| st.st_uid == 0)
            && is_empty_dir(&md)
        {
            hand_over(&md, owner, account)?;
        }
        check_owner(&md, owner, account)?;
        Ok(md)
    }

    fn open_subdirs(md: OwnedFd, owner: Owner) -> Result<Maildir, DeliveryError> {
        let tmp = open_dir(&md, "tmp", owner)?;
        let new = open_dir(&md, "new", owner)?;
        // cur/ is not written by a delivery agent, but a Maildir needs it (maildir(5)).
        open_dir(&md, "cur", owner)?;
        Ok(Maildir {
            owner,
            tmp,
            new: Arc::new(new),
        })
    }

    /// Whether the recipient may create files in tmp/ and link them into new/: the check at
    /// RCPT time, so that a mailbox its owner made unwritable gets its own 4xx rather than
    /// failing a whole transaction at the dot. The walk made sure both directories belong to
    /// the recipient, and for a file's owner the kernel looks at the owner's mode bits only
    /// (a POSIX ACL's owner entry is those bits), so write and search for the owner is the
    /// answer, read with fstat; plus a read-only mount (fstatvfs). Not faccessat(AT_EACCESS):
    /// glibc does that with faccessat2, and where the kernel lacks it or a seccomp filter
    /// refuses it, glibc checks as the real uid, root without its overrides, and every
    /// recipient would be refused (found in review). It cannot see everything a delivery
    /// meets (a full disk, a quota, a security module, an immutable flag), and what it sees
    /// may change before the delivery: those still fail at the dot.
    pub fn check_writable(&self) -> Result<(), DeliveryError> {
        for (dir, what) in [(&self.tmp, "tmp/"), (&*self.new, "new/")] {
            let st = fstat(dir).map_err(|e| DeliveryError::io(e, format!("fstat {what}")))?;
            if st.st_mode & 0o300 != 0o300 {
                // The mode goes to the agent's log, not over the socket: the receiver has no
                // business learning the modes of directories in homes (found in review).
                log::warn!(
                    "delivery agent: {what} of uid {} has mode {:o}",
                    self.owner.uid,
                    st.st_mode & 0o7777
                );
                return Err(DeliveryError::Unavailable(format!(
                    "{what} is not writable by its owner"
                )));
            }
            let vfs =
                fstatvfs(dir).map_err(|e| DeliveryError::io(e, format!("fstatvfs {what}")))?;
            if vfs.flags().contains(FsFlags::ST_RDONLY) {
                return Err(DeliveryError::io(Errno::EROFS, what));
            }
        }
        Ok(())
    }

    /// Creates `tmp/<name>`: O_CREAT|O_EXCL (never reuses or follows anything already
    /// there), mode 0600, owned by the recipient.
    pub fn create_tmp(&self, name: &str) -> Result<File, DeliveryError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = as_user(self.owner.uid, self.owner.gid, || {
            openat(&self.tmp, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
        })
        .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?
        .map_err(|e| DeliveryError::access(e, format!("create tmp/{name}")))?;
        Ok(File::from(fd))
    }

    /// Creates a copy with no name yet in tmp/ (O_TMPFILE: mode 0600, owned by the recipient,
    /// invisible to everyone until [`Maildir::link_new`]). `Ok(Err(errno))` when tmp/'s
    /// filesystem cannot (EOPNOTSUPP, or EISDIR from a kernel without O_TMPFILE): the caller
    /// then creates a named copy.
    pub fn create_unnamed(&self) -> Result<Result<File, Errno>, DeliveryError> {
        let flags = OFlag::O_WRONLY | OFlag::O_TMPFILE | OFlag::O_CLOEXEC;
        let r = as_user(self.owner.uid, self.owner.gid, || {
            openat(&self.tmp, ".", flags, Mode::S_IRUSR | Mode::S_IWUSR)
        })
        .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?;
        match r {
            Ok(fd) => Ok(Ok(File::from(fd))),
            Err(e @ (Errno::EOPNOTSUPP | Errno::EISDIR)) => Ok(Err(e)),
            Err(e) => Err(DeliveryError::access(e, "create a file in tmp/")),
        }
    }

    /// Gives an unnamed copy (from [`Maildir::create_unnamed`], already durable) the name
    /// `new/<new_name>`, as the recipient, never replacing an existing file (EEXIST). The
    /// descriptor is reached through /proc/self/fd, which names our own open file: linkat's
    /// AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, which the kernel takes from the effective set
    /// while the filesystem uid is the recipient's, and linking as root would write as
    /// root. The new link count is not durable until the file is synced again (the store's
    /// second sync). The errno is returned as is, for the store to classify.
    pub fn link_new(
        &self,
        fd: &OwnedFd,
        new_name: &str,
    ) -> Result<Result<(), Errno>, DeliveryError> {
        use std::os::fd::AsRawFd;
        let ours = format!("/proc/self/fd/{}", fd.as_raw_fd());
        as_user(self.owner.uid, self.owner.gid, || {
            linkat(
                AT_FDCWD,
                ours.as_str(),
                &self.new,
                new_name,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        })
        .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))
    }

    /// Writes `head` then `data` into a copy's tmp file (one writev where it can), as the
    /// recipient: ext4 reserves blocks at write(2) time (delayed allocation) and checks the
    /// writer's identity against its root reserve (resuid 0 by default), which root's would
    /// reach. (Quota is charged to the file's owner either way.)
    pub fn write_copy(&self, fd: &OwnedFd, head: &[u8], data: &[u8]) -> Result<(), DeliveryError> {
        as_user(self.owner.uid, self.owner.gid, || write_two(fd, head, data))
            .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?
            .map_err(|e| DeliveryError::io(e, "write of mail data"))
    }

    /// Moves `tmp/<tmp_name>` to `new/<new_name>` without ever replacing an existing file
    /// (renameat2 RENAME_NOREPLACE; link+unlink where the filesystem lacks it).
    pub fn publish(&self, tmp_name: &str, new_name: &str) -> Result<(), DeliveryError> {
        as_user(self.owner.uid, self.owner.gid, || {
            match renameat2(
                &self.tmp,
                tmp_name,
                &self.new,
                new_name,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
                    linkat(&self.tmp, tmp_name, &self.new, new_name, AtFlags::empty())?;
                    let _ = unlinkat(&self.tmp, tmp_name, UnlinkatFlags::NoRemoveDir);
                    Ok(())
                }
                r => r,
            }
        })
        .map_err(|e| DeliveryError::io(e, "taking the recipient's identity"))?
        .map_err(|e| DeliveryError::access(e, format!("rename into new/{new_name}")))
    }

    /// Best-effort removal, for clean-up after a failure.
    pub fn remove_tmp(&self, name: &str) {
        let _ = as_user(self.owner.uid, self.owner.gid, || {
            unlinkat(&self.tmp, name, UnlinkatFlags::NoRemoveDir)
        });
    }

    /// Removal of an already published file (rolling back a partial commit). Fails when the
    /// file is gone from new/ already (a mail reader moved it to cur/) or cannot be removed;
    /// the fsync of new/ after it is best effort (the copy is gone either way, and a crash
    /// that brings it back brings back a complete message).
    pub fn remove_new(&self, name: &str) -> Result<(), Errno> {
        let r = as_user(self.owner.uid, self.owner.gid, || {
            unlinkat(&self.new, name, UnlinkatFlags::NoRemoveDir)
        })
        .and_then(|r| r);
        let _ = fsync(&self.new);
        r
    }

    /// Removes files in tmp/ neither read nor written (atime, mtime) for `age` or longer: what a
    /// delivery of a named copy that never finished (an agent killed mid-transaction, a
    /// crash) left there, or another program's.
    /// maildir(5) says 36 hours. Only regular files directly in tmp/ are considered, and it
    /// runs as the recipient. Returns how many were removed; errors stop it quietly (it is
    /// housekeeping, never a reason to refuse mail). One pass looks at the first
    /// [`TMP_SCAN_LIMIT`] entries only and removes at most [`TMP_REMOVE_LIMIT`] files: it
    /// runs on the agent's only thread, before a delivery, and a user who filled their tmp/
    /// with a million old files must not hold up everybody's mail (found in review).
    pub fn clean_tmp(&self, age: std::time::Duration, now_unix: i64) -> usize {
        let limit = now_unix - age.as_secs() as i64;
        let work = || -> Result<usize, Errno> {
            let mut dir = nix::dir::Dir::openat(&self.tmp, ".", DIR_FLAGS, Mode::empty())?;
            let mut old = Vec::new();
            for entry in dir.iter().take(TMP_SCAN_LIMIT) {
                if old.len() >= TMP_REMOVE_LIMIT {
                    break;
                }
                let entry = entry?;
                let name = entry.file_name().to_owned();
                if name.as_bytes().starts_with(b".") {
                    continue;
                }
                let Ok(st) = fstatat(&self.tmp, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                let touched = st.st_atime.max(st.st_mtime);
                if st.st_mode & libc_mode::S_IFMT == libc_mode::S_IFREG && touched < limit {
                    old.push(name);
                }
            }
            let mut removed = 0;
            for name in old {
                if unlinkat(&self.tmp, name.as_c_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        };
        as_user(self.owner.uid, self.owner.gid, work)
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0)
    }

    /// The new/ directory's descriptor, to be made durable by the syncer.
    pub fn new_fd(&self) -> Arc<OwnedFd> {
        self.new.clone()
    }

    /// Identifies the new/ directory (device, inode), so a batch fsyncs each one once.
    pub fn new_dir_key(&self) -> Option<(u64, u64)> {
        fstat(&self.new).ok().map(|st| (st.st_dev, st.st_ino))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_path_drops_trailing_slashes_and_refuses_relative_homes() {
        let p = |s: &str| home_path(Path::new(s)).map(|p| p.to_str().unwrap().to_string());
        assert_eq!(p("/home/x/").unwrap(), "/home/x");
        assert_eq!(p("/home/x//").unwrap(), "/home/x");
        assert_eq!(p("/home/x").unwrap(), "/home/x");
        assert_eq!(p("/").unwrap(), "/");
        assert!(p("home/x").is_err());
        assert!(p("").is_err());
    }
}
