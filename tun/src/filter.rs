//! The no-bypass filter: what the overlay may deliver into a workload. Service traffic goes
//! through the mesh (mTLS between meshd, policy per request), never through the overlay, so a
//! packet is let into a workload only when it is
//!
//! * ICMP (ping and path-MTU errors keep working);
//! * a new flow that an L4 rule (`protocol = "tcp"`) allows from the sender's service to the
//!   workload's service on that port (TCP and UDP alike);
//! * a reply to a flow the workload itself opened: the send path notes the flows leaving each
//!   workload ([`Outgoing`]) and the receive path ([`Incoming`]) admits the packets coming back.
//!
//! Everything else is dropped and counted as `filtered`. Pure logic over packet bytes (read by
//! [`packet::classify`]) and time: the policy is asked through [`Admission`]; decisions are
//! cached per flow until the policy or the slice changes. The notes go from the send paths to the
//! receive path however the I/O layer carries them (a bounded channel, with the `linux-io`
//! feature).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::{self, Packet};

/// How long a workload's outgoing flow admits replies after its last outgoing packet.
pub const REPLY_WINDOW: Duration = Duration::from_secs(180);
/// How often the send path renews a flow it already noted.
const RENEW_AFTER: Duration = Duration::from_secs(30);
/// Bound on each table (and on the notes in flight); past it, the oldest entries go.
pub const MAX_FLOWS: usize = 1 << 16;

/// A transport flow seen from the workload: its own address and port, the remote's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub protocol: u8,
    pub local: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
}

/// The policy's word on new flows into local workloads.
pub trait Admission {
    /// Whether an L4 rule lets the service at overlay address `from` open `port` on the local
    /// workload at `to`.
    fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool;
}

/// The send path's side, one per workload interface: notes the flows the workload opens (and
/// renews them while they last) for the receive path.
#[derive(Default)]
pub struct Outgoing {
    noted: HashMap<Flow, Instant>,
    /// The flow noted last (a burst is mostly one flow): checked before the table.
    last: Option<(Flow, Instant)>,
}

impl Outgoing {
    pub fn new() -> Outgoing {
        Outgoing::default()
    }

    /// Notes `packet`, leaving a workload for a remote endpoint. Returns the flow when the
    /// receive path must hear of it ([`Incoming::opened`]): new, or due for renewal.
    pub fn note(&mut self, packet: &[u8], now: Instant) -> Option<Flow> {
        let Packet::Transport { protocol, source, destination, .. } = packet::classify(packet) else {
            return None;
        };
        let flow = Flow { protocol, local: source, remote: destination };
        if self.last.is_some_and(|(f, at)| f == flow && now.duration_since(at) < RENEW_AFTER) {
            return None;
        }
        if let Some(at) = self.noted.get(&flow) {
            self.last = Some((flow, *at));
        }
        if self.noted.get(&flow).is_some_and(|at| now.duration_since(*at) < RENEW_AFTER) {
            return None;
        }
        if self.noted.len() >= MAX_FLOWS {
            self.noted.retain(|_, at| now.duration_since(*at) < RENEW_AFTER);
        }
        self.noted.insert(flow, now);
        self.last = Some((flow, now));
        Some(flow)
    }
}

/// The receive path's side: decides on every packet arriving for a local workload.
#[derive(Default)]
pub struct Incoming {
    /// Flows local workloads opened -> when last renewed.
    opened: HashMap<Flow, Instant>,
    /// (remote, local, port, protocol) -> the policy's verdict, for the current view.
    decided: HashMap<(Ipv4Addr, Ipv4Addr, u16, u8), bool>,
    view: usize,
    /// The flow admitted last, and when (a burst is mostly one flow): admitted again without the
    /// tables for up to [`LAST_FOR`] while the view is the same.
    last: Option<(Flow, Instant)>,
}

/// How long the last admitted flow skips the tables (far below [`REPLY_WINDOW`]).
const LAST_FOR: Duration = Duration::from_millis(500);

impl Incoming {
    pub fn new() -> Incoming {
        Incoming::default()
    }

    /// Takes in a flow a local workload opened (or renewed), as [`Outgoing::note`] returned it.
    pub fn opened(&mut self, flow: Flow, now: Instant) {
        if self.opened.len() >= MAX_FLOWS {
            self.opened.retain(|_, at| now.duration_since(*at) < REPLY_WINDOW);
        }
        self.opened.insert(flow, now);
    }

    /// Whether `packet` (already authenticated, for a local workload) may be delivered.
    /// `view` identifies the policy and slice behind `admission`: cached verdicts go when it
    /// changes.
    pub fn admit(&mut self, admission: &impl Admission, view: usize, packet: &[u8], now: Instant) -> bool {
        match packet::classify(packet) {
            Packet::Icmp | Packet::Fragment => true,
            Packet::Other => false,
            Packet::Transport { protocol, source, destination, .. } => {
                let flow = Flow { protocol, local: destination, remote: source };
                if view == self.view
                    && self.last.is_some_and(|(f, at)| f == flow && now.duration_since(at) < LAST_FOR)
                {
                    return true;
                }
                let admitted = self.decide(admission, view, flow, now);
                self.last = admitted.then_some((flow, now));
                admitted
            }
        }
    }

