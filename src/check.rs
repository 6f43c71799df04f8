//! `inboxd check`: a doctor that reports, one plain line each, what a sysadmin would
//! otherwise find the hard way: unusable options, aliases that reach nobody (root and
//! postmaster above all), accounts whose Maildir is not theirs, is a symlink or can be
//! written by others, listen addresses already taken, and Maildirs on an ext4 without a
//! journal.
//!
//! Owns only looking: it opens, stats and binds (and at once closes) but never creates,
//! changes or delivers anything. Lines start with `problem:` (inboxd will refuse or fail
//! something), `note:` (worth knowing, not wrong) or `ok:`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::recipient::{lookup_account, Aliases, Resolution, Resolver, POSTMASTER};

/// Accounts below this uid are system accounts: their Maildirs are not checked (root apart).
/// `UID_MIN` of /etc/login.defs where it says, else Debian's and Fedora's default.
const FIRST_USER_UID: u32 = 1000;

/// `UID_MIN` from the text of login.defs(5), if it is there.
fn uid_min(login_defs: &str) -> Option<u32> {
    login_defs.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        if w.next() != Some("UID_MIN") {
            return None;
        }
        w.next()?.parse().ok()
    })
}

#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub problems: usize,
}

impl Report {
    fn problem(&mut self, s: String) {
        self.problems += 1;
        self.lines.push(format!("problem: {s}"));
    }
    fn note(&mut self, s: String) {
        self.lines.push(format!("note: {s}"));
    }
    fn ok(&mut self, s: String) {
        self.lines.push(format!("ok: {s}"));
    }
}

/// Runs every check for `config` as inboxd would run with it (as the current user).
pub fn run(config: &Config) -> Report {
    let mut r = Report::default();
    let privileged = nix::unistd::geteuid().is_root();
    check_user(config, privileged, &mut r);
    check_maildir_root(config, &mut r);
    let aliases = check_aliases_file(config, &mut r);
    check_aliases(config, privileged, &aliases, &mut r);
    check_listen(config, &mut r);
    let dirs = check_accounts(config, &mut r);
    check_journals(&dirs, &mut r);
    if !config.hostname.contains('.') {
        r.note(format!(
            "hostname {:?} is not fully qualified; give one with --hostname",
            config.hostname
        ));
    }
    r
}

fn check_user(config: &Config, privileged: bool, r: &mut Report) {
    if !privileged {
        r.note(
            "not run as root: inboxd would run unprivileged, writing every copy as this user"
                .into(),
        );
        return;
    }
    match nix::unistd::User::from_name(&config.user) {
        Ok(Some(u)) if u.uid.is_root() => {
            r.problem(format!("--user {}: is uid 0; the receiver must not run as root", config.user))
        }
        Ok(Some(u)) if u.gid.as_raw() == 0 => {
            r.problem(format!(
                "--user {}: its group is gid 0; the receiver and the resting agent must not have root's group",
                config.user
            ))
        }
        Ok(Some(_)) => r.ok(format!("user {} exists for the receiver", config.user)),
        Ok(None) => r.problem(format!(
            "no user {:?} for the receiver: useradd --system --no-create-home --shell /usr/sbin/nologin {}",
            config.user, config.user
        )),
        Err(e) => r.problem(format!("looking up the user {:?}: {e}", config.user)),
    }
}

fn check_maildir_root(config: &Config, r: &mut Report) {
    let Some(root) = &config.maildir_root else {
        return;
    };
    // The directories above it, as inboxd checks them before it starts (found in review:
    // under Debian's /var/mail, group-writable, check said ok and inboxd exited 78).
    if let Err(e) = crate::delivery::Layout::check_above_root(root) {
        r.problem(format!("--maildir-root {}: {e}", root.display()));
        return;
    }
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.note(format!(
            "--maildir-root {}: missing; inboxd creates it",
            root.display()
        )),
        Err(e) => r.problem(format!("--maildir-root {}: {e}", root.display())),
        Ok(m) if !m.is_dir() => r.problem(format!(
            "--maildir-root {}: not a directory (a symlink is not followed)",
            root.display()
        )),
        Ok(m) => {
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me || m.mode() & 0o022 != 0 {
                r.problem(format!(
                    "--maildir-root {}: belongs to uid {} with mode {:o}; it must belong to uid {me} and not be writable by group or others",
                    root.display(),
                    m.uid(),
                    m.mode() & 0o7777
                ));
            } else {
                r.ok(format!("--maildir-root {}", root.display()));
            }
        }
    }
}

