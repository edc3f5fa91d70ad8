//! Any inner packet, as a remote sender or a local workload could make it: read by the one
//! packet parser and decided by the no-bypass filter without a panic; a packet that is not even
//! IPv4 is never let in.
#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;

use tun::filter::{Admission, Incoming, Outgoing, Workload};
use tun::packet::{Ipv4Header, Packet, classify};

/// Lets every new flow to port 5432 in.
struct Port5432;

impl Admission for Port5432 {
    fn version(&self) -> u64 {
        1
    }

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
    // The packet as one its workload sent (noted), then as one arriving for it: from another
    // node (through the receive path's fast path) and from this node.
    let mut outgoing = Outgoing::new();
    let workload = Mutex::new(Workload::new());
    if let Some(flow) = outgoing.note(data, now) {
        workload.lock().unwrap().opened(flow, now);
    }
    let admitted = Incoming::new().admit(&Port5432, 1, &workload, data, now);
    let local = Workload::new().admit(&Port5432, data, now);
    if parsed.is_none() {
        assert!(!admitted && !local, "not IPv4, yet let in");
    }
    if class == Packet::Fragment {
        assert!(!admitted && !local, "a non-first fragment let in");
    }
});
