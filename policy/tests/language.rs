//! The policy language: parsing, line-precise errors, evaluation, tests in the policy.

use std::collections::BTreeSet;

use policy::{Action, Engine, Policy, Request, canonicalize};

const EXAMPLE: &str = r#"
default = "deny"

[[rule]]
name = "web-reads-items"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["GET", "HEAD"]
paths = ["/v1/items", "/v1/items/*"]

[[rule]]
name = "admins-write"
action = "allow"
from = ["web"]
to = ["api"]
methods = ["POST", "DELETE"]
paths = ["/v1/items/*"]
headers = [{ name = "X-Role", exact = "admin" }]

[[rule]]
name = "no-internal"
action = "deny"
from = ["*"]
to = ["api"]
paths = ["/internal/*"]

[[rule]]
name = "db-from-api"
action = "allow"
from = ["api"]
to = ["db"]
ports = [5432]
protocol = "tcp"

[[rule]]
name = "try-tracing"
action = "deny"
from = ["*"]
to = ["api"]
headers = [{ name = "x-debug", present = true }]
dry_run = true

[[test]]
from = "web"
to = "api"
port = 80
method = "GET"
path = "/v1/items/7"
expect = "allow"

[[test]]
from = "web"
to = "api"
port = 80
method = "DELETE"
path = "/v1/items/7"
expect = "deny"
"#;

/// An HTTP request as a client sends it.
struct Http<'a> {
    from: &'a str,
    to: &'a str,
    port: u16,
    method: &'a str,
    target: &'a str,
    headers: &'a [(&'a str, &'a [u8])],
}

fn get<'a>(
    from: &'a str,
    to: &'a str,
    port: u16,
    method: &'a str,
    target: &'a str,
    headers: &'a [(&'a str, &'a [u8])],
) -> Http<'a> {
    Http { from, to, port, method, target, headers }
}

/// Canonicalises `r` and decides on it.
fn decide(engine: &Engine, r: &Http<'_>) -> (policy::Decision, String) {
    let http = canonicalize(r.method, r.target).unwrap();
    let req = Request::http(r.from, r.to, r.port, &http, r.headers);
    (engine.evaluate(&req), policy::describe(&req))
}

#[test]
fn the_example_parses_and_its_tests_pass() {
    let policy = Policy::parse("example.toml", EXAMPLE).unwrap();
    assert_eq!(policy.rules.len(), 5);
    assert_eq!(policy.rules[0].line, 4, "a rule knows its line");
    let engine = Engine::compile(&policy);
    assert!(engine.run_tests(&policy.tests).is_empty());
}

