//! Helpers for integration tests: start the real `inboxd` binary on an ephemeral loopback
//! port, talk SMTP to it over TCP, and look at the Maildirs it wrote.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: mpsc::Receiver<String>,
    /// The log lines up to the one that gave the port (start-up warnings among them).
    pub startup: Vec<String>,
}

impl Server {
    /// Starts inboxd with `args` plus `--listen 127.0.0.1:0`, and waits for it to say which
    /// port it got.
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(Command::new(env!("CARGO_BIN_EXE_inboxd")), args)
    }

    /// inboxd delivering into `dir/ACCOUNT/` (`--maildir-root`), with no aliases. The tests
    /// deliver to the one account every host has, root: run as root, that needs
    /// `--allow-root-delivery` (the default refusal has its own tests).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::spawn_in(Command::new(env!("CARGO_BIN_EXE_inboxd")), dir, extra)
    }

    /// inboxd delivering into `dir/mail/ACCOUNT/`, with `aliases` written to `dir/aliases`
    /// (and read from there on SIGHUP). Returns the server and the aliases file's path.
    pub fn start_with_aliases(dir: &Path, aliases: &str, extra: &[&str]) -> (Server, PathBuf) {
        let file = dir.join("aliases");
        std::fs::write(&file, aliases).expect("write aliases");
        let mail = dir.join("mail");
        let mut args = vec![
            "--maildir-root",
            mail.to_str().expect("utf-8 path"),
            "--aliases",
            file.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        (Server::start(&args), file)
    }

    /// Like [`Server::start_in`], started by `cmd` (a wrapper, or inboxd with its own
    /// environment).
    pub fn spawn_in(cmd: Command, dir: &Path, extra: &[&str]) -> Server {
        let root = dir.to_str().expect("utf-8 path");
        let mut args = vec![
            "--maildir-root",
            root,
            "--aliases",
            "/dev/null",
            "--allow-root-delivery",
        ];
        args.extend_from_slice(extra);
        Server::spawn(cmd, &args)
    }

    /// Like [`Server::start`], run as `uid`/`gid` from the start (never root).
    pub fn start_as(uid: u32, gid: u32, args: &[&str]) -> Server {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_inboxd"));
        cmd.uid(uid).gid(gid);
        Server::spawn(cmd, args)
    }

    /// Like [`Server::start`], with at most `nofile` open descriptors (RLIMIT_NOFILE).
    pub fn start_with_fd_limit(nofile: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_inboxd"),
        ]);
        Server::spawn(cmd, args)
    }

    /// Like [`Server::start_in`], under a file size limit (RLIMIT_FSIZE) of `blocks` of 512
    /// octets (dash's `ulimit -f` unit; /proc/PID/limits shows the octets).
    pub fn start_in_with_fsize_limit(dir: &Path, blocks: u32) -> Server {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -f {blocks} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_inboxd"),
        ]);
        Server::spawn_in(cmd, dir, &[])
    }

    pub fn spawn(mut cmd: Command, args: &[&str]) -> Server {
        ensure_receiver_user();
        let mut child = cmd
            .args([
                "--listen",
                "127.0.0.1:0",
                "--hostname",
                "mx.test",
                "-d",
                "localhost",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn inboxd");
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        // From here on Drop reaps the child, whatever happens.
        let mut server = Server {
            child,
            port: 0,
            log: rx,
            startup: Vec::new(),
        };
        let stderr = stderr.expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let marker = "listening on [127.0.0.1:";
        while server.port == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = server
                .log
                .recv_timeout(left)
                .expect("inboxd did not report its port");
            if let Some(i) = line.find(marker) {
                let rest = &line[i + marker.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                server.port = digits.parse().expect("port number");
            }
            server.startup.push(line);
        }
        server
    }

    /// One whole session: EHLO, MAIL FROM:<tester@client.example>, each RCPT (which must
    /// get 250), DATA, `body` (SMTP form, dot-stuffed), the final dot, QUIT. Returns the
    /// reply to the final dot.
    pub fn deliver(&self, rcpts: &[&str], body: &str) -> String {
        let mut c = self.open_data(rcpts);
        c.send(body.as_bytes());
        let end = c.cmd(".");
        assert!(c.cmd("QUIT").starts_with("221 "));
        end
    }

    /// Like [`Server::deliver`], but a RCPT may be refused: then its reply is the answer (the
    /// session is ended with QUIT, nothing sent).
    pub fn try_deliver(&self, rcpts: &[&str], body: &str) -> String {
        self.deliver_or_refused(rcpts, body)
            .unwrap_or_else(|refused| refused)
    }

    /// Like [`Server::try_deliver`], telling the reply at the dot (`Ok`) from a RCPT's
    /// refusal (`Err`).
    pub fn deliver_or_refused(&self, rcpts: &[&str], body: &str) -> Result<String, String> {
        let mut c = self.mail_from();
        for r in rcpts {
            let reply = c.cmd(&format!("RCPT TO:<{r}@localhost>"));
            if !reply.starts_with("250 ") {
                assert!(c.cmd("QUIT").starts_with("221 "));
                return Err(reply);
            }
        }
        assert!(c.cmd("DATA").starts_with("354 "));
        c.send(body.as_bytes());
        let end = c.cmd(".");
        assert!(c.cmd("QUIT").starts_with("221 "));
        Ok(end)
    }

    /// Breaks a mailbox (`break_it`) just after a delivery to `account` (which `fix` makes
    /// possible), so that the next RCPT to it is accepted on the check's remembered answer
    /// (2 s, delivery/client.rs CHECKED_TTL) and the failure comes at the dot; then sends to
    /// `rcpts` and returns the reply at the dot, and how many deliveries to `account` went
    /// through on the way. On a machine too slow for the 2 s, the RCPT is refused instead:
    /// the whole is tried again, at most 5 times.
    pub fn fail_at_the_dot(
        &self,
        account: &str,
        fix: &dyn Fn(),
        break_it: &dyn Fn(),
        rcpts: &[&str],
        body: &str,
    ) -> (String, usize) {
        let mut delivered = 0;
        for _ in 0..5 {
            fix();
            let ok = self.try_deliver(&[account], &message(&token()));
            if ok.starts_with("250 ") {
                delivered += 1;
                break_it();
                match self.deliver_or_refused(rcpts, body) {
                    Ok(end) => return (end, delivered),
                    Err(refused) => assert!(refused.starts_with("4"), "{refused}"),
                }
            }
            // A refusal is remembered for 2 s too: wait it out.
            std::thread::sleep(Duration::from_millis(2100));
        }
        panic!("the failure never came at the dot in 5 tries");
    }

    /// A session up to the 354: EHLO, MAIL FROM:<tester@client.example>, each RCPT (which
    /// must get 250), DATA. The mail data and the dot are the caller's.
    pub fn open_data(&self, rcpts: &[&str]) -> Client {
        let mut c = self.mail_from();
        for r in rcpts {
            let reply = c.cmd(&format!("RCPT TO:<{r}@localhost>"));
            assert!(reply.starts_with("250 "), "{r}: {reply}");
        }
        assert!(c.cmd("DATA").starts_with("354 "));
        c
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    /// A session up to an accepted MAIL FROM:<tester@client.example> (after EHLO).
    pub fn mail_from(&self) -> Client {
        let mut c = self.connect();
        assert!(c.cmd("EHLO client.example").starts_with("250-"));
        assert!(c
            .cmd("MAIL FROM:<tester@client.example>")
            .starts_with("250 "));
        c
    }

    /// Log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Every log line up to and including the first holding `needle` (waiting up to 10 s).
    pub fn log_until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let done = line.contains(needle);
            out.push(line);
            if done {
                return out;
            }
        }
        panic!("no log line with {needle:?} in {out:#?}");
    }

    /// Waits up to 10 s for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let mut c = Client::connect_only(port);
        let g = c.reply();
        assert!(g.starts_with("220 "), "greeting {g:?}");
        c
    }

    /// Connects without reading the greeting.
    pub fn connect_only(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Whether anything arrives within `t`.
    pub fn readable_within(&mut self, t: Duration) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        self.stream.set_read_timeout(Some(t)).unwrap();
        let mut tmp = [0u8; 4096];
        let r = match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n > 0
            }
            Err(_) => false,
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        r
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// One whole (possibly multi-line) reply, CRLFs included.
    pub fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let line = self.line();
            assert!(line.len() >= 4, "short reply line {line:?}");
            out.push_str(&line);
            if line.as_bytes()[3] == b' ' {
                return out;
            }
        }
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8_lossy(&line).into_owned();
            }
            let mut tmp = [0u8; 4096];
            // A signal meant for another test's child can interrupt the read (seen once in
            // faults.rs): read again.
            let n = match self.stream.read(&mut tmp) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read reply"),
            };
            assert!(
                n > 0,
                "connection closed; buffered {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Whether the server closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 64];
        matches!(self.stream.read(&mut tmp), Ok(0) | Err(_))
    }
}

