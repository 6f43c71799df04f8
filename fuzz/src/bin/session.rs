//! AFL++ target: `inboxd::smtp::fuzz::session` on each input (see src/smtp/fuzz.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        inboxd::smtp::fuzz::session(data);
    });
}
