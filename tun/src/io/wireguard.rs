//! The WireGuard transport's timers: every tunnel's handshake retries, rekeying and keepalives,
//! run on one tick for the whole node.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::core::Tables;

/// How often the timers run: boringtun's timers count in quarters of a second at best.
const TICK: Duration = Duration::from_millis(250);

pub(super) struct Timers {
    pub socket: Arc<UdpSocket>,
    pub tables: Arc<ArcSwap<Tables>>,
}

impl Timers {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        loop {
            tick.tick().await;
            let tables = self.tables.load_full();
            for (network, peer, underlay) in tables.wireguard_peers() {
                if !peer.tick(network, &mut out) {
                    continue;
                }
                let Some(to) = underlay else { continue };
                if let Err(e) = self.socket.send_to(&out, to).await {
                    debug!(error = %e, %to, "sending a WireGuard timer message failed");
                }
            }
        }
    }
}
