//! The library half of `meshctl`: the lab ([`lab`]), one implementation of a local cluster in
//! network namespaces, used by `meshctl lab`, the end-to-end tests and the benchmarks.
#![forbid(unsafe_code)]

pub mod lab;