/// A unique token to find one's message again.
pub fn token() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tok{t:x}x{}", N.fetch_add(1, Ordering::SeqCst))
}

/// A message in SMTP form (CRLF) carrying `token`.
pub fn message(token: &str) -> String {
    format!(
        "From: Tester <tester@client.example>\r\nSubject: test {token}\r\nMessage-ID: <{token}@client.example>\r\n\r\nBody {token}\r\n..dotted line\r\n"
    )
}

/// Files in `dir/new` (the whole file names), sorted.
pub fn new_files(maildir: &Path) -> Vec<PathBuf> {
    list(&maildir.join("new"))
}

/// Whether `dir` is empty within 5 s. A refused transaction is answered as soon as the
/// failure is known; the agent removes its tmp/ files right after, not before the reply.
pub fn emptied(dir: &Path) -> bool {
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !list(dir).is_empty() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Messages in `maildir` (read with the `maildir` crate) whose content holds `token`.
pub fn messages_with(maildir: &Path, token: &str) -> Vec<Vec<u8>> {
    let md = maildir::Maildir::from(maildir.to_path_buf());
    let mut out = Vec::new();
    for entry in md.list_new().chain(md.list_cur()) {
        let entry = entry.expect("maildir entry");
        let data = std::fs::read(entry.path()).expect("read message");
        if data.windows(token.len()).any(|w| w == token.as_bytes()) {
            out.push(data);
        }
    }
    out
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("inboxd-test-{tag}-{}", token()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Started as root, inboxd runs its network side as the user `inboxd`: make sure it exists.
pub fn ensure_receiver_user() {
    if is_root()
        && nix::unistd::User::from_name("inboxd")
            .ok()
            .flatten()
            .is_none()
    {
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "inboxd",
            ])
            .status();
    }
}

/// The `Uid:` line of /proc/PID/status: real, effective, saved, filesystem.
pub fn proc_uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The children of PID (from /proc/PID/task/*/children).
pub fn proc_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// Creates `name` (with a home directory) unless it exists; returns its home and uid.
pub fn ensure_user(name: &str) -> (PathBuf, u32) {
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let st = Command::new("useradd")
            .args(["-m", name])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
    }
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    (u.dir, u.uid.as_raw())
}

/// inboxd started with CAP_DAC_READ_SEARCH out of its bounding set (as Docker and a strict
/// CapabilityBoundingSet= leave it).
pub fn without_dac_read_search() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set",
        "-dac_read_search",
        "--",
        env!("CARGO_BIN_EXE_inboxd"),
    ]);
    cmd
}

/// inboxd as root delivering to ~account/Maildir, with root (and so postmaster) aliased to
/// Jones: started as root, inboxd refuses to run while postmaster would reach uid 0.
pub fn start_system() -> (Server, TempDir) {
    ensure_user("Jones");
    let dir = TempDir::new("sysaliases");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "root: Jones\n").unwrap();
    let server = Server::start(&["--aliases", aliases.to_str().unwrap()]);
    (server, dir)
}

/// A 32 MiB ext4 image made with `mkfs.ext4 -O features` in `dir`, mounted through a loop
/// device at `dir/<features>.mnt` (mode 0755), or `None` where the loop mount fails.
pub fn mount_ext4_image(dir: &Path, features: &str) -> Option<(PathBuf, Mount)> {
    let img = dir.join(format!("{features}.img"));
    std::fs::File::create(&img)
        .expect("create image")
        .set_len(32 << 20)
        .expect("size image");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", features])
        .arg(&img)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 -O {features}");
    let mnt = dir.join(format!("{features}.mnt"));
    std::fs::create_dir(&mnt).expect("mkdir");
    let st = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt)
        .status()
        .expect("mount");
    if !st.success() {
        // CI sets INBOXD_REQUIRE_LOOP: there a test must not pass by skipping.
        assert!(
            std::env::var_os("INBOXD_REQUIRE_LOOP").is_none(),
            "cannot mount {} through a loop device",
            img.display()
        );
        return None;
    }
    let guard = Mount(mnt.clone());
    std::fs::set_permissions(&mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    Some((mnt, guard))
}

/// A filesystem the test mounted, unmounted on drop.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        // Lazily: the agent, which outlives the receiver by a moment, may still hold a
        // directory open in there.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// inboxd in a mount namespace of its own (unshare(1) makes it private, then execs inboxd:
/// same pid), where [`hang_nss`] can hang its NSS lookups without touching the host's.
pub fn inboxd_in_own_mount_namespace() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(env!("CARGO_BIN_EXE_inboxd"));
    cmd
}

/// Hangs the NSS lookups (nss_files) of process `pid`, started by
/// [`inboxd_in_own_mount_namespace`], and of its children: a FIFO in `dir` is bound over
/// /etc/passwd in its mount namespace, so the next getpwnam blocks in open(2) until the
/// process ends. The host's /etc/passwd is untouched.
pub fn hang_nss(pid: u32, dir: &Path) {
    let fifo = dir.join("passwd.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    // An unprivileged receiver opens it too: 0666 whatever the umask.
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let st = Command::new("nsenter")
        .args([
            "--target",
            &pid.to_string(),
            "--mount",
            "--",
            "mount",
            "--bind",
        ])
        .arg(&fifo)
        .arg("/etc/passwd")
        .status()
        .expect("nsenter");
    assert!(st.success(), "binding the FIFO over /etc/passwd of {pid}");
    assert!(std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .contains("root:"));
}

pub fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, needs root");
        return true;
    }
    false
}
