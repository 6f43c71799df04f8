//! Which filesystem a home is on, read from the mount table, so that the receiver can send
//! the requests for each filesystem's accounts down a lane of their own: a socket served by
//! a thread of the delivery agent that works on that filesystem alone. A filesystem that
//! stops answering (an NFS server gone, a FUSE daemon stuck) then holds up the mail for its
//! own accounts only, not everybody's (see `agent` and `client`).
//!
//! A lane is keyed by the mounted filesystem's device number (mountinfo's third field), so
//! that bind mounts of one filesystem share a lane; each mount point of its own filesystem
//! (an autofs home per user, say) gets a lane of its own while lanes last.
//!
//! Owns reading and matching `/proc/self/mountinfo` (proc(5)). It never touches a home:
//! asking the filesystem (stat, realpath) is what hangs on a dead mount, so a home is matched
//! as a string against the mount points, the longest that is a whole-component prefix
//! winning. A home reached through a symlink into another filesystem is matched where its
//! path says, not where it leads; that only puts it in a different lane, and what a lane may
//! do is re-checked by the agent like every request.

use std::path::Path;

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted, octal escapes (`\040` for a space, ...) undone.
    pub point: String,
    /// The filesystem's device, `major:minor`.
    pub dev: String,
}

/// The mounts of `/proc/self/mountinfo`'s text (fields 3 and 5 of each line); lines it
/// cannot read are left out.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = f.nth(2)?;
            let point = f.nth(1)?;
            dev.contains(':').then(|| Mount {
                point: unescape(point),
                dev: dev.to_string(),
            })
        })
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

/// The mount of `mounts` that holds `path`: the one whose point is the longest that is
/// `path` itself or one of its leading components (the last listed among equals: a mount
/// over another hides it). `None` for a relative path or when nothing matches.
pub fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let p = path.to_str()?;
    if !p.starts_with('/') {
        return None;
    }
    mounts
        .iter()
        .filter(|m| {
            let m = m.point.trim_end_matches('/');
            m.is_empty() || p == m || (p.starts_with(m) && p.as_bytes().get(m.len()) == Some(&b'/'))
        })
        .max_by_key(|m| m.point.len())
}

/// The mount points of this process's mount namespace, or none when the table cannot be
/// read (every home then shares the first lane).
pub fn read_mounts() -> Vec<Mount> {
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
33 22 0:26 /srv /srv/home rw - ext4 /dev/vdb rw
34 30 0:42 / /home rw - tmpfs tmpfs rw
bad line
";

    #[test]
    fn mount_points_are_read_and_unescaped() {
        let m = parse_mountinfo(INFO);
        let points: Vec<&str> = m.iter().map(|m| m.point.as_str()).collect();
        assert_eq!(
            points,
            [
                "/",
                "/home",
                "/home/nfs users",
                "/homework",
                "/srv/home",
                "/home"
            ]
        );
        assert_eq!(m[2].dev, "0:40");
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn the_longest_whole_component_prefix_wins() {
        let m = parse_mountinfo(INFO);
        let of = |p: &str| mount_of(&m, Path::new(p)).map(|m| (m.point.as_str(), m.dev.as_str()));
        // /home is mounted twice: the later mount (a tmpfs over the ext4) is what is seen.
        assert_eq!(of("/home/alice"), Some(("/home", "0:42")));
        assert_eq!(of("/home"), Some(("/home", "0:42")));
        assert_eq!(of("/home/nfs users/bob"), Some(("/home/nfs users", "0:40")));
        assert_eq!(of("/home/nfs usersx"), Some(("/home", "0:42")));
        assert_eq!(of("/homework/carol"), Some(("/homework", "0:41")));
        // A bind mount is the same filesystem, so the same device: the same lane.
        assert_eq!(of("/srv/home/erin"), Some(("/srv/home", "0:26")));
        assert_eq!(of("/homes/dave"), Some(("/", "254:1")));
        assert_eq!(of("/var/mail"), Some(("/", "254:1")));
        assert_eq!(of("relative/home"), None);
        assert_eq!(mount_of(&[], Path::new("/home/alice")), None);
    }
}
