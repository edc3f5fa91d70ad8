//! The building blocks that plans use and the state stores: placement constraints and choice
//! ([`placement`]), address management ([`ipam`]) and the network key rings ([`keys`]). Pure: no
//! state, no I/O.

pub mod ipam;
pub mod keys;
pub mod placement;
