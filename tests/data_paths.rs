//! The two ways mail data reaches the delivery agent (README "Delivery and durability"): held
//! by the receiver and sent whole with the commit when the message fits one request, or,
//! once it outgrows that, streamed into descriptors the agent opened. Both must give the same
//! files.

mod common;

use common::*;
use std::time::Duration;

/// The `via=` of the delivery log line of each of `n` deliveries, in log order.
fn vias(server: &Server, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let lines = server.log_until("event=delivered ");
        let line = lines.last().unwrap();
        let via = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("via="))
            .unwrap_or_else(|| panic!("no via= in {line}"));
        out.push(via.to_string());
    }
    out
}

/// The message body of `token` as the Maildir holds it: LF line ends, dots unstuffed.
fn stored_body(token: &str, extra: &str) -> String {
    format!(
        "From: Tester <tester@client.example>\nSubject: test {token}\nMessage-ID: <{token}@client.example>\n\nBody {token}\n.dotted line\n{extra}"
    )
}

#[test]
fn whole_and_streamed_messages_are_stored_alike() {
    let dir = TempDir::new("datapaths");
    let server = Server::start_in(dir.path(), &[]);
    let md = dir.path().join("nobody");

    // A: 70 KiB, so streamed: its copy is open in the agent while the others come and go
    // (no final dot yet).
    let tok_a = token();
    let line = "x".repeat(99) + "\r\n";
    let mut a = server.open_data(&["nobody"]);
    a.send((message(&tok_a) + &line.repeat(700)).as_bytes());
    std::thread::sleep(Duration::from_millis(100));

    // B: a small message: sent whole.
    let tok_b = token();
    let reply = server.deliver(&["nobody"], &message(&tok_b));
    assert!(reply.starts_with("250 2.0.0"), "{reply}");

    // C: a message too large for one request (200 KiB): held at first, then switched to
    // descriptors when it outgrew the request.
    let tok_c = token();
    let big: String = line.repeat(2048);
    let reply = server.deliver(&["nobody"], &(message(&tok_c) + &big));
    assert!(reply.starts_with("250 2.0.0"), "{reply}");

    // A ends.
    a.send(b"tail\r\n.\r\n");
    let reply = a.reply();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(a.cmd("QUIT").starts_with("221 "));

    assert_eq!(vias(&server, 3), ["whole", "stream", "stream"]);

    let big_stored = "x".repeat(99) + "\n";
    for (tok, extra) in [
        (&tok_a, big_stored.repeat(700) + "tail\n"),
        (&tok_b, String::new()),
        (&tok_c, big_stored.repeat(2048)),
    ] {
        let found = messages_with(&md, tok);
        assert_eq!(found.len(), 1, "{tok}");
        let text = String::from_utf8(found[0].clone()).unwrap();
        // The trace fields the receiver wrote come first, then the data exactly.
        assert!(
            text.starts_with("Return-Path: <tester@client.example>\n"),
            "{text:.200}"
        );
        assert!(
            text.ends_with(&stored_body(tok, &extra)),
            "{tok}: {:?}",
            &text[..text.len().min(600)]
        );
    }
    assert!(list(&md.join("tmp")).is_empty());
}

#[test]
fn a_whole_message_that_cannot_be_written_is_refused_and_leaves_nothing() {
    if skip_unless_root("a_whole_message_that_cannot_be_written_is_refused_and_leaves_nothing") {
        return;
    }
    // A file size limit the data does not fit: the agent's write fails with EFBIG (552
    // 5.2.2, see server_limits.rs for the streamed case), for a message sent whole.
    let dir = TempDir::new("datapathsfbig");
    // 4 blocks of 512 octets: 2 KiB.
    let server = Server::start_in_with_fsize_limit(dir.path(), 4);
    let md = dir.path().join("nobody");
    let tok_a = token();
    let mut a = server.open_data(&["nobody"]);
    a.send(message(&tok_a).as_bytes());
    std::thread::sleep(Duration::from_millis(100));
    let tok_b = token();
    let body = message(&tok_b) + &("y".repeat(70) + "\r\n").repeat(100);
    let reply = server.deliver(&["nobody"], &body);
    assert!(reply.starts_with("552 5.2.2"), "{reply}");
    // The agent wrote it (a streamed copy fails in the receiver, which logs no such line).
    let lines = server.log_until("event=agent_failed");
    let failed = lines.last().unwrap();
    assert!(failed.contains("write of mail data"), "{failed}");
    // A small one still goes through, whole.
    let tok_c = token();
    let reply = server.deliver(&["nobody"], &message(&tok_c));
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    a.send(b".\r\n");
    assert!(a.reply().starts_with("250 2.0.0"));
    assert_eq!(vias(&server, 2), ["whole", "whole"]);
    assert!(messages_with(&md, &tok_b).is_empty());
    assert_eq!(messages_with(&md, &tok_c).len(), 1);
    assert!(emptied(&md.join("tmp")));
}
