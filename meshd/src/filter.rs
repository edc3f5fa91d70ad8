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
//! Everything else is dropped and counted as `filtered`. Pure logic over packet bytes: the
//! policy is asked through [`Admission`]; decisions are cached per flow until the policy or the
//! slice changes.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How long a workload's outgoing flow admits replies after its last outgoing packet.
pub const REPLY_WINDOW: Duration = Duration::from_secs(180);
/// How often the send path renews a flow it already noted.
const RENEW_AFTER: Duration = Duration::from_secs(30);
/// Bound on each table; past it, the oldest entries go.
const MAX_FLOWS: usize = 1 << 16;

/// The channel from the send paths to the receive path, bounded.
pub fn channel() -> (mpsc::Sender<Flow>, mpsc::Receiver<Flow>) {
    mpsc::channel(MAX_FLOWS)
}

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// A transport flow seen from the workload: its own address and port, the remote's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub protocol: u8,
    pub local: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
}

/// What an IPv4 packet is, as far as the filter cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    Icmp,
    /// A non-first fragment: no ports, and useless without its first fragment, which is checked.
    Fragment,
    Transport {
        protocol: u8,
        source: (Ipv4Addr, u16),
        destination: (Ipv4Addr, u16),
        /// A TCP SYN without ACK: a connection being opened.
        opening: bool,
    },
    /// Anything else (other protocols, truncated headers): never let in.
    Other,
}

/// Classifies an IPv4 packet.
pub fn classify(packet: &[u8]) -> Packet {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Packet::Other;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let protocol = packet[9];
    if protocol == ICMP {
        return Packet::Icmp;
    }
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Packet::Fragment;
    }
    if protocol != TCP && protocol != UDP {
        return Packet::Other;
    }
    let Some(ports) = packet.get(ihl..ihl + 4) else { return Packet::Other };
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let opening = protocol == TCP && packet.get(ihl + 13).is_some_and(|flags| flags & 0x12 == 0x02);
    Packet::Transport {
        protocol,
        source: (source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: (destination, u16::from_be_bytes([ports[2], ports[3]])),
        opening,
    }
}

/// The policy's word on new flows into local workloads.
pub trait Admission {
    /// Whether an L4 rule lets the service at overlay address `from` open `port` on the local
    /// workload at `to`.
    fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool;
}

/// The send path's side, one per workload interface: notes the flows the workload opens (and
/// renews them while they last) for the receive path.
pub struct Outgoing {
    noted: HashMap<Flow, Instant>,
    /// The flow noted last (a burst is mostly one flow): checked before the table.
    last: Option<(Flow, Instant)>,
    to_receiver: mpsc::Sender<Flow>,
}

impl Outgoing {
    pub fn new(to_receiver: mpsc::Sender<Flow>) -> Outgoing {
        Outgoing { noted: HashMap::new(), last: None, to_receiver }
    }

    /// Notes `packet`, leaving a workload for a remote endpoint.
    pub fn note(&mut self, packet: &[u8], now: Instant) {
        let Packet::Transport { protocol, source, destination, .. } = classify(packet) else { return };
        let flow = Flow { protocol, local: source, remote: destination };
        if self.last.is_some_and(|(f, at)| f == flow && now.duration_since(at) < RENEW_AFTER) {
            return;
        }
        if let Some(at) = self.noted.get(&flow) {
            self.last = Some((flow, *at));
        }
        if self.noted.get(&flow).is_some_and(|at| now.duration_since(*at) < RENEW_AFTER) {
            return;
        }
        if self.noted.len() >= MAX_FLOWS {
            self.noted.retain(|_, at| now.duration_since(*at) < RENEW_AFTER);
        }
        self.noted.insert(flow, now);
        self.last = Some((flow, now));
        // Full (nothing came in for a long while, many new flows went out): the note is lost and
        // that flow's replies wait for its next note; memory stays bounded.
        let _ = self.to_receiver.try_send(flow);
    }
}

/// The receive path's side: decides on every packet arriving for a local workload.
pub struct Incoming {
    from_senders: mpsc::Receiver<Flow>,
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
    pub fn new(from_senders: mpsc::Receiver<Flow>) -> Incoming {
        Incoming { from_senders, opened: HashMap::new(), decided: HashMap::new(), view: 0, last: None }
    }

