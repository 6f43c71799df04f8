//! The only place in inboxd that changes credentials.
//!
//! When inboxd runs as root, every file operation inside a user's Maildir is done with that
//! user's filesystem identity (Linux fsuid/fsgid, setfsuid(2)), with no supplementary groups,
//! so the kernel checks permissions exactly as for the user and new files belong to the user.
//! Changing fsuid away from 0 also clears the filesystem capabilities (CAP_DAC_OVERRIDE,
//! CAP_FOWNER, ...) from the effective set, so root's overrides do not apply while it lasts.
//! Unprivileged, inboxd writes as itself and this module changes nothing.
//! It must not be used from more than one thread: fsuid is per thread and inboxd's event loop
//! is single-threaded.

use nix::errno::Errno;
use nix::unistd::{geteuid, setfsgid, setfsuid, setgroups, Gid, Uid};

/// Whether this process can take other users' identities.
pub fn privileged() -> bool {
    geteuid().is_root()
}

/// Called once at start-up as root: drop root's supplementary groups for good, so no file
/// access ever passes through a group the recipient is not in.
pub fn drop_supplementary_groups() -> Result<(), Errno> {
    if privileged() {
        setgroups(&[])?;
    }
    Ok(())
}

/// Runs `f` with the filesystem identity `uid`/`gid` (when privileged), and restores root's
/// afterwards, whatever `f` returns.
pub fn as_user<T>(uid: Uid, gid: Gid, f: impl FnOnce() -> T) -> Result<T, Errno> {
    if !privileged() {
        return Ok(f());
    }
    // setfsuid/setfsgid report the previous value, never an error; calling them again with
    // the same value shows whether the change took effect.
    setfsgid(gid);
    setfsuid(uid);
    if setfsuid(uid) != uid || setfsgid(gid) != gid {
        restore();
        return Err(Errno::EPERM);
    }
    let r = f();
    restore();
    Ok(r)
}

fn restore() {
    setfsuid(Uid::from_raw(0));
    setfsgid(Gid::from_raw(0));
}