    fn decide(&mut self, admission: &impl Admission, view: usize, flow: Flow, now: Instant) -> bool {
        // `flow` is seen from the local workload: a reply when the workload opened it.
        if self.opened.get(&flow).is_some_and(|at| now.duration_since(*at) < REPLY_WINDOW) {
            return true;
        }
        if view != self.view {
            self.decided.clear();
            self.view = view;
        }
        if self.decided.len() >= MAX_FLOWS {
            self.decided.clear();
        }
        let (remote, local) = (flow.remote, flow.local);
        *self
            .decided
            .entry((remote.0, local.0, local.1, flow.protocol))
            .or_insert_with(|| admission.opens(remote.0, local.0, local.1))
    }
}

/// For delivery between two workloads of this node (both services' rules are here): a new
/// flow needs an L4 rule towards the destination; anything else must belong to a flow the
/// reverse rule allows, and may not open a connection.
pub fn admit_local(admission: &impl Admission, packet: &[u8]) -> bool {
    match packet::classify(packet) {
        Packet::Icmp | Packet::Fragment => true,
        Packet::Other => false,
        Packet::Transport { source, destination, opening, .. } => {
            admission.opens(source.0, destination.0, destination.1)
                || (!opening && admission.opens(destination.0, source.0, source.1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::{A, ACK, B, SYN, packet};
    use crate::packet::{ICMP, TCP, UDP};

    /// Allows only `allowed` (from, to, port).
    struct Rules(Vec<(Ipv4Addr, Ipv4Addr, u16)>);

    impl Admission for Rules {
        fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
            self.0.contains(&(from, to, port))
        }
    }

    #[test]
    fn new_flows_need_an_l4_rule_and_icmp_always_passes() {
        let mut incoming = Incoming::new();
        let rules = Rules(vec![(A, B, 5432)]);
        let now = Instant::now();
        assert!(incoming.admit(&rules, 1, &packet(TCP, (A, 40000), (B, 5432), SYN), now));
        assert!(incoming.admit(&rules, 1, &packet(UDP, (A, 40000), (B, 5432), 0), now));
        assert!(!incoming.admit(&rules, 1, &packet(TCP, (A, 40000), (B, 80), SYN), now));
        assert!(!incoming.admit(&rules, 1, &packet(TCP, (B, 40000), (A, 5432), SYN), now), "one way");
        assert!(incoming.admit(&rules, 1, &packet(ICMP, (B, 0), (A, 0), 0), now));
        assert!(!incoming.admit(&rules, 1, &packet(47, (A, 0), (B, 0), 0), now));
    }

    #[test]
    fn replies_to_flows_a_workload_opened_pass_until_the_window_closes() {
        let mut outgoing = Outgoing::new();
        let mut incoming = Incoming::new();
        let none = Rules(vec![]);
        let now = Instant::now();
        let reply = packet(TCP, (A, 5432), (B, 40000), SYN | ACK);
        assert!(!incoming.admit(&none, 1, &reply, now), "nothing opened yet");
        let noted = outgoing.note(&packet(TCP, (B, 40000), (A, 5432), SYN), now);
        incoming.opened(noted.expect("a new flow is noted"), now);
        assert!(incoming.admit(&none, 1, &reply, now));
        // Another port of the same workload is still closed.
        assert!(!incoming.admit(&none, 1, &packet(TCP, (A, 5432), (B, 40001), ACK), now));
        assert!(!incoming.admit(&none, 1, &reply, now + REPLY_WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn outgoing_notes_a_flow_once_until_it_needs_renewing() {
        let mut outgoing = Outgoing::new();
        let now = Instant::now();
        let p = packet(UDP, (B, 5000), (A, 53), 0);
        assert!(outgoing.note(&p, now).is_some());
        assert!(outgoing.note(&p, now + Duration::from_secs(1)).is_none(), "noted once");
        assert!(outgoing.note(&p, now + RENEW_AFTER + Duration::from_secs(1)).is_some(), "renewed");
        assert!(outgoing.note(&[0x45; 10], now).is_none(), "not a flow");
    }

    #[test]
    fn cached_verdicts_follow_a_new_view() {
        let mut incoming = Incoming::new();
        let p = packet(TCP, (A, 40000), (B, 5432), SYN);
        let now = Instant::now();
        assert!(incoming.admit(&Rules(vec![(A, B, 5432)]), 1, &p, now));
        assert!(incoming.admit(&Rules(vec![]), 1, &p, now), "same view: cached");
        assert!(!incoming.admit(&Rules(vec![]), 2, &p, now), "new view: asked again");
    }

    #[test]
    fn local_delivery_checks_both_directions_without_state() {
        let rules = Rules(vec![(A, B, 5432)]);
        assert!(admit_local(&rules, &packet(TCP, (A, 40000), (B, 5432), SYN)));
        assert!(admit_local(&rules, &packet(TCP, (B, 5432), (A, 40000), SYN | ACK)), "reply");
        assert!(!admit_local(&rules, &packet(TCP, (B, 5432), (A, 40000), SYN)), "a reply never opens");
        assert!(!admit_local(&rules, &packet(TCP, (B, 40000), (A, 22), SYN)));
    }
}
