//! The DATA decoder (RFC 5321 4.1.1.4, 4.5.2) and the header scan done on the decoded message.
//!
//! Owns finding the end of mail data, dot-unstuffing, turning CRLF line ends into LF (the
//! Maildir convention), and detecting the faults that make mail data unacceptable: a bare CR or
//! bare LF anywhere (RFC 5321 2.3.8; the SMTP-smuggling defence), and a text line longer than
//! 1000 octets (RFC 5321 4.5.3.1.6). Only `<CRLF>.<CRLF>` ends the data. A fault is recorded and
//! decoding goes on to the real end, so the session can answer once there. It must not buffer
//! more than the bytes it was given, and does no I/O.

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including the CRLF.
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFault {
    BareLf,
    BareCr,
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of the data).
    LineStart,
    /// A `.` at the start of a line.
    Dot,
    /// `.` CR at the start of a line: one LF more ends the data.
    DotCr,
    /// Inside a line.
    Mid,
    /// A CR inside a line: LF must follow.
    Cr,
}

#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    line_len: usize,
    fault: Option<DataFault>,
}

impl Default for DataDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataDecoder {
    pub fn new() -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            line_len: 0,
            fault: None,
        }
    }

    /// The first fault seen, if any. Sticky until a new decoder is made.
    pub fn fault(&self) -> Option<DataFault> {
        self.fault
    }

    fn flag(&mut self, f: DataFault) {
        self.fault.get_or_insert(f);
    }

    /// Decodes `input`, appending message content (LF line ends, dots unstuffed) to `out`.
    /// Returns how many bytes were consumed and whether the end of data was reached; bytes after
    /// the terminating `.CRLF` are left unconsumed (they are pipelined commands).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Inside a line, everything up to the next CR or LF is plain text: copied in
                // one go rather than byte by byte (the bulk of any message).
                let rest = &input[i..];
                let run = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.line_len += run;
                    if self.line_len > MAX_TEXT_LINE {
                        self.flag(DataFault::LineTooLong);
                    }
                    out.extend_from_slice(&rest[..run]);
                    i += run;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            self.line_len += 1;
            if self.line_len > MAX_TEXT_LINE {
                self.flag(DataFault::LineTooLong);
            }
            match self.state {
                State::LineStart => match b {
                    b'.' => self.state = State::Dot,
                    _ => self.mid(b, out),
                },
                // RFC 5321 4.5.2: a leading dot followed by more text is removed, and the
                // 1000-octet limit applies to the line without it (a 998-octet text line that
                // starts with a dot is 1001 octets on the wire).
                State::Dot => match b {
                    b'\r' => self.state = State::DotCr,
                    _ => {
                        self.line_len -= 1;
                        self.mid(b, out)
                    }
                },
                State::DotCr => match b {
                    b'\n' => {
                        *self = DataDecoder {
                            fault: self.fault,
                            ..DataDecoder::new()
                        };
                        return (i, true);
                    }
                    _ => {
                        // ".\r" then something else: the CR was bare; the dot was stuffing.
                        self.flag(DataFault::BareCr);
                        out.push(b'\r');
                        self.mid(b, out);
                    }
                },
                State::Mid => self.mid(b, out),
                State::Cr => match b {
                    b'\n' => {
                        out.push(b'\n');
                        self.state = State::LineStart;
                        self.line_len = 0;
                    }
                    _ => {
                        self.flag(DataFault::BareCr);
                        out.push(b'\r');
                        self.mid(b, out);
                    }
                },
            }
        }
        (input.len(), false)
    }

    fn mid(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                // A bare LF neither ends a line nor the data (RFC 5321 2.3.8, 4.1.1.4).
                self.flag(DataFault::BareLf);
                out.push(b'\n');
                self.state = State::Mid;
            }
            _ => {
                out.push(b);
                self.state = State::Mid;
            }
        }
    }
}

/// Scans the header section of the decoded message (LF line ends) for the trace fields that
/// matter to loop detection: how many `Received:` fields, and the `Delivered-To:` values.
/// Memory is bounded: only the first [`HeaderScan::KEEP`] octets of each field are kept, and at
/// most [`HeaderScan::MAX_DELIVERED_TO`] values.
#[derive(Debug, Default)]
pub struct HeaderScan {
    in_body: bool,
    at_line_start: bool,
    started: bool,
    field: Vec<u8>,
    pub received: usize,
    pub delivered_to: Vec<String>,
}

