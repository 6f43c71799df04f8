//! Full disks, quotas, broken homes and hostile users, against real system accounts (as root;
//! run as any other user these tests say so and do nothing).
//!
//! Each case checks the reply, the log line that says why, and that nothing was written
//! anywhere it should not be; it also prints one `fault-row` line, which
//! `reliability/fault-matrix` collects into the README's table.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A throwaway account whose home is `home` (created empty, 0755, owned by the account,
/// unless `create_home` is false). Its previous home, if any, is removed first.
fn account(name: &str, home: &Path, create_home: bool) -> (u32, u32) {
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let st = Command::new("useradd")
            .args(["-M", "-s", "/usr/sbin/nologin", "-d"])
            .arg(home)
            .arg(name)
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
    } else {
        let out = Command::new("usermod")
            .arg("-d")
            .arg(home)
            .arg(name)
            .output()
            .expect("usermod");
        assert!(out.status.success(), "usermod {name}: {out:?}");
    }
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    let _ = std::fs::remove_dir_all(home);
    let _ = std::fs::remove_file(home);
    if create_home {
        std::fs::create_dir_all(home).unwrap();
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(home, Some(u.uid), Some(u.gid)).unwrap();
    }
    (u.uid.as_raw(), u.gid.as_raw())
}

fn remove_account(name: &str) {
    let _ = Command::new("userdel").arg(name).output();
}

/// Every path under `dir` (not following symlinks) with its type, size, owner and mode: what
/// "nothing was written" is checked against.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, u32, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        out.insert(
            d.clone(),
            (meta.mode(), meta.len(), meta.uid(), meta.nlink() as u32),
        );
        if meta.is_dir() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// The first log line holding `needle`, waiting up to 10 s.
fn log_line(server: &Server, needle: &str) -> String {
    server.log_until(needle).pop().unwrap_or_default()
}

/// One row of the README's table: the case, the reply, and the log line's reason.
fn row(case: &str, reply: &str, log: &str) {
    let why = log.find("error=").map_or(log, |i| &log[i..]);
    println!("fault-row | {case} | {} | {why} |", reply.trim_end());
}

/// Sends one message to `name` and Jones in one transaction: `name` must be refused at RCPT
/// with `want` (the delivery agent's mailbox check), the log line must say `why`, the message
/// must reach Jones all the same, and `home` (and `also`, a place a link points to) must not
/// change at all.
fn refused(case: &str, name: &str, home: &Path, also: Option<&Path>, want: &str, why: &str) {
    let (jones_home, _) = ensure_user("Jones");
    let before = (snapshot(home), also.map(snapshot));
    let (server, _aliases) = start_system();
    let mut c = server.connect();
    assert!(c.cmd("EHLO client.example").starts_with("250-"));
    assert!(c
        .cmd("MAIL FROM:<tester@client.example>")
        .starts_with("250 "));
    let rcpt = c.cmd(&format!("RCPT TO:<{name}@localhost>"));
    assert!(rcpt.starts_with(want), "{case}: {rcpt}");
    assert!(c.cmd("RCPT TO:<Jones@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    let tok = token();
    c.send(message(&tok).as_bytes());
    let end = c.cmd(".");
    assert!(
        end.starts_with("250 "),
        "{case}: the other recipient's copy: {end}"
    );
    assert!(c.cmd("QUIT").starts_with("221 "));
    assert_eq!(messages_with(&jones_home.join("Maildir"), &tok).len(), 1);
    let log = log_line(&server, "result=unavailable");
    assert!(log.contains(why), "{case}: the log says why: {log}");
    assert!(log.contains(&format!("rcpt=\"{name}\"")), "{case}: {log}");
    let after = (snapshot(home), also.map(snapshot));
    assert_eq!(before, after, "{case}: something under the home changed");
    row(case, &rcpt, &log);
}

#[test]
fn missing_home() {
    if skip_unless_root("missing_home") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-nohome");
    account("inboxd-nohome", &home, false);
    refused(
        "home missing",
        "inboxd-nohome",
        &home,
        None,
        "450 4.2.0",
        "does not exist",
    );
    assert!(!home.exists(), "the home was created");
}

#[test]
fn home_owned_by_someone_else() {
    if skip_unless_root("home_owned_by_someone_else") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-foreign");
    account("inboxd-foreign", &home, true);
    nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    refused(
        "home owned by root",
        "inboxd-foreign",
        &home,
        None,
        "450 4.2.0",
        "belongs to uid 0",
    );
}

/// The home itself is a symlink (to a directory the account owns): refused like any other
/// symlink on the way (the administrator points the passwd entry at the real directory).
#[test]
fn home_is_a_symlink() {
    if skip_unless_root("home_is_a_symlink") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-homesym");
    let real = PathBuf::from("/home/inboxd-homesym.real");
    account("inboxd-homesym", &real, true);
    account("inboxd-homesym", &home, false);
    std::os::unix::fs::symlink(&real, &home).unwrap();
    refused(
        "home is a symlink to a directory the account owns",
        "inboxd-homesym",
        &home,
        Some(&real),
        "450 4.2.0",
        "home /home/inboxd-homesym is a symlink, not a directory",
    );
    assert!(list(&real).is_empty(), "written through the home symlink");
    let _ = std::fs::remove_file(&home);
}

#[test]
fn home_not_writable_by_its_owner() {
    if skip_unless_root("home_not_writable_by_its_owner") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-ro");
    account("inboxd-ro", &home, true);
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o555)).unwrap();
    refused(
        "home not writable (0555, no Maildir)",
        "inboxd-ro",
        &home,
        None,
        "450 4.2.0",
        "EACCES",
    );
}

