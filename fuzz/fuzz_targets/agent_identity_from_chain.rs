//! `AgentIdentity::from_chain` on arbitrary leaf and issuer bytes: never
//! panics (every refusal is a `ChainError`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oneprotect_identity::AgentIdentity;

fuzz_target!(|data: &[u8]| {
    // The first two bytes split the input into leaf and issuer.
    if data.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_be_bytes([data[0], data[1]])) % (data.len() - 1);
    let (leaf, issuer) = data[2..].split_at(split.min(data.len() - 2));
    let _ = AgentIdentity::from_chain(leaf, issuer);
});
