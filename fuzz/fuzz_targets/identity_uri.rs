//! Identity URI parsing: never panics, and whatever parses is the canonical
//! spelling of what it parses to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oneprotect_identity::{AgentUri, TenantCaUri};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = s.parse::<AgentUri>() {
        assert_eq!(
            u.to_string(),
            s,
            "an agent URI parses only in canonical form"
        );
    }
    if let Ok(u) = s.parse::<TenantCaUri>() {
        assert_eq!(
            u.to_string(),
            s,
            "a tenant CA URI parses only in canonical form"
        );
    }
});
