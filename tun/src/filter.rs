//! The no-bypass filter: what the overlay may deliver into a workload. Service traffic goes
//! through the mesh (mTLS between meshd, policy per request), never through the overlay, so a
//! packet is let into a workload only when it is
//!
//! * ICMP (ping and path-MTU errors keep working);
//! * a new flow that an L4 rule (`protocol = "tcp"`) allows from the sender's service to the
//!   workload's service on that port (TCP and UDP alike);
//! * a reply to a flow the workload itself opened: the send path notes the flows leaving each
//!   workload ([`Outgoing`]) in that workload's own state ([`Workload::opened`]), which admits the
//!   packets of those flows coming back. A packet merely shaped like a reply (from a port the
//!   workload may open, say) is not one.
//!
//! ```text
//!  workload a ──► Outgoing(a).note ──(flow a:x → b:p)──► Workload(a).opened
//!  workload a ◄── Workload(a).admit: ICMP | Admission::opens(b, a, x) | a opened (a:x, b:p)
//! ```
//!
//! Delivery between two workloads of one node goes through the same state as delivery from
//! another node: the receiver's [`Workload`] admits, the sender's notes what it opened. There is
//! no stateless reverse rule (with `a → b:5432` allowed, `b` may answer `a`'s flows from 5432, not
//! send from 5432 to any port of `a`).
//!
//! Ports and flags are read only from a whole, unfragmented transport header
//! ([`packet::classify`]): a first fragment too short to hold it is dropped, and so is every
//! non-first fragment (ICMP aside), since one could rewrite the header its first fragment
//! showed (RFC 1858). Fragment IDs are not tracked: workloads see the overlay's MTU and path-MTU
//! errors, so a fragmented TCP or UDP datagram does not get through.
//!
//! Everything else is dropped and counted as `filtered`. Pure logic over packet bytes and time:
//! the policy is asked through [`Admission`]; decisions are cached per flow until the policy or
//! the slice changes. The state is kept per local workload, each table bounded at
//! [`MAX_FLOWS`] and, full, evicting the entry inserted or renewed longest ago in O(1): a workload
//! opening flows as fast as it can (or a peer opening flows into it) costs a constant per flow and
//! evicts only that workload's own entries, never another's.

mod recent;

use std::net::Ipv4Addr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::packet::{self, Packet};
use recent::Recent;

/// How long a workload's outgoing flow admits replies after its last outgoing packet.
pub const REPLY_WINDOW: Duration = Duration::from_secs(180);
/// How often the send path renews a flow it already noted.
const RENEW_AFTER: Duration = Duration::from_secs(30);
/// Bound on each table of one workload; past it, the entry inserted or renewed longest ago goes.
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
    /// Tells views apart: two views with one version give the same answers (cached verdicts
    /// go when it changes).
    fn version(&self) -> u64;

    /// Whether an L4 rule lets the service at overlay address `from` open `port` on the local
    /// workload at `to`.
    fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool;
}

/// The send path's side, one per workload interface: notes the flows the workload opens (and
/// renews them while they last) for its [`Workload`] state.
pub struct Outgoing {
    noted: Recent<Flow, Instant>,
    /// The flow noted last (a burst is mostly one flow): checked before the table.
    last: Option<(Flow, Instant)>,
}

impl Default for Outgoing {
    fn default() -> Outgoing {
        Outgoing { noted: Recent::new(MAX_FLOWS), last: None }
    }
}

impl Outgoing {
    pub fn new() -> Outgoing {
        Outgoing::default()
    }

    /// Notes `packet`, leaving a workload for a remote endpoint. Returns the flow when the
    /// workload's state must hear of it ([`Workload::opened`]): new, or due for renewal.
    pub fn note(&mut self, packet: &[u8], now: Instant) -> Option<Flow> {
        let Packet::Transport { protocol, source, destination, .. } = packet::classify(packet) else {
            return None;
        };
        let flow = Flow { protocol, local: source, remote: destination };
        if self.last.is_some_and(|(f, at)| f == flow && now.duration_since(at) < RENEW_AFTER) {
            return None;
        }
        if let Some(&at) = self.noted.get(&flow)
            && now.duration_since(at) < RENEW_AFTER
        {
            self.last = Some((flow, at));
            return None;
        }
        self.noted.insert(flow, now);
        self.last = Some((flow, now));
        Some(flow)
    }

