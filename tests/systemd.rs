//! The service manager's interface: sd_notify readiness, reload and stop messages over a path
//! or an abstract NOTIFY_SOCKET, and socket activation (LISTEN_FDS with the LISTEN_PID
//! check). The delivery agent must inherit neither the variables nor the sockets.

mod common;

use common::*;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::time::{Duration, Instant};

/// Datagrams until one contains `needle` (each is returned), within 10 s.
fn wait_for(sock: &UnixDatagram, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(needle) {
                return msg;
            }
            seen.push(msg);
        }
    }
    panic!("no {needle:?} from inboxd; got {seen:?}");
}

fn environ(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default())
        .replace('\0', "\n")
}

fn notifications_over(sock: UnixDatagram, value: &str) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dir = TempDir::new("notify");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inboxd"));
    cmd.env("NOTIFY_SOCKET", value);
    let server = Server::spawn_in(cmd, dir.path(), &[]);
    let ready = wait_for(&sock, "READY=1");
    assert!(ready.contains("STATUS=accepting mail on"), "{ready}");
    let agent = proc_children(server.child.id());
    assert_eq!(agent.len(), 1);
    assert!(
        !environ(agent[0]).contains("NOTIFY_SOCKET"),
        "the agent got NOTIFY_SOCKET"
    );
    server.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(&sock, "RELOADING=1");
    wait_for(&sock, "READY=1");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for(&sock, "STOPPING=1");
}

#[test]
fn readiness_reload_and_stop_are_notified_over_a_path_socket() {
    let dir = TempDir::new("notifypath");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    // The receiver may have dropped to the user inboxd before it stops: let it write.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    notifications_over(sock, path.to_str().unwrap());
}

#[test]
fn readiness_reload_and_stop_are_notified_over_an_abstract_socket() {
    let name = format!("inboxd-test-{}", token());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    notifications_over(sock, &format!("@{name}"));
}

/// python3 makes a listening socket, puts it at descriptor 3 and execs inboxd with
/// LISTEN_FDS=1 and LISTEN_PID set to its own pid (which the exec keeps): what systemd does.
const ACTIVATE: &str = r#"
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn a_socket_passed_by_the_service_manager_is_used() {
    let dir = TempDir::new("activation");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", ACTIVATE, env!("CARGO_BIN_EXE_inboxd")]);
    // Server::spawn adds --listen 127.0.0.1:0: the passed socket replaces it, and the port
    // inboxd reports is the passed socket's.
    let server = Server::spawn_in(cmd, dir.path(), &[]);
    let tok = token();
    assert!(server
        .deliver(&["root"], &message(&tok))
        .starts_with("250 "));
    assert_eq!(messages_with(&dir.path().join("root"), &tok).len(), 1);
    // And the --listen it was given is said to be ignored.
    assert!(
        server
            .startup
            .iter()
            .any(|l| l.contains("--listen [127.0.0.1:0] ignored: the service manager passed")),
        "{:?}",
        server.startup
    );
    let agent = proc_children(server.child.id());
    assert_eq!(agent.len(), 1);
    let env = environ(agent[0]);
    assert!(
        !env.contains("LISTEN_FDS") && !env.contains("LISTEN_PID"),
        "{env}"
    );
    // The agent holds one socket only, its end of the pair (on stdin): not the listener.
    let mut sockets: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", agent[0]))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| l.starts_with("socket:"))
        .collect();
    sockets.sort();
    sockets.dedup();
    assert_eq!(sockets.len(), 1, "the agent holds sockets {sockets:?}");
}

/// LISTEN_PID of another process: the variables are not ours, inboxd binds --listen.
#[test]
fn listen_fds_for_another_process_are_ignored() {
    let dir = TempDir::new("notours");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inboxd"));
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let server = Server::spawn_in(cmd, dir.path(), &[]);
    let mut c = server.connect();
    assert!(c.cmd("NOOP").starts_with("250 "));
}

/// A Unix socket passed as the listener: refused at start, with the reason (found in review:
/// it passed the checks and then every accept failed).
#[test]
fn a_passed_unix_socket_is_refused_at_start() {
    let dir = TempDir::new("unixactivation");
    let path = dir.path().join("l.sock");
    let script = ACTIVATE.replace(
        "s = socket.socket()\ns.bind((\"127.0.0.1\", 0))",
        &format!(
            "s = socket.socket(socket.AF_UNIX)\ns.bind({:?})",
            path.display().to_string()
        ),
    );
    assert_ne!(script, ACTIVATE);
    let errfile = dir.path().join("stderr");
    let mut child = Command::new("python3")
        .args(["-c", &script, env!("CARGO_BIN_EXE_inboxd")])
        .args(["--listen", "127.0.0.1:0", "--maildir-root"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errfile).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "still running: {err}");
    assert!(err.contains("is not a TCP socket"), "{err}");
}
