//! inboxd's entry point: parse the command line, set up logging, bind, serve.
//! Exit status: 0 after a clean stop, 64 (EX_USAGE) for a bad command line, 69
//! (EX_UNAVAILABLE) when a listener cannot be bound, 78 (EX_CONFIG) for an unusable
//! `--maildir-root` or aliases file, 71 (EX_OSERR) for other start-up failures.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use inboxd::cli::{self, Cli};
use inboxd::config::Config;
use inboxd::delivery::client::AgentClient;
use inboxd::delivery::{channel, privileges, Layout};
use inboxd::recipient::{Aliases, Resolver};
use inboxd::server::{listener, Server, ServerError};
use inboxd::smtp::SessionConfig;
use log::{info, warn};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_OSERR: u8 = 71;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

/// How long inboxd waits for its delivery agent to exit once the server has stopped (with
/// the server's own stop, at most about 18 s, below the unit's TimeoutStopSec=30s).
const AGENT_EXIT_WAIT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Called as sendmail, mailq or newaliases (symbolic links to inboxd).
    let called = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if let Some(status) = inboxd::sendmail::main_for(&called, &args) {
        return ExitCode::from(status);
    }
    raise_fd_limit();
    if args.first().map(String::as_str) == Some("--delivery-agent") {
        return agent_main(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("check") {
        return check_main(&args[1..]);
    }
    // Before anything opens a descriptor: the sockets systemd may have passed (3, 4, ...),
    // and its notification socket. Both are taken out of the environment.
    let passed = inboxd::systemd::listen_fds();
    let notifier = inboxd::systemd::Notifier::from_env();
    let config = match parse_config(&args, "", |e| eprintln!("inboxd: {e}")) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let level = match config.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    inboxd::logging::init(level);
    let passed = match passed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("inboxd: socket activation: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match run(&config, passed, notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            // Standard error is also where the log goes: one line is enough.
            eprintln!("inboxd: {msg}");
            ExitCode::from(code)
        }
    }
}

/// The options, or the exit: after --help (printed after `help_head`), --version, or a
/// usage error (reported by `report`, status 64).
fn parse_config(
    args: &[String],
    help_head: &str,
    report: impl Fn(&cli::CliError),
) -> Result<Config, ExitCode> {
    // The resolver is only asked when --hostname is absent.
    match cli::parse(args, inboxd::hostname::fqdn) {
        Ok(Cli::Run(c)) => Ok(*c),
        Ok(Cli::Help(text)) => {
            println!("{help_head}{text}");
            Err(ExitCode::SUCCESS)
        }
        Ok(Cli::Version) => {
            println!("inboxd {}", env!("CARGO_PKG_VERSION"));
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            report(&e);
            Err(ExitCode::from(EX_USAGE))
        }
    }
}

/// `inboxd check [options]`: the doctor (see `check`), with the options inboxd would run with.
fn check_main(args: &[String]) -> ExitCode {
    let head = "usage: inboxd check [options as for inboxd]\n\n";
    let config = match parse_config(args, head, |e| println!("problem: {e}")) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = inboxd::check::run(&config);
    for line in &report.lines {
        println!("{line}");
    }
    if report.problems == 0 {
        println!("no problems found");
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", report.problems);
        ExitCode::from(1)
    }
}

