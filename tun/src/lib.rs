//! The overlay data plane.
//!
//! A sans-IO packet core ([`core`]: bytes and time in, actions out): the [`header`] codec,
//! AES-256-GCM seal and open behind one [`aead`] trait with two backends, key lookup by epoch,
//! a [`replay`] window per sender and key, and the checks of the inner packet's addresses. Every
//! packet that fails a check is dropped with a [`core::DropReason`] and counted, never delivered.
//! Beside it, equally free of I/O: the no-bypass [`filter`] (what the overlay may deliver into a
//! workload) and the one [`packet`] parser that the core and the filter both read packets with.
//!
//! With the `linux-io` feature, `io` is the I/O around them: tun devices, the underlay UDP
//! socket, batching and offloads, and the tasks that move packets. Only that module uses Tokio.
//!
//! # Nonces
//!
//! The 96-bit AES-GCM nonce is `sender index (32 bits) || counter (64 bits)`.
//!
//! * Across senders sharing a network key: control gives every node a cluster-unique index at
//!   join and never reuses one, and a node only ever sends with its own index, so two senders'
//!   nonces differ in their first 32 bits.
//! * Within one sender: the counter's top 16 bits are the node's boot number, which meshd
//!   increments and syncs to disk before it sends anything; the low 48 bits count packets within
//!   a boot from 0 and never wrap (a boot that reaches 2^48 packets stops sending). A restarted
//!   meshd therefore never repeats a counter it used before, under any key.
//!
//! So no nonce repeats under one key. (Keys rotate every 12 hours and whenever a node leaves a
//! network, well before the 2^32-packet guidance for random-free GCM nonces would matter.)
#![forbid(unsafe_code)]

pub mod aead;
pub mod core;
pub mod filter;
pub mod header;
#[cfg(feature = "linux-io")]
pub mod io;
pub mod packet;
pub mod replay;
