//! Replays every input the fuzzer saved (fuzz/regressions/TARGET: inputs that once broke an
//! invariant, kept after the fix) and every seed (fuzz/seeds/TARGET) through the same
//! invariant checks the fuzz targets run (src/smtp/fuzz.rs, src/delivery/fuzz.rs). A fixed
//! bug stays fixed.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    let mut failed = Vec::new();
    for kind in ["regressions", "seeds"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let input = std::fs::read(&path).unwrap();
            count += 1;
            if std::panic::catch_unwind(|| check(&input)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(count > 0, "no inputs for {target}");
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
}

#[test]
fn command_inputs() {
    replay("command", inboxd::smtp::fuzz::command_line);
}

#[test]
fn path_inputs() {
    replay("path", inboxd::smtp::fuzz::paths);
}

#[test]
fn data_inputs() {
    replay("data", inboxd::smtp::fuzz::data_decoder);
}

#[test]
fn session_inputs() {
    replay("session", inboxd::smtp::fuzz::session);
}

#[test]
fn protocol_inputs() {
    replay("protocol", inboxd::delivery::fuzz::protocol);
}
