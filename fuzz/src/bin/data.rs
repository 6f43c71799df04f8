//! AFL++ target: `inboxd::smtp::fuzz::data_decoder` on each input (see src/smtp/fuzz.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        inboxd::smtp::fuzz::data_decoder(data);
    });
}
