//! Log lines: `key=value` events (see README "Logs"), written to standard error with a
//! UTC timestamp and the level, or, when standard error is the journal (systemd sets
//! JOURNAL_STREAM to its device and inode), with the sd-daemon(3) priority prefix (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug) and no timestamp: journald adds its own.
//!
//! Owns only the format; what is logged is decided where it happens.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::Level;

/// Installs the logger; `default_level` applies unless RUST_LOG says otherwise.
pub fn init(default_level: &str) {
    let journal = stderr_is_journal();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format(move |buf, record| {
            if journal {
                let prio = match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                writeln!(buf, "<{prio}>{}", record.args())
            } else {
                writeln!(buf, "{} {} {}", timestamp(), record.level(), record.args())
            }
        })
        .init();
}

/// `2026-11-30T19:05:53.123Z`.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (y, m, d) = crate::smtp::trace::civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3600,
        t / 60 % 60,
        t % 60,
        now.subsec_millis()
    )
}

/// systemd.exec(5): JOURNAL_STREAM is `device:inode` of the journal stream it connected
/// standard error to; it only counts if standard error still is that stream.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}
