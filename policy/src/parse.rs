//! Reading a policy file: TOML into a validated [`Policy`], every error naming the file, line and
//! column, the value, and what is allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::canonical::{self, Compare, Method};

/// A policy error at a place in a file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// What a rule inspects: HTTP requests (methods, paths, headers) or TCP connections (L4 only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

/// A path pattern, in canonical form (see [`canonical::canonical_path`]): exact, or a prefix
/// written with a trailing `/*`. A trailing `/` never matters: `/a/b` and `/a/b/` are one path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathMatch {
    /// Matches this path, with or without a trailing `/`.
    Exact(String),
    /// `/v1/items/*` is stored as `/v1/items/` and matches `/v1/items`, `/v1/items/` and every
    /// path below `/v1/items/`; never `/v1/itemsX`.
    Prefix(String),
}

impl PathMatch {
    /// Whether the canonical `path` is one this pattern names, spelled as the pattern spells it
    /// and in the same case: how allow rules match. Deny rules match more spellings (see the
    /// engine and `README.md`).
    pub fn matches(&self, path: &str) -> bool {
        let (pattern, under) = self.compiled();
        let spelled = Compare { decode: false, fold: false };
        if under { spelled.under(pattern, path, true) } else { spelled.exact(pattern, path, true) }
    }

    /// The pattern as compared: without a trailing `/` (`/v1/items/*` is `/v1/items`, `/*` and
    /// `/` are empty), and whether it names what is below it too.
    pub(crate) fn compiled(&self) -> (&str, bool) {
        match self {
            PathMatch::Exact(p) => (canonical::strip_slash(p), false),
            PathMatch::Prefix(p) => (canonical::strip_slash(p), true),
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(p) => f.write_str(p),
            PathMatch::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// How a header must look.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HeaderMatch {
    Present,
    Exact(String),
    Prefix(String),
}

/// A header condition of a rule; the name is lower-case.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderRule {
    pub name: String,
    pub matches: HeaderMatch,
}

/// A destination outside the mesh, as a rule's `to` names it: `cidr:A.B.C.D/N` (the addresses of
/// a network) or `dns:NAME` (the addresses NAME resolves to now, as meshd resolves it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum External {
    Net { network: Ipv4Addr, prefix_len: u8 },
    Name(String),
}

impl External {
    /// Reads `cidr:...` or `dns:...`; `None` for anything else (a service's name); an error for
    /// a malformed one.
    pub fn parse(text: &str) -> Option<Result<External, String>> {
        if let Some(cidr) = text.strip_prefix("cidr:") {
            return Some(parse_cidr(cidr));
        }
        let name = text.strip_prefix("dns:")?;
        Some(if valid_dns_name(name) {
            Ok(External::Name(name.to_owned()))
        } else {
            Err(format!(
                "`{text}`: a DNS name is lower-case labels of a-z, 0-9 and `-`, at least two, without a trailing dot"
            ))
        })
    }

    /// Whether `address` is one this destination names: in the network, or among `names` (the
    /// names whose current answers hold `address`).
    pub fn holds(&self, address: Ipv4Addr, names: &[&str]) -> bool {
        match self {
            External::Net { network, prefix_len } => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix_len)).unwrap_or(0);
                u32::from(address) & mask == u32::from(*network)
            }
            External::Name(n) => names.contains(&n.as_str()),
        }
    }
}

impl fmt::Display for External {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            External::Net { network, prefix_len } => write!(f, "cidr:{network}/{prefix_len}"),
            External::Name(n) => write!(f, "dns:{n}"),
        }
    }
}

fn parse_cidr(text: &str) -> Result<External, String> {
    let bad = || format!("`cidr:{text}` is not an IPv4 network A.B.C.D/N");
    let (address, len) = text.split_once('/').ok_or_else(bad)?;
    let network: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix_len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
    if u32::from(network) & !mask != 0 {
        let base = Ipv4Addr::from(u32::from(network) & mask);
        return Err(format!("`cidr:{text}` has host bits set: did you mean `cidr:{base}/{prefix_len}`?"));
    }
    Ok(External::Net { network, prefix_len })
}

