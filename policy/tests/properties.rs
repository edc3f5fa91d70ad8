//! Invariants of the engine over random policies and requests.

use std::collections::BTreeSet;

use policy::{Action, Engine, HeaderMatch, HeaderRule, Method, PathMatch, Policy, Protocol, Request, Rule};
use proptest::prelude::*;

const SERVICES: [&str; 4] = ["a", "b", "c", "d"];
const PATHS: [&str; 4] = ["/x", "/x/1", "/y", "/z"];

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
        proptest::sample::subsequence(vec![Method::Get, Method::Post, Method::Delete], 0..=3),
        proptest::sample::subsequence(vec!["/x", "/x/*", "/y"], 0..=3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(deny, from, to, ports, tcp, methods, paths, header, dry_run)| Rule {
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
    method: Option<Method>,
    path: &'static str,
    header: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        proptest::sample::select(SERVICES.to_vec()),
        proptest::sample::select(SERVICES.to_vec()),
        proptest::sample::select(vec![80u16, 443, 8080]),
        proptest::option::of(proptest::sample::select(vec![
            Method::Get,
            Method::Post,
            Method::Delete,
            Method::Put,
        ])),
        proptest::sample::select(PATHS.to_vec()),
        any::<bool>(),
    )
        .prop_map(|(from, to, port, method, path, header)| Req { from, to, port, method, path, header })
}

fn decide(p: &Policy, r: &Req) -> policy::Decision {
    let headers: &[(&str, &str)] = if r.header { &[("x-h", "1")] } else { &[] };
    Engine::compile(p).evaluate(&Request {
        from: r.from,
        to: r.to,
        port: r.port,
        method: r.method,
        path: r.path,
        headers,
    })
}

proptest! {
    #[test]
    fn deny_wins(p in policy(), r in request()) {
        let d = decide(&p, &r);
        for rule in p.rules.iter().filter(|x| x.action == Action::Deny && !x.dry_run) {
            let alone = Policy { default: Action::Allow, rules: vec![rule.clone()], ..p.clone() };
            if decide(&alone, &r).rule.is_some() {
                prop_assert_eq!(d.verdict, Action::Deny, "{} matches", rule.name);
            }
        }
        if d.verdict == Action::Allow {
            prop_assert!(d.rule.is_some() || p.default == Action::Allow);
        }
    }

    #[test]
    fn adding_an_allow_never_removes_access(p in policy(), extra in rule(), r in request()) {
        let before = decide(&p, &r).verdict;
        let mut more = p.clone();
        more.rules.push(Rule { name: "extra".into(), action: Action::Allow, ..extra });
        if before == Action::Allow {
            prop_assert_eq!(decide(&more, &r).verdict, Action::Allow);
        }
    }

    #[test]
    fn a_dry_run_rule_never_changes_the_verdict(p in policy(), extra in rule(), r in request()) {
        let before = decide(&p, &r);
        let mut more = p.clone();
        more.rules.push(Rule { name: "dry".into(), dry_run: true, ..extra });
        let after = decide(&more, &r);
        prop_assert_eq!(after.verdict, before.verdict);
        prop_assert_eq!(after.rule, before.rule);
    }

    /// Rules for other destinations never affect a decision.
    #[test]
    fn other_destinations_rules_are_irrelevant(p in policy(), r in request()) {
        let only: BTreeSet<String> = [r.to.to_owned()].into();
        prop_assert_eq!(decide(&p.restricted_to(&only), &r), decide(&p, &r));
    }
}
