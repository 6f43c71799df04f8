//! The delivery agent's account lookups, made in a thread of their own and waited for at
//! most [`LOOKUP_WAIT`], so that an NSS backend that hangs (an LDAP server that accepts and
//! never answers, a stuck nscd) stalls the agent's one loop, and with it every delivery, for
//! seconds rather than for as long as the backend likes.
//!
//! One lookup at a time: while one has not come back after its wait, every other lookup
//! fails at once (the transaction or check that needed it gets a 4xx and is retried by its
//! client), and Maildirs the agent already holds open (for 2 seconds after each was opened)
//! keep taking mail. The stuck lookup's answer, when it comes, is kept for a minute (the
//! client's retry of the request that gave up on it is answered from it) and lookups start
//! again.
//!
//! Owns the thread and the waiting; it must not change credentials (the thread is started
//! from the agent's loop while its filesystem identity is root's, after the capabilities
//! were dropped, and keeps that identity: NSS may talk to a daemon over a socket, as root,
//! not as the last recipient) and must not decide anything about the account it returns.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use log::{error, warn};

use super::DeliveryError;
use crate::recipient::{lookup_account, Account, RecipientError};

/// How long the agent waits for one account lookup. The receiver has just looked the same
/// account up (its own lookup has a 30 s limit), so an answer is expected at once; a
/// backend slower than this makes the request that needed it fail with 451 4.3.0.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(5);

type Answer = (u64, Result<Option<Account>, RecipientError>);

/// How long the answer of a lookup that came back late is kept: the client's retry of the
/// request that gave up on it is answered from it, so a backend slower than [`LOOKUP_WAIT`]
/// (but within the receiver's 30 s) slows mail down instead of stopping it (found in
/// review).
const LATE_KEPT: Duration = Duration::from_secs(60);
/// Late answers kept at most.
const LATE_MAX: usize = 1024;
/// After the thread could not be started, how long lookups are made in the loop before
/// starting it is tried again.
const RESTART_AFTER: Duration = Duration::from_secs(60);

struct Thread {
    ask: Sender<(u64, String)>,
    answers: Receiver<Answer>,
}

/// The lookups of one agent.
pub struct Lookups {
    thread: Option<Thread>,
    /// The thread could not be started, at this time: lookups are made in the loop itself
    /// until [`RESTART_AFTER`] has passed.
    inline_since: Option<Instant>,
    next: u64,
    /// A lookup that has not come back in time: (its number, the name, when it was asked).
    stuck: Option<(u64, String, Instant)>,
    /// Accounts whose lookup came back late, and when.
    late: HashMap<String, (Instant, Option<Account>)>,
    wait: Duration,
}

impl Default for Lookups {
    fn default() -> Self {
        Lookups::new(LOOKUP_WAIT)
    }
}

impl Lookups {
    pub fn new(wait: Duration) -> Lookups {
        Lookups {
            thread: None,
            inline_since: None,
            next: 0,
            stuck: None,
            late: HashMap::new(),
            wait,
        }
    }

    /// `name`'s account, or None if there is no such account. Errors are temporary.
    pub fn account(&mut self, name: &str) -> Result<Option<Account>, DeliveryError> {
        self.account_with(name, lookup_account)
    }

    /// The thread is gone (it panicked): so is the lookup it had, and the next lookup
    /// starts a new one (found in review: a stale `stuck` made every lookup fail for good).
    fn lost(&mut self) -> DeliveryError {
        self.thread = None;
        self.stuck = None;
        DeliveryError::Account("the lookup thread is gone".into())
    }

    /// The answer for `name` that came back late, if it came less than [`LATE_KEPT`] ago
    /// (used once).
    fn late_answer(&mut self, name: &str) -> Option<Option<Account>> {
        let (at, account) = self.late.remove(name)?;
        (at.elapsed() < LATE_KEPT).then_some(account)
    }

