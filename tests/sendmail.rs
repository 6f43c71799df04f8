//! The sendmail(8) interface: inboxd called as `sendmail`, `mailq` and `newaliases` (a
//! symbolic link), handing messages to a running inboxd over loopback SMTP.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A directory with `sendmail`, `mailq` and `newaliases` linked to inboxd.
fn links() -> (TempDir, PathBuf) {
    let dir = TempDir::new("sendmail-links");
    for name in ["sendmail", "mailq", "newaliases"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_inboxd"), dir.path().join(name)).unwrap();
    }
    let p = dir.path().to_path_buf();
    (dir, p)
}

/// Runs `bin args` with `input` on stdin; (status, stdout, stderr).
fn run(
    bin: &Path,
    port: u16,
    args: &[&str],
    input: &(impl AsRef<[u8]> + ?Sized),
) -> (i32, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .env("INBOXD_SMTP", format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_ref())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_message_from_cron_reaches_the_person_root_is_aliased_to() {
    let dir = TempDir::new("sendmail-cron");
    let (server, _) = Server::start_with_aliases(dir.path(), "root: nobody\n", &[]);
    let mail = dir.path().join("mail");
    let (_l, bin) = links();
    let tok = token();
    // What cron runs (Debian's cron 3.0).
    let (status, _, err) = run(
        &bin.join("sendmail"),
        server.port,
        &["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        &format!(
            "To: root\nSubject: Cron <root@host> run-parts {tok}\n\nline one\n.\nline three\n"
        ),
    );
    assert_eq!(status, 0, "{err}");
    let found = messages_with(&mail.join("nobody"), &tok);
    assert_eq!(found.len(), 1);
    let text = String::from_utf8_lossy(&found[0]);
    assert!(text.contains("From: CronDaemon <"), "{text}");
    assert!(text.contains("\nDate: "), "{text}");
    assert!(text.contains("\nMessage-ID: <"), "{text}");
    // -i: the lone dot was data, and came through unstuffed.
    assert!(text.ends_with("line one\n.\nline three\n"), "{text}");
}

/// A cron job's output as it comes: no header, a progress bar drawn with CRs, 8-bit text,
/// a line of 3000 octets, two recipients in one argument, and a bare user name for -f.
/// Before, the server refused it whole (bare CR, long line: 550 5.6.0, sendmail exited 65),
/// the first line became a header field, the 8-bit octets were replaced, and the comma got
/// 501.
#[test]
fn raw_cron_output_is_delivered_with_nothing_lost() {
    let dir = TempDir::new("sendmail-raw");
    let server = Server::start_in(dir.path(), &[]);
    let (_l, bin) = links();
    let tok = token();
    let long = "z".repeat(3000);
    let mut input = format!("backup {tok}\n10%\r55%\r100%\n").into_bytes();
    input.extend_from_slice(b"caf\xe9\n");
    input.extend_from_slice(format!("{long}\n").as_bytes());
    let (status, _, err) = run(
        &bin.join("sendmail"),
        server.port,
        &["-f", "www-data", "-i", "root,nobody"],
        &input,
    );
    assert_eq!(status, 0, "{err}");
    for account in ["root", "nobody"] {
        let found = messages_with(&dir.path().join(account), &tok);
        assert_eq!(found.len(), 1, "{account}");
        let text = &found[0];
        let shown = String::from_utf8_lossy(text);
        assert!(shown.starts_with("Return-Path: <www-data@"), "{shown}");
        let body_at = shown.find("\n\n").unwrap() + 2;
        let mut want = format!("backup {tok}\n10%\n55%\n100%\n").into_bytes();
        want.extend_from_slice(b"caf\xe9\n");
        // 3000 octets: three lines of 998 and one of 6.
        for piece in long.as_bytes().chunks(998) {
            want.extend_from_slice(piece);
            want.push(b'\n');
        }
        let got = &text[body_at..];
        assert_eq!(got, &want[..], "{shown}");
    }
}

/// `sendmail -bs` (alpine's way): the caller speaks SMTP on standard input and output, and
/// talks to inboxd itself.
#[test]
fn dash_bs_relays_an_smtp_session_on_standard_input() {
    let dir = TempDir::new("sendmail-bs");
    let server = Server::start_in(dir.path(), &[]);
    let (_l, bin) = links();
    let tok = token();
    let session = format!(
        "EHLO client\r\nMAIL FROM:<a@client>\r\nRCPT TO:<nobody@localhost>\r\nRCPT TO:<ghost@localhost>\r\nDATA\r\nSubject: {tok}\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    );
    let (status, out, err) = run(&bin.join("sendmail"), server.port, &["-bs"], &session);
    assert_eq!(status, 0, "{err}");
    assert!(
        out.starts_with("220 mx.test ESMTP inboxd ready\r\n"),
        "{out}"
    );
    assert!(
        out.contains("550 5.1.1"),
        "ghost refused by inboxd itself: {out}"
    );
    assert!(
        out.trim_end()
            .ends_with("221 2.0.0 mx.test closing connection"),
        "{out}"
    );
    assert_eq!(messages_with(&dir.path().join("nobody"), &tok).len(), 1);
}

#[test]
fn dash_t_takes_recipients_from_the_header_and_drops_bcc() {
    let dir = TempDir::new("sendmail-t");
    let server = Server::start_in(dir.path(), &[]);
    let (_l, bin) = links();
    let tok = token();
    let (status, _, err) = run(
        &bin.join("sendmail"),
        server.port,
        &["-t", "-f", "sender@client.example"],
        &format!("From: Sender <sender@client.example>\nTo: root\nBcc: nobody@localhost\nSubject: {tok}\n\nhello\n"),
    );
    assert_eq!(status, 0, "{err}");
    for account in ["root", "nobody"] {
        let found = messages_with(&dir.path().join(account), &tok);
        assert_eq!(found.len(), 1, "{account}");
        let text = String::from_utf8_lossy(&found[0]);
        assert!(!text.contains("Bcc"), "{text}");
        assert!(
            text.starts_with("Return-Path: <sender@client.example>\n"),
            "{text}"
        );
    }
}

#[test]
fn exit_statuses_follow_sysexits() {
    let dir = TempDir::new("sendmail-status");
    let server = Server::start_in(dir.path(), &[]);
    let (_l, bin) = links();
    let sendmail = bin.join("sendmail");
    // Unknown user: EX_NOUSER, and nothing was sent.
    let (status, _, err) = run(&sendmail, server.port, &["nosuchuser"], "Subject: x\n\nx\n");
    assert_eq!(status, 67, "{err}");
    // One good and one unknown recipient: the good one gets it, the status says EX_NOUSER.
    let tok = token();
    let (status, _, _) = run(
        &sendmail,
        server.port,
        &["root", "nosuchuser"],
        &format!("Subject: {tok}\n\nx\n"),
    );
    assert_eq!(status, 67);
    assert_eq!(messages_with(&dir.path().join("root"), &tok).len(), 1);
    // Nothing listening: EX_TEMPFAIL (there is no queue to keep the message in).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (status, _, err) = run(&sendmail, port, &["root"], "Subject: x\n\nx\n");
    assert_eq!(status, 75, "{err}");
    assert!(err.contains("nothing was sent"), "{err}");
    // Bad usage: EX_USAGE.
    let (status, _, _) = run(&sendmail, server.port, &["-bt"], "");
    assert_eq!(status, 64);
    // mailq: no queue.
    let (status, out, _) = run(&bin.join("mailq"), server.port, &[], "");
    assert_eq!(status, 0);
    assert!(out.contains("no mail queue"), "{out}");
}

#[test]
fn newaliases_reports_problems_and_tells_inboxd_to_reload() {
    let dir = TempDir::new("newaliases");
    let (server, aliases) =
        Server::start_with_aliases(dir.path(), "staff: root\n", &["--allow-root-delivery"]);
    std::fs::write(
        &aliases,
        "staff: root\nops: |/bin/sh\nfriend: x@remote.example\n",
    )
    .unwrap();
    let (_l, bin) = links();
    let out = Command::new(bin.join("newaliases"))
        .env("INBOXD_ALIASES", &aliases)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(65), "{stdout}");
    assert!(
        stdout.contains("ops: target \"|/bin/sh\" refused"),
        "{stdout}"
    );
    assert!(
        stdout.contains("remote target \"x@remote.example\" refused"),
        "{stdout}"
    );
    assert!(stdout.contains("3 aliases"), "{stdout}");
    if is_root() {
        assert!(server.wait_log("reloaded, 3 aliases"));
    }
}
