//! meshctl's commands, one module each; [`output`] is how they print.

pub mod check;
pub mod cluster;
pub mod network;
pub mod node;
pub mod output;
pub mod policy;
pub mod secret;
pub mod service;
pub mod signing;
