//! The compiled policy: rules grouped by destination service, so a decision looks only at the
//! rules that name its destination, however many rules other services have.
//!
//! Where a request could be read two ways, allow rules take the narrow reading and deny rules
//! the broad one, so that deny wins whichever reading the server behind the mesh takes: an
//! allow rule's header condition must hold for every value of the header, a deny rule's for
//! any; an allow rule matches the method and the path as spelled, a deny rule matches them in
//! any letter case (methods) and however percent-encoded (paths).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::canonical::{CanonicalError, CanonicalRequest, Compare, Method, canonicalize};
use crate::parse::{Action, External, HeaderMatch, HeaderRule, PathMatch, Policy, Protocol, TestCase};
use std::net::Ipv4Addr;

/// A request, or a TCP connection, to decide on.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub port: u16,
    /// The HTTP request in canonical form; `None`: a TCP connection, which only `tcp` rules match.
    pub http: Option<&'a CanonicalRequest<'a>>,
    /// Every header field line as received: the name (compared case-insensitively), the value
    /// as bytes; a header sent twice is two entries.
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> Request<'a> {
    /// A TCP connection.
    pub fn tcp(from: &'a str, to: &'a str, port: u16) -> Request<'a> {
        Request { from, to, port, http: None, headers: &[] }
    }

    /// An HTTP request.
    pub fn http(
        from: &'a str,
        to: &'a str,
        port: u16,
        http: &'a CanonicalRequest<'a>,
        headers: &'a [(&'a str, &'a [u8])],
    ) -> Request<'a> {
        Request { from, to, port, http: Some(http), headers }
    }
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
    /// `None`: any method.
    methods: Option<Methods>,
    paths: Vec<RulePath>,
    /// How `paths` are compared with the request's.
    compare: Compare,
    headers: Vec<HeaderRule>,
    dry_run: bool,
}

/// A [`PathMatch`] ready to compare.
struct RulePath {
    /// Without a trailing `/`.
    text: Box<str>,
    /// Matches what is below `text` too.
    under: bool,
    has_pct: bool,
}

impl RulePath {
    fn new(m: &PathMatch) -> RulePath {
        let (text, under) = m.compiled();
        RulePath { text: Box::from(text), under, has_pct: text.contains('%') }
    }

    fn matches(&self, cmp: Compare, path: &str, path_has_pct: bool) -> bool {
        let has_pct = self.has_pct || path_has_pct;
        if self.under { cmp.under(&self.text, path, has_pct) } else { cmp.exact(&self.text, path, has_pct) }
    }
}

/// The methods of a rule: the standard ones as bits, any other token by name.
struct Methods {
    bits: u16,
    others: Box<[Box<str>]>,
    /// Deny rules: letter case is ignored.
    fold: bool,
}

impl Methods {
    fn new(methods: &BTreeSet<Method<'static>>, fold: bool) -> Methods {
        let mut bits = 0;
        let mut others = Vec::new();
        for m in methods {
            let bit = if fold { Method::folded_bit(m.as_str()) } else { Method::bit(m.as_str()) };
            if bit == 0 {
                others.push(Box::from(m.as_str()));
            }
            bits |= bit;
        }
        Methods { bits, others: others.into(), fold }
    }

    fn contains(&self, req: &CanonicalRequest<'_>) -> bool {
        let bit = if self.fold { req.method_folded_bit } else { req.method_bit };
        if bit != 0 {
            return self.bits & bit != 0;
        }
        let name = req.method().as_str();
        if self.fold {
            self.others.iter().any(|o| o.eq_ignore_ascii_case(name))
        } else {
            self.others.iter().any(|o| **o == *name)
        }
    }
}

/// A value without the spaces and tabs around it (RFC 9110 §5.5: they are not part of it).
fn trim(v: &[u8]) -> &[u8] {
    let ows = |c: &u8| *c == b' ' || *c == b'\t';
    let start = v.iter().position(|c| !ows(c)).unwrap_or(v.len());
    let end = v.iter().rposition(|c| !ows(c)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// The non-empty elements of a value read as a comma-separated list (RFC 9110 §5.6.1).
fn elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|c| *c == b',').map(trim).filter(|e| !e.is_empty())
}

fn holds(m: &HeaderMatch, v: &[u8]) -> bool {
    match m {
        HeaderMatch::Present => true,
        HeaderMatch::Exact(want) => v == want.as_bytes(),
        HeaderMatch::Prefix(want) => v.starts_with(want.as_bytes()),
    }
}

