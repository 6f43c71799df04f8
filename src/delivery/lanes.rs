//! Which filesystem a home is on, read from the mount table, so that the receiver can send
//! the requests for each filesystem's accounts down a lane of their own: a socket served by
//! a thread of the delivery agent that works on that filesystem alone. A filesystem that
//! stops answering (an NFS server gone, a FUSE daemon stuck) then holds up the mail for its
//! own accounts only, not everybody's (see `agent` and `client`).
//!
//! Owns reading and matching `/proc/self/mountinfo` (proc(5)). It never touches a home:
//! asking the filesystem (stat, realpath) is what hangs on a dead mount, so a home is matched
//! as a string against the mount points, the longest that is a whole-component prefix
//! winning. A home reached through a symlink into another filesystem is matched where its
//! path says, not where it leads; that only puts it in a different lane, and what a lane may
//! do is re-checked by the agent like every request.

use std::path::Path;

/// The mount points of `/proc/self/mountinfo`'s text (field 5 of each line), octal escapes
/// (`\040` for a space, ...) undone; lines it cannot read are left out.
pub fn parse_mountinfo(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// Undoes the kernel's octal escapes of a mount point (`\ooo`, for space, tab, newline and
/// backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of `mounts` that holds `path`: the longest that is `path` itself or one
/// of its leading components. `None` for a relative path or when nothing matches.
pub fn mount_of<'a>(mounts: &'a [String], path: &Path) -> Option<&'a str> {
    let p = path.to_str()?;
    if !p.starts_with('/') {
        return None;
    }
    mounts
        .iter()
        .filter(|m| {
            let m = m.trim_end_matches('/');
            m.is_empty() || p == m || (p.starts_with(m) && p.as_bytes().get(m.len()) == Some(&b'/'))
        })
        .max_by_key(|m| m.len())
        .map(String::as_str)
}

/// The mount points of this process's mount namespace, or none when the table cannot be
/// read (every home then shares the first lane).
pub fn read_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:26 / /home rw,relatime shared:2 - ext4 /dev/vdb rw
31 30 0:40 / /home/nfs\\040users rw,relatime shared:3 - nfs srv:/u rw
32 22 0:41 / /homework rw - tmpfs tmpfs rw
bad line
";

    #[test]
    fn mount_points_are_read_and_unescaped() {
        assert_eq!(
            parse_mountinfo(INFO),
            ["/", "/home", "/home/nfs users", "/homework"]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn the_longest_whole_component_prefix_wins() {
        let m = parse_mountinfo(INFO);
        let of = |p: &str| mount_of(&m, Path::new(p));
        assert_eq!(of("/home/alice"), Some("/home"));
        assert_eq!(of("/home"), Some("/home"));
        assert_eq!(of("/home/nfs users/bob"), Some("/home/nfs users"));
        assert_eq!(of("/home/nfs usersx"), Some("/home"));
        assert_eq!(of("/homework/carol"), Some("/homework"));
        assert_eq!(of("/homes/dave"), Some("/"));
        assert_eq!(of("/var/mail"), Some("/"));
        assert_eq!(of("relative/home"), None);
        assert_eq!(mount_of(&[], Path::new("/home/alice")), None);
    }
}
