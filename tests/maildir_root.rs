//! End to end with `--maildir-root` (the no-setup mode): the real binary on an ephemeral
//! loopback port, real SMTP, messages read back with the `maildir` crate. Runs as any user;
//! recipients are accounts every Linux system has (root, nobody).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

#[test]
fn delivers_one_durable_copy_per_recipient_with_trace_fields() {
    let dir = TempDir::new("root");
    let server = Server::start_in(dir.path(), &[]);
    let tok = token();
    let body = message(&tok);
    let end = server.deliver(&["root", "nobody", "root"], &body);
    assert!(end.starts_with("250 2.0.0"), "{end}");
    for account in ["root", "nobody"] {
        let md = dir.path().join(account);
        let found = messages_with(&md, &tok);
        assert_eq!(found.len(), 1, "{account}: exactly one copy");
        let data = &found[0];
        let text = String::from_utf8_lossy(data);
        // RFC 5321 4.4: Return-Path first, then our Delivered-To and Received.
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("Return-Path: <tester@client.example>"));
        assert_eq!(
            lines.next(),
            Some(format!("Delivered-To: {account}@mx.test").as_str())
        );
        assert!(lines
            .next()
            .unwrap()
            .starts_with("Received: from client.example ([127.0.0.1])"));
        // The message itself, byte for byte, with LF line ends and the dot unstuffed.
        let stored = body.replace("\r\n", "\n").replace("\n..", "\n.");
        assert!(text.ends_with(&stored), "{text}");
        assert!(!data.contains(&b'\r'));
        // maildir(5) name with ,S=<size>; mode 0600; nothing left in tmp/.
        let files = new_files(&md);
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
        let meta = std::fs::metadata(&files[0]).unwrap();
        assert!(name.ends_with(&format!(",S={}", meta.len())), "{name}");
        assert!(name.contains(".mx.test,"), "{name}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(list(&md.join("tmp")).is_empty());
        assert!(md.join("cur").is_dir());
        if is_root() {
            let uid = nix::unistd::User::from_name(account)
                .unwrap()
                .unwrap()
                .uid
                .as_raw();
            assert_eq!(meta.uid(), uid, "{account}'s copy is owned by {account}");
            assert_eq!(std::fs::metadata(&md).unwrap().uid(), uid);
        }
    }
    assert!(server.stop().success());
}

/// A broken mailbox is refused at RCPT (the delivery agent's mailbox check), and the others
/// get the message; one that breaks after its check fails the whole transaction at the dot,
/// with nothing delivered to anybody.
#[test]
fn one_failing_recipient_means_nothing_is_delivered() {
    let dir = TempDir::new("allornothing");
    // nobody's "Maildir" is a plain file: refused at RCPT, root alone gets the message.
    let nobody = dir.path().join("nobody");
    std::fs::write(&nobody, b"not a directory").unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut c = server.connect();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<tester@client.example>");
    let r = c.cmd("RCPT TO:<nobody@localhost>");
    assert!(r.starts_with("450 4.2.0"), "{r}");
    assert!(c.cmd("RCPT TO:<root@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    let tok = token();
    c.send(message(&tok).as_bytes());
    assert!(c.cmd(".").starts_with("250 "));
    let root_md = dir.path().join("root");
    assert_eq!(messages_with(&root_md, &tok).len(), 1);
    // A real Maildir, delivered to, then its tmp/ made unwritable at once: the check's
    // answer is remembered for 2 s (delivery/client.rs CHECKED_TTL), so the RCPT is
    // accepted and the failure comes at the dot, for the whole transaction.
    std::fs::remove_file(&nobody).unwrap();
    // The failed check is remembered for those 2 s too.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let tmp = nobody.join("tmp");
    let tok = token();
    let (end, _) = server.fail_at_the_dot(
        "nobody",
        &|| {
            if tmp.exists() {
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).unwrap();
            }
        },
        &|| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500)).unwrap(),
        &["root", "nobody"],
        &message(&tok),
    );
    assert!(end.starts_with("450 4.2.0"), "{end}");
    assert!(
        messages_with(&root_md, &tok).is_empty(),
        "root's copy must not be visible"
    );
    assert!(
        list(&root_md.join("tmp")).is_empty(),
        "root's tmp copy must be removed"
    );
    // A later message to root alone goes through.
    let end = server.deliver(&["root"], &message(&tok));
    assert!(end.starts_with("250 "), "{end}");
    assert_eq!(messages_with(&root_md, &tok).len(), 1);
}

