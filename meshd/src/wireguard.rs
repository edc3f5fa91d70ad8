//! This node's WireGuard static keys: one per WireGuard network it has an endpoint on, made here
//! and kept in `<state dir>/wireguard/<network ID>.key` (mode 0600, beside the node key). Only
//! the public halves leave the node: reported to control, which hands them to the network's
//! other nodes. A key is made when the node joins the network's traffic and again whenever the
//! network's generation moves on (control's rotation), and deleted when the node leaves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use base64::Engine;
use mesh_api::files::{self, SECRET};
use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use tracing::{info, warn};
use tun::wireguard::StaticKey;

/// The keys held, by network ID: each with its generation.
pub struct Keys {
    dir: PathBuf,
    held: Mutex<BTreeMap<u32, (u32, StaticKey)>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_map().entries(held.iter().map(|(n, (g, k))| (n, (g, k)))).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
}

impl Keys {
    /// The keys kept under `state_dir`. A file that cannot be read is an error (never silently a
    /// new key, which would cut the node's sessions without a word).
    pub fn open(state_dir: &Path) -> Result<Keys, KeyError> {
        let dir = state_dir.join("wireguard");
        let mut held = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.collect::<Result<Vec<_>, _>>().map_err(|e| file_error(&dir, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(file_error(&dir, e)),
        };
        for entry in entries {
            let path = entry.path();
            let Some(network) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let text = files::read_string(&path).map_err(|e| file_error(&path, e))?;
            held.insert(
                network,
                parse(&text).map_err(|why| KeyError::File { path: path.display().to_string(), why })?,
            );
        }
        Ok(Keys { dir, held: Mutex::new(held) })
    }

    /// No keys, and none to be made: for a node without a session that makes them.
    pub fn empty(state_dir: &Path) -> Keys {
        Keys { dir: state_dir.join("wireguard"), held: Mutex::new(BTreeMap::new()) }
    }

    /// This node's key on network `network`, if it holds one.
    pub fn get(&self, network: u32) -> Option<StaticKey> {
        self.lock().get(&network).map(|(_, k)| k.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, (u32, StaticKey)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, network: u32) -> PathBuf {
        self.dir.join(format!("{network}.key"))
    }

    /// Brings the keys in line with `slice`: one for each WireGuard network in it, of the
    /// network's generation (made when missing or of an earlier one), none for the networks the
    /// node left. Returns the public keys control does not hold yet (as the node's own entries
    /// among the network's peers show): those to report.
    pub fn sync(&self, slice: &NodeSlice) -> Result<Vec<pb::WireguardKey>, KeyError> {
        let mut held = self.lock();
        let mut report = Vec::new();
        for n in &slice.networks {
            let Some(generation) = n.wireguard else { continue };
            let key = match held.get(&n.id) {
                Some((g, key)) if *g == generation => key.clone(),
                _ => {
                    let key = StaticKey::from_bytes(random_key());
                    std::fs::create_dir_all(&self.dir).map_err(|e| file_error(&self.dir, e))?;
                    let path = self.path(n.id);
                    files::write_atomic(&path, render(generation, &key).as_bytes(), SECRET)
                        .map_err(|e| file_error(&path, e))?;
                    info!(network = %n.name, generation, public = %encode(&key.public()), "WireGuard key made");
                    held.insert(n.id, (generation, key.clone()));
                    key
                }
            };
            let public = key.public();
            let known =
                n.peers.iter().any(|p| p.node_index == slice.node_index && p.wireguard == Some(public));
            if !known {
                report.push(pb::WireguardKey { network: n.id, generation, public: public.to_vec() });
            }
        }
        let gone: Vec<u32> = held
            .keys()
            .copied()
            .filter(|id| !slice.networks.iter().any(|n| n.id == *id && n.wireguard.is_some()))
            .collect();
        for id in gone {
            held.remove(&id);
            let path = self.path(id);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), error = %e, "cannot delete a WireGuard key no longer used");
            }
        }
        Ok(report)
    }
}