fn check_aliases_file(config: &Config, r: &mut Report) -> Aliases {
    match Aliases::load(&config.aliases) {
        Ok(a) => {
            for p in a.problems() {
                r.problem(p.clone());
            }
            r.ok(format!("{}: {} aliases", config.aliases.display(), a.len()));
            a
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.note(format!("{}: missing; no aliases", config.aliases.display()));
            Aliases::default()
        }
        Err(e) => {
            r.problem(format!("{}: {e}", config.aliases.display()));
            Aliases::default()
        }
    }
}

fn check_aliases(config: &Config, privileged: bool, aliases: &Aliases, r: &mut Report) {
    let refuse_uid0 = privileged && !config.allow_root_delivery;
    let resolver = Resolver::new(aliases.clone(), config.lowercase_fallback, refuse_uid0);
    for (key, targets) in aliases.entries() {
        for t in targets {
            let name = t.strip_prefix('\\').unwrap_or(&t);
            let alias = !t.starts_with('\\') && aliases.contains(name);
            if !alias {
                match lookup_account(name) {
                    Ok(Some(_)) => {}
                    Ok(None) => r.problem(format!(
                        "alias {key}: target {t:?} is neither an alias nor an account"
                    )),
                    Err(e) => r.problem(format!("alias {key}: {e}")),
                }
            }
        }
        match resolver.resolve(&key) {
            Ok(Resolution::Uid0Refused) => r.problem(format!(
                "alias {key} reaches only root, whose mail is refused (alias root to a person, or --allow-root-delivery)"
            )),
            // Every branch dropped (loops without an account, targets that are nothing):
            // mail to it gets 550 (found in review: check said nothing).
            Ok(Resolution::Unknown) => r.problem(format!(
                "alias {key} reaches no account: mail to it gets 550 5.1.1"
            )),
            Ok(Resolution::Accounts(a)) if a.len() > crate::smtp::session::MAX_ACCOUNTS => {
                r.problem(format!(
                    "alias {key} reaches {} accounts, more than the {} one message may reach: mail to it is refused",
                    a.len(),
                    crate::smtp::session::MAX_ACCOUNTS
                ))
            }
            _ => {}
        }
    }
    for name in ["root", POSTMASTER] {
        match resolver.resolve(name) {
            Ok(Resolution::Accounts(a)) => r.ok(format!("{name} reaches {}", a.join(", "))),
            Ok(Resolution::Uid0Refused) => r.problem(format!(
                "{name} reaches only root, whose mail inboxd refuses: add \"root: <a person's account>\" to {}",
                config.aliases.display()
            )),
            Ok(Resolution::Unknown) => r.problem(format!("{name} reaches no account")),
            Err(e) => r.problem(format!("{name}: {e}")),
        }
    }
}

fn check_listen(config: &Config, r: &mut Report) {
    for addr in &config.listen {
        match crate::server::listener::bind_listener(*addr) {
            Ok(l) => {
                drop(l);
                r.ok(format!("{addr} can be bound"));
            }
            // In use: by inboxd itself (running, or its socket unit holding the port) it is
            // what the administrator wants (found in review: check failed on every running
            // system); by anything else, a problem.
            Err(e) if e.errno == nix::errno::Errno::EADDRINUSE => match greeting(*addr) {
                Some(g) if is_inboxd_greeting(&g) => {
                    r.ok(format!("{addr}: inboxd answers there already ({g})"))
                }
                Some(g) => r.problem(format!("{e}; what answers there says {g:?}")),
                None => r.problem(e.to_string()),
            },
            Err(e) => r.problem(e.to_string()),
        }
    }
}

/// The first line (at most 512 octets) a server listening on `addr` sends within 5 seconds
/// in all; QUIT is sent after it.
fn greeting(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let limit = std::time::Duration::from_secs(5);
    let deadline = std::time::Instant::now() + limit;
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 512 {
        // One deadline for the whole line, not one per read (found in review: a server
        // sending a byte at a time could have held check for 512 timeouts).
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        s.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .ok()?;
        match s.read(&mut chunk[..512 - buf.len()]) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = s.write_all(b"QUIT\r\n");
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..end]).trim_end().to_string();
    (!line.is_empty()).then_some(line)
}

/// inboxd's greeting: `220 HOSTNAME ESMTP inboxd ready` (see `smtp::session`).
fn is_inboxd_greeting(line: &str) -> bool {
    line.starts_with("220 ") && line.ends_with(" ESMTP inboxd ready")
}

