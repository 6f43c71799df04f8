//! AFL++ target: `inboxd::delivery::fuzz::protocol` on each input (see src/delivery/fuzz.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        inboxd::delivery::fuzz::protocol(data);
    });
}
