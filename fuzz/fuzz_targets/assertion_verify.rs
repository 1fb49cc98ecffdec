//! The assertion verifier on arbitrary tokens: never panics, and never
//! accepts anything not signed by its key (the fuzzer cannot forge an
//! Ed25519 signature, so every input must be refused).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oneprotect_identity::{AssertionSigner, AssertionVerifier};

fn verifier() -> &'static AssertionVerifier {
    static V: OnceLock<AssertionVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let (signer, _) = AssertionSigner::generate("fuzz").expect("key");
        AssertionVerifier::new("oneprotect-upstream").add_key("fuzz", signer.public_key())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        verifier().verify(token, 1_800_000_000).is_err(),
        "an unsigned token was accepted"
    );
});