/// The accounts of /etc/passwd with a uid of at least UID_MIN (1000 by default), and root,
/// with a login shell: (name, uid, home).
fn local_accounts() -> Vec<(String, u32, PathBuf)> {
    let first = std::fs::read_to_string("/etc/login.defs")
        .ok()
        .and_then(|t| uid_min(&t))
        .unwrap_or(FIRST_USER_UID);
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let Ok(uid) = f[2].parse::<u32>() else {
            continue;
        };
        if (uid == 0 || (first..65534).contains(&uid)) && !f[6].ends_with("nologin") {
            out.push((f[0].to_string(), uid, PathBuf::from(f[5])));
        }
    }
    out
}

/// Checks every account's Maildir; returns the directories mail would be written under
/// (the `--maildir-root`, or each usable home), for [`check_journals`].
fn check_accounts(config: &Config, r: &mut Report) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = config.maildir_root.iter().cloned().collect();
    let me = nix::unistd::geteuid();
    for (name, account_uid, home) in local_accounts() {
        // Root's mail is refused only by a privileged inboxd (unprivileged, root is an
        // account like the others, its copies written as the user running inboxd).
        if account_uid == 0 && !config.allow_root_delivery && me.is_root() {
            continue;
        }
        // Unprivileged, inboxd writes every copy as itself (store.rs): that is the owner
        // delivery expects (found in review: run as a user, check reported every other
        // account's Maildir as a problem).
        let uid = if me.is_root() {
            account_uid
        } else {
            me.as_raw()
        };
        let maildir = match &config.maildir_root {
            Some(root) => root.join(&name),
            None => match check_home(&name, uid, &home) {
                Ok(maildir) => maildir,
                Err(problem) => {
                    r.problem(format!("{name}: {problem}"));
                    continue;
                }
            },
        };
        if config.maildir_root.is_none() {
            if let Some(home) = maildir.parent() {
                dirs.push(home.to_path_buf());
            }
        }
        check_maildir(&name, uid, &maildir, config.maildir_root.is_some(), r);
    }
    dirs
}

/// Notes each filesystem mail goes to that is an ext4 without a journal. There a power cut
/// can lose mail already delivered: a half-written change of a directory (growing into an
/// indexed one) loses entries that were durable, whatever the deliverer fsynced
/// (`reliability/power-cut`, README "Power cut"). A journalled ext4 has an entry
/// `<device>-<inode>` in /proc/fs/jbd2; without that directory nothing is said.
fn check_journals(dirs: &[PathBuf], r: &mut Report) {
    let mut seen = Vec::new();
    for dir in dirs {
        let Ok(m) = std::fs::metadata(dir) else {
            continue;
        };
        if seen.contains(&m.dev()) {
            continue;
        }
        seen.push(m.dev());
        let Ok(fs) = nix::sys::statfs::statfs(dir) else {
            continue;
        };
        if fs.filesystem_type() != nix::sys::statfs::EXT4_SUPER_MAGIC {
            continue;
        }
        if crate::delivery::fskind::ext4_journal(m.dev()) == Some(false) {
            let device = crate::delivery::fskind::device_name(m.dev()).unwrap_or_default();
            r.note(format!(
                "{} is on an ext4 without a journal ({device}): a power cut can lose mail already delivered there (README \"Power cut\"); a journalled filesystem keeps it",
                dir.display()
            ));
        }
    }
}