impl Compiled {
    fn matches(&self, req: &Request<'_>) -> bool {
        match &self.from {
            Some(from) if !from.contains(req.from) => return false,
            // `*` is every service: an allow rule names `ingress` to let published ports' clients
            // in, where a deny rule's `*` shuts them out too.
            None if req.from == crate::INGRESS && self.action == Action::Allow => return false,
            _ => {}
        }
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return false;
        }
        let Some(http) = req.http else {
            // A TCP connection: only L4 rules speak of it.
            return self.protocol == Protocol::Tcp;
        };
        if self.protocol == Protocol::Tcp {
            return true;
        }
        if let Some(methods) = &self.methods
            && !methods.contains(http)
        {
            return false;
        }
        if !self.paths.is_empty() {
            // The asterisk and authority forms have no path, and no `paths` entry matches them.
            let Some(path) = http.path() else { return false };
            if !self.paths.iter().any(|p| p.matches(self.compare, path, http.path_has_pct)) {
                return false;
            }
        }
        self.headers.iter().all(|h| self.header_holds(h, req, http))
    }

    /// Deny rules: some value (or some element of a comma-separated value) satisfies the
    /// condition. Allow rules: the header is there and every value satisfies it, and for a
    /// prefix every element of every value too, so repeating or joining values cannot slip a
    /// second value past the rule.
    fn header_holds(&self, h: &HeaderRule, req: &Request<'_>, http: &CanonicalRequest<'_>) -> bool {
        let named = req.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(&h.name)).map(|(_, v)| *v);
        // The authority of an absolute-form (or CONNECT) target names the host as `Host` does.
        let authority = if h.name == "host" { http.authority() } else { None };
        let mut values = named.chain(authority.map(str::as_bytes)).map(trim);
        if self.action == Action::Deny {
            return values.any(|v| {
                holds(&h.matches, v) || (v.contains(&b',') && elements(v).any(|e| holds(&h.matches, e)))
            });
        }
        let mut seen = false;
        for v in values {
            seen = true;
            if !holds(&h.matches, v) {
                return false;
            }
            if matches!(h.matches, HeaderMatch::Prefix(_))
                && v.contains(&b',')
                && !elements(v).all(|e| holds(&h.matches, e))
            {
                return false;
            }
        }
        seen
    }
}

/// A policy compiled for evaluation.
pub struct Engine {
    default: Action,
    by_destination: HashMap<Box<str>, Vec<Compiled>>,
    /// The rules naming destinations outside the mesh.
    egress: Vec<CompiledEgress>,
}

struct CompiledEgress {
    rule: RuleRef,
    action: Action,
    /// `None`: any service.
    from: Option<HashSet<Box<str>>>,
    /// Empty: any port.
    ports: Vec<u16>,
    to: Vec<External>,
    dry_run: bool,
}

/// A connection leaving the mesh, to decide on.
#[derive(Clone, Copy, Debug)]
pub struct EgressRequest<'a> {
    /// The calling workload's service.
    pub from: &'a str,
    pub address: Ipv4Addr,
    pub port: u16,
    /// The names (of `dns:` rules) whose current answers hold `address`.
    pub names: &'a [&'a str],
}

impl EgressRequest<'_> {
    /// "web -> 203.0.113.7:443 (egress)".
    pub fn describe(&self) -> String {
        match self.names {
            [] => format!("{} -> {}:{} (egress)", self.from, self.address, self.port),
            names => {
                format!("{} -> {}:{} ({}, egress)", self.from, self.address, self.port, names.join(", "))
            }
        }
    }
}

/// A policy test that did not get its expected verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestFailure {
    pub line: usize,
    pub request: String,
    pub expected: Action,
    /// For a refused request, a deny by no rule.
    pub got: Decision,
    /// Why the request was refused (the proxy would answer 400), if it was.
    pub refused: Option<CanonicalError>,
}

impl fmt::Display for TestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "test at line {}: {} expected {}, got ", self.line, self.request, self.expected)?;
        match &self.refused {
            Some(e) => write!(f, "refused (400 Bad Request): {e}"),
            None => f.write_str(&self.got.reason()),
        }
    }
}

