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
//! # Keys
//!
//! Every key is a pair key: the one this node shares with one peer node on one network for one
//! epoch, derived by control from an epoch secret that never leaves the managers, the two node
//! indexes and the two nodes' boot numbers (control's `planning::keys` has the schedule). A node
//! is sent only the keys of its own pairs. The core seals for a destination node with that
//! pair's current key, and opens a datagram with the key of (sender index, epoch) — after checking
//! that the UDP source is the sender's attested underlay address. So a member can open, forge or
//! jam only its own pairs' traffic; a leaver's keys go from every table with it; a restart of
//! either side changes the pair's keys, so what was recorded before it fails authentication
//! after it (the replay windows need no disk). On an unencrypted network the source check is all
//! there is: it stops off-path forgery, not an attacker on the path.
//!
//! # Nonces
//!
//! The 96-bit AES-GCM nonce is `sender index (32 bits) || counter (64 bits)`.
//!
//! * Between the two senders of a pair key: control gives every node a cluster-unique index at
//!   join and never reuses one, and a node only ever sends with its own index, so the two
//!   senders' nonces differ in their first 32 bits.
//! * Within one sender: the counter's top 16 bits are the node's boot number, which meshd
//!   increments and syncs to disk before it sends anything (and refuses to start when that file
//!   is unreadable or corrupt, rather than start again from 1); the low 48 bits count packets
//!   within a boot from 0 and never wrap (a boot that reaches 2^48 packets stops sending). A
//!   restarted meshd therefore never repeats a counter it used before, under any key; control
//!   refuses a session reporting a boot number lower than one already seen (a restored or copied
//!   state directory).
//!
//! So no nonce repeats under one key. (Keys rotate every 12 hours and change with every restart
//! of either side, well before the 2^32-packet guidance for random-free GCM nonces would matter.)
#![forbid(unsafe_code)]

/// The data plane's hash maps: keyed per packet (addresses, flows, peers), hashed with aHash,
/// randomly keyed per map (as std's SipHash is: no chosen collisions) and several times faster
/// on the small keys these are.
pub type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

pub mod aead;
pub mod core;
pub mod filter;
pub mod header;
#[cfg(feature = "linux-io")]
pub mod io;
pub mod packet;
pub mod replay;
pub mod wireguard;
