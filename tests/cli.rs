//! The command line of the real binary: usage errors exit 64 with one line, --version and
//! --help work, and a port that cannot be bound gives a clear message.

use std::process::Command;

fn inboxd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inboxd"))
        .args(args)
        .output()
        .expect("run inboxd")
}

#[test]
fn bad_options_exit_64_with_one_line() {
    for args in [
        &["--bogus"][..],
        &["--listen", "nowhere"],
        &["--max-recipients", "5"],
        &["--max-message-size", "lots"],
        &["stray"],
    ] {
        let out = inboxd(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("inboxd: "), "{err}");
    }
}

#[test]
fn version_and_help() {
    let out = inboxd(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("inboxd "));
    let out = inboxd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--domain",
        "--hostname",
        "--maildir-root",
        "--aliases",
        "--max-message-size",
        "--max-recipients",
        "--verbose",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir();
    let out = inboxd(&["--listen", &addr, "--maildir-root", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn a_maildir_root_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("inboxd-ww-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = inboxd(&[
        "--listen",
        "127.0.0.1:0",
        "--maildir-root",
        dir.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not be writable by group or others"), "{err}");
}

/// A --maildir-root that is a symlink, or inside a directory others may write (not sticky),
/// is refused: someone could point it at /etc (found in review).
#[test]
fn a_maildir_root_that_could_be_swapped_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::temp_dir().join(format!("inboxd-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("real")).unwrap();
    std::fs::set_permissions(base.join("real"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
    let open_dir = base.join("open");
    std::fs::create_dir_all(open_dir.join("mail")).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        open_dir.join("mail"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let run = |root: &std::path::Path| {
        let out = inboxd(&[
            "--listen",
            "127.0.0.1:0",
            "--maildir-root",
            root.to_str().unwrap(),
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&base.join("link"));
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("without following a symlink"), "{err}");
    let (code, err) = run(&open_dir.join("mail"));
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("writable by nobody else, or be sticky"),
        "{err}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// The man page is roff source: its font escapes are backslash-f, never a form feed (found in
/// this session: two lines held a literal form feed for each `\f`, and man showed
/// "B-oR..." where "-o..." was meant).
#[test]
fn the_man_page_holds_no_control_characters() {
    let page = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/man/inboxd.8")).unwrap();
    let bad: Vec<(usize, u8)> = page
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b < 0x20 && b != b'\n')
        .map(|(i, &b)| (i, b))
        .collect();
    assert!(bad.is_empty(), "control characters at {bad:?}");
}
