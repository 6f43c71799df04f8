//! The wire protocol between the receiver (the unprivileged SMTP process) and the delivery
//! agent: one SOCK_SEQPACKET datagram per message, fixed binary fields, no text parsing.
//!
//! ```text
//! request  := kind:u8 id:u64le body
//!   Begin  (1) body := n:u16le n * (len:u8 account-name)   reply: Opened or Failed
//!   Commit (2) body := -                                   reply: Done or Failed
//!   Abort  (3) body := -                                   no reply
//!   Deliver(4) body := n:u16le n * (len:u8 account-name hlen:u16le trace-fields) data
//!                      data: the rest of the datagram      reply: Done or Failed
//!   Check  (5) body := n:u16le n * (len:u8 account-name)   reply: Done (no names) or Failed
//!   Lane   (6) body := -   one socket rides along (SCM_RIGHTS)   reply: Done (no names) or Failed
//! response := kind:u8 id:u64le body
//!   Opened (1) body := n:u16le      n tmp-file descriptors ride along (SCM_RIGHTS)
//!   Failed (2) body := class:u8 len:u16le detail           class: see `DeliveryError`
//!   Done   (3) body := n:u16le n * (len:u8 file-name)     name in new/ per account, in order
//! ```
//!
//! Deliver is Begin, the writing and Commit in one: the receiver sends it for a message
//! whose request fits one datagram (most mail), so the agent writes each copy itself and no
//! descriptor crosses; larger messages take Begin, descriptors and Commit.
//!
//! Check asks, at RCPT time, whether each account's Maildir can take mail now (the same
//! lookup, walk and checks a delivery makes, and write permission on tmp/ and new/), so that
//! one broken mailbox gets its own 4xx instead of failing a whole transaction at the dot.
//!
//! Lane hands the agent one end of a new socket pair (its id, a request id like any other,
//! names the lane in the agent's log): a thread of the agent serves it as it serves the
//! first, and the receiver sends there the requests for the accounts whose homes are on one
//! filesystem, so that one that hangs (an NFS server that stops answering) holds up only
//! those (see `agent`).
//!
//! Owns encoding and strict decoding (exact lengths, no trailing bytes, bounded counts; a
//! Deliver's data has no length of its own, it is what the datagram holds after the fields,
//! and the channel refuses a cut datagram). It
//! must not trust what it decodes: the agent re-checks every account it is given.

use super::DeliveryError;

/// Largest datagram either side sends or accepts.
pub const MAX_DATAGRAM: usize = 64 * 1024;
/// Accounts in one Begin: their descriptors come back in one datagram, which carries at
/// most 253 (SCM_MAX_FD); the session keeps transactions below that.
pub const MAX_ACCOUNTS: usize = 253;
/// The kind octet of a Lane request, which the agent handles apart (it brings a socket).
pub const LANE_KIND: u8 = 6;
/// Octets of a Failed's detail at most (it is logged, not parsed).
const MAX_DETAIL: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Begin {
        id: u64,
        accounts: Vec<String>,
    },
    Commit {
        id: u64,
    },
    Abort {
        id: u64,
    },
    /// A whole small message: per account its trace fields, then the mail data they share.
    Deliver {
        id: u64,
        accounts: Vec<String>,
        heads: Vec<Vec<u8>>,
        data: Vec<u8>,
    },
    /// Can each account's Maildir take mail now? Nothing is created but a missing Maildir.
    Check {
        id: u64,
        accounts: Vec<String>,
    },
    /// A new lane: the socket that comes with it is served by a thread of its own.
    Lane {
        id: u64,
    },
}

/// The encoded size of a Deliver request, to know beforehand whether it fits a datagram.
pub fn deliver_size(accounts: &[String], heads: &[Vec<u8>], data_len: usize) -> usize {
    let fields: usize = accounts
        .iter()
        .zip(heads)
        .map(|(a, h)| 1 + a.len().min(255) + 2 + h.len())
        .sum();
    1 + 8 + 2 + fields + data_len
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `count` descriptors, one per account of the Begin, in its order, come with it.
    Opened {
        id: u64,
        count: u16,
    },
    Failed {
        id: u64,
        class: u8,
        detail: String,
    },
    /// Every copy is durable and visible: its file name in new/, per account of the Begin,
    /// in order (for the receiver's log).
    Done {
        id: u64,
        names: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed message between receiver and delivery agent")
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// `n:u16le n * (len:u8 utf-8)`, at most [`MAX_ACCOUNTS`] of them.
    fn names(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_ACCOUNTS {
            return Err(DecodeError);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.name()?);
        }
        Ok(out)
    }
    /// `len:u8 utf-8`.
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        let name = std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError)?;
        Ok(name.to_string())
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError)
        }
    }
}