impl Engine {
    pub fn compile(policy: &Policy) -> Engine {
        let mut by_destination: HashMap<Box<str>, Vec<Compiled>> = HashMap::new();
        let mut egress = Vec::new();
        for r in &policy.rules {
            let rule = RuleRef { name: Arc::from(r.name.as_str()), line: r.line };
            if r.is_egress() {
                egress.push(CompiledEgress {
                    rule,
                    action: r.action,
                    from: r.from.as_ref().map(|f| f.iter().map(|s| Box::from(s.as_str())).collect()),
                    ports: r.ports.iter().copied().collect(),
                    to: r.external(),
                    dry_run: r.dry_run,
                });
                continue;
            }
            let deny = r.action == Action::Deny;
            for to in &r.to {
                by_destination.entry(Box::from(to.as_str())).or_default().push(Compiled {
                    rule: rule.clone(),
                    action: r.action,
                    from: r.from.as_ref().map(|f| f.iter().map(|s| Box::from(s.as_str())).collect()),
                    ports: r.ports.iter().copied().collect(),
                    protocol: r.protocol,
                    methods: (!r.methods.is_empty()).then(|| Methods::new(&r.methods, deny)),
                    paths: r.paths.iter().map(RulePath::new).collect(),
                    compare: Compare { decode: deny, fold: r.paths_ignore_case },
                    headers: r.headers.clone(),
                    dry_run: r.dry_run,
                });
            }
        }
        Engine { default: policy.default, by_destination, egress }
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
            // Published ports are reachable only where a rule names `ingress`, whatever the default.
            (None, None) if req.from == crate::INGRESS => (Action::Deny, None),
            (None, None) => (self.default, None),
        };
        Decision { verdict, rule, dry_run }
    }

    /// Decides on a connection leaving the mesh: an enforced deny that matches wins; else an
    /// enforced allow; else deny, whatever the default (every way out is named by a rule).
    pub fn evaluate_egress(&self, req: &EgressRequest<'_>) -> Decision {
        let mut deny: Option<&RuleRef> = None;
        let mut allow: Option<&RuleRef> = None;
        let mut dry_run = Vec::new();
        for r in &self.egress {
            let from = r.from.as_ref().is_none_or(|f| f.contains(req.from));
            let port = r.ports.is_empty() || r.ports.contains(&req.port);
            if !(from && port && r.to.iter().any(|t| t.holds(req.address, req.names))) {
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
        let (verdict, rule) = match (deny, allow) {
            (Some(d), _) => (Action::Deny, Some(d.clone())),
            (None, Some(a)) => (Action::Allow, Some(a.clone())),
            (None, None) => (Action::Deny, None),
        };
        Decision { verdict, rule, dry_run }
    }

    /// What `source` may reach outside the mesh, coarsely: the names of enforced allow rules for
    /// it, and whether one names a network (then any name may resolve into it). For its DNS.
    pub fn egress_reach(&self, source: &str) -> (BTreeSet<String>, bool) {
        let mut names = BTreeSet::new();
        let mut networks = false;
        for r in self.egress.iter().filter(|r| r.action == Action::Allow && !r.dry_run) {
            if r.from.as_ref().is_some_and(|f| !f.contains(source)) {
                continue;
            }
            for t in &r.to {
                match t {
                    External::Name(n) => {
                        names.insert(n.clone());
                    }
                    External::Net { .. } => networks = true,
                }
            }
        }
        (names, networks)
    }

    /// Every `dns:` name a rule names: what meshd keeps resolved.
    pub fn egress_names(&self) -> BTreeSet<String> {
        self.egress
            .iter()
            .flat_map(|r| r.to.iter())
            .filter_map(|t| match t {
                External::Name(n) => Some(n.clone()),
                External::Net { .. } => None,
            })
            .collect()
    }

    /// Runs the policy's own tests; returns those that failed. A test whose request would be
    /// refused (400) counts as denied.
    pub fn run_tests(&self, tests: &[TestCase]) -> Vec<TestFailure> {
        tests
            .iter()
            .filter_map(|t| {
                let headers: Vec<(&str, &[u8])> =
                    t.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
                if let Some(Ok((address, name))) = crate::parse::egress_test_target(&t.to) {
                    let names: Vec<&str> = name.as_deref().into_iter().collect();
                    let req = EgressRequest { from: &t.from, address, port: t.port, names: &names };
                    let got = self.evaluate_egress(&req);
                    let request = match &name {
                        Some(n) => format!("{} -> dns:{n}:{} (egress)", t.from, t.port),
                        None => req.describe(),
                    };
                    return (got.verdict != t.expect).then_some(TestFailure {
                        line: t.line,
                        request,
                        expected: t.expect,
                        got,
                        refused: None,
                    });
                }
                let canonical = t.method.as_ref().map(|m| canonicalize(m.as_str(), &t.path));
                let (got, refused, request) = match &canonical {
                    Some(Err(e)) => {
                        let got = Decision { verdict: Action::Deny, rule: None, dry_run: Vec::new() };
                        let method = t.method.as_ref().map_or("", |m| m.as_str());
                        let request = format!("{} -> {}:{} {method} {}", t.from, t.to, t.port, t.path);
                        (got, Some(e.clone()), request)
                    }
                    Some(Ok(http)) => {
                        let req = Request::http(&t.from, &t.to, t.port, http, &headers);
                        (self.evaluate(&req), None, describe(&req))
                    }
                    None => {
                        let req = Request::tcp(&t.from, &t.to, t.port);
                        (self.evaluate(&req), None, describe(&req))
                    }
                };
                (got.verdict != t.expect).then_some(TestFailure {
                    line: t.line,
                    request,
                    expected: t.expect,
                    got,
                    refused,
                })
            })
            .collect()
    }
}

/// "web -> api:80 GET /v1/items" (the canonical request decided on) or "web -> db:5432 (tcp)".
pub fn describe(req: &Request<'_>) -> String {
    match req.http {
        Some(http) => format!("{} -> {}:{} {http}", req.from, req.to, req.port),
        None => format!("{} -> {}:{} (tcp)", req.from, req.to, req.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of the issue: nobody deletes everything, web reads and deletes items.
    const POLICY: &str = r#"
[[rule]]
name = "nobody-deletes-everything"
action = "deny"
from = ["*"]
to = ["api"]
methods = ["DELETE"]
paths = ["/v1/items/all"]

[[rule]]
name = "web-changes-items"
action = "allow"
from = ["web"]
to = ["api"]
methods = ["GET", "DELETE"]
paths = ["/v1/items/*"]

[[rule]]
name = "no-admin"
action = "deny"
from = ["*"]
to = ["api"]
paths = ["/admin/*"]
paths_ignore_case = true

[[rule]]
name = "team-reads-reports"
action = "allow"
from = ["web"]
to = ["api"]
methods = ["GET"]
paths = ["/reports/*"]
headers = [{ name = "x-team", prefix = "team-" }, { name = "x-role", exact = "reader" }]

[[rule]]
name = "no-debug"
action = "deny"
from = ["*"]
to = ["api"]
headers = [{ name = "x-debug", exact = "on" }]

[[rule]]
name = "no-evil-host"
action = "deny"
from = ["*"]
to = ["api"]
headers = [{ name = "host", exact = "admin.internal" }]

[[rule]]
name = "no-purge"
action = "deny"
from = ["*"]
to = ["api"]
methods = ["PURGE", "PROPFIND"]

[[rule]]
name = "web-purges-cache"
action = "allow"
from = ["web"]
to = ["api"]
methods = ["PURGE", "BAN"]
paths = ["/cache/*"]
"#;

    /// What the proxy does with a request: refuse it (400), or the verdict and the rule behind.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Outcome {
        Refused,
        Verdict(Action, Option<&'static str>),
    }
    use Outcome::*;

    const DENY_ALL: Outcome = Verdict(Action::Deny, Some("nobody-deletes-everything"));
    const BY_DEFAULT: Outcome = Verdict(Action::Deny, None);

    fn outcome(engine: &Engine, method: &str, target: &str, headers: &[(&str, &[u8])]) -> Outcome {
        let Ok(http) = canonicalize(method, target) else { return Refused };
        let d = engine.evaluate(&Request::http("web", "api", 80, &http, headers));
        const RULES: [&str; 8] = [
            "nobody-deletes-everything",
            "web-changes-items",
            "no-admin",
            "team-reads-reports",
            "no-debug",
            "no-evil-host",
            "no-purge",
            "web-purges-cache",
        ];
        let rule = d.rule.map(|r| *RULES.iter().find(|n| **n == &*r.name).expect("a rule of POLICY"));
        Verdict(d.verdict, rule)
    }

    fn engine() -> Engine {
        Engine::compile(&Policy::parse("p.toml", POLICY).unwrap())
    }

    #[test]
    fn no_spelling_of_delete_all_gets_past_the_deny() {
        let engine = engine();
        let allow = Verdict(Action::Allow, Some("web-changes-items"));
        let long = format!("/v1/items/{}all", "./".repeat(5000));
        let cases: Vec<(&str, &str, Outcome)> = vec![
            ("DELETE", "/v1/items/all", DENY_ALL),
            ("DELETE", "/v1/items//all", DENY_ALL),
            ("DELETE", "//v1//items//all", DENY_ALL),
            ("DELETE", "/v1/items/./all", DENY_ALL),
            ("DELETE", "/v1/items/%2e/all", DENY_ALL),
            ("DELETE", "/v1/items/x/../all", DENY_ALL),
            ("DELETE", "/v1/items/x/%2E%2e/all", DENY_ALL),
            ("DELETE", "/v1/items/%61ll", DENY_ALL),
            ("DELETE", "/v1/items/%61%6C%6c", DENY_ALL),
            ("DELETE", "/v1/%69tems/all", DENY_ALL),
            ("DELETE", "/v1/items/all/", DENY_ALL),
            ("DELETE", "/v1/items/all//", DENY_ALL),
            ("DELETE", "/v1/items/all/.", DENY_ALL),
            ("DELETE", "/v1/items/all?force=1", DENY_ALL),
            ("DELETE", "http://api/v1/items/all", DENY_ALL),
            ("DELETE", "http://elsewhere.example:8080/v1/items/%61ll", DENY_ALL),
            ("DELETE", &long, DENY_ALL),
            // Method case: servers that upper-case methods (Werkzeug does) read these as DELETE.
            ("delete", "/v1/items/all", DENY_ALL),
            ("Delete", "/v1/items//all", DENY_ALL),
            // Refused (400) where servers disagree on the meaning.
            ("DELETE", "/v1/items/all;x", Refused),
            ("DELETE", "/v1/items/all;", Refused),
            ("DELETE", "/v1/items;x/all", Refused),
            ("DELETE", "/v1/items/all%00", Refused),
            ("DELETE", "/v1/items/all%00.json", Refused),
            ("DELETE", "/v1/items/all#x", Refused),
            ("DELETE", "/v1/items/al%zz", Refused),
            ("DELETE", "/v1/items/al%6", Refused),
            ("DELETE", "/v1/items%2Fall", Refused),
            ("DELETE", "/v1/items%2fall", Refused),
            ("DELETE", "/v1/items\\all", Refused),
            ("DELETE", "/v1/items%5call", Refused),
            ("DELETE", "/v1/items/all\t", Refused),
            ("DELETE", "/v1/items/all ", Refused),
            ("DELETE", "/v1/items/%C0%AEall", Refused),
            ("DELETE", "/v1/items/\u{e0}ll", Refused),
            ("DELETE", "v1/items/all", Refused),
            ("DELETE", "", Refused),
            ("DELETE", "ftp://api/v1/items/all", Refused),
            ("DELETE", "http://user@api/v1/items/all", Refused),
            // Still data, not the resource `all`: a double encoding is decoded once.
            ("DELETE", "/v1/items/%2561ll", allow),
            // Other items stay deletable; the prefix is whole segments.
            ("DELETE", "/v1/items/7", allow),
            ("DELETE", "/v1/items/allx", allow),
            ("DELETE", "/v1/items/all/7", allow),
            ("DELETE", "/v1/items", allow),
            ("DELETE", "/v1/itemsX", BY_DEFAULT),
            ("DELETE", "/v1/itemsX/7", BY_DEFAULT),
            // An allow rule matches the method as spelled: `delete` is not `DELETE`.
            ("delete", "/v1/items/7", BY_DEFAULT),
            ("GET", "/v1/items/all", allow),
        ];
        for (method, target, want) in cases {
            let shown = if target.len() > 60 { &target[..60] } else { target };
            assert_eq!(outcome(&engine, method, target, &[]), want, "{method} {shown}");
        }
    }

    #[test]
    fn climbing_out_of_an_allowed_prefix_is_refused_or_denied() {
        let engine = engine();
        let no_admin = Verdict(Action::Deny, Some("no-admin"));
        let cases: Vec<(&str, Outcome)> = vec![
            ("/v1/items/../../admin", no_admin),
            ("/v1/items/../../metrics", BY_DEFAULT),
            ("/v1/items/../../admin/users", no_admin),
            ("/v1/items/%2e%2e/%2e%2e/admin/users", no_admin),
            ("/v1/items/.%2E/.%2e/admin/x", no_admin),
            ("/v1/items/../../../admin", Refused),
            ("/v1/items/..%2f..%2fadmin", Refused),
            ("/v1/items/..%5c..%5cadmin", Refused),
            ("/v1/items/..\\..\\admin", Refused),
            ("/v1/items/..;/..;/admin", Refused),
            ("/v1/items/%252e%252e/%252e%252e/admin", Verdict(Action::Allow, Some("web-changes-items"))),
            ("/v1/items/%c0%ae%c0%ae/admin", Refused),
            ("/v1/items/%u002e%u002e/admin", Refused),
            // `paths_ignore_case` on the deny: `/ADMIN` is `/admin` to a case-insensitive server.
            ("/ADMIN/users", no_admin),
            ("/Admin/", no_admin),
            ("/%41dmin", no_admin),
            ("/admin", no_admin),
            ("/admin/", no_admin),
            ("/administrator", BY_DEFAULT),
        ];
        for (target, want) in cases {
            assert_eq!(outcome(&engine, "GET", target, &[]), want, "GET {target}");
        }
    }

    #[test]
    fn repeated_and_odd_header_values_cannot_satisfy_an_allow_or_dodge_a_deny() {
        let engine = engine();
        let reports = Verdict(Action::Allow, Some("team-reads-reports"));
        let no_debug = Verdict(Action::Deny, Some("no-debug"));
        let no_host = Verdict(Action::Deny, Some("no-evil-host"));
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let cases: Vec<(&str, Headers<'_>, Outcome)> = vec![
            ("/reports/q1", &[("x-team", b"team-7"), ("x-role", b"reader")], reports),
            ("/reports/q1", &[("X-Team", b"team-7"), ("x-role", b" reader\t")], reports),
            ("/reports/q1", &[("x-team", b"team-7"), ("x-role", b"reader"), ("x-role", b"reader")], reports),
            ("/reports/q1", &[("x-team", b"team-7")], BY_DEFAULT),
            // Allow: every value must hold, however the values are sent.
            (
                "/reports/q1",
                &[("x-team", b"team-7"), ("x-role", b"reader"), ("x-role", b"admin")],
                BY_DEFAULT,
            ),
            (
                "/reports/q1",
                &[("x-team", b"team-7"), ("x-role", b"admin"), ("x-role", b"reader")],
                BY_DEFAULT,
            ),
            ("/reports/q1", &[("x-team", b"team-7"), ("x-role", b"reader, admin")], BY_DEFAULT),
            ("/reports/q1", &[("x-team", b"team-7, ops"), ("x-role", b"reader")], BY_DEFAULT),
            ("/reports/q1", &[("x-team", b"team-7"), ("x-team", b"ops"), ("x-role", b"reader")], BY_DEFAULT),
            ("/reports/q1", &[("x-team", b"team-7, team-8"), ("x-role", b"reader")], reports),
            // Not visible ASCII: compared as bytes, never skipped.
            (
                "/reports/q1",
                &[("x-team", b"team-7"), ("x-role", b"reader"), ("x-role", b"r\xe9ader")],
                BY_DEFAULT,
            ),
            ("/reports/q1", &[("x-team", b"team-\xff"), ("x-role", b"reader")], reports),
            ("/reports/q1", &[("x-team", b"\xffteam-7"), ("x-role", b"reader")], BY_DEFAULT),
            // Deny: any value, or any element of a list value, is enough.
            ("/v1/items/1", &[("x-debug", b"on")], no_debug),
            ("/v1/items/1", &[("x-debug", b"off"), ("x-debug", b"on")], no_debug),
            ("/v1/items/1", &[("x-debug", b"on"), ("x-debug", b"off")], no_debug),
            ("/v1/items/1", &[("x-debug", b"off, on")], no_debug),
            ("/v1/items/1", &[("x-debug", b"\xff"), ("x-debug", b" on ")], no_debug),
            ("/v1/items/1", &[("X-DEBUG", b"on")], no_debug),
            ("/v1/items/1", &[("x-debug", b"onx")], Verdict(Action::Allow, Some("web-changes-items"))),
            ("/v1/items/1", &[("x-debug", b"o\x00n")], Verdict(Action::Allow, Some("web-changes-items"))),
            // The authority of an absolute-form target is a host too.
            ("/v1/items/1", &[("host", b"api"), ("host", b"admin.internal")], no_host),
            ("http://admin.internal/v1/items/1", &[("host", b"api")], no_host),
        ];
        for (target, headers, want) in cases {
            assert_eq!(outcome(&engine, "GET", target, headers), want, "GET {target} {headers:?}");
        }
    }

    #[test]
    fn any_method_token_is_decided_by_the_rules() {
        let engine = engine();
        let no_purge = Verdict(Action::Deny, Some("no-purge"));
        let purges = Verdict(Action::Allow, Some("web-purges-cache"));
        let cases: Vec<(&str, &str, Outcome)> = vec![
            ("PURGE", "/cache/x", no_purge),
            ("purge", "/cache/x", no_purge),
            ("PropFind", "/", no_purge),
            ("BAN", "/cache/x", purges),
            ("ban", "/cache/x", BY_DEFAULT),
            ("BREW", "/v1/items/7", BY_DEFAULT),
            ("M-SEARCH", "/v1/items/7", BY_DEFAULT),
            ("DELETE", "/cache/x", BY_DEFAULT),
            ("GET\u{0}", "/", Refused),
            ("GE T", "/", Refused),
            ("", "/", Refused),
            // A method no rule names still meets the deny rules that name no method.
            ("BREW", "/admin/x", Verdict(Action::Deny, Some("no-admin"))),
            ("X-ANY", "/v1/items/1", Verdict(Action::Deny, Some("no-debug"))),
        ];
        for (method, target, want) in cases {
            let headers: &[(&str, &[u8])] = if method == "X-ANY" { &[("x-debug", b"on")] } else { &[] };
            assert_eq!(outcome(&engine, method, target, headers), want, "{method} {target}");
        }
    }

    #[test]
    fn targets_without_a_path_meet_only_rules_without_paths() {
        let engine = engine();
        let cases: Vec<(&str, &str, Outcome)> = vec![
            ("OPTIONS", "*", BY_DEFAULT),
            ("CONNECT", "api:443", BY_DEFAULT),
            ("PURGE", "*", Refused),
            ("PROPFIND", "api:443", Refused),
        ];
        for (method, target, want) in cases {
            assert_eq!(outcome(&engine, method, target, &[]), want, "{method} {target}");
        }
        let headers: &[(&str, &[u8])] = &[("x-debug", b"on")];
        assert_eq!(outcome(&engine, "OPTIONS", "*", headers), Verdict(Action::Deny, Some("no-debug")));
    }

    #[test]
    fn describe_shows_the_canonical_request_decided_on() {
        let http = canonicalize("DELETE", "/v1/items//./%61ll?force=1").unwrap();
        assert_eq!(
            describe(&Request::http("web", "api", 80, &http, &[])),
            "web -> api:80 DELETE /v1/items/all?force=1"
        );
        assert_eq!(describe(&Request::tcp("api", "db", 5432)), "api -> db:5432 (tcp)");
    }

    #[test]
    fn policy_tests_may_send_repeated_headers_and_count_a_refusal_as_a_deny() {
        let text = format!(
            "{POLICY}
[[test]]
from = \"web\"
to = \"api\"
port = 80
method = \"GET\"
path = \"/reports/q1\"
headers = {{ \"x-team\" = \"team-7\", \"x-role\" = [\"reader\", \"admin\"] }}
expect = \"deny\"

[[test]]
from = \"web\"
to = \"api\"
port = 80
method = \"DELETE\"
path = \"/v1/items/all;x\"
expect = \"deny\"

[[test]]
from = \"web\"
to = \"api\"
port = 80
method = \"DELETE\"
path = \"/v1/items/7;x\"
expect = \"allow\"
"
        );
        let policy = Policy::parse("p.toml", &text).unwrap();
        assert_eq!(policy.tests[0].headers.len(), 3);
        let failures = Engine::compile(&policy).run_tests(&policy.tests);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(
            failures[0].to_string(),
            format!(
                "test at line {}: web -> api:80 DELETE /v1/items/7;x expected allow, got refused (400 Bad Request): `;` path parameters are refused (servers disagree on what they mean), at byte 11",
                policy.tests[2].line
            )
        );
    }
}