/// A home below a directory its owner reaches through a supplementary group only (root's,
/// 0750, group `inboxd-grp`): the agent, which has no supplementary groups, opens the home
/// with root's identity (O_PATH) and still delivers (found in review of a change that
/// walked to homes as their owners, which refused this one).
#[test]
fn home_reached_through_a_supplementary_group() {
    if skip_unless_root("home_reached_through_a_supplementary_group") {
        return;
    }
    let _ = Command::new("groupadd").arg("inboxd-grp").output();
    let gid = nix::unistd::Group::from_name("inboxd-grp")
        .unwrap()
        .expect("group inboxd-grp")
        .gid;
    let dir = PathBuf::from("/home/inboxd-grpdir");
    let home = dir.join("home");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    account("inboxd-grpuser", &home, true);
    let out = Command::new("usermod")
        .args(["-a", "-G", "inboxd-grp", "inboxd-grpuser"])
        .output()
        .expect("usermod");
    assert!(out.status.success(), "usermod -G: {out:?}");
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(0)), Some(gid)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let (server, _aliases) = start_system();
    let tok = token();
    let reply = server.deliver(&["inboxd-grpuser"], &message(&tok));
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(messages_with(&home.join("Maildir"), &tok).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn maildir_is_a_file() {
    if skip_unless_root("maildir_is_a_file") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-mdfile");
    let (uid, gid) = account("inboxd-mdfile", &home, true);
    let md = home.join("Maildir");
    std::fs::write(&md, "not a directory\n").unwrap();
    std::os::unix::fs::chown(&md, Some(uid), Some(gid)).unwrap();
    refused(
        "Maildir is a regular file",
        "inboxd-mdfile",
        &home,
        None,
        "450 4.2.0",
        "Maildir is a regular file, not a directory",
    );
}

/// An account with a home and a Maildir (tmp/, new/, cur/) of its own, at /home/NAME.
fn account_with_maildir(name: &str) -> PathBuf {
    let home = PathBuf::from(format!("/home/{name}"));
    let (uid, gid) = account(name, &home, true);
    for d in ["Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"] {
        let p = home.join(d);
        std::fs::create_dir(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    }
    home
}

#[test]
fn tmp_not_writable() {
    if skip_unless_root("tmp_not_writable") {
        return;
    }
    let home = account_with_maildir("inboxd-rotmp");
    std::fs::set_permissions(
        home.join("Maildir/tmp"),
        std::fs::Permissions::from_mode(0o500),
    )
    .unwrap();
    refused(
        "Maildir/tmp not writable (0500)",
        "inboxd-rotmp",
        &home,
        None,
        "450 4.2.0",
        "tmp/ is not writable by its owner",
    );
}

/// The user's new/ not writable (0500). Found by the mailbox check at RCPT: 450 4.2.0 for
/// that recipient. Made unwritable just after a delivery, while the check's answer is still
/// remembered (2 s, see delivery/client.rs CHECKED_TTL), it is found only at the dot: the copy
/// is made in tmp/ but cannot be linked into new/, the transaction gets 450 4.2.0 and nothing
/// is left; the account's copies are named from then on (logged), so the next such try meets
/// the classic path, which is refused the same way at the rename; once new/ is writable
/// again the mail is delivered, and another account is not switched.
#[test]
fn new_not_writable() {
    if skip_unless_root("new_not_writable") {
        return;
    }
    let home = account_with_maildir("inboxd-ronew");
    let new = home.join("Maildir/new");
    let mode = |m| std::fs::set_permissions(&new, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o500);
    let (jones_home, _) = ensure_user("Jones");
    let (server, _aliases) = start_system();
    let at_rcpt = server.try_deliver(&["inboxd-ronew"], &message(&token()));
    let refused_at = std::time::Instant::now();
    assert!(at_rcpt.starts_with("450 4.2.0"), "{at_rcpt}");
    let why = log_line(&server, "result=unavailable");
    assert!(why.contains("new/ is not writable by its owner"), "{why}");
    row("Maildir/new not writable (0500)", &at_rcpt, &why);
    // The failed check is remembered for 2 s (delivery/client.rs CHECKED_TTL): a RCPT just
    // after the fix is still refused without asking the agent; one after that is not.
    mode(0o700);
    let again = server.try_deliver(&["inboxd-ronew"], &message(&token()));
    // Only a RCPT well within the 2 s can be sure to meet the remembered answer (on a
    // loaded machine the steps between may take longer; found in review).
    if refused_at.elapsed() < std::time::Duration::from_millis(1500) {
        assert!(again.starts_with("450 4.2.0"), "{again}");
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // Writable: delivered, and checked for the next 2 s. Unwritable again at once: the
    // RCPT is accepted on that answer, and the link into new/ fails at the dot.
    let (first, d1) = server.fail_at_the_dot(
        "inboxd-ronew",
        &|| mode(0o700),
        &|| mode(0o500),
        &["inboxd-ronew"],
        &message(&token()),
    );
    assert!(first.starts_with("450 4.2.0"), "{first}");
    let lines = server.log_until("event=not_delivered");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("event=named_copies account=inboxd-ronew")),
        "{lines:#?}"
    );
    let first_why = lines.last().unwrap().clone();
    assert!(
        first_why.contains("link into new/") && first_why.contains("EACCES"),
        "{first_why}"
    );
    // The same again, now named: created in tmp/ and refused at the rename, nothing left.
    let (retry, d2) = server.fail_at_the_dot(
        "inboxd-ronew",
        &|| mode(0o700),
        &|| mode(0o500),
        &["inboxd-ronew"],
        &message(&token()),
    );
    assert!(retry.starts_with("450 4.2.0"), "{retry}");
    let why = log_line(&server, "event=not_delivered");
    assert!(
        why.contains("rename into new/") && why.contains("EACCES"),
        "{why}"
    );
    assert!(emptied(&home.join("Maildir/tmp")), "nothing left in tmp/");
    assert_eq!(
        new_files(&home.join("Maildir")).len(),
        d1 + d2,
        "the 250s before each break only"
    );
    // Writable again: delivered (named). Another account is not affected.
    mode(0o700);
    let tok = token();
    let ok = server.try_deliver(&["inboxd-ronew"], &message(&tok));
    assert!(ok.starts_with("250 "), "{ok}");
    assert_eq!(messages_with(&home.join("Maildir"), &tok).len(), 1);
    let other = token();
    assert!(server
        .deliver(&["Jones"], &message(&other))
        .starts_with("250 "));
    assert_eq!(messages_with(&jones_home.join("Maildir"), &other).len(), 1);
    assert!(
        !server
            .log_lines()
            .iter()
            .any(|l| l.contains("event=named_copies account=Jones")),
        "Jones's copies stay unnamed"
    );
    row(
        "Maildir/new made unwritable (0500) between the check and the dot",
        &first,
        &first_why,
    );
    drop(server);
    remove_account("inboxd-ronew");
}

/// A user makes ~/Maildir, or one of its directories, a symlink: to a directory root owns
/// (where root could write and the user cannot), or to one of their own. inboxd never follows
/// it: 4xx, and nothing is written at either end.
#[test]
fn symlinks_in_place_of_maildir_directories() {
    if skip_unless_root("symlinks_in_place_of_maildir_directories") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-sym");
    for (case, link, own_target) in [
        (
            "Maildir is a symlink to a root-owned directory",
            "Maildir",
            false,
        ),
        (
            "Maildir is a symlink to the user's own directory",
            "Maildir",
            true,
        ),
        (
            "Maildir/new is a symlink to a root-owned directory",
            "Maildir/new",
            false,
        ),
        (
            "Maildir/tmp is a symlink to a root-owned directory",
            "Maildir/tmp",
            false,
        ),
    ] {
        let (uid, gid) = account("inboxd-sym", &home, true);
        let root_target = TempDir::new("symtarget");
        let target = if own_target {
            let t = home.join("elsewhere");
            std::fs::create_dir(&t).unwrap();
            std::os::unix::fs::chown(&t, Some(uid), Some(gid)).unwrap();
            t
        } else {
            root_target.path().to_path_buf()
        };
        if link != "Maildir" {
            for d in ["Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"] {
                if d != link {
                    let p = home.join(d);
                    std::fs::create_dir(&p).unwrap();
                    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
                }
            }
        }
        std::os::unix::fs::symlink(&target, home.join(link)).unwrap();
        refused(
            case,
            "inboxd-sym",
            &home,
            Some(&target),
            "450 4.2.0",
            "is a symlink, not a directory",
        );
        assert!(list(&target).is_empty(), "{case}: written through the link");
    }
}

/// Removes the planted links and the decoys on drop, also when an assertion fails.
struct Planted(Vec<PathBuf>, PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = std::fs::remove_file(l);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Owner, group, mode, size, link count and content of a file, not following symlinks.
fn file_state(p: &Path) -> (u32, u32, u32, u64, u64, Vec<u8>) {
    let m = std::fs::symlink_metadata(p).unwrap();
    let content = std::fs::read(p).unwrap();
    (m.uid(), m.gid(), m.mode(), m.len(), m.nlink(), content)
}

/// Hard links a user cannot make but root can (fs.protected_hardlinks stops the user; the
/// test plants them as root to show the worst case). A root-owned 0640 file standing in for
/// /etc/shadow (so that a regression cannot damage the host's real one), on the home's
/// filesystem as a hard link needs, is linked into tmp/, new/ and cur/. Delivery goes on
/// beside the links and never writes, truncates, chmods or chowns what they point to. An old
/// hard link to another root-only file in tmp/ looks abandoned: the 36-hour clean-up removes
/// only the user's directory entry, leaving the file intact; an old symlink in tmp/ is left
/// alone and its target untouched.
#[test]
fn hard_links_and_symlinks_planted_in_the_maildir() {
    if skip_unless_root("hard_links_and_symlinks_planted_in_the_maildir") {
        return;
    }
    let home = PathBuf::from("/home/inboxd-links");
    let (uid, gid) = account("inboxd-links", &home, true);
    let md = home.join("Maildir");
    for d in ["", "tmp", "new", "cur"] {
        let p = md.join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    }
    let decoys = home.with_file_name(format!(".inboxd-decoys-{}", token()));
    std::fs::create_dir(&decoys).unwrap();
    std::fs::set_permissions(&decoys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut planted = Planted(Vec::new(), decoys.clone());
    let shadow = decoys.join("shadow");
    std::fs::write(&shadow, "root:$y$fake$hash:20000:0:99999:7:::\n").unwrap();
    std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o640)).unwrap();
    for d in ["tmp", "new", "cur"] {
        let l = md.join(d).join(format!("1.shadow.{d}"));
        std::fs::hard_link(&shadow, &l).expect("hard link on the home's filesystem");
        planted.0.push(l);
    }
    let secret = decoys.join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let old_link = md.join("tmp/2.secret");
    std::fs::hard_link(&secret, &old_link).unwrap();
    planted.0.push(old_link.clone());
    let old_symlink = md.join("tmp/3.shadow");
    std::os::unix::fs::symlink(&shadow, &old_symlink).unwrap();
    // Read before backdating: reading would refresh the access time the clean-up looks at.
    let shadow_before = file_state(&shadow);
    let secret_before = file_state(&secret);
    let st = Command::new("touch")
        .args(["-h", "-d", "3 days ago"])
        .arg(&secret)
        .arg(&old_symlink)
        .status()
        .unwrap();
    assert!(st.success());

    let (server, _aliases) = start_system();
    let tok = token();
    let end = server.deliver(&["inboxd-links"], &message(&tok));
    assert!(end.starts_with("250 "), "{end}");
    // Read new/ directly: the maildir crate refuses the planted names.
    let delivered = list(&md.join("new"))
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(&tok)))
        .count();
    assert_eq!(delivered, 1);
    drop(server);

    assert_eq!(
        file_state(&shadow),
        shadow_before,
        "the linked file changed"
    );
    assert!(
        old_symlink.symlink_metadata().is_ok(),
        "an old symlink is left alone"
    );
    assert!(
        old_link.symlink_metadata().is_err(),
        "the abandoned link in tmp/ is cleaned up"
    );
    // The same file, one link fewer: unlinked, never truncated, chowned or chmodded.
    let (o, g, m, len, links, content) = secret_before;
    assert_eq!(file_state(&secret), (o, g, m, len, links - 1, content));
    println!(
        "fault-row | hard links to a root-owned stand-in for /etc/shadow in tmp/, new/, cur/; an old hard link and an old symlink in tmp/ | {} | the linked files unchanged; only the old link's entry removed |",
        end.trim_end()
    );
}

