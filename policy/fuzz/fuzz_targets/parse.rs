//! Any bytes given to the policy parser yield a policy or an error with a place, never a panic;
//! a policy that parses compiles, runs its tests and round-trips through its TOML form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match policy::Policy::parse("fuzz.toml", text) {
        Ok(p) => {
            let engine = policy::Engine::compile(&p);
            let _ = engine.run_tests(&p.tests);
            let again =
                policy::Policy::parse("again.toml", &p.to_toml()).expect("a parsed policy round-trips");
            assert_eq!(again.rules.len(), p.rules.len());
        }
        Err(e) => assert!(e.line >= 1 && e.column >= 1),
    }
});