#[test]
fn unknown_users_relays_and_smuggling_are_refused_over_the_wire() {
    let dir = TempDir::new("refuse");
    let server = Server::start_in(dir.path(), &[]);
    let mut c = server.connect();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<tester@client.example>");
    assert!(c
        .cmd("RCPT TO:<nosuchuser@localhost>")
        .starts_with("550 5.1.1"));
    assert!(c
        .cmd("RCPT TO:<root@other.example>")
        .starts_with("550 5.7.1"));
    assert!(c
        .cmd("RCPT TO:<root%other.example@localhost>")
        .starts_with("550 5.7.1"));
    assert!(c.cmd("RCPT TO:<root@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    let tok = token();
    c.send(format!("Subject: {tok}\r\n\r\nx\n.\nMAIL FROM:<a@b>\r\n.\r\n").as_bytes());
    assert!(c.reply().starts_with("550 5.6.0"));
    assert!(c.cmd("NOOP").starts_with("250 "));
    assert!(messages_with(&dir.path().join("root"), &tok).is_empty());
}

#[test]
fn oversized_message_gets_one_552_at_the_end_and_nothing_is_kept() {
    let dir = TempDir::new("size");
    let server = Server::start_in(dir.path(), &["--max-message-size", "100000"]);
    let mut c = server.connect();
    c.cmd("EHLO client.example");
    assert!(c
        .cmd("MAIL FROM:<a@b.example> SIZE=100001")
        .starts_with("552 5.3.4"));
    c.cmd("MAIL FROM:<a@b.example>");
    c.cmd("RCPT TO:<root@localhost>");
    assert!(c.cmd("DATA").starts_with("354 "));
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..200 {
        c.send(line.as_bytes());
    }
    assert!(c.cmd(".").starts_with("552 5.3.4"));
    assert!(c.cmd("NOOP").starts_with("250 "));
    let md = dir.path().join("root");
    assert!(new_files(&md).is_empty());
    assert!(list(&md.join("tmp")).is_empty());
}

#[test]
fn idle_client_gets_421_after_the_timeout() {
    let dir = TempDir::new("timeout");
    let server = Server::start_in(dir.path(), &["--timeout", "1"]);
    let mut c = server.connect();
    let r = c.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.closed());
}

#[test]
fn disconnect_during_data_leaves_nothing_behind() {
    let dir = TempDir::new("disconnect");
    let server = Server::start_in(dir.path(), &[]);
    {
        let mut c = server.connect();
        c.cmd("HELO client.example");
        c.cmd("MAIL FROM:<a@b.example>");
        c.cmd("RCPT TO:<root@localhost>");
        assert!(c.cmd("DATA").starts_with("354 "));
        c.send(b"Subject: cut\r\n\r\nhalf a line");
    }
    // The server is still fine, and nothing of the cut message exists.
    let mut c = server.connect();
    assert!(c.cmd("NOOP").starts_with("250 "));
    let md = dir.path().join("root");
    // The server sees the close in its own time: give it a moment to clean tmp/ (which
    // does not exist if the agent never opened the Maildir).
    let tmp = md.join("tmp");
    assert!(!tmp.exists() || emptied(&tmp));
    assert!(new_files(&md).is_empty());
}

#[test]
fn ipv6_listener_and_literals_of_every_listening_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("ipv6_listener_and_literals_of_every_listening_address: skipped, no ::1 here");
        return;
    }
    let dir = TempDir::new("v6");
    let server = Server::start_in(dir.path(), &["--listen", "[::1]:0"]);
    // Over IPv4, the literal of the IPv6 listener is local too; other literals are not.
    let mut c = server.connect();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<>");
    assert!(c.cmd("RCPT TO:<root@[IPv6:::1]>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<root@[127.0.0.1]>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<root@[127.0.0.2]>").starts_with("550 5.7.1"));
    assert!(c.cmd("RCPT TO:<root@[IPv6:::2]>").starts_with("550 5.7.1"));
}

/// root's Maildir (tmp/, new/, cur/) under `dir`.
fn root_maildir(dir: &std::path::Path) -> std::path::PathBuf {
    let md = dir.join("root");
    for d in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(md.join(d)).unwrap();
    }
    md
}