/// A DNS name a rule may name: lower case, at least two labels, no trailing dot.
fn valid_dns_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Line of the rule's `[[rule]]` header in its file.
    pub line: usize,
    pub action: Action,
    /// `None`: any source (`*`).
    pub from: Option<BTreeSet<String>>,
    pub to: BTreeSet<String>,
    /// Empty: any port.
    pub ports: BTreeSet<u16>,
    pub protocol: Protocol,
    /// Empty: any method.
    pub methods: BTreeSet<Method<'static>>,
    /// Empty: any path.
    pub paths: Vec<PathMatch>,
    /// `paths` compare ASCII letters case-insensitively (for servers that do).
    pub paths_ignore_case: bool,
    pub headers: Vec<HeaderRule>,
    pub dry_run: bool,
}

impl Rule {
    /// The destinations outside the mesh this rule names (an egress rule names only those).
    pub fn external(&self) -> Vec<External> {
        self.to.iter().filter_map(|t| External::parse(t)?.ok()).collect()
    }

    /// Whether this rule is about traffic leaving the mesh.
    pub fn is_egress(&self) -> bool {
        self.to.iter().any(|t| External::parse(t).is_some())
    }
}

/// A test carried in the policy: a request and the verdict it must get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    pub line: usize,
    pub from: String,
    pub to: String,
    pub port: u16,
    /// `None` for a TCP connection.
    pub method: Option<Method<'static>>,
    /// The request-target as a client would send it; canonicalised when the test runs, and a
    /// target that is refused counts as denied.
    pub path: String,
    /// Lower-case names; a header given several values appears once per value, in order.
    pub headers: Vec<(String, String)>,
    pub expect: Action,
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub file: String,
    pub default: Action,
    pub rules: Vec<Rule>,
    pub tests: Vec<TestCase>,
}

// The file as written. Every field a user writes is spanned so errors can point at it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<String>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    action: Spanned<String>,
    from: Spanned<Vec<Spanned<String>>>,
    to: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    ports: Vec<Spanned<i64>>,
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    paths_ignore_case: Option<Spanned<bool>>,
    #[serde(default)]
    headers: Vec<Spanned<RawHeader>>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: Spanned<String>,
    present: Option<bool>,
    exact: Option<String>,
    prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Spanned<String>,
    to: Spanned<String>,
    port: Spanned<i64>,
    method: Option<Spanned<String>>,
    #[serde(default = "root")]
    path: Spanned<String>,
    #[serde(default)]
    headers: BTreeMap<String, RawValues>,
    expect: Spanned<String>,
}

/// A test header's value, or its values when the header is sent more than once.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a header value is a string, or an array of strings for a header sent more than once"
)]
enum RawValues {
    One(String),
    Many(Vec<String>),
}

fn root() -> Spanned<String> {
    Spanned::new(0..0, "/".to_owned())
}

/// Turns byte offsets into 1-based lines and columns.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
        PolicyError { file: self.file.to_owned(), line, column, message: message.into() }
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.at(span.clone(), "").line
    }
}

/// A test's destination outside the mesh: an IPv4 address, or `dns:NAME` (an address NAME resolves
/// to); `None` for a service.
pub(crate) fn egress_test_target(to: &str) -> Option<Result<(Ipv4Addr, Option<String>), String>> {
    if let Ok(address) = to.parse::<Ipv4Addr>() {
        return Some(Ok((address, None)));
    }
    match External::parse(to)? {
        Ok(External::Name(n)) => Some(Ok((Ipv4Addr::UNSPECIFIED, Some(n)))),
        Ok(External::Net { .. }) => {
            Some(Err(format!("`{to}`: a test names one address (A.B.C.D) or `dns:NAME`, not a network")))
        }
        Err(e) => Some(Err(e)),
    }
}