/// `len:u8 account-name`. Account names are at most 32 octets (recipient::is_account_name);
/// a longer one is cut, and the agent then refuses it as no account.
fn put_name(v: &mut Vec<u8>, a: &str) {
    let b = &a.as_bytes()[..a.len().min(255)];
    v.push(b.len() as u8);
    v.extend_from_slice(b);
}

fn head(kind: u8, id: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.push(kind);
    v.extend_from_slice(&id.to_le_bytes());
    v
}

/// A request whose body is a list of account names (Begin, Check).
fn names_request(kind: u8, id: u64, accounts: &[String]) -> Vec<u8> {
    let mut v = head(kind, id);
    v.extend_from_slice(&(accounts.len() as u16).to_le_bytes());
    for a in accounts {
        put_name(&mut v, a);
    }
    v
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Begin { id, .. }
            | Request::Commit { id }
            | Request::Abort { id }
            | Request::Deliver { id, .. }
            | Request::Check { id, .. }
            | Request::Lane { id } => *id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Begin { id, accounts } => names_request(1, *id, accounts),
            Request::Check { id, accounts } => names_request(5, *id, accounts),
            Request::Commit { id } => head(2, *id),
            Request::Abort { id } => head(3, *id),
            Request::Lane { id } => head(LANE_KIND, *id),
            Request::Deliver {
                id,
                accounts,
                heads,
                data,
            } => {
                let mut v = Vec::with_capacity(deliver_size(accounts, heads, data.len()));
                v.extend_from_slice(&head(4, *id));
                // The count is that of the pairs written, whatever the caller passed.
                let n = accounts.len().min(heads.len());
                v.extend_from_slice(&(n as u16).to_le_bytes());
                for (a, h) in accounts.iter().zip(heads) {
                    put_name(&mut v, a);
                    // Trace fields are a few hundred octets (smtp::trace); the sender keeps
                    // the whole request below MAX_DATAGRAM.
                    let h = &h[..h.len().min(usize::from(u16::MAX))];
                    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
                    v.extend_from_slice(h);
                }
                v.extend_from_slice(data);
                v
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader { b };
        let kind = r.u8()?;
        let id = r.u64()?;
        let req = match kind {
            1 => {
                let accounts = r.names()?;
                if accounts.is_empty() {
                    return Err(DecodeError);
                }
                Request::Begin { id, accounts }
            }
            2 => Request::Commit { id },
            3 => Request::Abort { id },
            LANE_KIND => Request::Lane { id },
            5 => {
                let accounts = r.names()?;
                if accounts.is_empty() {
                    return Err(DecodeError);
                }
                Request::Check { id, accounts }
            }
            4 => {
                let n = r.u16()? as usize;
                if n == 0 || n > MAX_ACCOUNTS {
                    return Err(DecodeError);
                }
                let mut accounts = Vec::with_capacity(n);
                let mut heads = Vec::with_capacity(n);
                for _ in 0..n {
                    accounts.push(r.name()?);
                    let hlen = r.u16()? as usize;
                    heads.push(r.take(hlen)?.to_vec());
                }
                let data = std::mem::take(&mut r.b).to_vec();
                Request::Deliver {
                    id,
                    accounts,
                    heads,
                    data,
                }
            }
            _ => return Err(DecodeError),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    pub fn id(&self) -> u64 {
        match self {
            Response::Opened { id, .. }
            | Response::Failed { id, .. }
            | Response::Done { id, .. } => *id,
        }
    }

    pub fn failed(id: u64, e: &DeliveryError) -> Response {
        let (class, detail) = e.to_wire();
        Response::Failed {
            id,
            class,
            detail: detail.to_string(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Opened { id, count } => {
                let mut v = head(1, *id);
                v.extend_from_slice(&count.to_le_bytes());
                v
            }
            Response::Failed { id, class, detail } => {
                let mut v = head(2, *id);
                v.push(*class);
                let mut end = detail.len().min(MAX_DETAIL);
                while !detail.is_char_boundary(end) {
                    end -= 1;
                }
                v.extend_from_slice(&(end as u16).to_le_bytes());
                v.extend_from_slice(&detail.as_bytes()[..end]);
                v
            }
            Response::Done { id, names } => {
                let mut v = head(3, *id);
                let names = &names[..names.len().min(MAX_ACCOUNTS)];
                v.extend_from_slice(&(names.len() as u16).to_le_bytes());
                for n in names {
                    let mut end = n.len().min(255);
                    while !n.is_char_boundary(end) {
                        end -= 1;
                    }
                    v.push(end as u8);
                    v.extend_from_slice(&n.as_bytes()[..end]);
                }
                v
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader { b };
        let kind = r.u8()?;
        let id = r.u64()?;
        let resp = match kind {
            1 => Response::Opened {
                id,
                count: r.u16()?,
            },
            2 => {
                let class = r.u8()?;
                // Strict like the rest: only what `encode` writes (found by the fuzz target).
                let len = r.u16()? as usize;
                if len > MAX_DETAIL {
                    return Err(DecodeError);
                }
                let detail = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| DecodeError)?
                    .to_string();
                Response::Failed { id, class, detail }
            }
            3 => Response::Done {
                id,
                names: r.names()?,
            },
            _ => return Err(DecodeError),
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Begin {
                id: 7,
                accounts: vec!["alice".into(), "Carol".into()],
            },
            Request::Commit { id: u64::MAX },
            Request::Abort { id: 0 },
            Request::Lane { id: 3 },
            Request::Check {
                id: 11,
                accounts: vec!["bob".into(), "Carol".into()],
            },
            Request::Deliver {
                id: 9,
                accounts: vec!["alice".into(), "bob".into()],
                heads: vec![b"Delivered-To: alice\n".to_vec(), Vec::new()],
                data: b"Subject: x\n\nhello\n".to_vec(),
            },
            Request::Deliver {
                id: 10,
                accounts: vec!["alice".into()],
                heads: vec![Vec::new()],
                data: Vec::new(),
            },
        ] {
            if let Request::Deliver {
                accounts,
                heads,
                data,
                ..
            } = &r
            {
                assert_eq!(deliver_size(accounts, heads, data.len()), r.encode().len());
            }
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Opened { id: 1, count: 3 },
            Response::Failed {
                id: 2,
                class: 4,
                detail: "new is a symlink".into(),
            },
            Response::Done {
                id: 3,
                names: vec!["1.M2P3Q4.mx,S=5".into(), "6.M7P8Q9.mx,S=10".into()],
            },
        ] {
            assert_eq!(Response::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn malformed_input_is_refused() {
        let good = Request::Begin {
            id: 1,
            accounts: vec!["bob".into()],
        }
        .encode();
        for cut in 0..good.len() {
            assert_eq!(
                Request::decode(&good[..cut]),
                Err(DecodeError),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Request::decode(&long), Err(DecodeError));
        assert_eq!(
            Request::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError)
        );
        // A Check of nobody, like a Begin of nobody, is not a request.
        let empty = Request::Check {
            id: 1,
            accounts: Vec::new(),
        };
        assert_eq!(Request::decode(&empty.encode()), Err(DecodeError));
        let mut none = head(1, 1);
        none.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(Request::decode(&none), Err(DecodeError));
        let mut none = head(4, 1);
        none.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(Request::decode(&none), Err(DecodeError));
    }

    #[test]
    fn a_failure_detail_is_utf8_and_bounded() {
        let failed = |len: u16, detail: &[u8]| {
            let mut v = head(2, 5);
            v.push(4);
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(detail);
            v
        };
        assert!(Response::decode(&failed(2, b"ok")).is_ok());
        assert_eq!(Response::decode(&failed(2, b"\xff\xfe")), Err(DecodeError));
        let long = vec![b'x'; MAX_DETAIL + 1];
        assert_eq!(
            Response::decode(&failed(long.len() as u16, &long)),
            Err(DecodeError)
        );
        // What the encoder writes for a detail that is too long is accepted: cut to a
        // character boundary (a 3-octet character straddles octet 1024 here).
        let cut = Response::Failed {
            id: 5,
            class: 4,
            detail: "€".repeat(MAX_DETAIL),
        }
        .encode();
        match Response::decode(&cut) {
            Ok(Response::Failed { detail, .. }) => {
                assert_eq!(detail.len(), MAX_DETAIL - 1);
                assert_eq!(detail, "€".repeat((MAX_DETAIL - 1) / 3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_deliver_is_refused_before_its_data() {
        let good = Request::Deliver {
            id: 3,
            accounts: vec!["bob".into()],
            heads: vec![b"Return-Path: <>\n".to_vec()],
            data: b"x".to_vec(),
        }
        .encode();
        // Every cut inside the fields fails; a cut inside the data is only shorter data.
        let data_at = good.len() - 1;
        for cut in 0..data_at {
            assert_eq!(
                Request::decode(&good[..cut]),
                Err(DecodeError),
                "cut at {cut}"
            );
        }
        let mut two = good.clone();
        two[9] = 2; // claims a second account that is not there
        assert_eq!(Request::decode(&two), Err(DecodeError));
    }
}
