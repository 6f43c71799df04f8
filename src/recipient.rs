//! Recipients: a local part from RCPT TO becomes the local accounts that get a copy.
//!
//! Owns the alias table (`/etc/aliases` syntax, local targets only) and account lookups
//! through NSS (`getpwnam` via `nix::unistd::User::from_name`), keeping "no such user" apart
//! from "the lookup failed" so the session can answer 550 5.1.1 or 451 4.3.0. Local parts keep
//! their case (RFC 5321 2.4): an exact match wins, then (if enabled) the all-lowercase name.
//! It must not write anything, and it never runs or opens what an alias names: pipe, file and
//! `:include:` targets are refused with a warning.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use log::warn;
use nix::errno::Errno;
use nix::unistd::{Gid, Uid, User};

/// RFC 5321 4.5.1: every host accepts mail for Postmaster, in any case.
pub const POSTMASTER: &str = "postmaster";
/// How deep aliases may name aliases before we call it a loop.
const MAX_ALIAS_DEPTH: usize = 10;

/// A local account that can receive mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

/// Why a lookup could not be answered: always temporary (451 4.3.0), the client retries.
#[derive(Debug)]
pub enum RecipientError {
    /// getpwnam failed (NSS backend down, LDAP unreachable, ...).
    Lookup { name: String, errno: Errno },
}

impl fmt::Display for RecipientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipientError::Lookup { name, errno } => {
                write!(f, "account lookup for {name:?} failed: {errno}")
            }
        }
    }
}

impl std::error::Error for RecipientError {}

/// Names we are willing to pass to getpwnam: the portable user-name set (POSIX 3.437 plus
/// the `_`-first and `.` that shadow-utils allows), at most 32 octets. Anything else cannot be
/// an account, and never reaches NSS.
pub fn is_account_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Looks an account up through NSS: `Ok(None)` is "no such user", `Err` is a failed lookup.
pub fn lookup_account(name: &str) -> Result<Option<Account>, RecipientError> {
    if !is_account_name(name) {
        return Ok(None);
    }
    match User::from_name(name) {
        Ok(Some(u)) => Ok(Some(Account {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
            home: u.dir,
        })),
        Ok(None) => Ok(None),
        Err(errno) => Err(RecipientError::Lookup {
            name: name.to_string(),
            errno,
        }),
    }
}

/// An alias target we can deliver to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A name: another alias or an account.
    Name(String),
    /// `\name`: the account itself, no further alias expansion (sendmail convention).
    Account(String),
}

/// The alias table: `name: target, target, ...`, `#` comments, continuation lines starting
/// with white space (aliases(5)). Keys are stored as written and matched exactly; lower-case
/// keys serve the lower-case fallback.
#[derive(Debug, Default, Clone)]
pub struct Aliases {
    map: HashMap<String, Vec<Target>>,
}

impl Aliases {
    pub fn load(path: &Path) -> std::io::Result<Aliases> {
        let text = std::fs::read(path)?;
        Ok(Aliases::parse(
            &String::from_utf8_lossy(&text),
            &path.display().to_string(),
        ))
    }

    pub fn parse(text: &str, origin: &str) -> Aliases {
        // Join continuation lines first.
        let mut logical: Vec<(usize, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = logical.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
                continue;
            }
            if !line.trim().is_empty() {
                logical.push((n + 1, line.to_string()));
            }
        }
        let mut map = HashMap::new();
        for (n, line) in logical {
            let Some((key, rest)) = line.split_once(':') else {
                warn!("{origin}:{n}: no ':' in alias line, ignored");
                continue;
            };
            let key = key.trim().trim_matches('"');
            if key.is_empty() {
                continue;
            }
            let mut targets = Vec::new();
            for t in rest.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let t = t.trim_matches('"');
                if t.starts_with('|') || t.starts_with('/') || t.starts_with(":include:") {
                    warn!("{origin}:{n}: alias {key}: target {t:?} refused (inboxd never runs programs or writes files named in aliases)");
                } else if let Some(acct) = t.strip_prefix('\\') {
                    targets.push(Target::Account(acct.to_string()));
                } else if t.contains('@') {
                    warn!("{origin}:{n}: alias {key}: remote target {t:?} refused (inboxd never relays)");
                } else {
                    targets.push(Target::Name(t.to_string()));
                }
            }
            map.insert(key.to_string(), targets);
        }
        Aliases { map }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Turns local parts into account names.
#[derive(Debug, Clone)]
pub struct Resolver {
    aliases: Aliases,
    lowercase_fallback: bool,
    lookup: fn(&str) -> Result<Option<Account>, RecipientError>,
}

impl Resolver {
    pub fn new(aliases: Aliases, lowercase_fallback: bool) -> Resolver {
        Resolver {
            aliases,
            lowercase_fallback,
            lookup: lookup_account,
        }
    }

    /// Replaces the alias table (SIGHUP reloads it).
    pub fn set_aliases(&mut self, aliases: Aliases) {
        self.aliases = aliases;
    }