    /// How many flows are noted (at most [`MAX_FLOWS`]).
    pub fn len(&self) -> usize {
        self.noted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the filter holds for one local workload: the flows it opened, and the policy's verdicts
/// on flows into it. Its send path writes the first, whoever delivers to it reads both.
pub struct Workload {
    /// Flows the workload opened -> when last renewed.
    opened: Recent<Flow, Instant>,
    /// (remote, local port, protocol) -> the policy's verdict, for view `version`.
    decided: Recent<(Ipv4Addr, u16, u8), bool>,
    version: u64,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload { opened: Recent::new(MAX_FLOWS), decided: Recent::new(MAX_FLOWS), version: 0 }
    }
}

impl Workload {
    pub fn new() -> Workload {
        Workload::default()
    }

    /// Takes in a flow the workload opened (or renewed), as [`Outgoing::note`] returned it.
    pub fn opened(&mut self, flow: Flow, now: Instant) {
        self.opened.insert(flow, now);
    }

    /// How many opened flows are held (at most [`MAX_FLOWS`]).
    pub fn len(&self) -> usize {
        self.opened.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `packet` (authenticated, for this workload) may be delivered.
    pub fn admit(&mut self, admission: &impl Admission, packet: &[u8], now: Instant) -> bool {
        match packet::classify(packet) {
            Packet::Icmp => true,
            Packet::Fragment | Packet::Other => false,
            Packet::Transport { protocol, source, destination, .. } => {
                self.decide(admission, Flow { protocol, local: destination, remote: source }, now)
            }
        }
    }

    fn decide(&mut self, admission: &impl Admission, flow: Flow, now: Instant) -> bool {
        // `flow` is seen from the workload: a reply when the workload opened it.
        if self.opened.get(&flow).is_some_and(|at| now.duration_since(*at) < REPLY_WINDOW) {
            return true;
        }
        if admission.version() != self.version {
            self.decided.clear();
            self.version = admission.version();
        }
        let (remote, local) = (flow.remote, flow.local);
        let key = (remote.0, local.1, flow.protocol);
        if let Some(&verdict) = self.decided.get(&key) {
            return verdict;
        }
        let verdict = admission.opens(remote.0, local.0, local.1);
        self.decided.insert(key, verdict);
        verdict
    }
}

/// The receive path's side, one per node: decides on every packet arriving for a local
/// workload, by that workload's state (locked only when the packet is not of the flow admitted
/// last).
#[derive(Default)]
pub struct Incoming {
    /// The flow admitted last, on which network, under which view, and when (a burst is mostly
    /// one flow): admitted again without the workload's state for up to [`LAST_FOR`].
    last: Option<(u32, Flow, u64, Instant)>,
}

/// How long the last admitted flow skips the tables (far below [`REPLY_WINDOW`]).
const LAST_FOR: Duration = Duration::from_millis(500);

impl Incoming {
    pub fn new() -> Incoming {
        Incoming::default()
    }

    /// Whether `packet` (authenticated, for the local workload whose state is `workload`, on
    /// `network`) may be delivered.
    pub fn admit(
        &mut self,
        admission: &impl Admission,
        network: u32,
        workload: &Mutex<Workload>,
        packet: &[u8],
        now: Instant,
    ) -> bool {
        match packet::classify(packet) {
            Packet::Icmp => true,
            Packet::Fragment | Packet::Other => false,
            Packet::Transport { protocol, source, destination, .. } => {
                let flow = Flow { protocol, local: destination, remote: source };
                let version = admission.version();
                if self.last.is_some_and(|(n, f, v, at)| {
                    (n, f, v) == (network, flow, version) && now.duration_since(at) < LAST_FOR
                }) {
                    return true;
                }
                let admitted =
                    workload.lock().unwrap_or_else(PoisonError::into_inner).decide(admission, flow, now);
                self.last = admitted.then_some((network, flow, version, now));
                admitted
            }
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
        fn version(&self) -> u64 {
            1
        }

        fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
            self.0.contains(&(from, to, port))
        }
    }

    /// `Rules` under another version.
    struct Versioned(u64, Rules);

    impl Admission for Versioned {
        fn version(&self) -> u64 {
            self.0
        }

        fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
            self.1.opens(from, to, port)
        }
    }

    #[test]
    fn new_flows_need_an_l4_rule_and_icmp_always_passes() {
        let mut incoming = Workload::new();
        let rules = Rules(vec![(A, B, 5432)]);
        let now = Instant::now();
        assert!(incoming.admit(&rules, &packet(TCP, (A, 40000), (B, 5432), SYN), now));
        assert!(incoming.admit(&rules, &packet(UDP, (A, 40000), (B, 5432), 0), now));
        assert!(!incoming.admit(&rules, &packet(TCP, (A, 40000), (B, 80), SYN), now));
        assert!(!incoming.admit(&rules, &packet(TCP, (B, 40000), (A, 5432), SYN), now), "one way");
        assert!(incoming.admit(&rules, &packet(ICMP, (B, 0), (A, 0), 0), now));
        assert!(!incoming.admit(&rules, &packet(47, (A, 0), (B, 0), 0), now));
    }

