//! The overlay as this node wires it: `tun`'s data plane (the packet core, the no-bypass filter
//! and the Linux I/O) bound on the underlay port, asking the mesh's [`View`] about new flows into
//! workloads, with tables made from each slice. meshd moves no packet itself; the reconciler
//! attaches each workload's interfaces to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::keys::KeyUse;
use mesh_api::slice::NodeSlice;
use tun::core::{Config, KeyRole, NetworkConfig, PeerConfig, PeerKey};

use crate::mesh::View;

/// This node's overlay.
pub type Overlay = tun::io::Overlay<View>;

/// Where the overlay (UDP) and the mesh port (TCP) listen: every address, at the underlay's port.
pub fn listen_address(underlay: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), underlay.port())
}

/// Binds the overlay on `listen` for this run's `boot` number, its filter asking `views`.
pub fn bind(listen: SocketAddr, boot: u16, views: Arc<ArcSwap<View>>) -> std::io::Result<Overlay> {
    Overlay::bind(listen, boot, views)
}

/// The next boot number, stored (and synced) before it is used: part of every nonce's counter
/// and of every pair key, so a restarted meshd never repeats a nonce (see the `tun` crate docs).
/// Only a missing file means a first start: an unreadable or corrupt one is an error, never a
/// silent restart at 1 (which would repeat the nonces of boot 1).
pub fn next_boot(dir: &Path) -> std::io::Result<u16> {
    let path = dir.join("boot");
    let last: u16 = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            std::io::Error::other(format!(
                "{} holds {:?}, not a boot number: refusing to start, as starting again from 1 \
                 would repeat nonces; join this node again",
                path.display(),
                text.trim()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            return Err(std::io::Error::other(format!(
                "cannot read {}: {e}; refusing to start without the last boot number",
                path.display()
            )));
        }
    };
    let next = last.checked_add(1).ok_or_else(|| {
        std::io::Error::other(format!("{} is spent (65535 starts): join this node again", path.display()))
    })?;
    mesh_api::files::write_atomic(&path, format!("{next}\n").as_bytes(), mesh_api::files::SECRET)
        .map_err(std::io::Error::other)?;
    Ok(next)
}

/// The core's view of a slice, with this node's WireGuard keys from `wireguard`.
pub fn config(slice: &NodeSlice, wireguard: &crate::wireguard::Keys) -> Config {
    Config {
        local_index: slice.node_index,
        networks: slice
            .networks
            .iter()
            .map(|n| NetworkConfig {
                id: n.id,
                name: n.name.clone(),
                encrypted: n.encrypted,
                wireguard: n.wireguard.and_then(|_| wireguard.get(n.id)),
                keys: n
                    .pair_keys
                    .iter()
                    .filter_map(|k| {
                        let role = match n.ring.iter().find(|(_, e)| *e == k.epoch)?.0 {
                            KeyUse::Next => KeyRole::Next,
                            KeyUse::Current => KeyRole::Current,
                            KeyUse::Previous => KeyRole::Previous,
                        };
                        Some(PeerKey { peer: k.peer, role, epoch: k.epoch, key: k.key })
                    })
                    .collect(),
                peers: n
                    .peers
                    .iter()
                    .map(|p| PeerConfig {
                        address: p.address,
                        node_index: p.node_index,
                        underlay: p.underlay,
                        wireguard: p.wireguard,
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_numbers_grow_and_are_stored_before_use() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_boot(dir.path()).unwrap(), 1);
        assert_eq!(next_boot(dir.path()).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(dir.path().join("boot")).unwrap(), "2\n");
        std::fs::write(dir.path().join("boot"), "65535\n").unwrap();
        let spent = next_boot(dir.path()).unwrap_err().to_string();
        assert!(spent.contains("is spent (65535 starts): join this node again"), "{spent}");
        for corrupt in ["", "banana\n", "-1\n", "70000\n"] {
            std::fs::write(dir.path().join("boot"), corrupt).unwrap();
            let refused = next_boot(dir.path()).unwrap_err().to_string();
            assert!(refused.contains("not a boot number: refusing to start"), "{refused}");
            assert_eq!(std::fs::read_to_string(dir.path().join("boot")).unwrap(), corrupt, "left as found");
        }
        // Unreadable: a directory where the file should be.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("boot")).unwrap();
        assert!(next_boot(other.path()).unwrap_err().to_string().contains("refusing to start"));
    }
}