/// Unmounts on drop.
/// A full filesystem mid-transaction (a 1 MiB tmpfs the test mounts, holding one user's home):
/// that user's mail gets 452 4.3.1 and leaves nothing in tmp/ or new/; meanwhile another user
/// on another filesystem gets mail, in a second session that is open at the same time; a
/// transaction to both is refused whole; and once space is freed delivery works again.
#[test]
fn full_disk_mid_transaction() {
    if skip_unless_root("full_disk_mid_transaction") {
        return;
    }
    let dir = TempDir::new("enospc");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs"])
        .arg(dir.path())
        .status()
        .expect("mount");
    assert!(st.success(), "mount tmpfs");
    let _mount = Mount(dir.path().to_path_buf());
    let home = dir.path().join("full");
    account("inboxd-full", &home, true);
    let (jones_home, _) = ensure_user("Jones");
    let (server, _aliases) = start_system();
    let md = home.join("Maildir");
    let first = token();
    assert!(server
        .deliver(&["inboxd-full"], &message(&first))
        .starts_with("250 "));
    // Start the big message and let its first part be written; then fill the filesystem,
    // and deliver to Jones from another session while the big one is still open.
    // The copy has no name until it is delivered (O_TMPFILE): its first part shows in the
    // filesystem's usage.
    let used = || {
        let s = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        (s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64
    };
    let before = used();
    let mut big = server.open_data(&["inboxd-full"]);
    let lines: String = (0..400).map(|_| "x".repeat(900) + "\r\n").collect();
    big.send(format!("{}{}", message(&token()), &lines[..100 * 902]).as_bytes());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used() < before + 90 * 902 {
        assert!(
            std::time::Instant::now() < deadline,
            "first part not written"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let filler = dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![b'f'; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    big.send(&lines.as_bytes()[100 * 902..]);
    let other = token();
    assert!(server
        .deliver(&["Jones"], &message(&other))
        .starts_with("250 "));
    assert_eq!(messages_with(&jones_home.join("Maildir"), &other).len(), 1);
    let end = big.cmd(".");
    assert!(end.starts_with("452 4.3.1"), "{end}");
    let log = log_line(&server, "event=not_delivered");
    assert!(log.contains("ENOSPC"), "{log}");
    assert_eq!(new_files(&md).len(), 1, "only the first message is in new/");
    assert!(emptied(&md.join("tmp")), "nothing left in tmp/");
    // Both recipients in one transaction: refused whole, so Jones gets no copy either.
    let both = token();
    let mut c = server.open_data(&["inboxd-full", "Jones"]);
    c.send(format!("{}{lines}", message(&both)).as_bytes());
    let end_both = c.cmd(".");
    assert!(end_both.starts_with("452 4.3.1"), "{end_both}");
    assert!(messages_with(&jones_home.join("Maildir"), &both).is_empty());
    assert!(
        emptied(&jones_home.join("Maildir/tmp")),
        "nothing left in tmp/"
    );
    // Space again: delivery works. Nothing of the refused copies is held: the usage is back
    // to what it was before the big message (an unnamed copy that was never freed would
    // still count here, having no name to find it by).
    // The client has its 452 before the agent has read the Abort that frees the copy
    // (found flaky: 1 run in 6 saw it still held), so the space is waited for.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while used() > before + 16 * 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        used() <= before + 16 * 1024,
        "{} bytes still used",
        used() - before
    );
    let again = token();
    assert!(server
        .deliver(&["inboxd-full"], &message(&again))
        .starts_with("250 "));
    assert_eq!(messages_with(&md, &again).len(), 1);
    row("filesystem full mid-DATA", &end, &log);
    drop(server);
    // Its home went with the mount: no account is left pointing at nothing.
    remove_account("inboxd-full");
}

/// Ends the quotafs process (and so its mount) on drop.
struct Fuse(std::process::Child, PathBuf);

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.1).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// reliability/quotafs mounted at `dir/mnt` (limits in `dir/limits`), or `None` (with a
/// message) where the kernel has no FUSE; fails where fusepy is missing (.ci/run installs it).
fn mount_quotafs(test: &str) -> Option<(TempDir, Fuse, PathBuf, PathBuf)> {
    let have = Command::new("python3")
        .args(["-c", "import fuse"])
        .status()
        .is_ok_and(|s| s.success());
    if !Path::new("/dev/fuse").exists() {
        eprintln!("{test}: skipped, this machine has no /dev/fuse");
        return None;
    }
    assert!(
        have,
        "{test} needs fusepy (.ci/run installs it: pip install fusepy)"
    );
    let dir = TempDir::new("quota");
    let (back, mnt, limits) = (
        dir.path().join("back"),
        dir.path().join("mnt"),
        dir.path().join("limits"),
    );
    std::fs::create_dir(&back).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reliability/quotafs");
    let child = Command::new("python3")
        .arg(script)
        .args([&back, &mnt, &limits])
        .spawn()
        .expect("quotafs");
    let fuse = Fuse(child, mnt.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .all(|l| !l.contains(mnt.to_str().unwrap()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "quotafs did not mount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some((dir, fuse, mnt, limits))
}

/// Empties quotafs's limits when dropped: its writes answer again.
struct Unhang(PathBuf);

impl Drop for Unhang {
    fn drop(&mut self) {
        replace_file(&self.0, "");
    }
}

/// Replaces `file` whole (write, then rename), so quotafs never reads it half-written.
fn replace_file(file: &Path, text: &str) {
    let next = file.with_extension("new");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// A user over quota: the write fails with EDQUOT and the client gets 552 5.2.2 (Postfix's
/// mbox_dsn class for a full mailbox), with nothing left in tmp/ or new/; under the limit
/// mail is delivered, and once the limit is raised delivery works again. This kernel has no
/// CONFIG_QUOTA, so the quota is enforced by reliability/quotafs, a FUSE filesystem whose
/// write(2) returns EDQUOT as a real quota would. Skipped (with a message) where the kernel
/// has no FUSE; fails where fusepy is missing (.ci/run installs it).
#[test]
fn over_quota() {
    if skip_unless_root("over_quota") {
        return;
    }
    let Some((_dir, fuse, mnt, limits)) = mount_quotafs("over_quota") else {
        return;
    };
    let home = mnt.join("home");
    let (uid, _) = account("inboxd-quota", &home, true);
    std::fs::write(&limits, format!("{uid} 65536\n")).unwrap();
    let (server, _aliases) = start_system();
    let md = home.join("Maildir");
    let small = token();
    let first = server.deliver(&["inboxd-quota"], &message(&small));
    assert!(first.starts_with("250 "), "{first}");
    // quotafs (fusepy) has no O_TMPFILE: this is also the case of named copies, created in
    // tmp/ and renamed.
    let named = log_line(&server, "event=named_copies");
    assert!(named.contains("EOPNOTSUPP"), "{named}");
    let lines: String = (0..200).map(|_| "q".repeat(900) + "\r\n").collect();
    let end = server.deliver(&["inboxd-quota"], &format!("{}{lines}", message(&token())));
    assert!(end.starts_with("552 5.2.2"), "{end}");
    let log = log_line(&server, "event=not_delivered");
    assert!(log.contains("EDQUOT"), "{log}");
    assert_eq!(new_files(&md).len(), 1, "only the small message is in new/");
    assert!(emptied(&md.join("tmp")), "nothing left in tmp/");
    replace_file(&limits, &format!("{uid} 1048576\n"));
    let again = token();
    let ok = server.deliver(&["inboxd-quota"], &format!("{}{lines}", message(&again)));
    assert!(ok.starts_with("250 "), "{ok}");
    assert_eq!(messages_with(&md, &again).len(), 1);
    row("user over quota (EDQUOT)", &end, &log);
    drop(server);
    drop(fuse);
    remove_account("inboxd-quota");
}

/// A hung home (its filesystem stops answering writes, as a hung NFS server or a stuck FUSE
/// daemon does) holds up only the mail written into it. A streamed message's data (over 64
/// KiB) is written into its copies by a thread of the receiver: done by the event loop, as
/// before, one such write stalled every client (found in review; without the writer thread
/// the second client below gets no greeting). Once the filesystem answers again the message
/// is delivered. quotafs's "hang" line makes its writes wait.
/// A user at their quota with no Maildir yet: the mailbox check cannot create it (EDQUOT
/// from mkdir) and the RCPT gets 452 4.2.2, temporary at RCPT (a 552 there can be read as
/// "too many recipients", RFC 5321 4.5.3.1.10); the other recipient gets the message.
#[test]
fn over_quota_without_a_maildir_is_452_at_rcpt() {
    if skip_unless_root("over_quota_without_a_maildir_is_452_at_rcpt") {
        return;
    }
    let Some((_dir, fuse, mnt, limits)) =
        mount_quotafs("over_quota_without_a_maildir_is_452_at_rcpt")
    else {
        return;
    };
    let home = mnt.join("home");
    let (uid, _) = account("inboxd-quotadir", &home, true);
    std::fs::write(&limits, format!("{uid} 0\n")).unwrap();
    refused(
        "user at the quota, no Maildir yet (mkdir refused)",
        "inboxd-quotadir",
        &home,
        None,
        "452 4.2.2",
        "EDQUOT",
    );
    assert!(!home.join("Maildir").exists());
    drop(fuse);
    remove_account("inboxd-quotadir");
}

#[test]
fn a_hung_home_holds_up_only_its_own_mail() {
    if skip_unless_root("a_hung_home_holds_up_only_its_own_mail") {
        return;
    }
    let Some((_dir, fuse, mnt, limits)) = mount_quotafs("a_hung_home_holds_up_only_its_own_mail")
    else {
        return;
    };
    let home = mnt.join("home");
    account("inboxd-hung", &home, true);
    let (server, _aliases) = start_system();
    replace_file(&limits, "hang\n");
    // Dropped before the server: a failing assertion must not leave it in a write that
    // never returns (the server could not be reaped).
    let unhang = Unhang(limits.clone());
    // A: 300 KiB to the hung home; its writer blocks in write(2) on the first octets.
    let mut a = server.open_data(&["inboxd-hung"]);
    let big = token();
    let lines: String = (0..340).map(|_| "h".repeat(900) + "\r\n").collect();
    // Sent from a thread: the server stops reading once 64 KiB wait for the hung writer,
    // and the rest must not depend on the socket buffers' size (found in review).
    let mut w = a.stream.try_clone().unwrap();
    let body = format!("{}{lines}.\r\n", message(&big));
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut w, body.as_bytes()));
    if a.readable_within(std::time::Duration::from_secs(1)) {
        panic!("the hung home should hold up its message: {}", a.reply());
    }
    // B: greeted and served meanwhile, small and large mail to a healthy home alike.
    let mut b = Client::connect_only(server.port);
    assert!(
        b.readable_within(std::time::Duration::from_secs(5)),
        "no greeting while a home hangs"
    );
    assert!(b.reply().starts_with("220"));
    drop(b);
    let jones = nix::unistd::User::from_name("Jones").unwrap().unwrap().dir;
    let small = token();
    let r = server.deliver(&["Jones"], &message(&small));
    assert!(r.starts_with("250 "), "{r}");
    let large = token();
    let r = server.deliver(&["Jones"], &format!("{}{lines}", message(&large)));
    assert!(r.starts_with("250 "), "{r}");
    assert_eq!(messages_with(&jones.join("Maildir"), &large).len(), 1);
    // The filesystem answers again: A's message is delivered, whole.
    drop(unhang);
    sender.join().unwrap().unwrap();
    let r = a.reply();
    assert!(r.starts_with("250 "), "{r}");
    let md = home.join("Maildir");
    let got = messages_with(&md, &big);
    assert_eq!(got.len(), 1);
    assert!(got[0].len() > 340 * 901, "{}", got[0].len());
    assert!(emptied(&md.join("tmp")), "nothing left in tmp/");
    drop(server);
    drop(fuse);
    remove_account("inboxd-hung");
}

/// A home whose filesystem stops answering while the delivery agent writes a small message
/// into it (a Deliver: the agent writes the copy itself) holds up that message only: the
/// agent serves each filesystem of homes in a lane (a thread and a socket) of its own, so
/// mail to a home on another filesystem is delivered meanwhile. Before lanes the agent's one
/// loop waited in that write(2) and every delivery waited with it (this test then failed:
/// Jones's 250 never came while the home hung). Once the filesystem answers again the
/// message is delivered, whole and once.
#[test]
fn a_hung_filesystem_stalls_only_its_own_lane_of_the_agent() {
    let test = "a_hung_filesystem_stalls_only_its_own_lane_of_the_agent";
    if skip_unless_root(test) {
        return;
    }
    let Some((_dir, fuse, mnt, limits)) = mount_quotafs(test) else {
        return;
    };
    let home = mnt.join("home");
    account("inboxd-stuck", &home, true);
    // Made now: once the filesystem hangs, nothing can be made on it (quotafs answers one
    // request at a time, and a write is waiting).
    account("inboxd-stuck2", &mnt.join("home2"), true);
    let (server, _aliases) = start_system();
    // The RCPT's check makes the Maildir (a mkdir, which "hang" does not hold up).
    let mut a = server.open_data(&["inboxd-stuck"]);
    replace_file(&limits, "hang\n");
    let unhang = Unhang(limits.clone());
    let stuck = token();
    a.send(format!("{}.\r\n", message(&stuck)).as_bytes());
    if a.readable_within(std::time::Duration::from_secs(1)) {
        panic!("the hung home should hold up its message: {}", a.reply());
    }
    // Jones's home is on another filesystem: delivered while the agent's lane for the hung
    // one waits in write(2), both a small message and a streamed one.
    let jones = nix::unistd::User::from_name("Jones").unwrap().unwrap().dir;
    let started = std::time::Instant::now();
    let small = token();
    let r = server.deliver(&["Jones"], &message(&small));
    assert!(r.starts_with("250 "), "{r}");
    let large = token();
    let lines: String = (0..100).map(|_| "j".repeat(900) + "\r\n").collect();
    let r = server.deliver(&["Jones"], &format!("{}{lines}", message(&large)));
    assert!(r.starts_with("250 "), "{r}");
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(10),
        "Jones's mail waited {waited:?}"
    );
    assert_eq!(messages_with(&jones.join("Maildir"), &small).len(), 1);
    assert_eq!(messages_with(&jones.join("Maildir"), &large).len(), 1);
    // Another account on the hung filesystem, once its lane has been silent for 20 s: the
    // RCPT gets 451 at once instead of waiting 30 s for a check of its own.
    std::thread::sleep(std::time::Duration::from_secs(21).saturating_sub(started.elapsed()));
    let mut b = server.mail_from();
    let asked = std::time::Instant::now();
    let r = b.cmd("RCPT TO:<inboxd-stuck2@localhost>");
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(5),
        "the RCPT waited {:?}",
        asked.elapsed()
    );
    drop(b);
    // Lanes: the general one, Jones's filesystem's and the FUSE home's.
    let log = server.log_lines();
    let fuse_lane = format!("mount={:?}", mnt.to_str().unwrap());
    assert!(
        log.iter()
            .any(|l| l.contains("event=lane_opening") && l.contains(&fuse_lane)),
        "no lane for the FUSE home: {log:?}"
    );
    let ready = log
        .iter()
        .filter(|l| l.contains("event=lane_ready"))
        .count();
    assert!(ready >= 3, "{ready} lanes ready");
    // The filesystem answers again: the held message is delivered, once.
    drop(unhang);
    let r = a.reply();
    assert!(r.starts_with("250 "), "{r}");
    let md = home.join("Maildir");
    assert_eq!(messages_with(&md, &stuck).len(), 1);
    assert!(emptied(&md.join("tmp")), "nothing left in tmp/");
    println!(
        "fault-row | the filesystem of a home stops answering while the agent writes a small message into it; meanwhile a small and a streamed message to Jones (another filesystem) | Jones: 250 twice, within {:.1} s; 21 s on, a RCPT to another account there: 451 4.3.0 at once; the held message: {} once the filesystem answers | a lane for each filesystem; the held message in new/ once, nothing in tmp/ |",
        waited.as_secs_f64(),
        r.get(..9).unwrap_or(&r)
    );
    drop(server);
    drop(fuse);
    remove_account("inboxd-stuck");
    remove_account("inboxd-stuck2");
}

/// A user races inboxd: while messages are delivered, a loop swaps ~/Maildir/new, then
/// ~/Maildir itself, for a symlink to another directory of theirs and back, as fast as it
/// can. Every walk is by descriptor with O_NOFOLLOW, so no timing lets a write through the
/// link: the other directory stays empty, every message that got a 250 is in new/ once the
/// swapping stops, and each other one got a 450. Each phase goes on until a walk has met the
/// link and 20 deliveries went through (so the test cannot pass without racing); after a 450
/// it waits out the 2 s a failed check is remembered (found when that memory made every
/// delivery of a run a 450 from the cache, racing nothing).
#[test]
fn racing_symlink_swaps_never_redirect_a_write() {
    if skip_unless_root("racing_symlink_swaps_never_redirect_a_write") {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let home = PathBuf::from("/home/inboxd-race");
    let (uid, gid) = account("inboxd-race", &home, true);
    let md = home.join("Maildir");
    for d in ["", "tmp", "new", "cur"] {
        let p = md.join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    }
    // The target belongs to the user, so the owner check would not stop a write that
    // followed the link: only O_NOFOLLOW does.
    let target = TempDir::new("racetarget");
    std::os::unix::fs::chown(target.path(), Some(uid), Some(gid)).unwrap();
    let (server, _aliases) = start_system();
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut deliveries = 0;
    for (swap, keep) in [
        (md.join("new"), md.join("new.real")),
        (md.clone(), home.join("Maildir.real")),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let swapped = Arc::new(AtomicU32::new(0));
        let racer = {
            let (stop, swapped, swap, keep, target) = (
                stop.clone(),
                swapped.clone(),
                swap.clone(),
                keep.clone(),
                target.path().to_path_buf(),
            );
            std::thread::spawn(move || {
                // RENAME_EXCHANGE swaps the directory and the symlink atomically, so the
                // name always exists (no window in which inboxd would create it anew).
                std::os::unix::fs::symlink(&target, &keep).unwrap();
                let exchange = || {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &swap,
                        nix::fcntl::AT_FDCWD,
                        &keep,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap()
                };
                let mut swaps = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    exchange();
                    std::thread::yield_now();
                    exchange();
                    swaps += 1;
                    swapped.store(swaps, Ordering::Relaxed);
                }
                std::fs::remove_file(&keep).unwrap();
                swaps
            })
        };
        // The agent reuses an opened Maildir for 2 s and walks the path again only after
        // that or after a failure: go on until a walk has met the link at least once, and
        // the racer has swapped often (on a busy machine it may hardly get a CPU at first).
        let (start, mut met, mut phase_acked) = (std::time::Instant::now(), 0, 0);
        while met == 0
            || phase_acked < 20
            || swapped.load(Ordering::Relaxed) <= 40
            || deliveries % 40 != 0
        {
            assert!(
                start.elapsed().as_secs() < 90,
                "in 90 s: {met} walks met the link, {phase_acked} deliveries went through"
            );
            let tok = token();
            // A walk that meets the link refuses the RCPT (the mailbox check) or, when the
            // check's answer was still fresh, the transaction at the dot.
            let end = server.try_deliver(&["inboxd-race"], &message(&tok));
            deliveries += 1;
            if end.starts_with("250 ") {
                acked.push(tok);
                phase_acked += 1;
            } else {
                assert!(end.starts_with("450 4.2.0"), "{end}");
                met += 1;
                // A failed check is remembered for 2 s (delivery/client.rs CHECKED_TTL):
                // RCPTs meanwhile would be refused without any walk, racing nothing.
                std::thread::sleep(std::time::Duration::from_millis(2100));
            }
        }
        refused += met;
        stop.store(true, Ordering::Relaxed);
        let swaps = racer.join().unwrap();
        assert!(swaps > 40, "the racer hardly ran: {swaps} swaps");
    }
    drop(server);
    assert!(list(target.path()).is_empty(), "written through a symlink");
    for tok in &acked {
        assert_eq!(
            messages_with(&md, tok).len(),
            1,
            "an acknowledged message is missing"
        );
    }
    assert!(emptied(&md.join("tmp")));
    println!(
        "fault-row | a user swaps Maildir/new, then Maildir, for a symlink to a directory of their own in a loop, during {deliveries} deliveries | {} x 250, {refused} x 450 4.2.0 | nothing written through the link; every 250 in new/ |",
        acked.len()
    );
}