impl HeaderScan {
    const KEEP: usize = 512;
    const MAX_DELIVERED_TO: usize = 100;

    pub fn new() -> HeaderScan {
        HeaderScan {
            at_line_start: true,
            ..Default::default()
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if self.in_body {
                return;
            }
            if self.at_line_start {
                self.at_line_start = false;
                if b == b'\n' {
                    // Empty line: end of the header section (RFC 5322 2.1).
                    self.finish_field();
                    self.in_body = true;
                    return;
                }
                if b != b' ' && b != b'\t' {
                    // Not a continuation line: a new field starts.
                    self.finish_field();
                    self.started = true;
                }
            }
            if b == b'\n' {
                self.at_line_start = true;
            } else if self.field.len() < Self::KEEP {
                self.field.push(b);
            }
        }
    }

    /// Call at the end of data, so a message that is all header is scanned in full.
    pub fn finish(&mut self) {
        self.finish_field();
        self.in_body = true;
    }

    fn finish_field(&mut self) {
        if !self.started {
            return;
        }
        self.started = false;
        let field = std::mem::take(&mut self.field);
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return;
        };
        let name = field[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"Received") {
            self.received += 1;
        } else if name.eq_ignore_ascii_case(b"Delivered-To")
            && self.delivered_to.len() < Self::MAX_DELIVERED_TO
        {
            let v = field[colon + 1..].trim_ascii();
            self.delivered_to
                .push(String::from_utf8_lossy(v).into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Vec<u8>, usize, bool, Option<DataFault>) {
        let mut d = DataDecoder::new();
        let mut out = Vec::new();
        let (n, end) = d.feed(input, &mut out);
        (out, n, end, d.fault())
    }

    #[test]
    fn crlf_becomes_lf_and_end_is_found() {
        let (out, n, end, f) = decode(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: x\n\nhello\n");
        assert_eq!(n, 24);
        assert!(end);
        assert_eq!(f, None);
    }

    #[test]
    fn dot_unstuffing() {
        let (out, _, end, _) = decode(b"..leading\r\n.\r\n");
        assert_eq!(out, b".leading\n");
        assert!(end);
        let (out, _, _, _) = decode(b"...\r\n.\r\n");
        assert_eq!(out, b"..\n");
    }

    #[test]
    fn empty_data() {
        let (out, n, end, f) = decode(b".\r\n");
        assert!(out.is_empty() && end && f.is_none());
        assert_eq!(n, 3);
    }

    #[test]
    fn smuggling_forms_do_not_end_data() {
        for evil in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
        ] {
            let (_, n, end, f) = decode(evil);
            assert!(!end, "{evil:?} ended data");
            assert_eq!(n, evil.len());
            assert!(f.is_some(), "{evil:?} not flagged");
        }
    }

    #[test]
    fn end_split_across_reads() {
        let mut d = DataDecoder::new();
        let mut out = Vec::new();
        for chunk in [&b"x\r"[..], b"\n", b".", b"\r", b"\n"] {
            let (n, end) = d.feed(chunk, &mut out);
            assert_eq!(n, chunk.len());
            if end {
                assert_eq!(out, b"x\n");
                return;
            }
        }
        panic!("end not found");
    }

    #[test]
    fn line_length_limit() {
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode(&ok).3, None);
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode(&long).3, Some(DataFault::LineTooLong));
        let mut stuffed = b"..".to_vec();
        stuffed.extend_from_slice(&[b'D'; 997]);
        stuffed.extend_from_slice(b"\r\n.\r\n");
        let (out, _, end, f) = decode(&stuffed);
        assert!(end);
        assert_eq!(f, None);
        assert_eq!(out.len(), 999);
    }

    #[test]
    fn header_scan_counts_trace_fields() {
        let mut h = HeaderScan::new();
        h.feed(b"Received: a\nReceived: b\n\tc\nDelivered-To: x@h\nX: y\n\nReceived: body\n");
        h.finish();
        assert_eq!(h.received, 2);
        assert_eq!(h.delivered_to, vec!["x@h".to_string()]);
        let mut h = HeaderScan::new();
        h.feed(b"Delivered-To:  bob@h ");
        h.finish();
        assert_eq!(h.delivered_to, vec!["bob@h".to_string()]);
    }
}
