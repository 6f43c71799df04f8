//! The only place in inboxd that changes credentials.
//!
//! When inboxd runs as root, every file operation inside a user's Maildir is done with that
//! user's filesystem identity (Linux fsuid/fsgid, setfsuid(2)), with no supplementary groups,
//! so the kernel checks permissions exactly as for the user and new files belong to the user.
//! Changing fsuid away from 0 also clears the filesystem capabilities (CAP_DAC_OVERRIDE,
//! CAP_CHOWN, ...) from the effective set, so root's overrides do not apply while it lasts.
//! A user's identity is kept until another is needed or [`rest`] is called: anything done
//! meanwhile runs with fewer rights than root's, never more.
//! Between recipients the delivery agent rests as the receiver's unprivileged user
//! ([`rest_as`]): its real and effective ids stay 0, but no file it touches outside a
//! Maildir step is reached as root, so a mistake there cannot reach root's files
//! (`/etc/shadow` belongs to root, and root needs no override to write it). Root's own
//! filesystem identity is taken only by [`with_root`], to open a home (O_PATH) and for the
//! few steps of `--maildir-root` that need it, and given up when they end; and by
//! [`as_user`] for a uid-0 recipient under `--allow-root-delivery`, given up by [`settle`]
//! before the thread waits for work.
//! Unprivileged, inboxd writes as itself and this module changes nothing.
//! The receiver gives up root entirely with [`drop_to`] once it has bound its listeners.
//! fsuid is per thread (the raw setfsuid(2), which glibc does not broadcast), and so is the
//! identity remembered here: each of the delivery agent's threads takes the identities it
//! needs for itself, and one it does not know it has is set before use. The receiver's event
//! loop is single-threaded and takes none.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

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
    let u = unprivileged_user(user)?;
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

/// `--user`, looked up: the receiver runs as it and the agent rests as it, so it must exist
/// and have neither uid 0 nor gid 0 (root's group, whose files could then be read, and some
/// written).
fn unprivileged_user(user: &str) -> Result<User, String> {
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
    if u.gid.as_raw() == 0 {
        return Err(format!(
            "--user {user}: the receiver must not run with gid 0"
        ));
    }
    Ok(u)
}

/// The filesystem identity (uid, gid) the agent's threads rest in between recipients, set
/// once by [`rest_as`]; root's until then (the receiver before it drops root, the doctor).
static REST: OnceLock<(u32, u32)> = OnceLock::new();

fn rest_identity() -> (u32, u32) {
    REST.get().copied().unwrap_or((0, 0))
}

thread_local! {
    /// The filesystem identity this thread has, when known (None: a new thread, which has
    /// whatever its creator had when it was started, or one whose change failed halfway).
    /// It is kept after [`as_user`] returns, so a burst of deliveries to one account switches
    /// once (each switch is four system calls and a new set of credentials); [`rest`] goes
    /// back to the resting identity.
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
             without CAP_SETUID and CAP_SETGID the agent cannot take the identity it rests \
             with and stops, without CAP_CHOWN no new --maildir-root entry can be handed over"
        );
    }
    crate::sys::capset(wanted & permitted)?;
    nix::sys::prctl::set_no_new_privs()
}

/// Runs `f` with the filesystem identity `uid`/`gid` (when privileged). The identity stays
/// until another is asked for or [`rest`] is called.
pub fn as_user<T>(uid: Uid, gid: Gid, f: impl FnOnce() -> T) -> Result<T, Errno> {
    if !privileged() {
        return Ok(f());
    }
    take(uid.as_raw(), gid.as_raw())?;
    Ok(f())
}

/// Goes back to the resting identity (the receiver's user in the agent, see [`rest_as`];
/// root's before it is set), for what is done for no recipient in particular: NSS lookups,
/// starting a thread.
pub fn rest() -> Result<(), Errno> {
    if !privileged() {
        return Ok(());
    }
    let (uid, gid) = rest_identity();
    take(uid, gid)
}

/// Called before a thread waits for work: the identity of the last recipient may be kept
/// for the next burst, unless its uid or gid is root's (a uid-0 recipient under
/// `--allow-root-delivery`, an account whose primary group is root's), or this thread does
/// not know its identity: it rests instead.
pub fn settle() -> Result<(), Errno> {
    if !privileged() {
        return Ok(());
    }
    match TAKEN.get() {
        Some((uid, gid)) if uid != 0 && gid != 0 => Ok(()),
        _ => rest(),
    }
}

/// Runs `f` with root's filesystem identity, then rests: opening a home (O_PATH), which the
/// recipient may reach through a group the agent does not have; creating and handing over
/// a `--maildir-root` entry, in a directory that may be root's alone. CAP_CHOWN is effective
/// only while fsuid is 0 (the kernel raises and clears it with the change).
pub fn with_root<T>(f: impl FnOnce() -> T) -> Result<T, Errno> {
    if !privileged() {
        return Ok(f());
    }
    take(0, 0)?;
    let out = f();
    rest()?;
    Ok(out)
}

/// Started as root, the delivery agent rests as `user` (the receiver's, `--user`) from now
/// on: this thread at once, and every thread, which calls [`rest`] first thing (a new thread
/// has whatever identity its creator had at that moment). Checked by reading it back. Does
/// nothing when not running as root. The error says whether the configuration is at fault
/// (no such user, or uid 0) or the system (`true`: configuration).
pub fn rest_as(user: &str) -> Result<(), (bool, String)> {
    if !privileged() {
        return Ok(());
    }
    let u = unprivileged_user(user).map_err(|e| (true, e))?;
    let want = (u.uid.as_raw(), u.gid.as_raw());
    if REST.set(want).is_err() && REST.get() != Some(&want) {
        return Err((
            false,
            "the agent's resting identity is already set".to_string(),
        ));
    }
    // take() reads the identity back: an error here means it did not hold (no CAP_SETUID or
    // CAP_SETGID: the receiver could not have dropped root either).
    rest().map_err(|e| (false, format!("taking {user}'s filesystem identity: {e}")))
}

/// Takes the filesystem identity `uid`/`gid` for this thread, unless it is known to have it.
fn take(uid: u32, gid: u32) -> Result<(), Errno> {
    let want = (uid, gid);
    if TAKEN.get() == Some(want) {
        return Ok(());
    }
    // Unknown until it has held.
    TAKEN.set(None);
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    // setfsuid/setfsgid report the previous value, never an error; calling them again
    // with the same value shows whether the change took effect.
    setfsgid(gid);
    setfsuid(uid);
    if setfsuid(uid) != uid || setfsgid(gid) != gid {
        // Back to the resting identity, the least rights this thread can be known to have.
        let (ru, rg) = rest_identity();
        let (ru, rg) = (Uid::from_raw(ru), Gid::from_raw(rg));
        setfsgid(rg);
        setfsuid(ru);
        if setfsuid(ru) == ru && setfsgid(rg) == rg {
            TAKEN.set(Some((ru.as_raw(), rg.as_raw())));
        }
        return Err(Errno::EPERM);
    }
    TAKEN.set(Some(want));
    Ok(())
}
