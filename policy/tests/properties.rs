//! Invariants of the engine over random policies and requests, and of the canonical form over
//! random request-targets.

use std::collections::BTreeSet;

use policy::{
    Action, Engine, HeaderMatch, HeaderRule, Method, PathMatch, Policy, Protocol, Request, Rule,
    canonical_path, canonicalize,
};
use proptest::prelude::*;

const SERVICES: [&str; 4] = ["a", "b", "c", "d"];
/// Request-targets, some of them other spellings of the same path, some refused.
const PATHS: [&str; 10] = ["/x", "/x/1", "/y", "/z", "/x/", "//x", "/z/../x", "/%78/1", "/X", "/x;1"];

fn services() -> impl Strategy<Value = BTreeSet<String>> {
    proptest::sample::subsequence(SERVICES.to_vec(), 1..=4)
        .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        any::<bool>(),
        proptest::option::of(services()),
        services(),
        proptest::sample::subsequence(vec![80u16, 443], 0..=2),
        any::<bool>(),
        proptest::sample::subsequence(vec![Method::GET, Method::POST, Method::DELETE], 0..=3),
        proptest::sample::subsequence(vec!["/x", "/x/*", "/y"], 0..=3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(deny, from, to, ports, tcp, methods, paths, header, dry_run, fold)| Rule {
            paths_ignore_case: fold && !tcp && !paths.is_empty(),
            name: "r".into(),
            line: 1,
            action: if deny { Action::Deny } else { Action::Allow },
            from,
            to,
            ports: ports.into_iter().collect(),
            protocol: if tcp { Protocol::Tcp } else { Protocol::Http },
            methods: if tcp { BTreeSet::new() } else { methods.into_iter().collect() },
            paths: if tcp {
                vec![]
            } else {
                paths
                    .into_iter()
                    .map(|p| match p.strip_suffix('*') {
                        Some(prefix) => PathMatch::Prefix(prefix.into()),
                        None => PathMatch::Exact(p.into()),
                    })
                    .collect()
            },
            headers: if header && !tcp {
                vec![HeaderRule { name: "x-h".into(), matches: HeaderMatch::Present }]
            } else {
                vec![]
            },
            dry_run,
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    (any::<bool>(), proptest::collection::vec(rule(), 0..12)).prop_map(|(allow, rules)| Policy {
        file: "p".into(),
        default: if allow { Action::Allow } else { Action::Deny },
        rules: rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule { name: format!("r{i}"), line: i + 1, ..r })
            .collect(),
        tests: vec![],
    })
}

#[derive(Debug, Clone)]
struct Req {
    from: &'static str,
    to: &'static str,
    port: u16,
    /// `None`: a TCP connection.
    method: Option<&'static str>,
    path: String,
    header: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        proptest::sample::select(SERVICES.to_vec()),
        proptest::sample::select(SERVICES.to_vec()),
        proptest::sample::select(vec![80u16, 443, 8080]),
        proptest::option::of(proptest::sample::select(vec![
            "GET", "POST", "DELETE", "PUT", "delete", "PURGE",
        ])),
        proptest::sample::select(PATHS.to_vec()),
        any::<bool>(),
    )
        .prop_map(|(from, to, port, method, path, header)| Req {
            from,
            to,
            port,
            method,
            path: path.into(),
            header,
        })
}

/// The decision on `r`, or `None` when the request is refused.
fn decide(p: &Policy, r: &Req) -> Option<policy::Decision> {
    let headers: &[(&str, &[u8])] = if r.header { &[("x-h", b"1")] } else { &[] };
    let engine = Engine::compile(p);
    match r.method {
        None => Some(engine.evaluate(&Request::tcp(r.from, r.to, r.port))),
        Some(m) => {
            let http = canonicalize(m, &r.path).ok()?;
            Some(engine.evaluate(&Request::http(r.from, r.to, r.port, &http, headers)))
        }
    }
}

/// Request paths built of every kind of piece the canonical form treats specially, mostly
/// pieces it accepts.
fn target() -> impl Strategy<Value = String> {
    let accepted = proptest::sample::select(vec![
        "/", "//", "/", ".", "..", "%2e", "%2E", "a", "B", "~", "%61", "%7e", "%7E", "%41", "%20", "%C3%A9",
        "%c3%a9", "%25", "%252e", "%3b", "@", ":", "!", "*", "?",
    ]);
    let refused = proptest::sample::select(vec![
        "%2f", "%5c", "%00", ";", "\\", "#", "%", "%zz", " ", "\u{e9}", "%c3", "%a9", "%C0%AF",
    ]);
    let piece = prop_oneof![12 => accepted, 1 => refused];
    proptest::collection::vec(piece, 0..16).prop_map(|v| format!("/{}", v.concat()))
}

