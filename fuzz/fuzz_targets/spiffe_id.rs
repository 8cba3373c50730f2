//! SPIFFE IDs, trust domains, selectors and scopes from arbitrary bytes:
//! never a panic, and whatever parses round-trips through Display.
#![no_main]

use baton_core::{Permission, Selector, SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(SpiffeId::parse(&id.to_string()).ok(), Some(id));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(TrustDomain::new(td.as_str()).ok(), Some(td));
    }
    if let Ok(sel) = Selector::parse(s) {
        assert_eq!(Selector::parse(&sel.to_string()).ok(), Some(sel));
    }
    if let Ok(p) = Permission::parse(s) {
        assert_eq!(Permission::parse(&p.to_string()).ok(), Some(p));
    }
});