    /// Whether `packet` (already authenticated, for a local workload) may be delivered.
    /// `view` identifies the policy and slice behind `admission`: cached verdicts go when it
    /// changes.
    pub fn admit(&mut self, admission: &impl Admission, view: usize, packet: &[u8], now: Instant) -> bool {
        match classify(packet) {
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
        self.take_notes(now);
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

    fn take_notes(&mut self, now: Instant) {
        while let Ok(flow) = self.from_senders.try_recv() {
            if self.opened.len() >= MAX_FLOWS {
                self.opened.retain(|_, at| now.duration_since(*at) < REPLY_WINDOW);
            }
            self.opened.insert(flow, now);
        }
    }
}

/// For delivery between two workloads of this node (both services' rules are here): a new
/// flow needs an L4 rule towards the destination; anything else must belong to a flow the
/// reverse rule allows, and may not open a connection.
pub fn admit_local(admission: &impl Admission, packet: &[u8]) -> bool {
    match classify(packet) {
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

    /// Allows only `allowed` (from, to, port).
    struct Rules(Vec<(Ipv4Addr, Ipv4Addr, u16)>);

    impl Admission for Rules {
        fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
            self.0.contains(&(from, to, port))
        }
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn packet(protocol: u8, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = protocol;
        p[12..16].copy_from_slice(&from.0.octets());
        p[16..20].copy_from_slice(&to.0.octets());
        p[20..22].copy_from_slice(&from.1.to_be_bytes());
        p[22..24].copy_from_slice(&to.1.to_be_bytes());
        p[33] = flags;
        p
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    #[test]
    fn classifies_icmp_fragments_and_transport() {
        assert_eq!(classify(&packet(ICMP, (A, 0), (B, 0), 0)), Packet::Icmp);
        let mut fragment = packet(UDP, (A, 1), (B, 2), 0);
        fragment[7] = 8;
        assert_eq!(classify(&fragment), Packet::Fragment);
        assert_eq!(classify(&packet(47, (A, 1), (B, 2), 0)), Packet::Other);
        assert_eq!(classify(&[0x45; 10]), Packet::Other);
        assert_eq!(
            classify(&packet(TCP, (A, 1000), (B, 80), SYN)),
            Packet::Transport { protocol: TCP, source: (A, 1000), destination: (B, 80), opening: true }
        );
        assert!(matches!(
            classify(&packet(TCP, (A, 1000), (B, 80), SYN | ACK)),
            Packet::Transport { opening: false, .. }
        ));
    }

    #[test]
    fn new_flows_need_an_l4_rule_and_icmp_always_passes() {
        let (_tx, rx) = channel();
        let mut incoming = Incoming::new(rx);
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
        let (tx, rx) = channel();
        let mut outgoing = Outgoing::new(tx);
        let mut incoming = Incoming::new(rx);
        let none = Rules(vec![]);
        let now = Instant::now();
        let reply = packet(TCP, (A, 5432), (B, 40000), SYN | ACK);
        assert!(!incoming.admit(&none, 1, &reply, now), "nothing opened yet");
        outgoing.note(&packet(TCP, (B, 40000), (A, 5432), SYN), now);
        assert!(incoming.admit(&none, 1, &reply, now));
        // Another port of the same workload is still closed.
        assert!(!incoming.admit(&none, 1, &packet(TCP, (A, 5432), (B, 40001), ACK), now));
        assert!(!incoming.admit(&none, 1, &reply, now + REPLY_WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn outgoing_notes_a_flow_once_until_it_needs_renewing() {
        let (tx, mut rx) = channel();
        let mut outgoing = Outgoing::new(tx);
        let now = Instant::now();
        let p = packet(UDP, (B, 5000), (A, 53), 0);
        outgoing.note(&p, now);
        outgoing.note(&p, now + Duration::from_secs(1));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "noted once");
        outgoing.note(&p, now + RENEW_AFTER + Duration::from_secs(1));
        assert!(rx.try_recv().is_ok(), "renewed");
    }

    #[test]
    fn cached_verdicts_follow_a_new_view() {
        let (_tx, rx) = channel();
        let mut incoming = Incoming::new(rx);
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