proptest! {
    #[test]
    fn deny_wins(p in policy(), r in request()) {
        let Some(d) = decide(&p, &r) else { return Ok(()) };
        for rule in p.rules.iter().filter(|x| x.action == Action::Deny && !x.dry_run) {
            let alone = Policy { default: Action::Allow, rules: vec![rule.clone()], ..p.clone() };
            if decide(&alone, &r).unwrap().rule.is_some() {
                prop_assert_eq!(d.verdict, Action::Deny, "{} matches", rule.name);
            }
        }
        if d.verdict == Action::Allow {
            prop_assert!(d.rule.is_some() || p.default == Action::Allow);
        }
    }

    #[test]
    fn adding_an_allow_never_removes_access(p in policy(), extra in rule(), r in request()) {
        let Some(before) = decide(&p, &r) else { return Ok(()) };
        let mut more = p.clone();
        more.rules.push(Rule { name: "extra".into(), action: Action::Allow, ..extra });
        if before.verdict == Action::Allow {
            prop_assert_eq!(decide(&more, &r).unwrap().verdict, Action::Allow);
        }
    }

    /// A deny rule matches a request whenever the same rule as an allow would: deny rules take
    /// the broad reading of a request, allow rules the narrow one.
    #[test]
    fn a_deny_rule_matches_whatever_its_allow_twin_matches(extra in rule(), r in request()) {
        let rule = |action| Rule { action, dry_run: false, ..extra.clone() };
        let alone = |rule| Policy { file: "p".into(), default: Action::Deny, rules: vec![rule], tests: vec![] };
        let Some(allowed) = decide(&alone(rule(Action::Allow)), &r) else { return Ok(()) };
        if allowed.rule.is_some() {
            prop_assert!(decide(&alone(rule(Action::Deny)), &r).unwrap().rule.is_some());
        }
    }

    #[test]
    fn a_dry_run_rule_never_changes_the_verdict(p in policy(), extra in rule(), r in request()) {
        let before = decide(&p, &r);
        let mut more = p.clone();
        more.rules.push(Rule { name: "dry".into(), dry_run: true, ..extra });
        let after = decide(&more, &r);
        prop_assert_eq!(after.map(|d| (d.verdict, d.rule)), before.map(|d| (d.verdict, d.rule)));
    }

    /// Rules for other destinations never affect a decision.
    #[test]
    fn other_destinations_rules_are_irrelevant(p in policy(), r in request()) {
        let only: BTreeSet<String> = [r.to.to_owned()].into();
        prop_assert_eq!(decide(&p.restricted_to(&only), &r), decide(&p, &r));
    }

    /// Canonicalising is idempotent: the forwarded target of a canonical request is canonical
    /// and is forwarded unchanged, with the same decision.
    #[test]
    fn canonicalising_a_canonical_target_is_the_identity(t in target(), q in proptest::option::of("[a-z=&%2F]{0,6}")) {
        let t = match q { Some(q) => format!("{t}?{q}"), None => t };
        let Ok(c) = canonicalize("GET", &t) else { return Ok(()) };
        let forwarded = c.request_target();
        let again = canonicalize("GET", &forwarded).expect("a canonical target is accepted");
        prop_assert!(!again.is_rewritten(), "{} -> {}", t, forwarded);
        prop_assert_eq!(again.path(), c.path());
        prop_assert_eq!(again.query(), c.query());
        prop_assert_eq!(c.is_rewritten(), *forwarded != *t);
    }

    /// A canonical path has no empty or dot segment, and no percent-encoding of an unreserved
    /// character or in lower-case hex.
    #[test]
    fn a_canonical_path_has_one_spelling(t in target()) {
        let Ok(c) = canonicalize("GET", &t) else { return Ok(()) };
        let path = c.path().unwrap();
        prop_assert!(path.starts_with('/'));
        for bad in ["//", "/./", "/../"] {
            prop_assert!(!path.contains(bad), "{} -> {}", t, path);
        }
        prop_assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{} -> {}", t, path);
        let bytes = path.as_bytes();
        for (i, _) in path.match_indices('%') {
            let hex = &path[i + 1..i + 3];
            prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)), "{}", path);
            let v = u8::from_str_radix(hex, 16).unwrap();
            prop_assert!(!(v.is_ascii_alphanumeric() || b"-._~".contains(&v)), "{} encodes {:?}", path, v as char);
        }
        prop_assert!(bytes.iter().all(|b| b.is_ascii_graphic()));
        prop_assert_eq!(canonical_path(path).unwrap(), path);
    }

    /// Spellings of one path that the canonical form merges never get different decisions.
    #[test]
    fn every_spelling_of_a_path_gets_one_decision(p in policy(), r in request(), t in target()) {
        let Some(method) = r.method else { return Ok(()) };
        let Ok(c) = canonicalize(method, &t) else { return Ok(()) };
        let canonical = c.request_target().into_owned();
        let a = decide(&p, &Req { path: t.clone(), ..r.clone() });
        let b = decide(&p, &Req { path: canonical, ..r });
        prop_assert_eq!(a, b);
    }
}
