//! The host's fully qualified name, the default for `--hostname` and the first local domain.
//!
//! Owns the one `unsafe` block of inboxd: getaddrinfo(3) with AI_CANONNAME, which nix does not
//! wrap. It is called once at start-up, before the event loop exists (it may consult DNS, so
//! it must never be called from the loop).

use std::ffi::{CStr, CString};

use nix::libc;

/// gethostname(2), made fully qualified through the resolver (as `hostname -f` does) when it
/// has no dot. Falls back to the short name, then to `localhost`.
pub fn fqdn() -> String {
    let short = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    if short.contains('.') {
        return short;
    }
    canonical_name(&short).unwrap_or(short)
}

fn canonical_name(name: &str) -> Option<String> {
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
