//! Policy decisions: 10,000 rules over 1,000 destination services (10 each), one decision per
//! iteration; criterion's median is the p50 per decision. Canonicalising a request-target is
//! measured apart (the proxy does it once per request, before the decision).
//!
//!     cargo bench -p benches --bench policy

use std::fmt::Write;

use criterion::{Criterion, criterion_group, criterion_main};
use policy::{Engine, Policy, Request, canonicalize};

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
    let headers: [(&str, &[u8]); 2] = [("x-team", b"team-7-blue"), ("accept", b"*/*")];
    let get = canonicalize("GET", "/v1/r7/items/42").unwrap();
    let allowed = Request::http("client7", "svc500", 80, &get, &headers);
    assert!(engine.evaluate(&allowed).allowed());
    let nothing = canonicalize("GET", "/v1/nothing").unwrap();
    let denied = Request { http: Some(&nothing), ..allowed };
    assert!(!engine.evaluate(&denied).allowed());

    let mut group = c.benchmark_group("policy decision (10k rules, 1k services)");
    group.bench_function("allowed request", |b| b.iter(|| engine.evaluate(std::hint::black_box(&allowed))));
    group.bench_function("default deny", |b| b.iter(|| engine.evaluate(std::hint::black_box(&denied))));
    group.finish();

    let mut group = c.benchmark_group("canonical request-target");
    group.bench_function("already canonical", |b| {
        b.iter(|| canonicalize(std::hint::black_box("GET"), std::hint::black_box("/v1/r7/items/42?x=1")))
    });
    group.bench_function("rewritten", |b| {
        b.iter(|| {
            canonicalize(std::hint::black_box("GET"), std::hint::black_box("/v1//r7/./items/%34%32?x=1"))
        })
    });
    group.finish();

    c.bench_function("policy compile (10k rules)", |b| {
        b.iter(|| Engine::compile(std::hint::black_box(&policy)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
