//! The no-bypass filter: what the overlay may deliver into a workload. Service traffic goes
//! through the mesh (mTLS between meshd, policy per request), never through the overlay, so a
//! packet is let into a workload only when it is
//!
//! * ICMP (ping and path-MTU errors keep working);
//! * a new flow that an L4 rule (`protocol = "tcp"`) allows from the sender's service to the
//!   workload's service on that port (TCP and UDP alike);
//! * a reply to a flow the workload itself opened: the send path notes the flows leaving each
//!   workload ([`Outgoing`]) and [`Incoming`] admits the packets of those flows coming back.
//!   A packet merely shaped like a reply (from a port the workload may open, say) is not one.
//!
//! ```text
//!  workload a ──► Outgoing(a).note ──(flow a:x → b:p)──► Incoming.opened
//!  workload a ◄── Incoming.admit: ICMP | Admission::opens(b, a, x) | a opened (a:x, b:p)
//! ```
//!
//! Delivery between two workloads of one node goes through the same rules as delivery from
//! another node, with state of its own ([`Local`]: an [`Incoming`] and the senders' notes, which
//! the send paths share): there is no stateless reverse rule (with `a → b:5432` allowed, `b` may answer `a`'s flows from 5432, not
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
//! the slice changes. Every table is bounded at [`MAX_FLOWS`] and, full, evicts the entry
//! inserted or renewed longest ago in O(1) (a workload opening flows as fast as it can costs a
//! constant per flow). The notes go from the send paths to the receive path however the I/O
//! layer carries them (a bounded channel, with the `linux-io` feature).

mod recent;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::{self, Packet};
use recent::Recent;

/// How long a workload's outgoing flow admits replies after its last outgoing packet.
pub const REPLY_WINDOW: Duration = Duration::from_secs(180);
/// How often the send path renews a flow it already noted.
const RENEW_AFTER: Duration = Duration::from_secs(30);
/// Bound on each table (and on the notes in flight); past it, the entry inserted or renewed
/// longest ago goes.
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
    /// receive path must hear of it ([`Incoming::opened`]): new, or due for renewal.
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

/// The receive path's side: decides on every packet arriving for a local workload.
pub struct Incoming {
    /// Flows local workloads opened -> when last renewed.
    opened: Recent<Flow, Instant>,
    /// (remote, local, port, protocol) -> the policy's verdict, for the current view.
    decided: Recent<(Ipv4Addr, Ipv4Addr, u16, u8), bool>,
    view: usize,
    /// The flow admitted last, and when (a burst is mostly one flow): admitted again without the
    /// tables for up to [`LAST_FOR`] while the view is the same.
    last: Option<(Flow, Instant)>,
}

impl Default for Incoming {
    fn default() -> Incoming {
        Incoming { opened: Recent::new(MAX_FLOWS), decided: Recent::new(MAX_FLOWS), view: 0, last: None }
    }
}

/// How long the last admitted flow skips the tables (far below [`REPLY_WINDOW`]).
const LAST_FOR: Duration = Duration::from_millis(500);

impl Incoming {
    pub fn new() -> Incoming {
        Incoming::default()
    }

    /// Takes in a flow a local workload opened (or renewed), as [`Outgoing::note`] returned it.
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

    /// Whether `packet` (already authenticated, for a local workload) may be delivered.
    /// `view` identifies the policy and slice behind `admission`: cached verdicts go when it
    /// changes.
    pub fn admit(&mut self, admission: &impl Admission, view: usize, packet: &[u8], now: Instant) -> bool {
        match packet::classify(packet) {
            Packet::Icmp => true,
            Packet::Fragment | Packet::Other => false,
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
        let (remote, local) = (flow.remote, flow.local);
        let key = (remote.0, local.0, local.1, flow.protocol);
        if let Some(&verdict) = self.decided.get(&key) {
            return verdict;
        }
        let verdict = admission.opens(remote.0, local.0, local.1);
        self.decided.insert(key, verdict);
        verdict
    }
}

/// Delivery between two workloads of this node, which never crosses the underlay: the same
/// rules as [`Incoming`], with the sending workload's flows noted as it sends them (they need no
/// channel: both ends are here).
#[derive(Default)]
pub struct Local {
    incoming: Incoming,
    outgoing: Outgoing,
}

impl Local {
    pub fn new() -> Local {
        Local::default()
    }

