//! The two ways issue 3 offers to get message data into each recipient's Maildir, measured
//! on this machine: CPU time and wall time per message, without the fsyncs (they are the
//! same for both; see examples/group_commit.rs for those).
//!
//! - `direct` (what inboxd does): one tmp/ file per recipient is created first, and the data
//!   is written into each as it arrives;
//! - `spool`: the data is written once into an unnamed spool file (O_TMPFILE), then copied
//!   into one tmp/ file per recipient with copy_file_range.
//!
//! Not a test: a measurement that prints figures.
//!
//! ```text
//! cargo run --release --example data_path -- DIR [MESSAGES] [SIZE]
//! ```
//! DIR must be on the Maildirs' filesystem; the example makes `DIR/dp-bench/r{0,1,2}/tmp` and
//! moves, never deletes, what it wrote (mass deletes slow ext4 file creation for minutes).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use nix::fcntl::{copy_file_range, open, OFlag};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::stat::Mode;

fn cpu_secs() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn create(dir: &Path, name: &str) -> File {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(name))
        .expect("create")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: data_path DIR [MESSAGES] [SIZE]");
        std::process::exit(64);
    };
    let messages: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5000);
    let size: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let root = Path::new(dir).join("dp-bench");
    let tmps: Vec<_> = (0..3)
        .map(|r| root.join(format!("r{r}")).join("tmp"))
        .collect();
    for t in &tmps {
        fs::create_dir_all(t).expect("mkdir");
    }
    fs::create_dir_all(root.join("trash")).expect("mkdir trash");
    // The data arrives in chunks, as from a socket.
    let body = vec![b'x'; size];
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    for rcpts in [1usize, 3] {
        for mode in ["direct", "spool"] {
            let (c0, w0) = (cpu_secs(), Instant::now());
            for n in 0..messages {
                let name = format!("{}.{mode}.{rcpts}.{n}", std::process::id());
                match mode {
                    "direct" => {
                        let mut files: Vec<File> =
                            tmps[..rcpts].iter().map(|t| create(t, &name)).collect();
                        for c in &chunks {
                            for f in &mut files {
                                f.write_all(c).expect("write");
                            }
                        }
                    }
                    _ => {
                        let spool = open(
                            root.as_path(),
                            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                            Mode::S_IRUSR | Mode::S_IWUSR,
                        )
                        .expect("O_TMPFILE");
                        let mut spool = File::from(spool);
                        for c in &chunks {
                            spool.write_all(c).expect("write");
                        }
                        for t in &tmps[..rcpts] {
                            let out = create(t, &name);
                            let mut off: i64 = 0;
                            let mut left = size;
                            while left > 0 {
                                let k = copy_file_range(
                                    spool.as_fd(),
                                    Some(&mut off),
                                    out.as_fd(),
                                    None,
                                    left,
                                )
                                .expect("copy_file_range");
                                if k == 0 {
                                    break;
                                }
                                left -= k;
                            }
                        }
                    }
                }
            }
            let cpu = cpu_secs() - c0;
            let wall = w0.elapsed().as_secs_f64();
            println!(
                "data_path mode={mode} rcpts={rcpts} size={size} messages={messages} \
                 cpu_us_per_msg={:.1} wall_us_per_msg={:.1}",
                cpu * 1e6 / messages as f64,
                wall * 1e6 / messages as f64
            );
            for (r, t) in tmps.iter().enumerate() {
                let keep = root
                    .join("trash")
                    .join(format!("{}-{mode}-{rcpts}-{r}", std::process::id()));
                let _ = fs::rename(t, keep);
                fs::create_dir_all(t).expect("mkdir tmp");
            }
        }
    }
}