/// What delivery would make of `name`'s home: its Maildir's path, or the problem and the
/// reply such mail gets (tests/faults.rs shows each).
fn check_home(name: &str, uid: u32, home: &Path) -> Result<PathBuf, String> {
    // As delivery sees it: a trailing slash dropped (it would make lstat follow a symlinked
    // home that delivery refuses).
    let home = crate::delivery::maildir::home_path(home)
        .map_err(|e| format!("{e}: mail to {name} gets 450 4.2.0"))?;
    let why = match std::fs::symlink_metadata(home) {
        Ok(m) if !m.is_dir() => "is a symlink or not a directory".to_string(),
        Ok(m) if m.uid() != uid => format!("belongs to uid {}, not to uid {uid}", m.uid()),
        // The Maildir is opened in it as its owner: search permission always; to create a
        // missing one, write permission too, and read to open the home for its fsync
        // (maildir.rs open_dir).
        Ok(m) if m.mode() & 0o100 == 0 => format!("is not searchable by {name}"),
        Ok(m)
            if m.mode() & 0o700 != 0o700
                && std::fs::symlink_metadata(home.join("Maildir")).is_err() =>
        {
            format!("is not readable, writable and searchable by {name} and has no Maildir")
        }
        Ok(_) => return Ok(home.join("Maildir")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => {
            return Err(format!(
                "home {}: {e}: mail to {name} gets 4xx",
                home.display()
            ))
        }
    };
    Err(format!(
        "home {} {why}: mail to {name} gets 450 4.2.0",
        home.display()
    ))
}

/// The owner's permission bits delivery needs on `Maildir`, `tmp`, `new` and `cur`, all there
/// (maildir.rs): each is opened for reading, except that under `--maildir-root` the
/// account's directory is opened with O_PATH (search only); tmp/ and new/ are written in.
/// A missing subdirectory is made in the Maildir, which then needs read, write and search
/// (the fsync of a directory held with O_PATH opens it for reading).
fn needs(i: usize, in_root: bool, missing_sub: bool) -> u32 {
    match i {
        0 if missing_sub => 0o700,
        0 if in_root => 0o100,
        0 => 0o500,
        1 | 2 => 0o700,
        _ => 0o400,
    }
}

fn describe(bits: u32) -> &'static str {
    match bits {
        0o700 => "read, write and search",
        0o500 => "read and search",
        0o100 => "search",
        _ => "read",
    }
}

fn check_maildir(name: &str, uid: u32, md: &Path, in_root: bool, r: &mut Report) {
    let mut bad = false;
    let missing_sub = ["tmp", "new", "cur"].iter().any(|d| {
        matches!(std::fs::symlink_metadata(md.join(d)), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    });
    for (i, dir) in [
        md.to_path_buf(),
        md.join("tmp"),
        md.join("new"),
        md.join("cur"),
    ]
    .iter()
    .enumerate()
    {
        let want = needs(i, in_root, missing_sub);
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if i == 0 {
                    r.note(format!(
                        "{name}: {} missing; created at the first delivery",
                        md.display()
                    ));
                    return;
                }
                r.note(format!(
                    "{name}: {} missing; created at the first delivery",
                    dir.display()
                ));
            }
            Err(e) => {
                r.problem(format!("{name}: {}: {e}", dir.display()));
                bad = true;
            }
            Ok(m) if m.file_type().is_symlink() => {
                r.problem(format!(
                    "{name}: {} is a symlink, never followed: mail to {name} gets 450 4.2.0",
                    dir.display()
                ));
                // Nor by check: what is below it is not looked at (found in review: tmp,
                // new and cur were stat'ed through it, as root).
                if i == 0 {
                    return;
                }
                bad = true;
            }
            Ok(m) if !m.is_dir() => {
                r.problem(format!(
                    "{name}: {} is not a directory: mail to {name} gets 450 4.2.0",
                    dir.display()
                ));
                bad = true;
            }
            Ok(m) if m.uid() != uid => {
                r.problem(format!(
                    "{name}: {} belongs to uid {}, not to uid {uid}: mail to {name} gets 450 4.2.0",
                    dir.display(),
                    m.uid()
                ));
                bad = true;
            }
            // What delivery needs of each, as its owner (maildir.rs): every one is opened
            // for reading; Maildir is searched; tmp/ and new/ are written in; cur/ only
            // opened (found in review: a 0500 cur/ was a problem, a 0300 tmp/ was not).
            Ok(m) if m.mode() & want != want => {
                r.problem(format!(
                    "{name}: {} has mode {:o}: {name} needs {} there, mail to {name} gets 450 4.2.0",
                    dir.display(),
                    m.mode() & 0o7777,
                    describe(want)
                ));
                bad = true;
            }
            Ok(m) if m.mode() & 0o022 != 0 => {
                r.problem(format!(
                    "{name}: {} has mode {:o}: others can add, remove or replace mail (chmod 700)",
                    dir.display(),
                    m.mode() & 0o7777
                ));
                bad = true;
            }
            Ok(_) => {}
        }
    }
    if !bad {
        r.ok(format!("{name}: {}", md.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_min_is_read_from_login_defs() {
        let defs = "# UID_MIN 5\nUID_MAX\t\t\t60000\nUID_MIN\t\t\t 500\n";
        assert_eq!(uid_min(defs), Some(500));
        assert_eq!(uid_min("UID_MIN\n"), None);
        assert_eq!(uid_min(""), None);
    }
}