/// A file at `f` neither read nor written for 40 hours: what a crash left in tmp/.
fn left_40_hours_ago(f: &std::path::Path) {
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 3600);
    std::fs::write(f, "partial").unwrap();
    std::fs::File::options()
        .write(true)
        .open(f)
        .unwrap()
        .set_times(
            std::fs::FileTimes::new()
                .set_accessed(long_ago)
                .set_modified(long_ago),
        )
        .unwrap();
}

/// maildir(5): files left in tmp/ for 36 hours (a delivery cut short by a crash) are removed
/// when the Maildir is next opened; younger ones, and everything else, are left alone.
#[test]
fn tmp_files_older_than_36_hours_are_cleaned() {
    let dir = TempDir::new("tmpclean");
    let md = root_maildir(dir.path());
    let old = md.join("tmp").join("1.M1P1Q1.crashed");
    let young = md.join("tmp").join("2.M2P2Q2.recent");
    std::fs::write(&young, "partial").unwrap();
    left_40_hours_ago(&old);
    let server = Server::start_in(dir.path(), &[]);
    let tok = token();
    assert!(server
        .deliver(&["root"], &message(&tok))
        .starts_with("250 "));
    assert!(!old.exists(), "a 40-hour-old tmp file is still there");
    assert!(young.exists(), "a fresh tmp file was removed");
    assert_eq!(messages_with(&md, &tok).len(), 1);
    assert!(server.wait_log("event=tmp_cleaned account=root files=1"));
}

/// One cleaning pass removes at most 100 old files (found in review: a user who filled their
/// tmp/ with old files held up every delivery while the agent removed them all).
#[test]
fn one_cleaning_pass_removes_at_most_100_files() {
    let dir = TempDir::new("tmpcleancap");
    let md = root_maildir(dir.path());
    for i in 0..150 {
        left_40_hours_ago(&md.join("tmp").join(format!("{i}.M1P1Q1.crashed")));
    }
    let server = Server::start_in(dir.path(), &[]);
    let tok = token();
    assert!(server
        .deliver(&["root"], &message(&tok))
        .starts_with("250 "));
    assert!(server.wait_log("event=tmp_cleaned account=root files=100"));
    assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 50);
    assert_eq!(messages_with(&md, &tok).len(), 1);
}

/// An empty directory of root's in place of an account's (the agent killed between its mkdir
/// and its chown) is handed to the account, not refused for ever (found in review).
#[test]
fn an_empty_root_owned_account_directory_is_handed_over() {
    if skip_unless_root("an_empty_root_owned_account_directory_is_handed_over") {
        return;
    }
    let dir = TempDir::new("handover");
    let md = dir.path().join("nobody");
    std::fs::create_dir(&md).unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let tok = token();
    let reply = server.deliver(&["nobody"], &message(&tok));
    assert!(reply.starts_with("250 "), "{reply}");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&md).unwrap()),
        nobody.uid.as_raw()
    );
    assert_eq!(messages_with(&md, &tok).len(), 1);
}

/// An account's directory that exists already (0700, its own) is opened again by a later
/// agent, which may not read it as root (found by reliability/crash-test once the agent gave
/// up CAP_DAC_READ_SEARCH: every opening after the first got EACCES and 450).
#[test]
fn an_existing_account_directory_is_opened_again() {
    if skip_unless_root("an_existing_account_directory_is_opened_again") {
        return;
    }
    let dir = TempDir::new("reopen");
    for _ in 0..2 {
        let server = Server::start_in(dir.path(), &[]);
        let tok = token();
        let reply = server.deliver(&["nobody"], &message(&tok));
        assert!(reply.starts_with("250 "), "{reply}");
        assert_eq!(messages_with(&dir.path().join("nobody"), &tok).len(), 1);
        assert!(server.stop().success());
    }
}

/// A --maildir-root created by inboxd is 0755 whatever the umask (found in review: under the
/// unit's UMask=0077 it came out 0700, and the accounts' mail readers could not pass).
#[test]
fn a_created_maildir_root_can_be_walked_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("umaskroot");
    let root = dir.path().join("srv").join("mail");
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "umask 077 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_inboxd"),
    ]);
    let server = Server::spawn_in(cmd, &root, &[]);
    for d in [dir.path().join("srv"), root.clone()] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{}", d.display());
    }
    drop(server);
}
