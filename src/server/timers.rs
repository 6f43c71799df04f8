//! The deadline heap that drives poll's timeout.
//!
//! Owns "which connection's deadline comes next". Each connection keeps at most one live entry:
//! a deadline that moves later is not re-pushed (the old entry fires, finds the deadline moved,
//! and is re-armed), so the heap does not grow with every command. It must not touch sessions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use mio::Token;

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Timers {
    /// Arms a timer for `token` at `at`, where `armed` is the time of its live entry, if any.
    /// Returns the new live entry's time.
    pub fn arm(&mut self, token: Token, at: Instant, armed: Option<Instant>) -> Option<Instant> {
        match armed {
            Some(a) if a <= at => Some(a),
            _ => {
                self.heap.push(Reverse((at, token.0)));
                Some(at)
            }
        }
    }

    /// Pops one entry that is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, Token)> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => {
                let Reverse((t, tok)) = self.heap.pop()?;
                Some((t, Token(tok)))
            }
            _ => None,
        }
    }

    /// Entries in the heap, live or stale.
    pub fn entries(&self) -> usize {
        self.heap.len()
    }

    /// Drops every entry `live` says is not a connection's live one: entries of closed
    /// connections otherwise stay until they come due (found in review: at 10,000
    /// connections a second and a 300 s timeout, millions of them).
    pub fn retain(&mut self, live: impl Fn(Token, Instant) -> bool) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap
            .into_vec()
            .into_iter()
            .filter(|Reverse((t, tok))| live(Token(*tok), *t))
            .collect();
    }

    /// How long poll may sleep.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((t, _))| t.saturating_duration_since(now) + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_entries_can_be_dropped() {
        let mut t = Timers::default();
        let now = Instant::now();
        for i in 0..10 {
            t.arm(Token(i), now + Duration::from_secs(i as u64), None);
        }
        t.retain(|tok, _| tok.0 % 2 == 0);
        assert_eq!(t.entries(), 5);
        let mut due = Vec::new();
        while let Some((_, tok)) = t.pop_due(now + Duration::from_secs(100)) {
            due.push(tok.0);
        }
        assert_eq!(due, vec![0, 2, 4, 6, 8]);
    }

    #[test]
    fn later_deadlines_are_not_pushed_again() {
        let mut t = Timers::default();
        let now = Instant::now();
        let a = t.arm(Token(1), now + Duration::from_secs(5), None);
        let b = t.arm(Token(1), now + Duration::from_secs(9), a);
        assert_eq!(a, b);
        assert_eq!(t.heap.len(), 1);
        let c = t.arm(Token(1), now + Duration::from_secs(1), b);
        assert_eq!(c, Some(now + Duration::from_secs(1)));
        assert!(t.pop_due(now).is_none());
        assert_eq!(
            t.pop_due(now + Duration::from_secs(2)).map(|x| x.1),
            Some(Token(1))
        );
    }
}
