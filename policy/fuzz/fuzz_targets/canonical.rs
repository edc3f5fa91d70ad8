//! Any method and request-target yield a canonical request or a refusal, never a panic; a
//! canonical request's forwarded target is itself canonical and forwarded unchanged (the
//! canonical form is idempotent), and its path is in the one spelling rules are written in.
//!
//! Input: the method, one space, the request-target.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (method, target) = text.split_once(' ').unwrap_or(("GET", text));
    let c = match policy::canonicalize(method, target) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let shown = c.to_string();
    assert!(shown.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{shown:?}");
    let forwarded = c.request_target();
    assert_eq!(c.is_rewritten(), *forwarded != *target);
    let again = policy::canonicalize(method, &forwarded).expect("a canonical target is accepted");
    assert!(!again.is_rewritten(), "{target:?} -> {forwarded:?} is rewritten again");
    assert_eq!(again.path(), c.path());
    assert_eq!(again.query(), c.query());
    if let Some(path) = c.path() {
        for bad in ["//", "/./", "/../"] {
            assert!(!path.contains(bad), "{target:?} -> {path:?}");
        }
        assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{target:?} -> {path:?}");
        for (i, _) in path.match_indices('%') {
            let v = u8::from_str_radix(&path[i + 1..i + 3], 16).expect("hex");
            assert!(!(v.is_ascii_alphanumeric() || b"-._~".contains(&v)), "{path:?}");
            assert!(!path[i + 1..i + 3].bytes().any(|b| b.is_ascii_lowercase()), "{path:?}");
        }
        assert_eq!(policy::canonical_path(path).expect("a canonical path is accepted"), path);
    }
});
