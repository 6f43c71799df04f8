//! Group-commit strategies for the delivery agent, measured on this machine's disk: how
//! fast each one makes batches of Maildir deliveries durable, and what it costs another
//! process writing to the same filesystem at the same time.
//!
//! Not a test: a measurement that prints figures (`bench/group-commit` runs it).
//!
//! ```text
//! cargo run --release --example group_commit -- DIR [BATCH] [FILES] [OTHER]
//! ```
//! DIR must be on the filesystem to measure (the Maildirs' one); the example makes
//! `DIR/gc-bench/{tmp,new}` and moves, never deletes, what it wrote (mass deletes slow ext4
//! file creation for minutes). OTHER is `none`, `burst` (another process has just written
//! 1 GiB without syncing it: a download, a copy, a build; then it idles) or `fsyncer` (another
//! process writes 64 KiB and fsyncs, over and over: a database). Before each strategy the
//! page cache is flushed (sync), so each starts from the same state.
//!
//! Strategies, per batch of BATCH files of 4 KiB (each one the full Maildir protocol: create
//! in tmp/, write, make durable, rename into new/, fsync new/ once per batch):
//! - `fsync`: fsync each file in turn (what a careful single writer does);
//! - `parallel`: all the batch's fsyncs at once, from inboxd's pool of 16 threads;
//! - `syncfs`: always one syncfs() for the whole batch (flushes the whole filesystem);
//! - `adaptive`: what inboxd's agent does (`src/delivery/syncer.rs`): syncfs while the host
//!   has at most 4 MiB dirty, the parallel fsyncs otherwise.
//!
//! Output: one line per strategy with files/s, commit latency p50/p99 (ms) and, when OTHER
//! is not `none`, the other writer's throughput (MiB/s or fsyncs/s) during the run.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use inboxd::delivery::syncer::{Policy, Syncer, Target};
use std::os::fd::OwnedFd;
use std::sync::Arc;

const STRATEGIES: [&str; 4] = ["fsync", "parallel", "syncfs", "adaptive"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--other-writer") {
        other_writer(&args[2], &args[3]);
        return;
    }
    let Some(dir) = args.get(1) else {
        eprintln!("usage: group_commit DIR [BATCH] [FILES] [none|stream|fsyncer]");
        std::process::exit(64);
    };
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let files: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4000);
    let other = args.get(4).cloned().unwrap_or_else(|| "none".into());
    let root = Path::new(dir).join("gc-bench");
    for d in ["tmp", "new", "trash"] {
        fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let body = vec![b'x'; 4096];
    for strategy in STRATEGIES {
        nix::unistd::sync();
        let mut child = start_other(&other, &root);
        let (rate, p50, p99, max) = run(&root, strategy, batch, files, &body);
        let other_rate = stop_other(&mut child);
        println!(
            "group_commit strategy={strategy} batch={batch} files={files} other={other} \
             files_per_s={rate:.0} commit_p50_ms={p50:.2} commit_p99_ms={p99:.2} commit_max_ms={max:.1} \
             other_rate={other_rate}"
        );
        // Move the delivered files away without deleting them.
        let stamp = format!("{strategy}-{}", std::process::id());
        let trash = root.join("trash").join(stamp);
        let _ = fs::rename(root.join("new"), &trash);
        fs::create_dir_all(root.join("new")).expect("mkdir new");
    }
}

fn run(
    root: &Path,
    strategy: &str,
    batch: usize,
    files: usize,
    body: &[u8],
) -> (f64, f64, f64, f64) {
    let newdir = File::open(root.join("new")).expect("open new/");
    let dev = nix::sys::stat::fstat(newdir.as_fd()).expect("fstat").st_dev;
    let kind = inboxd::delivery::fskind::of(&newdir, dev);
    let mut syncer = Syncer::new(match strategy {
        "fsync" => Policy::SerialFsync,
        "parallel" => Policy::ParallelFsync,
        _ => Policy::Adaptive,
    });
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut n = 0;
    while n < files {
        let t0 = Instant::now();
        let mut open: Vec<(File, PathBuf, PathBuf)> = Vec::with_capacity(batch);
        for _ in 0..batch {
            let name = format!("{}.{}.{}", std::process::id(), strategy, n);
            n += 1;
            let tmp = root.join("tmp").join(&name);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .expect("create");
            f.write_all(body).expect("write");
            open.push((f, tmp, root.join("new").join(name)));
        }
        let targets: Vec<Target> = open
            .iter()
            .map(|(f, _, _)| Target {
                fd: Arc::new(OwnedFd::from(f.try_clone().expect("dup"))),
                dev: Some(dev),
                kind,
            })
            .collect();
        let results = match strategy {
            "syncfs" => {
                nix::unistd::syncfs(newdir.as_fd()).expect("syncfs");
                Vec::new()
            }
            _ => syncer.sync(&targets),
        };
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        for (_, tmp, new) in &open {
            fs::rename(tmp, new).expect("rename");
        }
        newdir.sync_all().expect("fsync new/");
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (rate, pct(0.5), pct(0.99), lat[lat.len() - 1])
}

fn start_other(kind: &str, root: &Path) -> Option<Child> {
    if kind == "none" {
        return None;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args(["--other-writer", kind])
        .arg(root.join("other.dat"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn other writer");
    // Long enough for the burst to be in the page cache.
    std::thread::sleep(Duration::from_millis(1500));
    Some(child)
}

fn stop_other(child: &mut Option<Child>) -> String {
    let Some(c) = child.take() else {
        return "-".into();
    };
    let mut c = c;
    drop(c.stdin.take());
    let out = c.wait_with_output().expect("wait other writer");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The other process, until its stdin closes: `burst` writes 1 GiB once (no sync) and then
/// idles, printing how long the writing took; `fsyncer` writes 64 KiB and fsyncs, over and
/// over, and prints its rate.
fn other_writer(kind: &str, path: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // The parent stops us by closing our stdin: no signal handler needed.
    static STOP: AtomicBool = AtomicBool::new(false);
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        STOP.store(true, Ordering::Relaxed);
    });
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("other file");
    let start = Instant::now();
    if kind == "burst" {
        let buf = vec![b'o'; 1 << 20];
        for _ in 0..1024 {
            f.write_all(&buf).expect("write");
        }
        let took = start.elapsed().as_secs_f64();
        while !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("1GiB-written-in-{took:.2}s");
        return;
    }
    let buf = vec![b'o'; 64 << 10];
    let mut ops: u64 = 0;
    while !STOP.load(Ordering::Relaxed) {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fsync");
        ops += 1;
    }
    println!("{:.0}fsyncs/s", ops as f64 / start.elapsed().as_secs_f64());
}
