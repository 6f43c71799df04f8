//! The event loop under pressure and administration: the connection cap, running out of file
//! descriptors (EMFILE), and reloading aliases on SIGHUP.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn clients_over_the_connection_cap_wait_for_a_free_slot() {
    let dir = TempDir::new("cap");
    let server = Server::start_in(dir.path(), &["--max-connections", "2"]);
    let c1 = server.connect();
    let _c2 = server.connect();
    // The third connection completes in the kernel's backlog but is not served yet.
    let mut c3 = Client::connect_only(server.port);
    assert!(
        !c3.readable_within(Duration::from_millis(500)),
        "served over the cap"
    );
    drop(c1);
    assert!(
        c3.readable_within(Duration::from_secs(5)),
        "not served after a slot freed"
    );
    assert!(c3.reply().starts_with("220 "));
    assert!(c3.cmd("NOOP").starts_with("250 "));
}

#[test]
fn running_out_of_descriptors_pauses_accepting_and_recovers() {
    let dir = TempDir::new("emfile");
    let server = Server::start_with_fd_limit(
        16,
        &[
            "--maildir-root",
            dir.path().to_str().unwrap(),
            "--aliases",
            "/dev/null",
            "--allow-root-delivery",
        ],
    );
    let clients: Vec<Client> = (0..30).map(|_| Client::connect_only(server.port)).collect();
    assert!(
        server.wait_log("pausing accepts"),
        "EMFILE was not reached or not logged"
    );
    drop(clients);
    // Once descriptors are free again, new clients are served and mail is delivered.
    std::thread::sleep(Duration::from_millis(500));
    let tok = token();
    let end = server.deliver(&["root"], &message(&tok));
    assert!(end.starts_with("250 "), "{end}");
    assert_eq!(messages_with(&dir.path().join("root"), &tok).len(), 1);
}

#[test]
fn aliases_are_local_only_and_reloaded_on_sighup() {
    let dir = TempDir::new("aliases");
    let aliases = dir.path().join("aliases");
    let canary = dir.path().join("canary");
    std::fs::write(
        &aliases,
        format!(
            "# test aliases\nstaff: root,\n  nobody\nevil: \"|/bin/touch {c}\", {c}, :include:{c}\n",
            c = canary.display()
        ),
    )
    .unwrap();
    let mail = dir.path().join("mail");
    let server = Server::start(&[
        "--maildir-root",
        mail.to_str().unwrap(),
        "--aliases",
        aliases.to_str().unwrap(),
        "--allow-root-delivery",
    ]);
    let send = |rcpt: &str| -> (String, String) {
        let mut c = server.connect();
        c.cmd("HELO client.example");
        c.cmd("MAIL FROM:<a@b.example>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}@localhost>"));
        if !r.starts_with("250") {
            return (r, String::new());
        }
        c.cmd("DATA");
        let tok = token();
        c.send(message(&tok).as_bytes());
        let end = c.cmd(".");
        assert!(end.starts_with("250 "), "{end}");
        (r, tok)
    };
    let (_, tok) = send("staff");
    assert_eq!(messages_with(&mail.join("root"), &tok).len(), 1);
    assert_eq!(messages_with(&mail.join("nobody"), &tok).len(), 1);
    let (r, _) = send("evil");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(!canary.exists(), "an alias target was run or written");

    std::fs::write(&aliases, "staff: nobody\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(server.wait_log("reloaded, 1 aliases"));
    let (_, tok) = send("staff");
    assert_eq!(messages_with(&mail.join("root"), &tok).len(), 0);
    assert_eq!(messages_with(&mail.join("nobody"), &tok).len(), 1);
}

/// One client address gets at most --max-connections-per-ip connections: the next gets
/// 421 4.7.0 at once and is closed; when one ends, the address may connect again.
#[test]
fn connections_per_client_address_are_limited() {
    let dir = TempDir::new("perip");
    let server = Server::start_in(dir.path(), &["--max-connections-per-ip", "2"]);
    let c1 = server.connect();
    let mut c2 = server.connect();
    let mut c3 = Client::connect_only(server.port);
    let r = c3.reply();
    assert!(r.starts_with("421 4.7.0 "), "{r}");
    assert!(c3.closed());
    assert!(c2.cmd("NOOP").starts_with("250 "));
    drop(c1);
    std::thread::sleep(Duration::from_millis(200));
    let mut c4 = server.connect();
    assert!(c4.cmd("NOOP").starts_with("250 "));
    assert!(server.wait_log("event=refused peer=127.0.0.1:"));
}

/// Under a file size limit (ulimit -f, systemd's LimitFSIZE=), a message too big for it gets
/// 552 5.2.2 (EFBIG, like a full mailbox) instead of SIGXFSZ killing inboxd, nothing is left
/// behind, and the next message is delivered.
#[test]
fn file_size_limit_gives_552_not_a_dead_server() {
    let dir = TempDir::new("fsize");
    // 64 blocks of 512 octets: 32 KiB.
    let server = Server::start_in_with_fsize_limit(dir.path(), 64);
    let lines: String = (0..200).map(|_| "z".repeat(900) + "\r\n").collect();
    let end = server.deliver(&["root"], &format!("{}{lines}", message(&token())));
    assert!(end.starts_with("552 5.2.2"), "{end}");
    let log = server
        .log_until("event=not_delivered")
        .pop()
        .unwrap_or_default();
    assert!(
        log.contains("quota exceeded: write of mail data: EFBIG"),
        "{log}"
    );
    let md = dir.path().join("root");
    assert!(new_files(&md).is_empty());
    assert!(emptied(&md.join("tmp")));
    let tok = token();
    assert!(server
        .deliver(&["root"], &message(&tok))
        .starts_with("250 "));
    assert_eq!(messages_with(&md, &tok).len(), 1);
}

/// newaliases signals only inboxd processes that block SIGHUP (a running server reads it
/// from its signalfd; to one still starting, or to `inboxd check`, it would be fatal: found in
/// review). A running server does block it, and a reload works.
#[test]
fn a_running_server_blocks_sighup() {
    let dir = TempDir::new("blockedhup");
    let server = Server::start_in(dir.path(), &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap();
    assert_eq!(blocked & 1, 1, "SIGHUP not blocked: {blocked:x}");
}
