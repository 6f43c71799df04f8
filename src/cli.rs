//! The command line: getopts options turned into a validated [`Config`].
//!
//! Owns option names, help text and value checks. A bad option or value is a one-line
//! [`CliError::Usage`], which `main` turns into exit status 64 (EX_USAGE, sysexits.h). It must
//! not start anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use getopts::Options;

use crate::config::*;

#[derive(Debug, PartialEq)]
pub enum Cli {
    Run(Box<Config>),
    Help(String),
    Version,
}

#[derive(Debug, PartialEq)]
pub enum CliError {
    Usage(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m} (try --help)"),
        }
    }
}

fn options() -> Options {
    let mut o = Options::new();
    o.optmulti(
        "l",
        "listen",
        &format!(
            "address and port to listen on, IPv4 or [IPv6] (repeatable; default {DEFAULT_LISTEN})"
        ),
        "ADDR:PORT",
    );
    o.optmulti(
        "d",
        "domain",
        "a mail domain delivered locally (repeatable; default: the hostname and localhost)",
        "NAME",
    );
    o.optopt("", "hostname", "the name inboxd gives itself in replies, Received fields and file names (default: the host's fully qualified name, as `hostname -f` gives it)", "NAME");
    o.optopt(
        "m",
        "maildir-root",
        "deliver to DIR/<account>/ instead of ~<account>/Maildir/",
        "DIR",
    );
    o.optopt(
        "a",
        "aliases",
        &format!("aliases file (default {DEFAULT_ALIASES}; a missing file means no aliases)"),
        "FILE",
    );
    o.optopt(
        "",
        "max-message-size",
        &format!("largest message accepted, in octets (default {DEFAULT_MAX_MESSAGE_SIZE})"),
        "BYTES",
    );
    o.optopt("", "max-recipients", &format!("recipients per message, at least {MIN_MAX_RECIPIENTS} (default {DEFAULT_MAX_RECIPIENTS})"), "N");
    o.optopt(
        "",
        "max-connections",
        &format!("concurrent client connections (default {DEFAULT_MAX_CONNECTIONS})"),
        "N",
    );
    o.optopt(
        "",
        "max-connections-per-ip",
        &format!(
            "concurrent connections from one client address; more get 421 (default {DEFAULT_MAX_PER_IP})"
        ),
        "N",
    );
    o.optopt(
        "",
        "max-errors",
        &format!("bad commands before a session is ended with 421 (default {DEFAULT_MAX_ERRORS})"),
        "N",
    );
    o.optopt(
        "",
        "timeout",
        &format!(
            "seconds to wait for client input (default {}, RFC 5321 4.5.3.2)",
            DEFAULT_TIMEOUT.as_secs()
        ),
        "SECS",
    );
    o.optflag(
        "",
        "no-lowercase-fallback",
        "do not try the all-lowercase account when no account matches the local part exactly",
    );
    o.optflag(
        "",
        "allow-root-delivery",
        "started as root, also deliver to accounts with uid 0 (by default their mail is refused: alias root to a person)",
    );
    o.optopt(
        "u",
        "user",
        &format!(
            "started as root, run the network-facing process as this user, and the delivery agent with its filesystem identity between recipients (default {DEFAULT_USER})"
        ),
        "NAME",
    );
    o.optflagmulti("v", "verbose", "log more (repeat for more)");
    o.optflag("V", "version", "print the version and exit");
    o.optflag("h", "help", "print this help and exit");
    o
}

pub fn usage() -> String {
    options().usage("Usage: inboxd [options]\n\ninboxd receives mail by SMTP for the users of this host and writes it into their Maildirs.")
}

fn number<T: std::str::FromStr>(m: &getopts::Matches, name: &str) -> Result<Option<T>, CliError> {
    match m.opt_str(name) {
        None => Ok(None),
        Some(s) => s
            .parse::<T>()
            .map(Some)
            .map_err(|_| CliError::Usage(format!("--{name}: {s:?} is not a valid number"))),
    }
}