/// 32 random bytes from the OS (clamped into a private key by X25519 itself).
fn random_key() -> [u8; 32] {
    mesh_api::ids::random_bytes::<32>()
}

/// A public key as `wg` shows it: base64.
pub fn encode(public: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(public)
}

fn render(generation: u32, key: &StaticKey) -> String {
    format!(
        "generation {generation}\nprivate {}\n",
        base64::engine::general_purpose::STANDARD.encode(key.bytes())
    )
}

fn parse(text: &str) -> Result<(u32, StaticKey), String> {
    let mut lines = text.lines();
    let generation = lines
        .next()
        .and_then(|l| l.strip_prefix("generation "))
        .and_then(|g| g.trim().parse().ok())
        .ok_or("no `generation N` line")?;
    let private = lines
        .next()
        .and_then(|l| l.strip_prefix("private "))
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k.trim()).ok())
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or("no `private <base64 of 32 bytes>` line")?;
    Ok((generation, StaticKey::from_bytes(private)))
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::File { path: path.display().to_string(), why: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::slice::{Peer, SliceNetwork};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    /// A network in a test slice: its ID, its WireGuard generation, and this node's public key
    /// as control holds it.
    type Net = (u32, Option<u32>, Option<[u8; 32]>);

    fn slice(networks: &[Net]) -> NodeSlice {
        let node: mesh_api::ids::NodeId = mesh_api::ids::NodeId::random();
        NodeSlice {
            node: node.clone(),
            node_index: 7,
            networks: networks
                .iter()
                .map(|&(id, generation, own)| SliceNetwork {
                    name: format!("n{id}"),
                    id,
                    subnet: "10.1.0.0/24".parse().unwrap(),
                    encrypted: true,
                    wireguard: generation,
                    ring: vec![],
                    pair_keys: vec![],
                    peers: Arc::from(vec![Peer {
                        address: "10.1.0.2".parse().unwrap(),
                        node: node.clone(),
                        underlay: None,
                        node_index: 7,
                        boot: 1,
                        wireguard: own,
                    }]),
                    services: Arc::from(vec![]),
                })
                .collect(),
            version: 1,
            endpoints: vec![],
            policy: None,
            visibility: Default::default(),
            removed_nodes: vec![],
            managers: vec![],
            manager_ids: vec![],
            trust_pem: String::new(),
            cross_pem: String::new(),
            published: vec![],
            ingress: vec![],
        }
    }

    #[test]
    fn keys_are_made_per_network_kept_across_restarts_rotated_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::open(dir.path()).unwrap();
        let report = keys.sync(&slice(&[(5, Some(1), None), (6, None, None)])).unwrap();
        assert_eq!(report.len(), 1, "one WireGuard network, its key unknown to control");
        assert_eq!(report[0].network, 5);
        let first = keys.get(5).unwrap();
        assert_eq!(report[0].public, first.public().to_vec());
        assert!(keys.get(6).is_none(), "an AES-GCM network has no WireGuard key");
        let file = dir.path().join("wireguard/5.key");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // Control holds it now: nothing to report, and the same key after a restart.
        let known = slice(&[(5, Some(1), Some(first.public()))]);
        assert!(keys.sync(&known).unwrap().is_empty());
        let again = Keys::open(dir.path()).unwrap();
        assert_eq!(again.get(5), Some(first.clone()));
        assert!(again.sync(&known).unwrap().is_empty());
        // A new generation: a new key, reported.
        let report = again.sync(&slice(&[(5, Some(2), Some(first.public()))])).unwrap();
        let second = again.get(5).unwrap();
        assert_ne!(second, first);
        assert_eq!(report[0].generation, 2);
        assert_eq!(report[0].public, second.public().to_vec());
        // The node leaves the network: the key goes, from memory and disk.
        again.sync(&slice(&[])).unwrap();
        assert!(again.get(5).is_none());
        assert!(!file.exists());
    }

    #[test]
    fn a_corrupt_key_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("wireguard")).unwrap();
        std::fs::write(dir.path().join("wireguard/5.key"), "generation x\n").unwrap();
        let e = Keys::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("5.key") && e.contains("generation"), "{e}");
    }
}
