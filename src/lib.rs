//! inboxd: a final-delivery SMTP server that writes accepted mail into local users' Maildirs.
//!
//! Dependencies point one way: `main` → `cli`/`config` → `server` → (`smtp`, `recipient`,
//! `delivery`). `smtp` is the protocol without I/O; `recipient` looks up users; `delivery`
//! writes Maildirs (and `delivery::privileges` is the only code that changes credentials).

pub mod check;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod hostname;
pub mod logging;
pub mod recipient;
pub mod sendmail;
pub mod server;
pub mod smtp;
pub mod sys;
pub mod systemd;
