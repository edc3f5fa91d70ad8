//! Planning changes: pure functions that read the state and return the commands that make a
//! change ([`plans`]), with placement ([`placement`]), address management ([`ipam`]) and the
//! network key rings ([`keys`]). Nothing here applies anything.

pub mod ipam;
pub mod keys;
pub mod placement;
pub mod plans;
