//! The host's fully qualified name, the default for `--hostname` and the first local domain.
//!
//! Called once at start-up, before the event loop exists: the resolver may consult DNS, so
//! it must never be called from the loop.

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
    crate::sys::canonical_name(&short).unwrap_or(short)
}
