//! Policy decisions: 10,000 rules over 1,000 destination services (10 each), one decision per
//! iteration; criterion's median is the p50 per decision.
//!
//!     cargo bench -p benches --bench policy

use std::fmt::Write;

use criterion::{Criterion, criterion_group, criterion_main};
use policy::{Engine, Method, Policy, Request};

fn big_policy() -> String {
    let mut text = String::from("default = \"deny\"\n");
    for s in 0..1000 {
        for r in 0..10 {
            let action = if r == 9 { "deny" } else { "allow" };
            writeln!(
                text,
                "[[rule]]\nname = \"s{s}-r{r}\"\naction = \"{action}\"\nfrom = [\"client{r}\", \"svc{}\"]\nto = [\"svc{s}\"]\nports = [80, 8080]\nmethods = [\"GET\", \"POST\"]\npaths = [\"/v1/r{r}/*\", \"/v1/exact{r}\"]\nheaders = [{{ name = \"x-team\", prefix = \"team-{r}\" }}]",
                (s + 1) % 1000
            )
            .unwrap();
        }
    }
    text
}

fn bench(c: &mut Criterion) {
    let text = big_policy();
    let policy = Policy::parse("bench.toml", &text).expect("the bench policy parses");
    assert_eq!(policy.rules.len(), 10_000);
    let engine = Engine::compile(&policy);
    let headers = [("x-team", "team-7-blue"), ("accept", "*/*")];
    let allowed = Request {
        from: "client7",
        to: "svc500",
        port: 80,
        method: Some(Method::Get),
        path: "/v1/r7/items/42",
        headers: &headers,
    };
    assert!(engine.evaluate(&allowed).allowed());
    let denied = Request { path: "/v1/nothing", ..allowed };
    assert!(!engine.evaluate(&denied).allowed());

    let mut group = c.benchmark_group("policy decision (10k rules, 1k services)");
    group.bench_function("allowed request", |b| b.iter(|| engine.evaluate(std::hint::black_box(&allowed))));
    group.bench_function("default deny", |b| b.iter(|| engine.evaluate(std::hint::black_box(&denied))));
    group.finish();
    c.bench_function("policy compile (10k rules)", |b| {
        b.iter(|| Engine::compile(std::hint::black_box(&policy)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
