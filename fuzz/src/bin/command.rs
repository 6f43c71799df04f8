//! AFL++ target: `inboxd::smtp::fuzz::command_line` on each input (see src/smtp/fuzz.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        inboxd::smtp::fuzz::command_line(data);
    });
}