    #[test]
    fn replies_to_flows_a_workload_opened_pass_until_the_window_closes() {
        let mut outgoing = Outgoing::new();
        let mut incoming = Workload::new();
        let none = Rules(vec![]);
        let now = Instant::now();
        let reply = packet(TCP, (A, 5432), (B, 40000), SYN | ACK);
        assert!(!incoming.admit(&none, &reply, now), "nothing opened yet");
        let noted = outgoing.note(&packet(TCP, (B, 40000), (A, 5432), SYN), now);
        incoming.opened(noted.expect("a new flow is noted"), now);
        assert!(incoming.admit(&none, &reply, now));
        // Another port of the same workload is still closed.
        assert!(!incoming.admit(&none, &packet(TCP, (A, 5432), (B, 40001), ACK), now));
        assert!(!incoming.admit(&none, &reply, now + REPLY_WINDOW + Duration::from_secs(1)));
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
        let mut incoming = Workload::new();
        let p = packet(TCP, (A, 40000), (B, 5432), SYN);
        let now = Instant::now();
        assert!(incoming.admit(&Versioned(1, Rules(vec![(A, B, 5432)])), &p, now));
        assert!(incoming.admit(&Versioned(1, Rules(vec![])), &p, now), "same view: cached");
        assert!(!incoming.admit(&Versioned(2, Rules(vec![])), &p, now), "new view: asked again");
    }

    /// Two workloads of one node, A and B, as the send paths move packets between them: the
    /// receiver's state admits, the sender's notes what it opened.
    #[derive(Default)]
    struct Pair {
        a: (Outgoing, Workload),
        b: (Outgoing, Workload),
    }

    impl Pair {
        fn deliver(&mut self, rules: &Rules, p: &[u8], now: Instant) -> bool {
            let from_a = crate::packet::Ipv4Header::parse(p).is_some_and(|ip| ip.source == A);
            let (from, to) = if from_a { (&mut self.a, &mut self.b) } else { (&mut self.b, &mut self.a) };
            if !to.1.admit(rules, p, now) {
                return false;
            }
            if let Some(flow) = from.0.note(p, now) {
                from.1.opened(flow, now);
            }
            true
        }
    }

