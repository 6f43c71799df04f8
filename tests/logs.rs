//! Log lines: key=value events with the session id, and sd-daemon priority prefixes when
//! standard error is the journal.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn each_delivery_is_one_key_value_line() {
    let dir = TempDir::new("logs");
    let server = Server::start_in(dir.path(), &[]);
    let tok = token();
    assert!(server
        .deliver(&["root", "nobody"], &message(&tok))
        .starts_with("250 "));
    std::thread::sleep(Duration::from_millis(200));
    let lines = server.log_lines();
    let find =
        |needle: &str| -> Vec<&String> { lines.iter().filter(|l| l.contains(needle)).collect() };
    let connect = find("event=connect session=");
    assert_eq!(connect.len(), 1, "{lines:#?}");
    let session = connect[0]
        .split_whitespace()
        .find_map(|w| w.strip_prefix("session="))
        .unwrap()
        .to_string();
    let rcpt = find("event=rcpt ");
    assert_eq!(rcpt.len(), 2, "{lines:#?}");
    assert!(rcpt[0].contains(&format!(
        "session={session} rcpt=\"root\" result=accepted accounts=root"
    )));
    let delivered = find("event=delivered ");
    assert_eq!(delivered.len(), 2, "{lines:#?}");
    for (line, account) in delivered.iter().zip(["root", "nobody"]) {
        assert!(line.contains(&format!("session={session} ")), "{line}");
        assert!(
            line.contains(&format!("account={account} file=new/")),
            "{line}"
        );
        assert!(line.contains(" status=250 commit_ms="), "{line}");
        // The size in the line is the file's.
        let name = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("file="))
            .unwrap();
        let size: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("size="))
            .unwrap()
            .parse()
            .unwrap();
        let meta = std::fs::metadata(dir.path().join(account).join(name)).unwrap();
        assert_eq!(meta.len(), size);
    }
    // Timestamped and levelled on a terminal or file.
    assert!(
        delivered[0].contains("Z INFO event=delivered"),
        "{}",
        delivered[0]
    );
}

#[test]
fn under_the_journal_lines_carry_priorities() {
    let dir = TempDir::new("journal");
    let log = dir.path().join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mail = dir.path().join("mail");
    let mut child = Command::new(env!("CARGO_BIN_EXE_inboxd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "-d",
            "localhost",
            "--hostname",
            "mx.test",
        ])
        .args([
            "--maildir-root",
            mail.to_str().unwrap(),
            "--aliases",
            "/dev/null",
        ])
        .arg("--allow-root-delivery")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("listening on") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let line = text
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("started");
    assert!(line.starts_with("<6>inboxd "), "{line}");
}

/// Envelope values in log lines are quoted (Rust's `{:?}` escaping), so a space or a quote in
/// a quoted local part cannot split a key=value line or forge another key; controls never get
/// that far (the parser refuses them, `relay_and_escaping.txt`).
#[test]
fn envelope_values_are_quoted_in_logs() {
    let dir = TempDir::new("logquote");
    let server = Server::start_in(dir.path(), &[]);
    let mut c = server.connect();
    assert!(c.cmd("EHLO client.example").starts_with("250"));
    let from = c.cmd(r#"MAIL FROM:<"x result=accepted \"y"@client.example>"#);
    assert!(from.starts_with("250 "), "{from}");
    let r = c.cmd(r#"RCPT TO:<"a b result=accepted \"c"@localhost>"#);
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.cmd("RCPT TO:<root@localhost>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    c.send(message(&token()).as_bytes());
    assert!(c.cmd(".").starts_with("250 "));
    assert!(c.cmd("QUIT").starts_with("221 "));
    let lines = server.log_until("event=close ");
    let unknown: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("event=rcpt ") && l.contains("result=unknown"))
        .collect();
    assert_eq!(unknown.len(), 1, "{lines:#?}");
    assert!(
        unknown[0].contains(r#"rcpt="a b result=accepted \"c" result=unknown"#),
        "{}",
        unknown[0]
    );
    let tx: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("event=transaction "))
        .collect();
    assert_eq!(tx.len(), 1, "{lines:#?}");
    assert!(
        tx[0].contains(r#"from="<\"x result=accepted \\\"y\"@client.example>""#),
        "{}",
        tx[0]
    );
    for l in &lines {
        assert!(!l.chars().any(|c| c.is_control()), "raw control in {l:?}");
    }
}
