//! Recipients: a local part from RCPT TO becomes the local accounts that get a copy.
//!
//! Owns the alias table (`/etc/aliases` syntax, local targets only) and account lookups
//! through NSS (`getpwnam` via `nix::unistd::User::from_name`), keeping "no such user" apart
//! from "the lookup failed" so the session can answer 550 5.1.1 or 451 4.3.0. Local parts keep
//! their case (RFC 5321 2.4): the name as written is tried first, then (if enabled) the
//! all-lowercase name; for each, an alias comes before an account, and an alias key also
//! answers to its all-lowercase form (`ALICE:` takes mail for `alice` before the account).
//! It must not write anything, and it never runs or opens what an alias names: pipe, file and
//! `:include:` targets are refused with a warning.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use nix::errno::Errno;
use nix::unistd::{Gid, Uid, User};

/// RFC 5321 4.5.1: every host accepts mail for Postmaster, in any case.
pub const POSTMASTER: &str = "postmaster";
/// How deep aliases may name aliases before we call it a loop.
const MAX_ALIAS_DEPTH: usize = 10;
/// How long an account that was found is remembered (a burst of mail to one user costs one
/// NSS lookup). "No such user" and failed lookups are never remembered: a new account gets
/// mail at once, and an outage is retried.
const ACCOUNT_TTL: Duration = Duration::from_secs(2);
/// Accounts remembered at most.
const ACCOUNT_CACHE: usize = 1024;

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
/// with white space (aliases(5)). Keys are stored as written and matched exactly, and each is
/// also matched by its all-lowercase form (see [`Aliases::get`]).
#[derive(Debug, Default, Clone)]
pub struct Aliases {
    /// Keys as written.
    map: HashMap<String, Vec<Target>>,
    /// Each key lower-cased, to the key as written (the later line's when two fold alike).
    folded: HashMap<String, String>,
    /// What was wrong in the file (each also logged as a warning), for newaliases.
    problems: Vec<String>,
}

/// The comma-separated targets of an alias line, a comma inside double quotes kept in its
/// target (found in review: `x: "|/bin/prog -a,bob"` also reached the account bob).
fn split_targets(rest: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in rest.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
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
        let mut folded: HashMap<String, String> = HashMap::new();
        let mut problems = Vec::new();
        let mut problem = |p: String| {
            warn!("{p}");
            problems.push(p);
        };
        for (n, line) in logical {
            let Some((key, rest)) = line.split_once(':') else {
                problem(format!("{origin}:{n}: no ':' in alias line, ignored"));
                continue;
            };
            // A key is matched as written and by its all-lowercase form (`MAILER-DAEMON:`,
            // `Postmaster:`; found in review: RFC 5321 4.5.1 makes postmaster
            // case-insensitive, and `Postmaster: alice` was never used).
            let key = key.trim().trim_matches('"').to_string();
            if key.is_empty() {
                continue;
            }
            let lower = key.to_ascii_lowercase();
            // Decided by the table, not the index (found in review: a key written a third
            // time after one in another case was not reported as replacing the first).
            if map.contains_key(&key) {
                problem(format!(
                    "{origin}:{n}: alias {key} defined again: this line replaces the earlier one"
                ));
            } else if let Some(earlier) = folded.get(&lower) {
                problem(format!(
                    "{origin}:{n}: alias {key} defined again as {earlier} in another case: each is matched as written, and {lower} reaches the one written {lower}, else the later line"
                ));
            }
            folded.insert(lower, key.clone());
            let mut targets = Vec::new();
            for t in split_targets(rest)
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
            {
                let t = t.trim_matches('"');
                if t.starts_with('|') || t.starts_with('/') || t.starts_with(":include:") {
                    problem(format!("{origin}:{n}: alias {key}: target {t:?} refused (inboxd never runs programs or writes files named in aliases)"));
                } else if let Some(acct) = t.strip_prefix('\\') {
                    targets.push(Target::Account(acct.to_string()));
                } else if t.contains('@') {
                    problem(format!("{origin}:{n}: alias {key}: remote target {t:?} refused (inboxd never relays)"));
                } else {
                    targets.push(Target::Name(t.to_string()));
                }
            }
            map.insert(key, targets);
        }
        Aliases {
            map,
            folded,
            problems,
        }
    }

    /// The alias `name` names: the key written so, or, for an all-lowercase `name`, the key
    /// whose all-lowercase form it is (`postmaster` finds `Postmaster:`, `mailer-daemon`
    /// finds `MAILER-DAEMON:`). (key as written, targets).
    fn get(&self, name: &str) -> Option<(&String, &Vec<Target>)> {
        if let Some(kv) = self.map.get_key_value(name) {
            return Some(kv);
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let key = self.folded.get(name)?;
        self.map.get_key_value(key)
    }

    /// Every alias and its usable targets as written (`\\name` for an account target), sorted.
    pub fn entries(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .map
            .iter()
            .map(|(k, ts)| {
                let ts = ts
                    .iter()
                    .map(|t| match t {
                        Target::Name(n) => n.clone(),
                        Target::Account(a) => format!("\\{a}"),
                    })
                    .collect();
                (k.clone(), ts)
            })
            .collect();
        out.sort();
        out
    }

    /// Whether `name` is an alias.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// What was wrong in the file, one line each.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What a local part resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The accounts that get a copy (never empty).
    Accounts(Vec<String>),
    /// Neither an alias nor an account.
    Unknown,
    /// It reaches only uid-0 accounts, and delivery as root is refused.
    Uid0Refused,
}