    /// What a workload of this node sends to another, and whether it is delivered.
    type Step = (&'static str, Vec<u8>, bool);

    #[test]
    fn local_delivery_admits_rules_and_replies_to_flows_the_workload_opened_only() {
        let rules = Rules(vec![(A, B, 5432)]);
        let steps: Vec<Step> = vec![
            ("nothing opened: a reverse-rule shape", packet(UDP, (B, 5432), (A, 9999), 0), false),
            ("a opens b:5432, as the rule allows", packet(TCP, (A, 40000), (B, 5432), SYN), true),
            ("b replies to that flow", packet(TCP, (B, 5432), (A, 40000), SYN | ACK), true),
            ("a goes on", packet(TCP, (A, 40000), (B, 5432), ACK), true),
            ("b, from the allowed port, to another port of a", packet(UDP, (B, 5432), (A, 9999), 0), false),
            (
                "b, TCP from the allowed port, to another port of a",
                packet(TCP, (B, 5432), (A, 40001), ACK),
                false,
            ),
            ("b opens a port of a without a rule", packet(TCP, (B, 40000), (A, 22), SYN), false),
            ("a opens a port of b without a rule", packet(TCP, (A, 40000), (B, 22), SYN), false),
            ("b answering the refused flow", packet(TCP, (B, 22), (A, 40000), SYN | ACK), false),
            ("a opens a UDP flow the rule allows", packet(UDP, (A, 5000), (B, 5432), 0), true),
            ("b replies to it", packet(UDP, (B, 5432), (A, 5000), 0), true),
            ("ICMP both ways", packet(ICMP, (B, 0), (A, 0), 0), true),
        ];
        let mut local = Pair::default();
        let now = Instant::now();
        for (step, p, delivered) in steps {
            assert_eq!(local.deliver(&rules, &p, now), delivered, "{step}");
        }
    }

    #[test]
    fn a_reply_shaped_packet_from_another_node_needs_a_flow_the_workload_opened() {
        let rules = Rules(vec![(A, B, 5432)]);
        let mut incoming = Workload::new();
        let now = Instant::now();
        // On B's node: A may open B:5432, so B's answers leave from 5432; nothing lets a packet
        // from A:5432 (or to another port of B) in.
        assert!(!incoming.admit(&rules, &packet(UDP, (A, 5432), (B, 9999), 0), now));
        // On A's node: A opened B:5432 from 40000; B's answer passes, B from 5432 elsewhere not.
        let mut outgoing = Outgoing::new();
        let flow = outgoing.note(&packet(TCP, (A, 40000), (B, 5432), SYN), now).expect("new flow");
        incoming.opened(flow, now);
        assert!(incoming.admit(&rules, &packet(TCP, (B, 5432), (A, 40000), SYN | ACK), now));
        assert!(!incoming.admit(&rules, &packet(UDP, (B, 5432), (A, 9999), 0), now));
    }

    /// `p` as a fragment: `more` fragments follow, at `offset` (in 8 bytes).
    fn fragment(mut p: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
        let len = u16::try_from(p.len()).unwrap();
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[6..8].copy_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
        p
    }

    #[test]
    fn fragments_without_a_whole_transport_header_are_dropped() {
        let rules = Rules(vec![(A, B, 5432), (A, B, 9)]);
        let syn = packet(TCP, (A, 40000), (B, 5432), SYN);
        let udp = packet(UDP, (A, 5000), (B, 5432), 0);
        // A later fragment whose first 4 bytes look like the ports of an allowed (or opened) flow.
        let mut tail = packet(UDP, (A, 5000), (B, 5432), 0);
        tail.truncate(28);
        let mut syn_rest = syn[..20].to_vec();
        syn_rest.extend_from_slice(&syn[28..]);
        let cases: [(&str, Vec<u8>, bool); 6] = [
            (
                "a SYN whose first fragment carries 8 bytes of TCP header",
                fragment(syn[..28].to_vec(), true, 0),
                false,
            ),
            ("a non-first fragment of that SYN", fragment(syn_rest, false, 1), false),
            ("a non-first fragment shaped like an allowed flow", fragment(tail.clone(), false, 1), false),
            ("a non-first fragment with more to come", fragment(tail, true, 185), false),
            ("a first fragment holding the whole TCP header", fragment(syn, true, 0), true),
            ("a first fragment holding the whole UDP header", fragment(udp[..28].to_vec(), true, 0), true),
        ];
        let now = Instant::now();
        for (case, p, admitted) in cases {
            assert_eq!(Workload::new().admit(&rules, &p, now), admitted, "from another node: {case}");
            assert_eq!(Pair::default().deliver(&rules, &p, now), admitted, "on this node: {case}");
        }
    }

    #[test]
    fn a_flood_of_flows_keeps_the_tables_at_their_bound_and_evicts_by_age_only() {
        let mut outgoing = Outgoing::new();
        let mut incoming = Workload::new();
        let none = Rules(vec![]);
        let start = Instant::now();
        let open = |outgoing: &mut Outgoing, incoming: &mut Workload, p: &[u8], now| {
            if let Some(flow) = outgoing.note(p, now) {
                incoming.opened(flow, now);
            }
        };
        // B's legitimate flow, opened first, then renewed by its traffic.
        let legitimate = packet(TCP, (B, 40000), (A, 443), ACK);
        let reply = packet(TCP, (A, 443), (B, 40000), ACK);
        open(&mut outgoing, &mut incoming, &legitimate, start);
        let flood = |i: u32| packet(UDP, (B, 5000), (Ipv4Addr::from(0x0b00_0000 + i), 53), 0);
        for i in 0..200_000 {
            let now = start + Duration::from_millis(u64::from(i));
            open(&mut outgoing, &mut incoming, &flood(i), now);
            assert!(outgoing.len() <= MAX_FLOWS && incoming.len() <= MAX_FLOWS, "past the bound at {i}");
            if i == 100_000 {
                // Renewed (past RENEW_AFTER): the newest again, so only later flows are younger.
                assert!(now.duration_since(start) > RENEW_AFTER);
                assert!(!incoming.admit(&none, &reply, now), "evicted by the flood so far");
                open(&mut outgoing, &mut incoming, &legitimate, now);
                assert!(incoming.admit(&none, &reply, now), "noted again");
            }
        }
        assert_eq!((outgoing.len(), incoming.len()), (MAX_FLOWS, MAX_FLOWS));
        // 99,999 flows came after the renewal: more than the bound, so it is gone now; the
        // newest flows are all still there.
        let later = start + Duration::from_secs(201);
        assert!(!incoming.admit(&none, &reply, later), "evicted once MAX_FLOWS newer flows came");
        let newest = |i: u32| packet(UDP, (Ipv4Addr::from(0x0b00_0000 + i), 53), (B, 5000), 0);
        let oldest_kept = 200_000 - u32::try_from(MAX_FLOWS).unwrap();
        assert!(incoming.admit(&none, &newest(oldest_kept), later));
        assert!(incoming.admit(&none, &newest(199_999), later));
        assert!(!incoming.admit(&none, &newest(oldest_kept - 1), later), "the next older is gone");
    }

    #[test]
    fn a_legitimate_flow_outlives_a_flood_smaller_than_the_bound() {
        let mut incoming = Workload::new();
        let none = Rules(vec![]);
        let now = Instant::now();
        let legitimate = Flow { protocol: TCP, local: (B, 40000), remote: (A, 443) };
        incoming.opened(legitimate, now);
        for i in 0..u32::try_from(MAX_FLOWS).unwrap() - 1 {
            let flow =
                Flow { protocol: UDP, local: (B, 5000), remote: (Ipv4Addr::from(0x0b00_0000 + i), 53) };
            incoming.opened(flow, now);
        }
        let reply = packet(TCP, (A, 443), (B, 40000), ACK);
        assert!(incoming.admit(&none, &reply, now), "the table is full, nothing evicted yet");
        incoming.opened(Flow { protocol: UDP, local: (B, 5001), remote: (A, 53) }, now);
        let after = now + LAST_FOR + Duration::from_millis(1);
        assert!(!incoming.admit(&none, &reply, after), "the oldest goes first");
    }

    #[test]
    fn a_flood_from_one_workload_evicts_none_of_anothers_flows() {
        const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
        let none = Rules(vec![]);
        let start = Instant::now();
        // B opened a flow to A, then went quiet.
        let (mut b_out, b) = (Outgoing::new(), Mutex::new(Workload::new()));
        let flow = b_out.note(&packet(TCP, (B, 40000), (A, 443), ACK), start).expect("new flow");
        b.lock().unwrap().opened(flow, start);
        // C, on the same node, opens flows as fast as it can: three times the bound.
        let (mut c_out, c) = (Outgoing::new(), Mutex::new(Workload::new()));
        for i in 0..3 * u32::try_from(MAX_FLOWS).unwrap() {
            let p = packet(UDP, (C, 5000 + (i % 7) as u16), (Ipv4Addr::from(0x0b00_0000 + i), 53), 0);
            if let Some(flow) = c_out.note(&p, start) {
                c.lock().unwrap().opened(flow, start);
            }
        }
        assert_eq!(c.lock().unwrap().len(), MAX_FLOWS, "C's state is at its bound");
        // A floods B's port range too (nothing allows it): B's verdict cache is bounded.
        let mut incoming = Incoming::new();
        for port in 1..=u16::MAX {
            assert!(!incoming.admit(&none, 1, &b, &packet(UDP, (A, 9), (B, port), 0), start));
        }
        let later = start + Duration::from_secs(60);
        let reply = packet(TCP, (A, 443), (B, 40000), ACK);
        assert!(incoming.admit(&none, 1, &b, &reply, later), "B's flow outlived both floods");
        assert_eq!(b.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_receive_paths_last_flow_is_held_per_network_and_view() {
        let rules = Rules(vec![(A, B, 5432)]);
        let (b, other) = (Mutex::new(Workload::new()), Mutex::new(Workload::new()));
        let mut incoming = Incoming::new();
        let now = Instant::now();
        let p = packet(TCP, (A, 40000), (B, 5432), ACK);
        assert!(incoming.admit(&rules, 1, &b, &p, now));
        // The same 5-tuple for a workload with B's address on another network: its own state.
        assert!(!incoming.admit(&Rules(vec![]), 2, &other, &p, now), "another network");
        assert!(incoming.admit(&rules, 1, &b, &p, now));
        // A new view that refuses it: not let through on the strength of the last flow.
        assert!(!incoming.admit(&Versioned(7, Rules(vec![])), 1, &b, &p, now), "another view");
        assert!(!incoming.admit(&Versioned(7, Rules(vec![])), 1, &b, &p, now));
        // Its fast path expires: a reply window closed since is seen.
        let mut out = Outgoing::new();
        let opened = out.note(&packet(UDP, (B, 5000), (A, 53), 0), now).unwrap();
        b.lock().unwrap().opened(opened, now);
        let reply = packet(UDP, (A, 53), (B, 5000), 0);
        let none = Rules(vec![]);
        assert!(incoming.admit(&none, 1, &b, &reply, now + REPLY_WINDOW - LAST_FOR / 2));
        assert!(!incoming.admit(&none, 1, &b, &reply, now + REPLY_WINDOW + LAST_FOR * 2));
    }
}