/// Parses the arguments (without the program name). `system_hostname` gives the default for
/// `--hostname`; it is called only when that option is absent.
pub fn parse(args: &[String], system_hostname: impl FnOnce() -> String) -> Result<Cli, CliError> {
    let m = options()
        .parse(args)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(Cli::Help(usage()));
    }
    if m.opt_present("version") {
        return Ok(Cli::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(CliError::Usage(format!("unexpected argument {extra:?}")));
    }
    let mut listen = Vec::new();
    for s in m.opt_strs("listen") {
        let a: SocketAddr = s.parse().map_err(|_| {
            CliError::Usage(format!(
                "--listen: {s:?} is not ADDR:PORT (e.g. 127.0.0.1:25 or [::1]:25)"
            ))
        })?;
        if !listen.contains(&a) {
            listen.push(a);
        }
    }
    let listen_given = !listen.is_empty();
    if listen.is_empty() {
        listen.push(
            DEFAULT_LISTEN
                .parse()
                .map_err(|_| CliError::Usage("bad default".into()))?,
        );
    }
    let given = m.opt_str("hostname");
    let from_system = given.is_none();
    let hostname = given.unwrap_or_else(system_hostname);
    if !valid_domain(&hostname) {
        // Say where the name came from (found in review: with no --hostname, the message
        // named an option that was not given).
        return Err(CliError::Usage(if from_system {
            format!(
                "the system's host name {hostname:?} is not a domain name: give one with --hostname"
            )
        } else {
            format!("--hostname: {hostname:?} is not a domain name")
        }));
    }
    let mut domains = Vec::new();
    for d in m.opt_strs("domain") {
        let d = d.strip_suffix('.').unwrap_or(&d).to_ascii_lowercase();
        if !valid_domain(&d) {
            return Err(CliError::Usage(format!(
                "--domain: {d:?} is not a domain name"
            )));
        }
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    if domains.is_empty() {
        domains.push(hostname.to_ascii_lowercase());
        if !domains.iter().any(|d| d == "localhost") {
            domains.push("localhost".to_string());
        }
    }
    let max_message_size =
        number::<u64>(&m, "max-message-size")?.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
    if max_message_size < 65536 {
        // RFC 5321 4.5.3.1.7: at least 64K octets.
        return Err(CliError::Usage(
            "--max-message-size: at least 65536 (RFC 5321 4.5.3.1.7)".into(),
        ));
    }
    let max_recipients = number::<usize>(&m, "max-recipients")?.unwrap_or(DEFAULT_MAX_RECIPIENTS);
    if max_recipients < MIN_MAX_RECIPIENTS {
        return Err(CliError::Usage(format!(
            "--max-recipients: at least {MIN_MAX_RECIPIENTS} (RFC 5321 4.5.3.1.8)"
        )));
    }
    let max_connections =
        number::<usize>(&m, "max-connections")?.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(CliError::Usage("--max-connections: at least 1".into()));
    }
    let max_connections_per_ip =
        number::<usize>(&m, "max-connections-per-ip")?.unwrap_or(DEFAULT_MAX_PER_IP);
    if max_connections_per_ip == 0 {
        return Err(CliError::Usage(
            "--max-connections-per-ip: at least 1".into(),
        ));
    }
    let max_errors = number::<u32>(&m, "max-errors")?.unwrap_or(DEFAULT_MAX_ERRORS);
    if max_errors == 0 {
        return Err(CliError::Usage("--max-errors: at least 1".into()));
    }
    let timeout = match number::<u64>(&m, "timeout")? {
        None => DEFAULT_TIMEOUT,
        Some(0) => return Err(CliError::Usage("--timeout: at least 1 second".into())),
        Some(s) if s > MAX_TIMEOUT_SECS => {
            return Err(CliError::Usage(format!(
                "--timeout: at most {MAX_TIMEOUT_SECS} seconds"
            )))
        }
        Some(s) => Duration::from_secs(s),
    };
    let maildir_root = match m.opt_str("maildir-root") {
        Some(s) if s.is_empty() => {
            return Err(CliError::Usage("--maildir-root: empty path".into()))
        }
        s => s.map(PathBuf::from),
    };
    Ok(Cli::Run(Box::new(Config {
        listen,
        listen_given,
        domains,
        hostname,
        maildir_root,
        aliases: PathBuf::from(
            m.opt_str("aliases")
                .unwrap_or_else(|| DEFAULT_ALIASES.into()),
        ),
        max_message_size,
        max_recipients,
        max_connections,
        max_connections_per_ip,
        max_errors,
        timeout,
        lowercase_fallback: !m.opt_present("no-lowercase-fallback"),
        allow_root_delivery: m.opt_present("allow-root-delivery"),
        user: m
            .opt_str("user")
            .unwrap_or_else(|| DEFAULT_USER.to_string()),
        verbose: m.opt_count("verbose"),
    })))
}

/// RFC 1035 letters-digits-hyphens labels.
fn valid_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str) -> Config {
        match parse(&args(s), || "mx.example.org".to_string()) {
            Ok(Cli::Run(c)) => *c,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run("");
        assert_eq!(c.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(
            c.domains,
            vec!["mx.example.org".to_string(), "localhost".to_string()]
        );
        assert_eq!(c.max_recipients, 1000);
        assert!(c.lowercase_fallback);
    }

    #[test]
    fn repeatable_listen_and_domains() {
        let c = run("--listen 127.0.0.1:2525 --listen [::1]:2525 -d Example.COM. -d example.com");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.domains, vec!["example.com".to_string()]);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for s in [
            "--listen nowhere",
            "--max-recipients 10",
            "--max-message-size 12x",
            "--bogus",
            "--timeout 0",
            "--timeout 18446744073709551615",
            "--domain bad_domain",
            "extra",
        ] {
            assert!(
                matches!(parse(&args(s), || "h".to_string()), Err(CliError::Usage(_))),
                "{s}"
            );
        }
    }
}