/// The addresses inboxd listens on, for address literals. A wildcard listener
/// (`0.0.0.0`, `::`) stands for every address of the host's interfaces.
fn listening_addresses(bound: &[std::net::SocketAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in bound {
        let ip = a.ip();
        if ip.is_unspecified() {
            if let Ok(ifs) = nix::ifaddrs::getifaddrs() {
                for i in ifs {
                    let Some(sa) = i.address else { continue };
                    if let Some(v4) = sa.as_sockaddr_in() {
                        out.push(IpAddr::V4(v4.ip()));
                    } else if let Some(v6) = sa.as_sockaddr_in6() {
                        out.push(IpAddr::V6(v6.ip()));
                    }
                }
            }
        } else {
            out.push(ip);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every connection and every copy in flight holds descriptors: use all the kernel allows
/// (the soft RLIMIT_NOFILE up to the hard one), silently keeping the old limit on failure.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// `inboxd --delivery-agent --hostname NAME --user USER [--maildir-root DIR] [--allow-root]`,
/// with the socket to the receiver as standard input: the delivery agent (an internal
/// interface, started by inboxd itself; see `delivery::agent`).
fn agent_main(args: &[String]) -> ExitCode {
    inboxd::logging::init("info");
    let mut hostname = None;
    let mut root = None;
    let mut allow_root = false;
    let mut user = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--hostname" => hostname = it.next().cloned(),
            "--maildir-root" => root = it.next().cloned(),
            "--allow-root" => allow_root = true,
            "--user" => user = it.next().cloned(),
            other => {
                eprintln!("inboxd delivery agent: unexpected argument {other:?}");
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    let (Some(hostname), Some(user)) = (hostname, user) else {
        eprintln!("inboxd delivery agent: --hostname and --user are required");
        return ExitCode::from(EX_USAGE);
    };
    let layout = match root {
        None => Layout::Home,
        Some(r) => match Layout::root(std::path::Path::new(&r)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("inboxd delivery agent: --maildir-root {r}: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
    };
    if let Err(e) = privileges::drop_supplementary_groups()
        .and_then(|()| privileges::keep_only_delivery_capabilities())
        .and_then(|()| inboxd::delivery::agent::ignore_stop_signals())
    {
        eprintln!("inboxd delivery agent: setting up: {e}");
        return ExitCode::from(EX_OSERR);
    }
    // Before any thread starts: between recipients the agent's filesystem identity is the
    // receiver's unprivileged user's, not root's (see delivery::privileges).
    if let Err((config, e)) = privileges::rest_as(&user) {
        eprintln!("inboxd delivery agent: {e}");
        return ExitCode::from(if config { EX_CONFIG } else { EX_OSERR });
    }
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("inboxd delivery agent: no socket on standard input: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let store = inboxd::delivery::store::Store::new(&hostname, layout, allow_root);
    match inboxd::delivery::agent::serve(sock, store) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inboxd delivery agent: {e}");
            ExitCode::from(EX_OSERR)
        }
    }
}

fn run(
    config: &Config,
    passed: Vec<std::net::TcpListener>,
    notifier: inboxd::systemd::Notifier,
) -> Result<(), (u8, String)> {
    // SIGHUP asks a running server to re-read its aliases (newaliases sends it to every
    // receiver): until the server reads signals, one must not kill it (found in review). It
    // stays pending and is read, with the others, once the server runs.
    let mut hup = nix::sys::signal::SigSet::empty();
    hup.add(nix::sys::signal::Signal::SIGHUP);
    hup.thread_block()
        .map_err(|e| (EX_OSERR, format!("blocking SIGHUP: {e}")))?;
    let mut listeners = Vec::new();
    if passed.is_empty() {
        for addr in &config.listen {
            listeners
                .push(listener::bind_listener(*addr).map_err(|e| (EX_UNAVAILABLE, e.to_string()))?);
        }
    } else {
        // Socket activation: the service manager's sockets replace --listen. Said when
        // --listen was given (found in review: an administrator who asked for 127.0.0.1:25
        // got the socket unit's 0.0.0.0:25 and [::]:25 without a word).
        if config.listen_given {
            let theirs: Vec<String> = passed
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .map(|a| a.to_string())
                .collect();
            warn!(
                "--listen {:?} ignored: the service manager passed the sockets {theirs:?} \
                 (socket activation; their addresses are set in inboxd.socket)",
                config.listen
            );
        }
        for l in passed {
            listeners.push(mio::net::TcpListener::from_std(l));
        }
    }
    let bound: Vec<std::net::SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    privileges::drop_supplementary_groups()
        .map_err(|e| (EX_OSERR, format!("dropping supplementary groups: {e}")))?;
    let aliases = match Aliases::load(&config.aliases) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!("{}: not found; no aliases", config.aliases.display());
            Aliases::default()
        }
        Err(e) => return Err((EX_CONFIG, format!("{}: {e}", config.aliases.display()))),
    };
    if let Some(root) = &config.maildir_root {
        // Checked here too, for a clear error before anything starts; the agent uses it.
        Layout::root(root)
            .map_err(|e| (EX_CONFIG, format!("--maildir-root {}: {e}", root.display())))?;
    }
    // Started as root, the agent could write as any uid: uid 0 only when explicitly allowed.
    let refuse_uid0 = privileges::privileged() && !config.allow_root_delivery;
    let resolver = Resolver::new(aliases.clone(), config.lowercase_fallback, refuse_uid0);
    resolver
        .check_postmaster()
        .map_err(|e| (EX_CONFIG, format!("{}: {e}", config.aliases.display())))?;
    let (mut agent, agent_sock) = start_agent(config)?;
    let session_config = SessionConfig {
        hostname: config.hostname.clone(),
        local_domains: config.domains.clone(),
        local_addresses: listening_addresses(&bound),
        max_message_size: config.max_message_size,
        max_recipients: config.max_recipients,
        command_timeout: config.timeout,
        data_timeout: config.timeout.max(Duration::from_secs(600)),
        max_errors: config.max_errors,
    };
    let mut delivery = AgentClient::new(agent_sock, &config.hostname);
    if config.maildir_root.is_none() {
        // Each filesystem holding homes gets a lane of the agent (see delivery::lanes).
        let homes = resolver.clone();
        delivery.route_by_home(move |account| homes.home_of(account));
    }
    // Everything that needs root is done: listeners bound, agent started. The server's
    // lookup thread starts after the switch, so it never held privileges either.
    privileges::drop_to(&config.user).map_err(|e| (EX_CONFIG, e))?;
    let mut server = Server::new(
        listeners,
        session_config,
        resolver,
        delivery,
        (config.max_connections, config.max_connections_per_ip),
        config.aliases.clone(),
    )
    .map_err(|e| (EX_OSERR, e.to_string()))?;
    info!(
        "inboxd {} listening on {:?} for domains {:?}; hostname {}; mail to {}; {} aliases",
        env!("CARGO_PKG_VERSION"),
        server.local_addrs(),
        config.domains,
        config.hostname,
        match &config.maildir_root {
            Some(r) => format!("{}/<account>/", r.display()),
            None => "~<account>/Maildir/".to_string(),
        },
        aliases.len()
    );
    notifier.notify(&format!(
        "READY=1\nSTATUS=accepting mail on {:?}",
        server.local_addrs()
    ));
    server.set_notifier(notifier);
    let result = server.run();
    // The agent sees its socket close and exits once it has cleaned up. An agent stuck in
    // the kernel (a hung NFS home) is not waited for beyond AGENT_EXIT_WAIT (found in
    // review): the service manager's stop timeout and its cgroup kill deal with it.
    drop(server);
    let until = std::time::Instant::now() + AGENT_EXIT_WAIT;
    loop {
        match agent.try_wait() {
            Ok(None) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                warn!(
                    "the delivery agent (pid {}) has not exited after {AGENT_EXIT_WAIT:?}; \
                     not waiting for it",
                    agent.id()
                );
                break;
            }
            _ => break,
        }
    }
    match result {
        Ok(()) => Ok(()),
        Err(e @ ServerError::AgentGone(_)) => Err((EX_TEMPFAIL, e.to_string())),
        Err(e) => Err((EX_OSERR, e.to_string())),
    }
}

/// Starts the delivery agent (this program with `--delivery-agent`, the socket as its
/// standard input). It keeps the privileges inboxd started with.
fn start_agent(
    config: &Config,
) -> Result<(std::process::Child, std::os::fd::OwnedFd), (u8, String)> {
    let (ours, theirs) = channel::pair()
        .map_err(|e| (EX_OSERR, format!("socketpair for the delivery agent: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| (EX_OSERR, format!("finding our own executable: {e}")))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--delivery-agent")
        .args(["--hostname", &config.hostname])
        .args(["--user", &config.user])
        .stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null());
    if let Some(root) = &config.maildir_root {
        cmd.arg("--maildir-root").arg(root);
    }
    if config.allow_root_delivery {
        cmd.arg("--allow-root");
    }
    let child = cmd
        .spawn()
        .map_err(|e| (EX_OSERR, format!("starting the delivery agent: {e}")))?;
    Ok((child, ours))
}