    /// Resolves a local part to the accounts that get a copy. `Ok(None)`: no such recipient.
    pub fn resolve(&self, local_part: &str) -> Result<Option<Vec<String>>, RecipientError> {
        let mut candidates = vec![local_part.to_string()];
        if local_part.eq_ignore_ascii_case(POSTMASTER) {
            candidates = vec![POSTMASTER.to_string()];
        } else if self.lowercase_fallback {
            let lower = local_part.to_ascii_lowercase();
            if lower != local_part {
                candidates.push(lower);
            }
        }
        for name in &candidates {
            let mut out = Vec::new();
            if self.expand(name, 0, &mut Vec::new(), &mut out)? {
                return Ok(if out.is_empty() { None } else { Some(out) });
            }
        }
        if candidates[0] == POSTMASTER {
            // No alias and no account called postmaster: RFC 5321 4.5.1 still requires the
            // address to work, so it reaches root (whose alias, if any, is followed).
            let mut out = Vec::new();
            if self.expand("root", 0, &mut Vec::new(), &mut out)? && !out.is_empty() {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    /// Expands `name` into `out`. Returns false when `name` is neither alias nor account.
    fn expand(
        &self,
        name: &str,
        depth: usize,
        seen: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<bool, RecipientError> {
        if let Some(targets) = self.aliases.map.get(name) {
            if seen.iter().any(|s| s == name) || depth >= MAX_ALIAS_DEPTH {
                warn!("alias loop through {name:?}; that branch is dropped");
                return Ok(true);
            }
            seen.push(name.to_string());
            for t in targets {
                let found = match t {
                    Target::Account(a) => self.account_into(a, out)?,
                    Target::Name(n) => self.expand(n, depth + 1, seen, out)?,
                };
                if !found {
                    warn!("alias {name:?}: target {t:?} is neither an alias nor an account");
                }
            }
            seen.pop();
            return Ok(true);
        }
        self.account_into(name, out)
    }

    fn account_into(&self, name: &str, out: &mut Vec<String>) -> Result<bool, RecipientError> {
        match (self.lookup)(name)? {
            Some(a) => {
                if !out.contains(&a.name) {
                    out.push(a.name);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(name: &str) -> Result<Option<Account>, RecipientError> {
        let known = ["root", "alice", "Carol", "Jones", "bob"];
        if name == "broken" {
            return Err(RecipientError::Lookup {
                name: name.into(),
                errno: Errno::EIO,
            });
        }
        Ok(known.contains(&name).then(|| Account {
            name: name.to_string(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            home: PathBuf::from("/home").join(name),
        }))
    }

    fn resolver(aliases: &str, fallback: bool) -> Resolver {
        Resolver {
            aliases: Aliases::parse(aliases, "test"),
            lowercase_fallback: fallback,
            lookup: fake,
        }
    }

    fn names(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn exact_match_wins_and_case_is_preserved() {
        let r = resolver("", true);
        assert_eq!(r.resolve("Carol").unwrap(), names(&["Carol"]));
        // No account "CAROL" nor "carol": never folded onto "Carol".
        assert_eq!(r.resolve("CAROL").unwrap(), None);
        assert_eq!(r.resolve("carol").unwrap(), None);
        assert_eq!(r.resolve("ALICE").unwrap(), names(&["alice"]));
        assert_eq!(resolver("", false).resolve("ALICE").unwrap(), None);
    }

    #[test]
    fn postmaster_any_case_reaches_root_or_its_alias() {
        let r = resolver("", true);
        assert_eq!(r.resolve("PostMaster").unwrap(), names(&["root"]));
        let r = resolver("postmaster: root\nroot: alice, bob\n", true);
        assert_eq!(r.resolve("POSTMASTER").unwrap(), names(&["alice", "bob"]));
    }

    #[test]
    fn alias_file_syntax_and_refused_targets() {
        let text = "# comment\nstaff: alice,\n  \\bob\nevil: |/bin/sh, /etc/passwd, :include:/x, u@remote.example\nmixed: \"|cmd\", Jones\n";
        let r = resolver(text, true);
        assert_eq!(r.resolve("staff").unwrap(), names(&["alice", "bob"]));
        assert_eq!(r.resolve("evil").unwrap(), None);
        assert_eq!(r.resolve("mixed").unwrap(), names(&["Jones"]));
    }

    #[test]
    fn alias_loops_terminate() {
        let r = resolver("a: b\nb: a, alice\nself: self\n", true);
        assert_eq!(r.resolve("a").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve("self").unwrap(), None);
    }

    #[test]
    fn lookup_failure_is_an_error_not_unknown() {
        let r = resolver("", true);
        assert!(r.resolve("broken").is_err());
        assert_eq!(r.resolve("nosuchuser").unwrap(), None);
        assert_eq!(r.resolve("../etc").unwrap(), None);
    }

    #[test]
    fn account_name_charset() {
        assert!(is_account_name("Carol"));
        assert!(is_account_name("a.b-c_d"));
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a b",
            "a\u{e9}",
            &"x".repeat(33),
        ] {
            assert!(!is_account_name(bad), "{bad}");
        }
    }
}
