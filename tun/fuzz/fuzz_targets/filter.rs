//! Any inner packet, as a remote sender or a local workload could make it: read by the one
//! packet parser and decided by the no-bypass filter without a panic; a packet that is not even
//! IPv4 is never let in.
#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tun::filter::{Admission, Incoming, Local, Outgoing};
use tun::packet::{Ipv4Header, Packet, classify};

/// Lets every new flow to port 5432 in.
struct Port5432;

impl Admission for Port5432 {
    fn opens(&self, _from: Ipv4Addr, _to: Ipv4Addr, port: u16) -> bool {
        port == 5432
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let parsed = Ipv4Header::parse(data);
    let class = classify(data);
    if parsed.is_none() {
        assert_eq!(class, Packet::Other);
    }
    let mut outgoing = Outgoing::new();
    let mut incoming = Incoming::new();
    if let Some(flow) = outgoing.note(data, now) {
        incoming.opened(flow, now);
    }
    let admitted = incoming.admit(&Port5432, 1, data, now);
    let local = Local::new().deliver(&Port5432, 1, data, now);
    if parsed.is_none() {
        assert!(!admitted && !local, "not IPv4, yet let in");
    }
    if class == Packet::Fragment {
        assert!(!admitted && !local, "a non-first fragment let in");
    }
});