    /// [`Lookups::account`] with the lookup function given (tests hang it).
    pub fn account_with(
        &mut self,
        name: &str,
        lookup: fn(&str) -> Result<Option<Account>, RecipientError>,
    ) -> Result<Option<Account>, DeliveryError> {
        let inline = |name: &str| lookup(name).map_err(|e| DeliveryError::Account(e.to_string()));
        if let Some(since) = self.inline_since {
            if since.elapsed() < RESTART_AFTER {
                return inline(name);
            }
            self.inline_since = None;
        }
        if self.thread.is_none() {
            match start(lookup) {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    error!("delivery agent: cannot start the lookup thread ({e}); looking accounts up in the loop for {RESTART_AFTER:?}");
                    self.inline_since = Some(Instant::now());
                    return inline(name);
                }
            }
        }
        if let Some((n, who, since)) = self.stuck.take() {
            // Has it come back meanwhile? Its answer is kept for the retry.
            let Some(t) = &self.thread else {
                return Err(self.lost());
            };
            let came = loop {
                match t.answers.try_recv() {
                    Ok((m, r)) if m == n => break r,
                    Ok(_) => continue,
                    Err(TryRecvError::Empty) => {
                        // An answer that came back late earlier still serves (found in
                        // review: a newly stuck lookup hid it).
                        if let Some(account) = self.late_answer(name) {
                            self.stuck = Some((n, who, since));
                            return Ok(account);
                        }
                        let e = DeliveryError::Account(format!(
                            "the NSS lookup of {who} has not returned for {}s; lookups wait for it",
                            since.elapsed().as_secs()
                        ));
                        self.stuck = Some((n, who, since));
                        return Err(e);
                    }
                    Err(TryRecvError::Disconnected) => return Err(self.lost()),
                }
            };
            warn!(
                "delivery agent: the NSS lookup of {who} came back after {:?}",
                since.elapsed()
            );
            if let Ok(account) = came {
                let now = Instant::now();
                if self.late.len() >= LATE_MAX {
                    self.late
                        .retain(|_, (at, _)| now.saturating_duration_since(*at) < LATE_KEPT);
                    if self.late.len() >= LATE_MAX {
                        self.late.clear();
                    }
                }
                self.late.insert(who, (now, account));
            }
        }
        if let Some(account) = self.late_answer(name) {
            return Ok(account);
        }
        let Some(t) = &self.thread else {
            return Err(self.lost());
        };
        self.next += 1;
        let n = self.next;
        let asked = Instant::now();
        if t.ask.send((n, name.to_string())).is_err() {
            return Err(self.lost());
        }
        let deadline = asked + self.wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match t.answers.recv_timeout(left) {
                Ok((m, r)) if m == n => {
                    return r.map_err(|e| DeliveryError::Account(e.to_string()))
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    warn!(
                        "delivery agent: the NSS lookup of {name} has not returned after {:?}; \
                         lookups fail until it does",
                        self.wait
                    );
                    self.stuck = Some((n, name.to_string(), asked));
                    return Err(DeliveryError::Account(format!(
                        "the NSS lookup of {name} did not return within {}s",
                        self.wait.as_secs()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.lost()),
            }
        }
    }
}

fn start(lookup: fn(&str) -> Result<Option<Account>, RecipientError>) -> std::io::Result<Thread> {
    let (ask, asked) = mpsc::channel::<(u64, String)>();
    let (answer, answers) = mpsc::channel::<Answer>();
    std::thread::Builder::new()
        .name("agent-lookup".into())
        // The default stack (2 MiB), like the receiver's lookup thread: NSS modules (LDAP
        // with TLS, sssd) run on it, and an overflow would abort the agent (found in review).
        .spawn(move || {
            // NSS with the agent's resting identity, whatever its creator had taken.
            if let Err(e) = super::privileges::rest() {
                error!("delivery agent: lookup thread: taking the agent's own identity: {e}");
                return;
            }
            for (n, name) in asked {
                if answer.send((n, lookup(&name))).is_err() {
                    return;
                }
            }
        })?;
    Ok(Thread { ask, answers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    fn found(name: &str) -> Result<Option<Account>, RecipientError> {
        if name.starts_with("hang") {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(Some(Account {
            name: name.to_string(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            home: "/home/x".into(),
        }))
    }

    #[test]
    fn a_lookup_that_does_not_return_fails_alone_and_then_every_other_fails_at_once() {
        let mut l = Lookups::new(Duration::from_millis(200));
        assert_eq!(
            l.account_with("alice", found).unwrap().unwrap().name,
            "alice"
        );
        let t0 = Instant::now();
        let e = l.account_with("hang1", found).unwrap_err();
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(e.to_string().contains("did not return within"), "{e}");
        // While it is out, others fail without waiting for it (it takes 1.5 s).
        let t1 = Instant::now();
        let e = l.account_with("bob", found).unwrap_err();
        assert!(t1.elapsed() < Duration::from_millis(1000));
        assert!(e.to_string().contains("has not returned"), "{e}");
        // Once it came back, lookups work again, and its late answer serves the retry.
        let deadline = Instant::now() + Duration::from_secs(10);
        let bob = loop {
            match l.account_with("bob", found) {
                Ok(a) => break a,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the lookups never recovered");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        assert_eq!(bob.unwrap().name, "bob");
        assert_eq!(
            l.account_with("carol", found).unwrap().unwrap().name,
            "carol"
        );
        // Another lookup gets stuck; the first one's late answer still serves its retry.
        assert!(l.account_with("hang2", found).is_err());
        let t2 = Instant::now();
        assert_eq!(
            l.account_with("hang1", found).unwrap().unwrap().name,
            "hang1"
        );
        assert!(t2.elapsed() < Duration::from_millis(1000), "asked again");
        assert!(l.account_with("dave", found).is_err(), "hang2 is still out");
    }
}
