//! The only `unsafe` code in inboxd, kept small and commented: system calls nix does not
//! wrap (safely).
//!
//! - [`canonical_name`]: getaddrinfo(3) with AI_CANONNAME, for the default hostname.
//! - [`adopt_fds`]: taking ownership of descriptors received with SCM_RIGHTS.
//! - [`adopt_passed_fds`]: taking ownership of the sockets systemd passed (socket activation).
//! - [`capset`], [`capget`]: to give up capabilities the delivery agent does not need.
//! - [`wait_for_writeback`]: sync_file_range(2), to learn a file's own writeback error.
//!
//! It must not grow: anything that can be done with a safe API is done elsewhere.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// The canonical name of `name` from the resolver (as `hostname -f` finds it), if any.
pub fn canonical_name(name: &str) -> Option<String> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: `addrinfo` is a plain C struct for which all-zero is the documented "no hints"
    // value; getaddrinfo receives valid NUL-terminated strings and a valid out-pointer, and
    // on success we read `ai_canonname` (NUL-terminated or null) from the first result and
    // free the list exactly once, copying the name out before freeing.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_flags = libc::AI_CANONNAME;
        hints.ai_family = libc::AF_UNSPEC;
        hints.ai_socktype = libc::SOCK_STREAM;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut res) != 0
            || res.is_null()
        {
            return None;
        }
        let cn = (*res).ai_canonname;
        let out = if cn.is_null() {
            None
        } else {
            CStr::from_ptr(cn).to_str().ok().map(str::to_string)
        };
        libc::freeaddrinfo(res);
        out.filter(|n| !n.is_empty())
    }
}

/// Takes ownership of descriptors that recvmsg(2) just installed in this process
/// (SCM_RIGHTS). Must be given each received descriptor exactly once.
pub fn adopt_fds(raw: Vec<RawFd>) -> Vec<OwnedFd> {
    raw.into_iter()
        // SAFETY: the kernel created these descriptors for us during recvmsg; nothing else
        // in the process knows them, so each gets exactly one owner here and is closed when
        // that owner is dropped.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Takes ownership of the descriptors the service manager passed, `first..first + n`
/// (sd_listen_fds(3)); a number that is not an open descriptor is skipped. Must be called
/// once, first thing, before inboxd opens any descriptor of its own.
pub fn adopt_passed_fds(first: RawFd, n: RawFd) -> Vec<OwnedFd> {
    (first..first.saturating_add(n))
        // SAFETY: F_GETFD only asks whether the number is an open descriptor. If it is, the
        // service manager passed it to this process (the caller checked LISTEN_PID) and
        // nothing in inboxd has opened or adopted a descriptor yet, so it gets exactly one
        // owner here, closed when that owner is dropped.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

// The kernel's struct __user_cap_header_struct and, for version 3, two
// __user_cap_data_struct (capabilities 0-31, then 32-63).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// capget(2): the permitted set of this thread, as a mask of capability numbers.
pub fn capget() -> Result<u64, nix::errno::Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(), CapData::default()];
    // SAFETY: both pointers point to live, correctly laid out #[repr(C)] values for the whole
    // call; version 3 writes exactly two data structs.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r == 0 {
        Ok(u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32)
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// capset(2): makes `keep` (a mask of capability numbers) the whole permitted and effective
/// sets of this thread (inheritable: none). It can only keep what is permitted already.
pub fn capset(keep: u64) -> Result<(), nix::errno::Errno> {
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: both pointers point to live, correctly laid out #[repr(C)] values for the whole
    // call (version 3 reads exactly two data structs); capset only reads them.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// sync_file_range(fd, 0, 0, WAIT_BEFORE | WRITE | WAIT_AFTER): waits for the writeback of
/// the whole file and reports an error from it that this open file description has not seen
/// yet (errseq), without flushing the device cache. After a syncfs, this is how each file
/// learns whether its own data reached the disk: syncfs reports an error only once, to
/// whichever caller comes first.
pub fn wait_for_writeback(fd: BorrowedFd<'_>) -> Result<(), nix::errno::Errno> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain system call on a descriptor the caller keeps open for the call; it
    // touches no memory of ours.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn localhost_has_a_canonical_name() {
        // /etc/hosts maps localhost on every Linux system; whatever it is, it is non-empty.
        let n = super::canonical_name("localhost").expect("localhost resolves");
        assert!(!n.is_empty());
        assert!(super::canonical_name("no-such-host.invalid").is_none());
    }
}