#[test]
fn the_shipped_example_parses_and_its_tests_pass() {
    let text = include_str!("../../examples/policy.toml");
    let policy = Policy::parse("examples/policy.toml", text).unwrap();
    let failures = Engine::compile(&policy).run_tests(&policy.tests);
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn decisions_follow_the_rules() {
    let engine = Engine::compile(&Policy::parse("p.toml", EXAMPLE).unwrap());
    let admin: [(&str, &[u8]); 1] = [("x-role", b"admin")];
    let debug: [(&str, &[u8]); 1] = [("x-debug", b"1")];
    let cases: Vec<(Http<'_>, Action, Option<&str>)> = vec![
        (get("web", "api", 80, "GET", "/v1/items", &[]), Action::Allow, Some("web-reads-items")),
        (get("web", "api", 80, "GET", "/v1/items/7", &[]), Action::Allow, Some("web-reads-items")),
        (get("web", "api", 80, "GET", "/v1/itemsX", &[]), Action::Deny, None),
        (get("web", "api", 8080, "GET", "/v1/items", &[]), Action::Deny, None),
        (get("web", "api", 80, "POST", "/v1/items", &[]), Action::Deny, None),
        (get("web", "api", 80, "DELETE", "/v1/items/7", &[]), Action::Deny, None),
        (get("web", "api", 80, "DELETE", "/v1/items/7", &admin), Action::Allow, Some("admins-write")),
        (get("other", "api", 80, "GET", "/v1/items", &[]), Action::Deny, None),
        // Deny wins over an allow that also matches.
        (get("web", "api", 80, "POST", "/internal/x", &admin), Action::Deny, Some("no-internal")),
        // A dry-run deny changes nothing.
        (get("web", "api", 80, "GET", "/v1/items", &debug), Action::Allow, Some("web-reads-items")),
        // A tcp rule allows requests on its port too.
        (get("api", "db", 5432, "GET", "/", &[]), Action::Allow, Some("db-from-api")),
    ];
    for (req, verdict, rule) in cases {
        let (d, described) = decide(&engine, &req);
        assert_eq!(d.verdict, verdict, "{described}");
        assert_eq!(d.rule.as_ref().map(|r| &*r.name), rule, "{described}");
    }
    let (d, _) = decide(&engine, &get("web", "api", 80, "GET", "/v1/items", &debug));
    assert_eq!(d.dry_run.len(), 1);
    assert_eq!((&*d.dry_run[0].0.name, d.dry_run[0].1), ("try-tracing", Action::Deny));
    // TCP connections: only tcp rules.
    let tcp = Request::tcp;
    assert_eq!(engine.evaluate(&tcp("api", "db", 5432)).verdict, Action::Allow);
    assert_eq!(engine.evaluate(&tcp("web", "db", 5432)).verdict, Action::Deny);
    assert_eq!(
        engine.evaluate(&tcp("web", "api", 80)).verdict,
        Action::Deny,
        "http rules never match a raw connection"
    );
    assert_eq!(engine.evaluate(&tcp("web", "api", 80)).reason(), "deny by default");
}

#[test]
fn a_default_of_allow_applies_when_nothing_matches() {
    let p = Policy::parse("p.toml", "default = \"allow\"\n").unwrap();
    let e = Engine::compile(&p);
    assert_eq!(decide(&e, &get("a", "b", 1, "GET", "/", &[])).0.verdict, Action::Allow);
    let p = Policy::parse("p.toml", "").unwrap();
    assert_eq!(p.default, Action::Deny, "deny unless said otherwise");
}

#[test]
fn errors_name_file_line_column_value_and_what_is_allowed() {
    let rule = |body: &str| {
        format!(
            "default = \"deny\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"api\"]\n{body}\n"
        )
    };
    let cases: Vec<(String, usize, usize, &str)> = vec![
        (rule("methods = [\"GET\", \"G T\"]"), 7, 19, "method `G T` is not an HTTP token"),
        (rule("methods = [\"GET/\"]"), 7, 12, "method `GET/` is not an HTTP token"),
        (rule("methods = [\"\"]"), 7, 12, "method `` is not an HTTP token"),
        (rule("ports = [70000]"), 7, 10, "port `70000` is out of range"),
        (rule("paths = [\"v1\"]"), 7, 10, "path `v1` is not valid: a path starts with `/`"),
        (rule("paths = [\"/a/*/b\"]"), 7, 10, "`*` may only end a path"),
        // Rule paths are written in canonical form.
        (rule("paths = [\"/v1//items\"]"), 7, 10, "path `/v1//items` is not canonical: write `/v1/items`"),
        (rule("paths = [\"/v1/./items/*\"]"), 7, 10, "is not canonical: write `/v1/items/*`"),
        (rule("paths = [\"/v1/x/../items\"]"), 7, 10, "is not canonical: write `/v1/items`"),
        (rule("paths = [\"/v1/%69tems\"]"), 7, 10, "is not canonical: write `/v1/items`"),
        (rule("paths = [\"/a%c3%a9\"]"), 7, 10, "is not canonical: write `/a%C3%A9`"),
        (rule("paths = [\"/ok\", \"/a;b\"]"), 7, 17, "`;` path parameters are refused"),
        (rule("paths = [\"/a%2Fb\"]"), 7, 10, "`%2F` (an encoded `/`) is refused"),
        (rule("paths = [\"/a%zz\"]"), 7, 10, "path `/a%zz` is not valid: `%` is not followed by two hex digits, at byte 2"),
        (rule("paths = [\"/%C0%AF\"]"), 7, 10, "not UTF-8"),
        (rule("paths = [\"/..\"]"), 7, 10, "`..` climbs above the root"),
        (rule("paths = [\"/a b\"]"), 7, 10, "the byte 0x20 is not allowed here (percent-encode it)"),
        (rule("paths = [\"/a\\\\b\"]"), 7, 10, "`\\` is refused in a path"),
        (rule("paths = [\"/a?b\"]"), 7, 10, "a rule path has no query"),
        (rule("paths = [\"/a#b\"]"), 7, 10, "no fragment"),
        (rule("paths_ignore_case = true"), 7, 21, "`paths_ignore_case` needs `paths`"),
        (rule("headers = [{ name = \"x\", exact = \"a \" }]"), 7, 12, "cannot start or end with a space"),
        (rule("headers = [{ name = \"x\", prefix = \" a\" }]"), 7, 12, "cannot start with a space"),
        (rule("protocol = \"udp\""), 7, 12, "unknown protocol `udp`"),
        (rule("colour = \"red\""), 7, 1, "unknown field `colour`"),
        (rule("headers = [{ name = \"x\", present = true, exact = \"y\" }]"), 7, 12, "exactly one of"),
        (rule("protocol = \"tcp\"\nmethods = [\"GET\"]"), 2, 1, "cannot match methods"),
        ("default = \"maybe\"\n".to_owned(), 1, 11, "unknown action `maybe`: expected `allow` or `deny`"),
        ("[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"Web!\"]\nto = [\"api\"]\n".to_owned(), 4, 9, "service name `Web!` is not valid"),
        ("[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"*\"]\n".to_owned(), 5, 7, "`*` is allowed only in `from`"),
        ("[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\n".to_owned(), 1, 1, "missing field `to`"),
        ("[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"a\"]\n[[rule]]\nname = \"r\"\naction = \"deny\"\nfrom = [\"web\"]\nto = [\"a\"]\n".to_owned(), 7, 8, "rule name `r` is used twice (first at line 1)"),
        ("default = \n".to_owned(), 1, 11, ""),
        ("[[test]]\nfrom = \"web\"\nto = \"api\"\nport = 80\nmethod = \"FE TCH\"\nexpect = \"allow\"\n".to_owned(), 5, 10, "method `FE TCH` is not an HTTP token"),
        ("[[test]]\nfrom = \"web\"\nto = \"api\"\nport = 80\nexpect = \"yes\"\n".to_owned(), 5, 10, "unknown action `yes`"),
        ("[[test]]\nfrom = \"web\"\nto = \"api\"\nport = 80\nheaders = { x = 1 }\nexpect = \"deny\"\n".to_owned(), 5, 17, "a header value is a string, or an array of strings"),
    ];
    for (text, line, column, message) in cases {
        let err = Policy::parse("policy.toml", &text).unwrap_err();
        assert_eq!(
            (err.file.as_str(), err.line, err.column),
            ("policy.toml", line, column),
            "{err}\n---\n{text}"
        );
        assert!(err.message.contains(message), "{err}");
        assert!(err.to_string().starts_with(&format!("policy.toml:{line}:{column}: ")), "{err}");
    }
}

#[test]
fn services_are_validated_against_the_cluster_with_a_suggestion() {
    let text = "[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"apii\"]\n";
    let p = Policy::parse("p.toml", text).unwrap();
    let known: BTreeSet<String> = ["web", "api", "db"].iter().map(|s| s.to_string()).collect();
    let err = p.validate_services(text, &known).unwrap_err();
    assert_eq!((err.line, err.column), (5, 7));
    assert!(err.message.contains("service `apii` does not exist; did you mean `api`?"), "{err}");
    let far = text.replace("apii", "zzzzzz");
    let err = Policy::parse("p.toml", &far).unwrap().validate_services(&far, &known).unwrap_err();
    assert!(err.message.ends_with("does not exist"), "{err}");
    let ok = text.replace("apii", "api");
    Policy::parse("p.toml", &ok).unwrap().validate_services(&ok, &known).unwrap();
}

#[test]
fn failing_tests_are_reported_with_their_line_and_the_rule_behind() {
    let text = format!(
        "{EXAMPLE}\n[[test]]\nfrom = \"web\"\nto = \"api\"\nport = 80\nmethod = \"GET\"\npath = \"/internal/x\"\nexpect = \"allow\"\n"
    );
    let p = Policy::parse("p.toml", &text).unwrap();
    let failures = Engine::compile(&p).run_tests(&p.tests);
    assert_eq!(failures.len(), 1);
    let f = &failures[0];
    let line_of = |needle: &str, nth: usize| {
        text.lines().enumerate().filter(|(_, l)| *l == needle).nth(nth).unwrap().0 + 1
    };
    let test_line = line_of("[[test]]", 2);
    let rule_line = line_of("[[rule]]", 2);
    assert_eq!(f.line, test_line);
    assert_eq!(
        f.to_string(),
        format!(
            "test at line {test_line}: web -> api:80 GET /internal/x expected allow, got deny by rule `no-internal` (line {rule_line})"
        )
    );
}

#[test]
fn a_restricted_policy_round_trips_through_toml() {
    let p = Policy::parse("p.toml", EXAMPLE).unwrap();
    let only_db = p.restricted_to(&["db".to_owned()].into());
    assert_eq!(only_db.rules.len(), 1);
    assert_eq!(only_db.rules[0].name, "db-from-api");
    let again = Policy::parse("slice", &p.to_toml()).unwrap();
    assert_eq!(again.rules.len(), p.rules.len());
    for (a, b) in again.rules.iter().zip(&p.rules) {
        assert_eq!(
            (&a.name, a.action, &a.from, &a.to, &a.ports, a.protocol),
            (&b.name, b.action, &b.from, &b.to, &b.ports, b.protocol)
        );
        assert_eq!(
            (&a.methods, &a.paths, a.paths_ignore_case, &a.headers, a.dry_run),
            (&b.methods, &b.paths, b.paths_ignore_case, &b.headers, b.dry_run)
        );
    }
    assert_eq!(again.default, p.default);
}

/// Published ports' clients (`ingress`) get in only where an allow rule names them: not by `*`,
/// not by `default = "allow"`, not by a rule for another service; a deny rule's `*` shuts them out.
#[test]
fn ingress_is_admitted_only_by_rules_that_name_it() {
    let open = r#"
default = "allow"

[[rule]]
name = "anyone-reads"
action = "allow"
from = ["*"]
to = ["web", "api"]
methods = ["GET"]
"#;
    let engine = Engine::compile(&Policy::parse("p.toml", open).unwrap());
    let get = canonicalize("GET", "/").unwrap();
    let post = canonicalize("POST", "/").unwrap();
    for (http, port) in [(&get, 80), (&post, 80)] {
        let decision = engine.evaluate(&Request::http("ingress", "web", port, http, &[]));
        assert_eq!(decision.verdict, Action::Deny, "{http}");
        // Any service still gets what the policy gives it.
        assert!(engine.evaluate(&Request::http("web", "api", port, http, &[])).allowed(), "{http}");
    }
    assert!(!engine.evaluate(&Request::tcp("ingress", "db", 5432)).allowed());

    let named = format!(
        "{open}\n[[rule]]\nname = \"published-web\"\naction = \"allow\"\nfrom = [\"ingress\"]\nto = [\"web\"]\nports = [80]\npaths = [\"/public/*\"]\n\n[[rule]]\nname = \"no-secrets\"\naction = \"deny\"\nfrom = [\"*\"]\nto = [\"web\"]\npaths = [\"/public/secret\"]\n"
    );
    let policy = Policy::parse("p.toml", &named).unwrap();
    let engine = Engine::compile(&policy);
    let public = canonicalize("GET", "/public/a").unwrap();
    let decision = engine.evaluate(&Request::http("ingress", "web", 80, &public, &[]));
    assert_eq!(decision.reason(), "allow by rule `published-web` (line 11)");
    // Encoded and dot-segment spellings reach the same canonical request.
    for spelled in ["/public/%73ecret", "/public/./x/../secret", "/public//secret"] {
        let http = canonicalize("GET", spelled).unwrap();
        let decision = engine.evaluate(&Request::http("ingress", "web", 80, &http, &[]));
        assert_eq!(decision.reason(), "deny by rule `no-secrets` (line 19)", "{spelled}");
    }
    // Another port, another path, another service: the rule does not reach them.
    assert!(!engine.evaluate(&Request::http("ingress", "web", 81, &public, &[])).allowed());
    assert!(!engine.evaluate(&Request::http("ingress", "web", 80, &get, &[])).allowed());
    assert!(!engine.evaluate(&Request::http("ingress", "api", 80, &public, &[])).allowed());

    // `ingress` is a known source and never a destination.
    let known: BTreeSet<String> = ["web", "api", "db"].iter().map(|s| s.to_string()).collect();
    policy.validate_services(&named, &known).unwrap();
    let bad = "[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"ingress\"]\n";
    let err = Policy::parse("p.toml", bad).unwrap_err();
    assert!(err.message.contains("`ingress` stands for published ports' clients"), "{err}");
}

/// Destinations outside the mesh: named only by allow rules (never by the default), by network
/// or by DNS name (the addresses its answers hold), per port; deny wins; bad ones say why.
#[test]
fn egress_leaves_only_where_an_allow_rule_names_the_destination() {
    use policy::EgressRequest;
    let text = r#"
default = "allow"

[[rule]]
name = "web-to-partner"
action = "allow"
from = ["web"]
to = ["cidr:203.0.113.0/24"]
ports = [443]

[[rule]]
name = "web-to-api"
action = "allow"
from = ["web"]
to = ["dns:api.example.com"]
ports = [443, 80]

[[rule]]
name = "not-that-one"
action = "deny"
from = ["*"]
to = ["cidr:203.0.113.66/32"]

[[test]]
from = "web"
to = "203.0.113.9"
port = 443
expect = "allow"

[[test]]
from = "web"
to = "dns:api.example.com"
port = 80
expect = "allow"

[[test]]
from = "api"
to = "203.0.113.9"
port = 443
expect = "deny"
"#;
    let policy = Policy::parse("p.toml", text).unwrap();
    let engine = Engine::compile(&policy);
    assert!(engine.run_tests(&policy.tests).is_empty());
    let ask = |from: &str, address: &str, port: u16, names: &[&str]| {
        engine
            .evaluate_egress(&EgressRequest { from, address: address.parse().unwrap(), port, names })
            .reason()
    };
    assert_eq!(ask("web", "203.0.113.9", 443, &[]), "allow by rule `web-to-partner` (line 4)");
    assert_eq!(ask("web", "203.0.113.255", 443, &[]), "allow by rule `web-to-partner` (line 4)");
    // Another port, another network's edge, another source, the denied host: deny, whatever
    // `default = "allow"` says.
    assert_eq!(ask("web", "203.0.113.9", 80, &[]), "deny by default");
    assert_eq!(ask("web", "203.0.114.0", 443, &[]), "deny by default");
    assert_eq!(ask("web", "203.0.112.255", 443, &[]), "deny by default");
    assert_eq!(ask("db", "203.0.113.9", 443, &[]), "deny by default");
    assert_eq!(ask("web", "203.0.113.66", 443, &[]), "deny by rule `not-that-one` (line 18)");
    // A name's rule holds only the addresses its answers hold now (meshd says which).
    assert_eq!(ask("web", "198.51.100.7", 80, &["api.example.com"]), "allow by rule `web-to-api` (line 11)");
    assert_eq!(ask("web", "198.51.100.7", 80, &[]), "deny by default");
    assert_eq!(ask("web", "198.51.100.7", 80, &["evil.example.com"]), "deny by default");
    // What the workloads' DNS may forward for each source.
    let (names, networks) = engine.egress_reach("web");
    assert_eq!((names.into_iter().collect::<Vec<_>>(), networks), (vec!["api.example.com".to_owned()], true));
    assert_eq!(engine.egress_reach("db"), (BTreeSet::new(), false));
    assert_eq!(engine.egress_names().into_iter().collect::<Vec<_>>(), ["api.example.com"]);
    // The node hosting web gets the egress rules it enforces; one hosting only api, none of web's.
    let web: BTreeSet<String> = ["web".to_owned()].into();
    assert_eq!(policy.restricted_to(&web).rules.len(), 3);
    let api: BTreeSet<String> = ["api".to_owned()].into();
    assert_eq!(
        policy.restricted_to(&api).rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["not-that-one"]
    );
    // Written back and read again, the same rules.
    let again = Policy::parse("again", &policy.restricted_to(&web).to_toml()).unwrap();
    assert_eq!(
        again.rules.iter().map(|r| r.to.clone()).collect::<Vec<_>>(),
        policy.rules.iter().map(|r| r.to.clone()).collect::<Vec<_>>()
    );
    // Services are checked; external destinations are not services.
    let known: BTreeSet<String> = ["web", "api", "db"].iter().map(|s| s.to_string()).collect();
    policy.validate_services(text, &known).unwrap();

    let rule = |to: &str, extra: &str| {
        format!("[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [{to}]\n{extra}")
    };
    for (bad, why) in [
        (rule("\"cidr:203.0.113.1/24\"", ""), "has host bits set: did you mean `cidr:203.0.113.0/24`?"),
        (rule("\"cidr:203.0.113.0/33\"", ""), "is not an IPv4 network"),
        (rule("\"cidr:example.com/24\"", ""), "is not an IPv4 network"),
        (rule("\"dns:API.example.com\"", ""), "a DNS name is lower-case labels"),
        (rule("\"dns:localhost\"", ""), "at least two"),
        (rule("\"dns:api.example.com.\"", ""), "without a trailing dot"),
        (rule("\"dns:api..com\"", ""), "a DNS name"),
        (rule("\"cidr:10.0.0.0/8\", \"api\"", ""), "not both"),
        (rule("\"dns:api.example.com\"", "methods = [\"GET\"]\n"), "cannot match methods, paths or headers"),
        (rule("\"dns:api.example.com\"", "protocol = \"http\"\n"), "its connections are decided"),
        (
            "[[rule]]\nname = \"r\"\naction = \"allow\"\nfrom = [\"ingress\"]\nto = [\"cidr:10.0.0.0/8\"]\n"
                .to_owned(),
            "`ingress` cannot leave the mesh",
        ),
        (
            "[[test]]\nfrom = \"web\"\nto = \"cidr:10.0.0.0/8\"\nport = 1\nexpect = \"deny\"\n".to_owned(),
            "a test names one address",
        ),
        (
            "[[test]]\nfrom = \"web\"\nto = \"10.0.0.1\"\nport = 1\nmethod = \"GET\"\nexpect = \"deny\"\n"
                .to_owned(),
            "has no `method`",
        ),
    ] {
        let err = Policy::parse("p.toml", &bad).unwrap_err();
        assert!(err.message.contains(why), "{bad}\n{err}");
    }
}