/// Turns local parts into account names.
///
/// Clones share the cache of found accounts: the event loop answers from it
/// ([`Resolver::resolve_cached`]) while a lookup thread fills it ([`Resolver::resolve`]).
#[derive(Debug, Clone)]
pub struct Resolver {
    aliases: Aliases,
    lowercase_fallback: bool,
    /// Whether accounts with uid 0 are dropped from every expansion: set when inboxd runs as
    /// root without `--allow-root-delivery`, so the delivery agent never writes as root.
    refuse_uid0: bool,
    lookup: fn(&str) -> Result<Option<Account>, RecipientError>,
    found: Arc<Mutex<HashMap<String, (Instant, Account)>>>,
}

/// One expansion's result: accounts found, and whether a uid-0 account was dropped. What
/// to warn about is collected beside it and logged once the resolution is over, so that a
/// resolution tried from the cache and then redone with lookups warns once.
#[derive(Default)]
struct Expansion {
    accounts: Vec<String>,
    dropped_uid0: bool,
}

fn log_warnings(warnings: Vec<String>) {
    for w in warnings {
        warn!("{w}");
    }
}

/// A cache-only expansion needed an account that is not in the cache.
struct NotCached;

impl Resolver {
    pub fn new(aliases: Aliases, lowercase_fallback: bool, refuse_uid0: bool) -> Resolver {
        Resolver {
            aliases,
            lowercase_fallback,
            refuse_uid0,
            lookup: lookup_account,
            found: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The home of an account found by an earlier lookup, however long ago (homes seldom
    /// move; the delivery agent looks the account up again anyway): what the receiver needs
    /// to pick the agent's lane for it (see `delivery::lanes`), without a lookup. `name` is
    /// the account's name as NSS gave it, which may differ from the name it was asked by
    /// (a directory that matches names without regard to case), the key of the memory.
    pub fn home_of(&self, name: &str) -> Option<PathBuf> {
        let found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        match found.get(name) {
            Some((_, a)) if a.name == name => Some(a.home.clone()),
            _ => found
                .values()
                .find(|(_, a)| a.name == name)
                .map(|(_, a)| a.home.clone()),
        }
    }

    /// An account found in the last [`ACCOUNT_TTL`], if any.
    fn cached(&self, name: &str, now: Instant) -> Option<Account> {
        let found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        match found.get(name) {
            Some((at, a)) if now.duration_since(*at) < ACCOUNT_TTL => Some(a.clone()),
            _ => None,
        }
    }

    /// An NSS lookup, answered from the last [`ACCOUNT_TTL`] when the account was found. The
    /// cache's lock is never held across the lookup itself.
    fn lookup(&self, name: &str) -> Result<Option<Account>, RecipientError> {
        if let Some(a) = self.cached(name, Instant::now()) {
            return Ok(Some(a));
        }
        let r = (self.lookup)(name)?;
        // Timed from the answer: a lookup slower than the TTL is still remembered (found in
        // review).
        let now = Instant::now();
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Some(a) => {
                if found.len() >= ACCOUNT_CACHE {
                    found.clear();
                }
                found.insert(name.to_string(), (now, a.clone()));
            }
            None => {
                found.remove(name);
            }
        }
        Ok(r)
    }

    /// The alias table in use.
    pub fn aliases(&self) -> &Aliases {
        &self.aliases
    }

    /// Puts in a table that another copy of this resolver has already checked with
    /// [`Resolver::set_aliases`] (the server's lookup thread does the checking, since it
    /// looks accounts up).
    pub fn adopt_aliases(&mut self, aliases: Aliases) {
        self.aliases = aliases;
    }

    /// Replaces the alias table (SIGHUP reloads it), unless postmaster would then reach
    /// nobody: the old table stays and the reason is returned.
    pub fn set_aliases(&mut self, aliases: Aliases) -> Result<(), String> {
        let old = std::mem::replace(&mut self.aliases, aliases);
        if let Err(e) = self.check_postmaster() {
            self.aliases = old;
            return Err(e);
        }
        Ok(())
    }

    /// RFC 5321 4.5.1: postmaster must always reach somebody. Err says why it would not
    /// (it ends at uid 0 and delivery as root is refused); a failed lookup is not an error
    /// here, it is answered 451 at RCPT time like any other.
    pub fn check_postmaster(&self) -> Result<(), String> {
        match self.resolve(POSTMASTER) {
            Ok(Resolution::Uid0Refused) => Err(
                "postmaster reaches only root, and inboxd does not deliver as uid 0: \
                 add \"root: <a person's account>\" to the aliases file, \
                 or pass --allow-root-delivery"
                    .into(),
            ),
            Ok(Resolution::Unknown) => {
                Err("postmaster reaches nobody: alias postmaster (or root) to an account".into())
            }
            _ => Ok(()),
        }
    }

    /// Resolves a local part to the accounts that get a copy, looking accounts up through
    /// NSS where the cache does not have them (it may block: the server calls it from its
    /// lookup thread, never from the event loop).
    pub fn resolve(&self, local_part: &str) -> Result<Resolution, RecipientError> {
        let mut warnings = Vec::new();
        let r = self.resolve_with(local_part, &mut warnings, &mut |name| self.lookup(name));
        // Logged whatever the result: what was found wrong before a failed lookup still is.
        log_warnings(warnings);
        r
    }

    /// Resolves a local part from the alias table and the cache alone, without any system
    /// call: `None` when an account it needs is not cached. A cached account is one found:
    /// "no such user" and failures are always asked again; a name NSS is never asked about
    /// ([`is_account_name`]) is no account, here too.
    pub fn resolve_cached(&self, local_part: &str) -> Option<Resolution> {
        let now = Instant::now();
        let mut warnings = Vec::new();
        let r = self
            .resolve_with(local_part, &mut warnings, &mut |name| {
                if !is_account_name(name) {
                    return Ok(None);
                }
                self.cached(name, now).map(Some).ok_or(NotCached)
            })
            .ok();
        // Warnings only with an answer: without one, the lookup thread redoes it all.
        if r.is_some() {
            log_warnings(warnings);
        }
        r
    }

    fn resolve_with<E>(
        &self,
        local_part: &str,
        warnings: &mut Vec<String>,
        lookup: &mut dyn FnMut(&str) -> Result<Option<Account>, E>,
    ) -> Result<Resolution, E> {
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
            let mut out = Expansion::default();
            if self.expand(name, 0, &mut Vec::new(), &mut out, warnings, lookup)? {
                return Ok(out.into_resolution());
            }
        }
        if candidates[0] == POSTMASTER {
            // No alias and no account called postmaster: RFC 5321 4.5.1 still requires the
            // address to work, so it reaches root (whose alias, if any, is followed).
            let mut out = Expansion::default();
            if self.expand("root", 0, &mut Vec::new(), &mut out, warnings, lookup)? {
                return Ok(out.into_resolution());
            }
        }
        Ok(Resolution::Unknown)
    }

    /// Expands `name` into `out`. Returns false when `name` is neither alias nor account.
    fn expand<E>(
        &self,
        name: &str,
        depth: usize,
        seen: &mut Vec<String>,
        out: &mut Expansion,
        warnings: &mut Vec<String>,
        lookup: &mut dyn FnMut(&str) -> Result<Option<Account>, E>,
    ) -> Result<bool, E> {
        // An alias first (the key written so, or whose all-lowercase form `name` is), then
        // the account: the lower-case fallback's candidate reaches an upper-case key, and
        // an account `Carol` keeps mail to `Carol` from an alias `carol`.
        if let Some((key, targets)) = self.aliases.get(name) {
            let key = key.clone();
            if seen.contains(&key) {
                // An alias that reaches itself (`alice: alice, bob`, `root: root, admin`)
                // means the account of that name there (found in review: the account's own
                // copy was dropped as a loop, and `alice: alice` refused alice's mail).
                if self.account_into(name, out, warnings, lookup)? {
                    return Ok(true);
                }
                warnings.push(format!(
                    "alias loop through {name:?}, and no account of that name; that branch is dropped"
                ));
                return Ok(true);
            }
            if depth >= MAX_ALIAS_DEPTH {
                warnings.push(format!(
                    "alias {name:?} nested more than {MAX_ALIAS_DEPTH} deep; that branch is dropped"
                ));
                return Ok(true);
            }
            seen.push(key);
            for t in targets {
                let found = match t {
                    Target::Account(a) => self.account_into(a, out, warnings, lookup)?,
                    Target::Name(n) => self.expand(n, depth + 1, seen, out, warnings, lookup)?,
                };
                if !found {
                    warnings.push(format!(
                        "alias {name:?}: target {t:?} is neither an alias nor an account"
                    ));
                }
            }
            seen.pop();
            return Ok(true);
        }
        self.account_into(name, out, warnings, lookup)
    }

    fn account_into<E>(
        &self,
        name: &str,
        out: &mut Expansion,
        warnings: &mut Vec<String>,
        lookup: &mut dyn FnMut(&str) -> Result<Option<Account>, E>,
    ) -> Result<bool, E> {
        match lookup(name)? {
            Some(a) if self.refuse_uid0 && a.uid.is_root() => {
                warnings.push(format!(
                    "{name:?} is uid 0: no copy (delivery as root is not allowed)"
                ));
                out.dropped_uid0 = true;
                Ok(true)
            }
            Some(a) => {
                if !out.accounts.contains(&a.name) {
                    out.accounts.push(a.name);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Expansion {
    fn into_resolution(self) -> Resolution {
        if !self.accounts.is_empty() {
            Resolution::Accounts(self.accounts)
        } else if self.dropped_uid0 {
            Resolution::Uid0Refused
        } else {
            Resolution::Unknown
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
            uid: Uid::from_raw(if name == "root" { 0 } else { 1000 }),
            gid: Gid::from_raw(1000),
            home: PathBuf::from("/home").join(name),
        }))
    }

    fn resolver(aliases: &str, fallback: bool) -> Resolver {
        Resolver {
            aliases: Aliases::parse(aliases, "test"),
            lowercase_fallback: fallback,
            refuse_uid0: false,
            lookup: fake,
            found: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn names(v: &[&str]) -> Resolution {
        Resolution::Accounts(v.iter().map(|s| s.to_string()).collect())
    }

    const UNKNOWN: Resolution = Resolution::Unknown;

    #[test]
    fn uid0_is_dropped_when_refused() {
        let mut r = resolver(
            "ops: root, alice
boss: root
",
            true,
        );
        r.refuse_uid0 = true;
        assert_eq!(r.resolve("root").unwrap(), Resolution::Uid0Refused);
        assert_eq!(r.resolve("boss").unwrap(), Resolution::Uid0Refused);
        assert_eq!(r.resolve("Postmaster").unwrap(), Resolution::Uid0Refused);
        assert_eq!(r.resolve("ops").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve("nobody-here").unwrap(), UNKNOWN);
        assert!(r.check_postmaster().is_err());
        // Aliased to a person, root and postmaster work again.
        let mut r = resolver(
            "root: alice
",
            true,
        );
        r.refuse_uid0 = true;
        assert_eq!(r.resolve("postmaster").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve("root").unwrap(), names(&["alice"]));
    }

    #[test]
    fn exact_match_wins_and_case_is_preserved() {
        let r = resolver("", true);
        assert_eq!(r.resolve("Carol").unwrap(), names(&["Carol"]));
        // No account "CAROL" nor "carol": never folded onto "Carol".
        assert_eq!(r.resolve("CAROL").unwrap(), UNKNOWN);
        assert_eq!(r.resolve("carol").unwrap(), UNKNOWN);
        assert_eq!(r.resolve("ALICE").unwrap(), names(&["alice"]));
        assert_eq!(resolver("", false).resolve("ALICE").unwrap(), UNKNOWN);
    }

    #[test]
    fn postmaster_any_case_reaches_root_or_its_alias() {
        let r = resolver("", true);
        assert_eq!(r.resolve("PostMaster").unwrap(), names(&["root"]));
        let r = resolver("postmaster: root\nroot: alice, bob\n", true);
        assert_eq!(r.resolve("POSTMASTER").unwrap(), names(&["alice", "bob"]));
        assert!(r.check_postmaster().is_ok());
        assert!(resolver("postmaster: nobody-here\n", true)
            .check_postmaster()
            .is_err());
    }

    #[test]
    fn alias_file_syntax_and_refused_targets() {
        let text = "# comment\nstaff: alice,\n  \\bob\nevil: |/bin/sh, /etc/passwd, :include:/x, u@remote.example\nmixed: \"|cmd\", Jones\n";
        let r = resolver(text, true);
        assert_eq!(r.resolve("staff").unwrap(), names(&["alice", "bob"]));
        assert_eq!(r.resolve("evil").unwrap(), UNKNOWN);
        assert_eq!(r.resolve("mixed").unwrap(), names(&["Jones"]));
    }

    /// Found in review: an alias naming itself dropped its own account's copy, keys were
    /// compared with their case, a duplicate key went unreported, and a comma in quotes split
    /// a target.
    #[test]
    fn self_references_case_duplicates_and_quotes() {
        let r = resolver(
            "alice: alice, bob\nbob: bob\nPostmaster: Carol\nMAILER-DAEMON: postmaster\nstaff: alice\nSTAFF: bob\nx: \"|/bin/prog -a,Jones\"\n",
            true,
        );
        assert_eq!(r.resolve("alice").unwrap(), names(&["alice", "bob"]));
        assert_eq!(r.resolve("bob").unwrap(), names(&["bob"]));
        assert_eq!(r.resolve("postmaster").unwrap(), names(&["Carol"]));
        assert_eq!(r.resolve("mailer-daemon").unwrap(), names(&["Carol"]));
        // Two keys that differ in case: each as written; the all-lowercase name reaches the
        // one written so; and it is a problem.
        assert_eq!(r.resolve("staff").unwrap(), names(&["alice", "bob"]));
        assert_eq!(r.resolve("STAFF").unwrap(), names(&["bob"]));
        // (`Staff`: no alias or account written so; the lower-case fallback's `staff`.)
        assert_eq!(r.resolve("Staff").unwrap(), names(&["alice", "bob"]));
        assert!(r
            .aliases
            .problems()
            .iter()
            .any(|p| p.contains("alias STAFF defined again as staff in another case")));
        // The pipe is refused whole; Jones is not a target.
        assert_eq!(r.resolve("x").unwrap(), UNKNOWN);
        assert!(r.aliases.problems().iter().any(|p| p.contains("-a,Jones")));
        // `+` is no account name, but an alias may have one.
        let r = resolver("alice+lists: alice\n", true);
        assert_eq!(r.resolve("alice+lists").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve("alice+other").unwrap(), UNKNOWN);
        // A key written a third time, after one in another case, replaces the first.
        let r = resolver("staff: alice\nSTAFF: bob\nstaff: Jones\n", true);
        assert_eq!(r.resolve("staff").unwrap(), names(&["Jones"]));
        assert!(r
            .aliases
            .problems()
            .iter()
            .any(|p| p.contains(":3: alias staff defined again: this line replaces")));
        // `Root:` is root's alias too, even with root's mail refused (found in review: the
        // refused account hid it, and inboxd would not start).
        let mut r = resolver("Root: alice\n", true);
        r.refuse_uid0 = true;
        assert_eq!(r.resolve("postmaster").unwrap(), names(&["alice"]));
        assert!(r.check_postmaster().is_ok());
        // An account named exactly keeps its mail from an alias that differs in case.
        let r = resolver("carol: bob\n", false);
        assert_eq!(r.resolve("Carol").unwrap(), names(&["Carol"]));
        assert_eq!(r.resolve("carol").unwrap(), names(&["bob"]));
    }

    #[test]
    fn alias_loops_terminate() {
        let r = resolver("a: b\nb: a, alice\nself: self\n", true);
        assert_eq!(r.resolve("a").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve("self").unwrap(), UNKNOWN);
    }

    #[test]
    fn lookup_failure_is_an_error_not_unknown() {
        let r = resolver("", true);
        assert!(r.resolve("broken").is_err());
        assert_eq!(r.resolve("nosuchuser").unwrap(), UNKNOWN);
        assert_eq!(r.resolve("../etc").unwrap(), UNKNOWN);
    }

    #[test]
    fn the_cache_answers_only_what_it_holds_and_is_shared_by_clones() {
        let r = resolver("staff: alice, bob\nroot: alice\n", true);
        let thread_copy = r.clone();
        // Nothing cached yet: every account (and every name NSS would be asked about) needs
        // the lookup thread.
        assert_eq!(r.resolve_cached("alice"), None);
        assert_eq!(r.resolve_cached("nosuchuser"), None);
        // A name NSS is never asked about is no account, without the thread.
        assert_eq!(r.resolve_cached("../etc"), Some(UNKNOWN));
        // The thread's copy looks them up; the event loop's copy then answers from the cache.
        assert_eq!(thread_copy.resolve("alice").unwrap(), names(&["alice"]));
        assert_eq!(r.resolve_cached("alice"), Some(names(&["alice"])));
        assert_eq!(
            r.resolve_cached("ALICE"),
            None,
            "the exact name is looked up first"
        );
        // An alias needs all its accounts cached.
        assert_eq!(r.resolve_cached("staff"), None);
        assert_eq!(
            thread_copy.resolve("staff").unwrap(),
            names(&["alice", "bob"])
        );
        assert_eq!(r.resolve_cached("staff"), Some(names(&["alice", "bob"])));
        // postmaster is first asked for as an account, which the cache never holds as absent.
        assert_eq!(r.resolve_cached("postmaster"), None);
        assert_eq!(
            thread_copy.resolve("postmaster").unwrap(),
            names(&["alice"])
        );
        // "No such user" is never cached, so a new account gets mail at once.
        assert_eq!(thread_copy.resolve("nosuchuser").unwrap(), UNKNOWN);
        assert_eq!(r.resolve_cached("nosuchuser"), None);
    }

    #[test]
    fn a_reload_checked_by_one_copy_is_adopted_by_another() {
        let mut thread_copy = resolver("", true);
        let mut r = thread_copy.clone();
        thread_copy
            .set_aliases(Aliases::parse("team: Carol, Jones\n", "test"))
            .unwrap();
        r.adopt_aliases(thread_copy.aliases().clone());
        assert_eq!(
            thread_copy.resolve("team").unwrap(),
            names(&["Carol", "Jones"])
        );
        assert_eq!(r.resolve_cached("team"), Some(names(&["Carol", "Jones"])));
        // A table that leaves postmaster with nobody is refused, and the old one stays.
        assert!(thread_copy
            .set_aliases(Aliases::parse("postmaster: nobody-here\n", "test"))
            .is_err());
        assert!(thread_copy.aliases().contains("team"));
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
