//! The service-to-service ACL policy: a TOML language with line-precise errors, validation,
//! compilation into an engine whose decisions cost the same however many rules other services
//! have, evaluation, explanation, and tests carried inside the policy file. No I/O.
//!
//! ```toml
//! default = "deny"
//!
//! [[rule]]
//! name = "web-reads-items"
//! action = "allow"
//! from = ["web"]
//! to = ["api"]
//! ports = [80]
//! methods = ["GET", "HEAD"]
//! paths = ["/v1/items", "/v1/items/*"]
//!
//! [[test]]
//! from = "web"
//! to = "api"
//! port = 80
//! method = "GET"
//! path = "/v1/items/7"
//! expect = "allow"
//! ```
//!
//! Deny wins over allow; what no rule matches gets the default.
//!
//! Rules never see a request as the client spelled it. The proxy first makes it canonical with
//! [`canonicalize`] (one spelling per resource: `/v1/items//./%61ll` is `/v1/items/all`), answers
//! 400 Bad Request when that fails ([`CanonicalError`]), evaluates the [`CanonicalRequest`], and
//! forwards to the workload exactly the request-target the policy decided on:
//!
//! ```
//! use policy::{Engine, Policy, Request, canonicalize};
//!
//! let policy = Policy::parse("p.toml", r#"
//!     [[rule]]
//!     name = "nobody-deletes-everything"
//!     action = "deny"
//!     from = ["*"]
//!     to = ["api"]
//!     methods = ["DELETE"]
//!     paths = ["/v1/items/all"]
//!
//!     [[rule]]
//!     name = "web-changes-items"
//!     action = "allow"
//!     from = ["web"]
//!     to = ["api"]
//!     methods = ["GET", "DELETE"]
//!     paths = ["/v1/items/*"]
//! "#).unwrap();
//! let engine = Engine::compile(&policy);
//!
//! let http = canonicalize("DELETE", "/v1/items//./%61ll?force=1").unwrap();
//! assert_eq!(http.to_string(), "DELETE /v1/items/all?force=1");
//! let headers: [(&str, &[u8]); 1] = [("x-role", b"admin")];
//! let decision = engine.evaluate(&Request::http("web", "api", 80, &http, &headers));
//! assert_eq!(decision.reason(), "deny by rule `nobody-deletes-everything` (line 2)");
//!
//! // Allowed: forward `http.request_target()`, rewritten if `http.is_rewritten()`.
//! let http = canonicalize("GET", "/v1/items/7/").unwrap();
//! assert!(engine.evaluate(&Request::http("web", "api", 80, &http, &[])).allowed());
//! assert_eq!(http.request_target(), "/v1/items/7/");
//!
//! // `..` is resolved before the rules look: this asks for `/admin`, which no rule allows.
//! let http = canonicalize("GET", "/v1/items/../../admin").unwrap();
//! assert_eq!(http.path(), Some("/admin"));
//! assert!(!engine.evaluate(&Request::http("web", "api", 80, &http, &[])).allowed());
//!
//! // Refused before any rule is looked at: the proxy answers 400 with the reason.
//! let refused = canonicalize("DELETE", "/v1/items/all;x").unwrap_err();
//! assert_eq!(refused.to_string(), "`;` path parameters are refused (servers disagree on what they mean), at byte 13");
//! ```
//!
//! See `policy/README.md` for the language and for what each spelling of a path means.
#![forbid(unsafe_code)]

/// The source of every connection a published port takes in (`meshctl service create
/// --publish`): a reserved name, never a service's. Only allow rules that name it admit those
/// clients: `*` does not, and neither does `default = "allow"`.
pub const INGRESS: &str = "ingress";

mod canonical;
mod engine;
mod parse;

pub use canonical::{CanonicalError, CanonicalRequest, Method, TargetForm, canonical_path, canonicalize};
pub use engine::{Decision, EgressRequest, Engine, Request, RuleRef, TestFailure, describe};
pub use parse::{
    Action, External, HeaderMatch, HeaderRule, PathMatch, Policy, PolicyError, Protocol, Rule, TestCase,
};