    /// Whether `packet`, sent by a workload of this node to another, may be delivered; when it
    /// may, its flow is noted as one the sender opened, so that the replies to it pass.
    pub fn deliver(&mut self, admission: &impl Admission, view: usize, packet: &[u8], now: Instant) -> bool {
        if !self.incoming.admit(admission, view, packet, now) {
            return false;
        }
        if let Some(flow) = self.outgoing.note(packet, now) {
            self.incoming.opened(flow, now);
        }
        true
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
        let mut local = Local::new();
        let now = Instant::now();
        for (step, p, delivered) in steps {
            assert_eq!(local.deliver(&rules, 1, &p, now), delivered, "{step}");
        }
    }

    #[test]
    fn a_reply_shaped_packet_from_another_node_needs_a_flow_the_workload_opened() {
        let rules = Rules(vec![(A, B, 5432)]);
        let mut incoming = Incoming::new();
        let now = Instant::now();
        // On B's node: A may open B:5432, so B's answers leave from 5432; nothing lets a packet
        // from A:5432 (or to another port of B) in.
        assert!(!incoming.admit(&rules, 1, &packet(UDP, (A, 5432), (B, 9999), 0), now));
        // On A's node: A opened B:5432 from 40000; B's answer passes, B from 5432 elsewhere not.
        let mut outgoing = Outgoing::new();
        let flow = outgoing.note(&packet(TCP, (A, 40000), (B, 5432), SYN), now).expect("new flow");
        incoming.opened(flow, now);
        assert!(incoming.admit(&rules, 1, &packet(TCP, (B, 5432), (A, 40000), SYN | ACK), now));
        assert!(!incoming.admit(&rules, 1, &packet(UDP, (B, 5432), (A, 9999), 0), now));
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
            assert_eq!(Incoming::new().admit(&rules, 1, &p, now), admitted, "from another node: {case}");
            assert_eq!(Local::new().deliver(&rules, 1, &p, now), admitted, "on this node: {case}");
        }
    }

    #[test]
    fn a_flood_of_flows_keeps_the_tables_at_their_bound_and_evicts_by_age_only() {
        let mut outgoing = Outgoing::new();
        let mut incoming = Incoming::new();
        let none = Rules(vec![]);
        let start = Instant::now();
        let open = |outgoing: &mut Outgoing, incoming: &mut Incoming, p: &[u8], now| {
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
                assert!(!incoming.admit(&none, 1, &reply, now), "evicted by the flood so far");
                open(&mut outgoing, &mut incoming, &legitimate, now);
                assert!(incoming.admit(&none, 1, &reply, now), "noted again");
            }
        }
        assert_eq!((outgoing.len(), incoming.len()), (MAX_FLOWS, MAX_FLOWS));
        // 99,999 flows came after the renewal: more than the bound, so it is gone now; the
        // newest flows are all still there.
        let later = start + Duration::from_secs(201);
        assert!(!incoming.admit(&none, 1, &reply, later), "evicted once MAX_FLOWS newer flows came");
        let newest = |i: u32| packet(UDP, (Ipv4Addr::from(0x0b00_0000 + i), 53), (B, 5000), 0);
        let oldest_kept = 200_000 - u32::try_from(MAX_FLOWS).unwrap();
        assert!(incoming.admit(&none, 1, &newest(oldest_kept), later));
        assert!(incoming.admit(&none, 1, &newest(199_999), later));
        assert!(!incoming.admit(&none, 1, &newest(oldest_kept - 1), later), "the next older is gone");
    }

    #[test]
    fn a_legitimate_flow_outlives_a_flood_smaller_than_the_bound() {
        let mut incoming = Incoming::new();
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
        assert!(incoming.admit(&none, 1, &reply, now), "the table is full, nothing evicted yet");
        incoming.opened(Flow { protocol: UDP, local: (B, 5001), remote: (A, 53) }, now);
        let after = now + LAST_FOR + Duration::from_millis(1);
        assert!(!incoming.admit(&none, 1, &reply, after), "the oldest goes first");
    }
}
