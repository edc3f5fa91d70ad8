//! The compiled policy: rules grouped by destination service, so a decision looks only at the
//! rules that name its destination, however many rules other services have.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::parse::{Action, HeaderMatch, HeaderRule, Method, PathMatch, Policy, Protocol, TestCase};

/// A request (or, without a method, a TCP connection) to decide on. Header names lower-case.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub port: u16,
    /// `None`: a TCP connection, which only `tcp` rules can match.
    pub method: Option<Method>,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

/// The rule behind a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub name: Arc<str>,
    pub line: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule `{}` (line {})", self.name, self.line)
    }
}

/// A verdict and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Action,
    /// The enforced rule that decided; `None` when the default did.
    pub rule: Option<RuleRef>,
    /// Dry-run rules that matched and what they would have done (logged, not enforced).
    pub dry_run: Vec<(RuleRef, Action)>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.verdict == Action::Allow
    }

    /// "allow by rule `x` (line 4)" or "deny by default".
    pub fn reason(&self) -> String {
        match &self.rule {
            Some(rule) => format!("{} by {rule}", self.verdict),
            None => format!("{} by default", self.verdict),
        }
    }
}

struct Compiled {
    rule: RuleRef,
    action: Action,
    /// `None`: any source.
    from: Option<HashSet<Box<str>>>,
    /// Empty: any port.
    ports: Vec<u16>,
    protocol: Protocol,
    /// Bit per [`Method`]; 0: any method.
    methods: u16,
    paths: Vec<PathMatch>,
    headers: Vec<HeaderRule>,
    dry_run: bool,
}

fn method_bit(m: Method) -> u16 {
    1 << (m as u16)
}

impl Compiled {
    fn matches(&self, req: &Request<'_>) -> bool {
        if let Some(from) = &self.from
            && !from.contains(req.from)
        {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return false;
        }
        let Some(method) = req.method else {
            // A TCP connection: only L4 rules speak of it.
            return self.protocol == Protocol::Tcp;
        };
        if self.protocol == Protocol::Tcp {
            return true;
        }
        if self.methods != 0 && self.methods & method_bit(method) == 0 {
            return false;
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p.matches(req.path)) {
            return false;
        }
        self.headers.iter().all(|h| {
            let value = req.headers.iter().find(|(n, _)| *n == h.name).map(|(_, v)| *v);
            match (&h.matches, value) {
                (_, None) => false,
                (HeaderMatch::Present, Some(_)) => true,
                (HeaderMatch::Exact(want), Some(v)) => v == want,
                (HeaderMatch::Prefix(want), Some(v)) => v.starts_with(want.as_str()),
            }
        })
    }
}

/// A policy compiled for evaluation.
pub struct Engine {
    default: Action,
    by_destination: HashMap<Box<str>, Vec<Compiled>>,
}

/// A policy test that did not get its expected verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestFailure {
    pub line: usize,
    pub request: String,
    pub expected: Action,
    pub got: Decision,
}

impl fmt::Display for TestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test at line {}: {} expected {}, got {}",
            self.line,
            self.request,
            self.expected,
            self.got.reason()
        )
    }
}

impl Engine {
    pub fn compile(policy: &Policy) -> Engine {
        let mut by_destination: HashMap<Box<str>, Vec<Compiled>> = HashMap::new();
        for r in &policy.rules {
            let rule = RuleRef { name: Arc::from(r.name.as_str()), line: r.line };
            for to in &r.to {
                by_destination.entry(Box::from(to.as_str())).or_default().push(Compiled {
                    rule: rule.clone(),
                    action: r.action,
                    from: r.from.as_ref().map(|f| f.iter().map(|s| Box::from(s.as_str())).collect()),
                    ports: r.ports.iter().copied().collect(),
                    protocol: r.protocol,
                    methods: r.methods.iter().fold(0, |bits, m| bits | method_bit(*m)),
                    paths: r.paths.clone(),
                    headers: r.headers.clone(),
                    dry_run: r.dry_run,
                });
            }
        }
        Engine { default: policy.default, by_destination }
    }

    /// Decides on `req`: an enforced deny that matches wins; else an enforced allow; else the
    /// default. Dry-run rules that match are reported and change nothing.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let mut deny: Option<&RuleRef> = None;
        let mut allow: Option<&RuleRef> = None;
        let mut dry_run = Vec::new();
        if let Some(rules) = self.by_destination.get(req.to) {
            for r in rules {
                if !r.matches(req) {
                    continue;
                }
                if r.dry_run {
                    dry_run.push((r.rule.clone(), r.action));
                } else if r.action == Action::Deny {
                    deny = deny.or(Some(&r.rule));
                } else {
                    allow = allow.or(Some(&r.rule));
                }
            }
        }
        let (verdict, rule) = match (deny, allow) {
            (Some(d), _) => (Action::Deny, Some(d.clone())),
            (None, Some(a)) => (Action::Allow, Some(a.clone())),
            (None, None) => (self.default, None),
        };
        Decision { verdict, rule, dry_run }
    }

    /// Runs the policy's own tests; returns those that failed.
    pub fn run_tests(&self, tests: &[TestCase]) -> Vec<TestFailure> {
        tests
            .iter()
            .filter_map(|t| {
                let headers: Vec<(&str, &str)> =
                    t.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let req = Request {
                    from: &t.from,
                    to: &t.to,
                    port: t.port,
                    method: t.method,
                    path: &t.path,
                    headers: &headers,
                };
                let got = self.evaluate(&req);
                (got.verdict != t.expect).then(|| TestFailure {
                    line: t.line,
                    request: describe(&req),
                    expected: t.expect,
                    got,
                })
            })
            .collect()
    }
}

/// "web -> api:80 GET /v1/items" or "web -> db:5432 (tcp)".
pub fn describe(req: &Request<'_>) -> String {
    match req.method {
        Some(m) => format!("{} -> {}:{} {} {}", req.from, req.to, req.port, m.as_str(), req.path),
        None => format!("{} -> {}:{} (tcp)", req.from, req.to, req.port),
    }
}
