//! As root, against real system accounts and their home directories (the production layout,
//! `~account/Maildir`). These tests create the accounts they need with useradd. Run as any
//! other user they say so and do nothing: they need root to create accounts and to write as
//! them (CI runs them as root).

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

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
    // keeps none of root's file overrides, must still walk into it.
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

/// A home only its owner may read (0700), reached by an agent without CAP_DAC_READ_SEARCH:
/// the agent opens the home with O_PATH, which asks for no permission on it, as on NFS with
/// root_squash, where root is nobody (found in review: it was opened for reading, so such
/// homes got 450). The Maildir is missing and gets made as the user.
#[test]
fn a_private_home_gets_mail_without_reading_it_as_root() {
    if skip_unless_root("a_private_home_gets_mail_without_reading_it_as_root") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    ensure_user("Jones");
    let (home, _) = ensure_user("inboxd-private");
    let _ = std::fs::remove_dir_all(home.join("Maildir"));
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let dir = TempDir::new("privatehome");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "root: Jones\n").unwrap();
    let cmd = without_dac_read_search();
    let server = Server::spawn(cmd, &["--aliases", aliases.to_str().unwrap()]);
    let tok = token();
    let reply = server.deliver(&["inboxd-private"], &message(&tok));
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(messages_with(&home.join("Maildir"), &tok).len(), 1);
}
