//! Recipient lookups run off the event loop: an NSS backend that never answers holds up
//! neither the other sessions nor a stop.
//!
//! The hung backend is made for real: inboxd runs in a mount namespace of its own, where the
//! test binds a FIFO over /etc/passwd once inboxd is up, so the next getpwnam (nss_files)
//! blocks in open(2) until the process ends. Needs root (mount namespaces).

mod common;

use std::time::{Duration, Instant};

use common::{hang_nss, inboxd_in_own_mount_namespace, skip_unless_root, Client, Server, TempDir};

#[test]
fn a_hung_nss_backend_holds_up_neither_other_sessions_nor_a_stop() {
    if skip_unless_root("a_hung_nss_backend_holds_up_neither_other_sessions_nor_a_stop") {
        return;
    }
    let dir = TempDir::new("hungnss");
    let mail = dir.path().join("mail");
    let mut server = Server::spawn_in(inboxd_in_own_mount_namespace(), &mail, &[]);
    // Mail flows before the backend hangs.
    assert!(server
        .deliver(&["root"], "Subject: before\r\n\r\nx\r\n")
        .starts_with("250"));
    let pid = server.child.id().to_string();
    hang_nss(server.child.id(), dir.path());

    // A: a recipient that is not in the cache (no such user is ever cached), whose lookup
    // now blocks in the lookup thread.
    let mut a = Client::connect(server.port);
    assert!(a.cmd("EHLO a.example").starts_with("250"));
    assert!(a.cmd("MAIL FROM:<a@a.example>").starts_with("250"));
    a.send(b"RCPT TO:<nobody-such-xyz@localhost>\r\n");
    assert!(
        !a.readable_within(Duration::from_secs(1)),
        "the lookup should be hanging"
    );

    // B: a new session is greeted and served meanwhile (run in the event loop, the lookup
    // held every session, this greeting included).
    let mut b = Client::connect_only(server.port);
    assert!(
        b.readable_within(Duration::from_secs(5)),
        "no greeting while a lookup hangs"
    );
    assert!(b.reply().starts_with("220"));
    assert!(b.cmd("EHLO b.example").starts_with("250"));
    assert!(b.cmd("MAIL FROM:<b@b.example>").starts_with("250"));
    assert!(b.cmd("NOOP").starts_with("250"));

    // Every thread of the receiver, the lookup thread among them, runs as the user inboxd
    // with no capabilities. (glibc's setresuid changes every thread, so this holds whatever
    // the order; the thread is started after the switch anyway.)
    let inboxd = nix::unistd::User::from_name("inboxd")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        tasks.len() >= 2,
        "no lookup thread: {} task(s)",
        tasks.len()
    );
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let uids: Vec<u32> = field("Uid:").iter().map(|x| x.parse().unwrap()).collect();
        assert_eq!(uids, vec![inboxd; 4], "{:?}", t.path());
        for caps in ["CapPrm:", "CapEff:"] {
            assert_eq!(
                field(caps),
                vec!["0000000000000000"],
                "{caps} {:?}",
                t.path()
            );
        }
    }

    // A stop is not held by the hung lookup: A gets 451 4.3.0 for its recipient, then 421,
    // within the stop's wait (8 s), and inboxd exits though its lookup thread is still stuck.
    let t0 = Instant::now();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(b.reply().starts_with("421"));
    assert!(
        a.readable_within(Duration::from_secs(15)),
        "no answer to the hung RCPT after SIGTERM"
    );
    let r = a.reply();
    assert!(r.starts_with("451 4.3.0"), "{r}");
    assert!(a.reply().starts_with("421"));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert!(server.wait_log("lookup timed out"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "inboxd did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}
