//! The only place in inboxd that changes credentials.
//!
//! When inboxd runs as root, every file operation inside a user's Maildir is done with that
//! user's filesystem identity (Linux fsuid/fsgid, setfsuid(2)), with no supplementary groups,
//! so the kernel checks permissions exactly as for the user and new files belong to the user.
//! Changing fsuid away from 0 also clears the filesystem capabilities (CAP_DAC_OVERRIDE,
//! CAP_FOWNER, ...) from the effective set, so root's overrides do not apply while it lasts.
//! A user's identity is kept until another is needed or [`as_root`] is called: anything done
//! meanwhile runs with fewer rights than root's, never more.
//! Unprivileged, inboxd writes as itself and this module changes nothing.
//! The receiver gives up root entirely with [`drop_to`] once it has bound its listeners.
//! fsuid is per thread (the raw setfsuid(2), which glibc does not broadcast), and so is the
//! identity remembered here: each of the delivery agent's lane threads takes recipients'
//! identities for itself, and a thread is started as root (see `agent`). The receiver's
//! event loop is single-threaded and takes none.

use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::unistd::{
    geteuid, getresgid, getresuid, setfsgid, setfsuid, setgroups, setresgid, setresuid, setuid,
    Gid, Uid, User,
};

/// geteuid's answer, remembered (0: not asked yet, 1: root, 2: not root): it is asked before
/// every file operation, and only [`drop_to`] changes it.
static PRIVILEGED: AtomicU8 = AtomicU8::new(0);

/// Whether this process can take other users' identities.
pub fn privileged() -> bool {
    match PRIVILEGED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let root = geteuid().is_root();
            PRIVILEGED.store(if root { 1 } else { 2 }, Ordering::Relaxed);
            root
        }
    }
}

/// Called once at start-up as root: drop root's supplementary groups for good, so no file
/// access ever passes through a group the recipient is not in.
pub fn drop_supplementary_groups() -> Result<(), Errno> {
    if privileged() {
        setgroups(&[])?;
    }
    Ok(())
}

/// Becomes `user` for good (the receiver, once its listeners are bound and the delivery agent
/// is started): no supplementary groups, real/effective/saved ids all the user's, and it is
/// checked that root cannot be regained. Does nothing when not running as root.
pub fn drop_to(user: &str) -> Result<(), String> {
    if !privileged() {
        return Ok(());
    }
    let u = User::from_name(user)
        .map_err(|e| format!("looking up the user {user:?}: {e}"))?
        .ok_or_else(|| {
            format!(
                "no user {user:?} to run as: create it (useradd --system --no-create-home \
                 --shell /usr/sbin/nologin {user}) or name another with --user"
            )
        })?;
    if u.uid.is_root() {
        return Err(format!("--user {user}: the receiver must not run as uid 0"));
    }
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(u.gid, u.gid, u.gid).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(u.uid, u.uid, u.uid).map_err(|e| format!("setresuid: {e}"))?;
    let ids = getresuid().map_err(|e| format!("getresuid: {e}"))?;
    let gids = getresgid().map_err(|e| format!("getresgid: {e}"))?;
    let all_user = [ids.real, ids.effective, ids.saved]
        .iter()
        .all(|&i| i == u.uid)
        && [gids.real, gids.effective, gids.saved]
            .iter()
            .all(|&g| g == u.gid);
    if !all_user || setuid(Uid::from_raw(0)).is_ok() {
        return Err("dropping root privileges did not hold".to_string());
    }
    PRIVILEGED.store(2, Ordering::Relaxed);
    Ok(())
}

thread_local! {
    /// The filesystem identity this thread has taken, if not root's. It is kept after
    /// [`as_user`] returns, so a burst of deliveries to one account switches once (each
    /// switch is four system calls and a new set of credentials); [`as_root`] goes back.
    /// Keeping a user's identity can only take rights away, never add any.
    static TAKEN: std::cell::Cell<Option<(u32, u32)>> = const { std::cell::Cell::new(None) };
}

/// The capabilities the delivery agent keeps, as bit numbers (linux/capability.h):
/// CAP_CHOWN (handing a new `--maildir-root` entry to its account), CAP_SETGID and
/// CAP_SETUID (taking a recipient's filesystem identity). No file override: a home is
/// opened with O_PATH, which asks for no permission on it, and everything inside it is done
/// as its owner (CAP_DAC_READ_SEARCH, kept until a review found it let the agent read any
/// file, is no longer needed).
const AGENT_CAPABILITIES: [u32; 3] = [0, 6, 7];

/// Started as root, the delivery agent gives up every other capability (it can no longer
/// override file permissions, kill, trace, mount, use raw sockets, ...) and sets
/// no_new_privs. Does nothing when not running as root.
pub fn keep_only_delivery_capabilities() -> Result<(), Errno> {
    if !privileged() {
        return Ok(());
    }
    let wanted = AGENT_CAPABILITIES.iter().fold(0u64, |m, c| m | 1 << c);
    // capset can only keep what is permitted already: where the service manager or a
    // container took some away, keep what is left.
    let permitted = crate::sys::capget()?;
    let missing = wanted & !permitted;
    if missing != 0 {
        log::warn!(
            "delivery agent: capabilities {missing:#x} are not available (bounding set); \
             without CAP_SETUID and CAP_SETGID no copy can be written as its recipient"
        );
    }
    crate::sys::capset(wanted & permitted)?;
    nix::sys::prctl::set_no_new_privs()
}

/// Runs `f` with the filesystem identity `uid`/`gid` (when privileged). The identity stays
/// until another is asked for or [`as_root`] is called.
pub fn as_user<T>(uid: Uid, gid: Gid, f: impl FnOnce() -> T) -> Result<T, Errno> {
    if !privileged() {
        return Ok(f());
    }
    let want = (uid.as_raw(), gid.as_raw());
    if TAKEN.get() != Some(want) {
        // setfsuid/setfsgid report the previous value, never an error; calling them again
        // with the same value shows whether the change took effect.
        setfsgid(gid);
        setfsuid(uid);
        if setfsuid(uid) != uid || setfsgid(gid) != gid {
            restore();
            return Err(Errno::EPERM);
        }
        TAKEN.set(Some(want));
    }
    Ok(f())
}

/// Goes back to root's filesystem identity, for what only root may do: walking to a home
/// directory another user may not enter, creating a `--maildir-root` entry, NSS lookups.
pub fn as_root() {
    if privileged() && TAKEN.get().is_some() {
        restore();
    }
}

fn restore() {
    setfsuid(Uid::from_raw(0));
    setfsgid(Gid::from_raw(0));
    TAKEN.set(None);
}
