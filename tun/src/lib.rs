//! The overlay data plane: a sans-IO packet core (header codec, AES-256-GCM seal/open, key ring,
//! replay window, filter) and the Linux I/O around it. (It lands with the data plane issue.)
#![forbid(unsafe_code)]
