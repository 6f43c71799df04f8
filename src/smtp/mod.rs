//! The SMTP protocol, sans I/O (RFC 5321 and the extensions inboxd offers).
//!
//! Owns everything about the protocol and nothing about the world: no sockets, no clock, no
//! users, no files, no logging. The server feeds bytes and time to a [`session::Session`] and
//! acts on its events; every module here is tested bytes-in/bytes-out.

pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzz;
pub mod path;
pub mod reply;
pub mod session;
pub mod trace;

pub use reply::Reply;
pub use session::{DeliveryOutcome, Event, Peer, RcptVerdict, Session, SessionConfig, Transaction};

#[cfg(test)]
mod transcript_tests;
