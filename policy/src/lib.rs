//! The service-to-service ACL policy: its TOML language, line-precise errors, compilation and
//! evaluation, with no I/O. (The language and engine land with the policy issue.)
#![forbid(unsafe_code)]
