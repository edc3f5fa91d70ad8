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
//! Deny wins over allow; what no rule matches gets the default. See `policy/README.md`.
#![forbid(unsafe_code)]

mod engine;
mod parse;

pub use engine::{Decision, Engine, Request, RuleRef, TestFailure, describe};
pub use parse::{
    Action, HeaderMatch, HeaderRule, Method, PathMatch, Policy, PolicyError, Protocol, Rule, TestCase,
};