/// A valid service name: 1-63 of a-z, 0-9, `-`, starting with a letter (as control requires).
fn valid_service(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

fn action(loc: &Locator<'_>, value: &Spanned<String>) -> Result<Action, PolicyError> {
    match value.get_ref().as_str() {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(loc.at(value.span(), format!("unknown action `{other}`: expected `allow` or `deny`"))),
    }
}

fn port(loc: &Locator<'_>, value: &Spanned<i64>) -> Result<u16, PolicyError> {
    u16::try_from(*value.get_ref()).ok().filter(|p| *p != 0).ok_or_else(|| {
        loc.at(value.span(), format!("port `{}` is out of range: expected 1-65535", value.get_ref()))
    })
}

fn method(loc: &Locator<'_>, value: &Spanned<String>) -> Result<Method<'static>, PolicyError> {
    Method::parse(value.get_ref()).map(Method::into_owned).map_err(|_| {
        loc.at(
            value.span(),
            format!(
                "method `{}` is not an HTTP token: 1 or more of A-Z a-z 0-9 !#$%&'*+-.^_`|~ (case-sensitive: `GET`, `PURGE`)",
                value.get_ref().escape_debug()
            ),
        )
    })
}

/// A rule path: canonical (as requests are made canonical before rules see them), or a parse
/// error that says how to write it.
fn path_pattern(loc: &Locator<'_>, value: &Spanned<String>) -> Result<PathMatch, PolicyError> {
    let p = value.get_ref();
    let bad = |why: &str| loc.at(value.span(), format!("path `{}` is not valid: {why}", p.escape_debug()));
    if !p.starts_with('/') {
        return Err(bad("a path starts with `/`"));
    }
    if p.contains('?') {
        return Err(bad("a rule path has no query"));
    }
    let (written, star) = match p.find('*') {
        None => (p.as_str(), false),
        Some(i) if i == p.len() - 1 && p.ends_with("/*") => (&p[..i], true),
        Some(_) => {
            return Err(bad(
                "`*` may only end a path, after a `/`, as in `/v1/items/*` (`%2A` is a literal `*`)",
            ));
        }
    };
    match canonical::canonical_path(written) {
        Ok(c) if c == written => {}
        Ok(c) => {
            let star = if star { "*" } else { "" };
            return Err(loc.at(
                value.span(),
                format!(
                    "path `{p}` is not canonical: write `{c}{star}` (requests are matched in canonical form)"
                ),
            ));
        }
        Err(e) => return Err(bad(&e.to_string())),
    }
    Ok(if star { PathMatch::Prefix(written.to_owned()) } else { PathMatch::Exact(written.to_owned()) })
}

impl Policy {
    /// Parses and validates `text`, read from `file` (used in error messages).
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let loc = Locator { file, text };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            loc.at(span, e.message().trim().to_owned())
        })?;
        let default = match &raw.default {
            Some(d) => action(&loc, d)?,
            None => Action::Deny,
        };
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut rules = Vec::new();
        for spanned in &raw.rule {
            let line = loc.line(&spanned.span());
            let r = spanned.get_ref();
            let name = r.name.get_ref().clone();
            if name.is_empty()
                || name.len() > 63
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(loc.at(
                    r.name.span(),
                    format!("rule name `{name}` is not valid: 1-63 characters of a-z, A-Z, 0-9, `-`, `_`"),
                ));
            }
            if let Some(first) = names.insert(name.clone(), line) {
                return Err(loc
                    .at(r.name.span(), format!("rule name `{name}` is used twice (first at line {first})")));
            }
            let from = if r.from.get_ref().iter().any(|s| s.get_ref() == "*") {
                if r.from.get_ref().len() > 1 {
                    return Err(loc.at(r.from.span(), "`*` stands for every service; list it alone"));
                }
                None
            } else {
                if r.from.get_ref().is_empty() {
                    return Err(
                        loc.at(r.from.span(), "`from` is empty: list source services, or `*` for any")
                    );
                }
                Some(services(&loc, r.from.get_ref())?)
            };
            if r.to.get_ref().is_empty() {
                return Err(loc.at(r.to.span(), "`to` is empty: list the destination services"));
            }
            if let Some(star) = r.to.get_ref().iter().find(|s| s.get_ref() == "*") {
                return Err(
                    loc.at(star.span(), "`to` names destination services; `*` is allowed only in `from`")
                );
            }
            if let Some(ingress) = r.to.get_ref().iter().find(|s| s.get_ref() == crate::INGRESS) {
                return Err(loc.at(
                    ingress.span(),
                    "`ingress` stands for published ports' clients; it is a source, never a destination",
                ));
            }
            let external: Vec<&Spanned<String>> =
                r.to.get_ref().iter().filter(|t| External::parse(t.get_ref()).is_some()).collect();
            let egress = !external.is_empty();
            let to = if egress {
                if external.len() != r.to.get_ref().len() {
                    return Err(loc.at(
                        r.to.span(),
                        "`to` names services or destinations outside the mesh (`cidr:`, `dns:`), not both",
                    ));
                }
                let mut to = BTreeSet::new();
                for t in external {
                    let parsed =
                        External::parse(t.get_ref()).expect("external").map_err(|e| loc.at(t.span(), e))?;
                    to.insert(parsed.to_string());
                }
                if from.as_ref().is_some_and(|f| f.contains(crate::INGRESS)) {
                    return Err(loc.at(
                        r.from.span(),
                        "`ingress` cannot leave the mesh: egress rules are for services",
                    ));
                }
                to
            } else {
                services(&loc, r.to.get_ref())?
            };
            let protocol = match &r.protocol {
                // What leaves the mesh is decided per connection: its HTTP (usually TLS) is not read.
                None if egress => Protocol::Tcp,
                Some(p) if egress && p.get_ref() != "tcp" => {
                    return Err(loc.at(
                        p.span(),
                        "a rule for destinations outside the mesh is `protocol = \"tcp\"`: its connections are decided, not their requests",
                    ));
                }
                None => Protocol::Http,
                Some(p) => match p.get_ref().as_str() {
                    "http" => Protocol::Http,
                    "tcp" => Protocol::Tcp,
                    other => {
                        return Err(
                            loc.at(p.span(), format!("unknown protocol `{other}`: expected `http` or `tcp`"))
                        );
                    }
                },
            };
            let methods = r.methods.iter().map(|m| method(&loc, m)).collect::<Result<BTreeSet<_>, _>>()?;
            let paths = r.paths.iter().map(|p| path_pattern(&loc, p)).collect::<Result<Vec<_>, _>>()?;
            let paths_ignore_case = match &r.paths_ignore_case {
                Some(v) if *v.get_ref() && paths.is_empty() => {
                    return Err(loc.at(v.span(), "`paths_ignore_case` needs `paths`"));
                }
                Some(v) => *v.get_ref(),
                None => false,
            };
            let mut headers = Vec::new();
            for h in &r.headers {
                let raw = h.get_ref();
                let hname = raw.name.get_ref().to_ascii_lowercase();
                if !valid_header_name(&hname) {
                    return Err(loc.at(
                        raw.name.span(),
                        format!("header name `{}` is not a valid HTTP header name", raw.name.get_ref()),
                    ));
                }
                // Values are compared without the spaces around them (as servers read them), so a
                // condition that has some could never hold.
                let ows = |c: char| c == ' ' || c == '\t';
                if let Some(v) = raw.exact.as_ref().filter(|v| v.starts_with(ows) || v.ends_with(ows)) {
                    return Err(loc.at(
                        h.span(),
                        format!("header `{hname}`: `exact = {v:?}` cannot start or end with a space or tab"),
                    ));
                }
                if let Some(v) = raw.prefix.as_ref().filter(|v| v.starts_with(ows)) {
                    return Err(loc.at(
                        h.span(),
                        format!("header `{hname}`: `prefix = {v:?}` cannot start with a space or tab"),
                    ));
                }
                let matches = match (raw.present, &raw.exact, &raw.prefix) {
                    (Some(true), None, None) => HeaderMatch::Present,
                    (None, Some(v), None) => HeaderMatch::Exact(v.clone()),
                    (None, None, Some(v)) => HeaderMatch::Prefix(v.clone()),
                    _ => {
                        return Err(loc.at(
                            h.span(),
                            format!("header `{hname}` needs exactly one of `present = true`, `exact = \"...\"`, `prefix = \"...\"`"),
                        ));
                    }
                };
                headers.push(HeaderRule { name: hname, matches });
            }
            if protocol == Protocol::Tcp && (!methods.is_empty() || !paths.is_empty() || !headers.is_empty())
            {
                return Err(loc.at(
                    spanned.span(),
                    format!(
                        "rule `{name}` is `protocol = \"tcp\"`: it cannot match methods, paths or headers"
                    ),
                ));
            }
            rules.push(Rule {
                name,
                line,
                action: action(&loc, &r.action)?,
                from,
                to,
                ports: r.ports.iter().map(|p| port(&loc, p)).collect::<Result<_, _>>()?,
                protocol,
                methods,
                paths,
                paths_ignore_case,
                headers,
                dry_run: r.dry_run,
            });
        }
        let mut tests = Vec::new();
        for spanned in &raw.test {
            let t = spanned.get_ref();
            let egress = egress_test_target(t.to.get_ref());
            if let Some(Err(e)) = &egress {
                return Err(loc.at(t.to.span(), e.clone()));
            }
            if egress.is_some() && t.method.is_some() {
                return Err(loc.at(
                    spanned.span(),
                    "a test of a connection leaving the mesh has no `method`: connections are decided, not requests",
                ));
            }
            let checked: &[&Spanned<String>] = if egress.is_some() { &[&t.from] } else { &[&t.from, &t.to] };
            for s in checked {
                if !valid_service(s.get_ref()) {
                    return Err(loc.at(
                        s.span(),
                        format!(
                            "service name `{}` is not valid: 1-63 characters of a-z, 0-9, `-`",
                            s.get_ref()
                        ),
                    ));
                }
            }
            let expect = action(&loc, &t.expect)?;
            let path = t.path.get_ref().clone();
            let mut headers = Vec::new();
            for (name, values) in &t.headers {
                let name = name.to_ascii_lowercase();
                match values {
                    RawValues::One(v) => headers.push((name, v.clone())),
                    RawValues::Many(vs) => headers.extend(vs.iter().map(|v| (name.clone(), v.clone()))),
                }
            }
            tests.push(TestCase {
                line: loc.line(&spanned.span()),
                from: t.from.get_ref().clone(),
                to: t.to.get_ref().clone(),
                port: port(&loc, &t.port)?,
                method: t.method.as_ref().map(|m| method(&loc, m)).transpose()?,
                path,
                headers,
                expect,
            });
        }
        Ok(Policy { file: file.to_owned(), default, rules, tests })
    }

    /// Checks every service named in the policy against the cluster's services; suggests the
    /// closest name when one is near.
    pub fn validate_services(&self, text: &str, known: &BTreeSet<String>) -> Result<(), PolicyError> {
        let loc = Locator { file: &self.file, text };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| loc.at(e.span().unwrap_or(0..0), e.message().to_owned()))?;
        let mut named: Vec<&Spanned<String>> = Vec::new();
        for r in &raw.rule {
            named.extend(r.get_ref().from.get_ref().iter().filter(|s| s.get_ref() != "*"));
            named.extend(r.get_ref().to.get_ref().iter().filter(|t| External::parse(t.get_ref()).is_none()));
        }
        for t in &raw.test {
            named.push(&t.get_ref().from);
            if egress_test_target(t.get_ref().to.get_ref()).is_none() {
                named.push(&t.get_ref().to);
            }
        }
        for s in named {
            let name = s.get_ref();
            if !known.contains(name) && name != crate::INGRESS {
                let closest =
                    known.iter().map(|k| (strsim::levenshtein(k, name), k)).filter(|(d, _)| *d <= 2).min();
                let hint = match closest {
                    Some((_, k)) => format!("; did you mean `{k}`?"),
                    None if known.is_empty() => "; the cluster has no services".to_owned(),
                    None => String::new(),
                };
                return Err(loc.at(s.span(), format!("service `{name}` does not exist{hint}")));
            }
        }
        Ok(())
    }

    /// Every service a rule names as a destination.
    pub fn destinations(&self) -> BTreeSet<&str> {
        self.rules.iter().flat_map(|r| r.to.iter().map(String::as_str)).collect()
    }

    /// The same policy with only the rules whose destinations include one of `services`, and the
    /// egress rules whose sources do, and no tests: what a node hosting those services needs, and
    /// no more.
    pub fn restricted_to(&self, services: &BTreeSet<String>) -> Policy {
        let needed = |r: &&Rule| {
            r.to.iter().any(|t| services.contains(t))
                || (r.is_egress() && r.from.as_ref().is_none_or(|f| f.iter().any(|s| services.contains(s))))
        };
        Policy {
            file: self.file.clone(),
            default: self.default,
            rules: self.rules.iter().filter(needed).cloned().collect(),
            tests: Vec::new(),
        }
    }

    /// Writes the policy back as TOML that [`Policy::parse`] reads to the same rules (tests
    /// omitted). Used to send a node its rules.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct OutPolicy<'a> {
            default: Action,
            rule: Vec<OutRule<'a>>,
        }
        #[derive(Serialize)]
        struct OutRule<'a> {
            name: &'a str,
            action: Action,
            from: Vec<&'a str>,
            to: Vec<&'a str>,
            ports: Vec<u16>,
            protocol: Protocol,
            methods: Vec<&'a str>,
            paths: Vec<String>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            paths_ignore_case: bool,
            headers: Vec<BTreeMap<&'static str, toml::Value>>,
            dry_run: bool,
        }
        let rule = self
            .rules
            .iter()
            .map(|r| OutRule {
                name: &r.name,
                action: r.action,
                from: r.from.as_ref().map_or(vec!["*"], |f| f.iter().map(String::as_str).collect()),
                to: r.to.iter().map(String::as_str).collect(),
                ports: r.ports.iter().copied().collect(),
                protocol: r.protocol,
                methods: r.methods.iter().map(|m| m.as_str()).collect(),
                paths: r.paths.iter().map(|p| p.to_string()).collect(),
                paths_ignore_case: r.paths_ignore_case,
                headers: r
                    .headers
                    .iter()
                    .map(|h| {
                        let mut m = BTreeMap::new();
                        m.insert("name", toml::Value::String(h.name.clone()));
                        match &h.matches {
                            HeaderMatch::Present => m.insert("present", toml::Value::Boolean(true)),
                            HeaderMatch::Exact(v) => m.insert("exact", toml::Value::String(v.clone())),
                            HeaderMatch::Prefix(v) => m.insert("prefix", toml::Value::String(v.clone())),
                        };
                        m
                    })
                    .collect(),
                dry_run: r.dry_run,
            })
            .collect();
        toml::to_string(&OutPolicy { default: self.default, rule }).expect("a policy serializes")
    }
}

fn services(loc: &Locator<'_>, list: &[Spanned<String>]) -> Result<BTreeSet<String>, PolicyError> {
    let mut out = BTreeSet::new();
    for s in list {
        if !valid_service(s.get_ref()) {
            return Err(loc.at(
                s.span(),
                format!("service name `{}` is not valid: 1-63 characters of a-z, 0-9, `-`, starting with a letter", s.get_ref()),
            ));
        }
        out.insert(s.get_ref().clone());
    }
    Ok(out)
}
