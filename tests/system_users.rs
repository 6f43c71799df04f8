//! As root, against real system accounts and their home directories (the production layout,
//! `~account/Maildir`). These tests create the accounts they need with useradd. Run as any
//! other user they say so and do nothing: they need root to create accounts and to write as
//! them (CI runs them as root).

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

/// Creates `name` (with a home directory) unless it exists; returns its home and uid.
fn ensure_user(name: &str) -> (PathBuf, u32) {
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let st = Command::new("useradd")
            .args(["-m", name])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
    }
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    (u.dir, u.uid.as_raw())
}

/// inboxd as root delivering to ~account/Maildir, with root (and so postmaster) aliased to
/// Jones: started as root, inboxd refuses to run while postmaster would reach uid 0.
fn start_system() -> (Server, TempDir) {
    ensure_user("Jones");
    let dir = TempDir::new("sysaliases");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "root: Jones\n").unwrap();
    let server = Server::start(&["--aliases", aliases.to_str().unwrap()]);
    (server, dir)
}

fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, needs root (creates accounts, writes as them)");
        return true;
    }
    false
}

/// RFC 821 Appendix F end to end: Smith sends one message to Jones, Green and Brown; Green
/// has no mailbox. The accounts are spelled with capitals: case is preserved.
#[test]
fn rfc821_appendix_f_with_system_accounts() {
    if skip_unless_root("rfc821_appendix_f_with_system_accounts") {
        return;
    }
    let (jones_home, jones_uid) = ensure_user("Jones");
    let (brown_home, brown_uid) = ensure_user("Brown");
    assert!(
        nix::unistd::User::from_name("Green").unwrap().is_none(),
        "Green must not exist"
    );
    // Brown's home is private (0700, the default of many distributions): the agent, which
    // keeps only CAP_DAC_READ_SEARCH of root's file overrides, must still walk into it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&brown_home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (server, _aliases) = start_system();
    let tok = token();
    let mut c = server.connect();
    assert!(c.cmd("HELO GMAIL.COM").starts_with("250 "));
    assert!(c.cmd("MAIL FROM:<Smith@UOW.EDU.AU>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<Jones@localhost>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<Green@localhost>").starts_with("550 "));
    assert!(c.cmd("RCPT TO:<Brown@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    c.send(format!("Subject: {tok}\r\n\r\nBlah blah blah...\r\n...etc. etc. etc.\r\n").as_bytes());
    assert!(c.cmd(".").starts_with("250 "));
    assert!(c.cmd("QUIT").starts_with("221 "));
    for (home, uid) in [(jones_home, jones_uid), (brown_home, brown_uid)] {
        let md = home.join("Maildir");
        let found = messages_with(&md, &tok);
        assert_eq!(found.len(), 1, "{}: exactly one copy", md.display());
        let text = String::from_utf8_lossy(&found[0]);
        assert!(text.starts_with("Return-Path: <Smith@UOW.EDU.AU>\n"));
        assert!(
            text.ends_with("\nBlah blah blah...\n..etc. etc. etc.\n"),
            "{text}"
        );
        for f in new_files(&md) {
            assert_eq!(
                std::fs::metadata(&f).unwrap().uid(),
                uid,
                "owned by the recipient"
            );
        }
        assert_eq!(std::fs::metadata(&md).unwrap().uid(), uid);
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A user plants a symlink at ~/Maildir/new pointing elsewhere: the delivery gets a 4xx,
/// nothing is written through the link, and nothing is left in tmp/.
#[test]
fn symlinked_maildir_new_gets_4xx_and_no_write_through_it() {
    if skip_unless_root("symlinked_maildir_new_gets_4xx_and_no_write_through_it") {
        return;
    }
    let (home, uid) = ensure_user("inboxdsym");
    let md = home.join("Maildir");
    let _ = std::fs::remove_dir_all(&md);
    std::fs::create_dir_all(md.join("tmp")).unwrap();
    std::fs::create_dir_all(md.join("cur")).unwrap();
    let target = TempDir::new("symtarget");
    for d in [&md, &md.join("tmp"), &md.join("cur")] {
        nix::unistd::chown(d.as_path(), Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
    }
    std::os::unix::fs::symlink(target.path(), md.join("new")).unwrap();
    let (server, _aliases) = start_system();
    let end = server.deliver(&["inboxdsym"], "Subject: symlink\r\n\r\nx\r\n");
    assert!(end.starts_with('4'), "{end}");
    assert!(
        list(target.path()).is_empty(),
        "a file was written through the symlink"
    );
    assert!(list(&md.join("tmp")).is_empty(), "tmp/ left behind");
    let log = server.log_lines().join("\n");
    assert!(log.contains("symlink"), "the log says why: {log}");
    let _ = std::fs::remove_dir_all(&md);
}

/// A home that does not belong to the account: root never writes into it.
#[test]
fn home_not_owned_by_the_account_gets_4xx() {
    if skip_unless_root("home_not_owned_by_the_account_gets_4xx") {
        return;
    }
    let (home, uid) = ensure_user("inboxdforeign");
    nix::unistd::chown(home.as_path(), Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    let _ = std::fs::remove_dir_all(home.join("Maildir"));
    let (server, _aliases) = start_system();
    let end = server.deliver(&["inboxdforeign"], "Subject: foreign\r\n\r\nx\r\n");
    assert!(end.starts_with("450 4.2.0"), "{end}");
    assert!(
        !home.join("Maildir").exists(),
        "nothing created in a home root owns"
    );
    nix::unistd::chown(home.as_path(), Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A full filesystem mid-transaction: 452 4.3.1, no partial file anywhere, and delivery
/// works again once space is freed. A 1 MiB tmpfs made by the test.
#[test]
fn full_disk_gets_452_and_leaves_nothing_partial() {
    if skip_unless_root("full_disk_gets_452_and_leaves_nothing_partial") {
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
    let mail = dir.path().join("mail");
    let server = Server::start_in(&mail, &[]);
    let send = |body: &str| server.deliver(&["root"], body);
    let first = token();
    assert!(send(&message(&first)).starts_with("250 "));
    // Fill the filesystem.
    let filler = dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![b'f'; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    let lines: String = (0..400).map(|_| "x".repeat(900) + "\r\n").collect();
    let big = format!("{}{lines}", message(&token()));
    let end = send(&big);
    assert!(end.starts_with("452 4.3.1"), "{end}");
    let md = mail.join("root");
    assert_eq!(new_files(&md).len(), 1, "only the first message is in new/");
    assert!(list(&md.join("tmp")).is_empty(), "nothing left in tmp/");
    // Space again: delivery works.
    std::fs::remove_file(&filler).unwrap();
    let again = token();
    assert!(send(&message(&again)).starts_with("250 "));
    assert_eq!(messages_with(&md, &again).len(), 1);
    drop(server);
}

/// Started as root, inboxd never writes as uid 0 unless told to: it will not start while
/// postmaster reaches only root, RCPT to root gets 550 5.7.1, an alias keeps its other
/// targets, and a SIGHUP that would leave postmaster with nobody keeps the old aliases.
#[test]
fn uid0_is_refused_unless_allowed() {
    if skip_unless_root("uid0_is_refused_unless_allowed") {
        return;
    }
    let (brown_home, _) = ensure_user("Brown");
    let out = Command::new(env!("CARGO_BIN_EXE_inboxd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "-d",
            "localhost",
            "--aliases",
            "/dev/null",
        ])
        .output()
        .expect("run inboxd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("postmaster reaches only root"), "{err}");

    let dir = TempDir::new("rootpolicy");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "postmaster: Brown\nops: root, Brown\n").unwrap();
    let server = Server::start(&["--aliases", aliases.to_str().unwrap()]);
    let mut c = server.connect();
    assert!(c.cmd("EHLO client.example").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@client.example>").starts_with("250 "));
    let r = c.cmd("RCPT TO:<root@localhost>");
    assert!(r.starts_with("550 5.7.1 "), "{r}");
    assert!(c.cmd("RCPT TO:<Postmaster>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<ops@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    let tok = token();
    c.send(message(&tok).as_bytes());
    assert!(c.cmd(".").starts_with("250 "));
    // postmaster and ops both reach Brown: one copy; root got none.
    assert_eq!(messages_with(&brown_home.join("Maildir"), &tok).len(), 1);
    assert_eq!(
        messages_with(std::path::Path::new("/root/Maildir"), &tok).len(),
        0
    );
    assert!(server.wait_log("reaches only uid 0"));

    std::fs::write(&aliases, "# postmaster forgotten\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(server.wait_log("keeping the aliases loaded before"));
    assert!(c.cmd("MAIL FROM:<a@client.example>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<postmaster@localhost>").starts_with("250 "));
    assert!(c.cmd("RSET").starts_with("250 "));
    drop(c);
    drop(server);

    // Explicitly allowed: root is a recipient like any other.
    let server = Server::start(&["--aliases", "/dev/null", "--allow-root-delivery"]);
    let mut c = server.connect();
    assert!(c.cmd("HELO client.example").starts_with("250 "));
    assert!(c.cmd("MAIL FROM:<a@client.example>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<root@localhost>").starts_with("250 "));
}
