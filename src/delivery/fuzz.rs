//! Fuzz target for the wire protocol between the receiver and the delivery agent: a function
//! that takes arbitrary bytes and panics when an invariant breaks.
//!
//! The agent's request decoder is where a receiver that was taken over meets the part of
//! inboxd that can take any user's identity, so what it accepts must be exactly what the
//! encoder writes. Owns the invariants, so that the fuzzer (`fuzz/`, target `protocol`) and
//! the regression tests (`tests/fuzz_regressions.rs`) check the same things. It does no I/O
//! and the server never calls it.

use super::protocol::{deliver_size, Request, Response, MAX_ACCOUNTS};

/// The first octet chooses the decoder (even: a request, as the agent reads it; odd: a
/// response, as the receiver reads it); the rest is the datagram.
///
/// Invariants, for every datagram a decoder accepts:
/// - it is the one encoding of what was decoded (`encode` gives back the same octets), so no
///   field can be smuggled in a second form, and no octet is ignored;
/// - the id the agent reads to refuse a request it cannot handle (octets 1 to 8) is the id
///   of the request;
/// - a Begin, Check or Deliver names between 1 and [`MAX_ACCOUNTS`] accounts, a Deliver has one set
///   of trace fields per account, and `deliver_size` (which the receiver uses to decide
///   whether a message goes whole) is its exact size.
pub fn protocol(input: &[u8]) {
    let Some((&which, b)) = input.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let Ok(r) = Request::decode(b) else {
            return;
        };
        assert_eq!(r.encode(), b, "a second encoding of {r:?}");
        let id: [u8; 8] = b[1..9].try_into().expect("decoded, so at least 9 octets");
        assert_eq!(u64::from_le_bytes(id), r.id());
        match &r {
            Request::Begin { accounts, .. } | Request::Check { accounts, .. } => {
                assert!((1..=MAX_ACCOUNTS).contains(&accounts.len()));
            }
            Request::Deliver {
                accounts,
                heads,
                data,
                ..
            } => {
                assert!((1..=MAX_ACCOUNTS).contains(&accounts.len()));
                assert_eq!(accounts.len(), heads.len());
                assert_eq!(deliver_size(accounts, heads, data.len()), b.len());
            }
            Request::Commit { .. } | Request::Abort { .. } | Request::Lane { .. } => {}
        }
    } else {
        let Ok(r) = Response::decode(b) else {
            return;
        };
        assert_eq!(r.encode(), b, "a second encoding of {r:?}");
    }
}
