//! The admin bundle: the directory `meshctl` reads to find the managers and prove it is an admin
//! (`ca.crt`, `admin.crt`, `admin.key` (0600), `control`: one manager address per line,
//! `managers`: one manager node ID per line, the only certificates accepted as control).

use std::path::Path;

use crate::files::{self, FileError, PUBLIC, SECRET};
use crate::tls::Identity;

/// The admin bundle `meshctl` reads: where the managers are and how to prove being an admin.
#[derive(Clone, Debug)]
pub struct AdminBundle {
    /// Manager addresses, tried in turn; the leader is found from any of them.
    pub managers: Vec<String>,
    /// The managers' node IDs: only their certificates are accepted as control (empty in a
    /// bundle written before they were kept: any manager certificate of the CA).
    pub manager_ids: Vec<String>,
    pub ca_pem: String,
    pub identity: Identity,
}

impl AdminBundle {
    pub fn load(dir: &Path) -> Result<AdminBundle, FileError> {
        Ok(AdminBundle {
            managers: addresses(&files::read_string(&dir.join("control"))?),
            manager_ids: read_ids(&dir.join(MANAGER_IDS))?,
            ca_pem: files::read_string(&dir.join("ca.crt"))?,
            identity: Identity {
                cert_pem: files::read_string(&dir.join("admin.crt"))?,
                key_pem: files::read_string(&dir.join("admin.key"))?,
            },
        })
    }

    /// Records the managers' addresses and IDs in the bundle in `dir`, when they changed, so
    /// that the next call finds a leader even if the managers known so far are gone, and
    /// accepts only the managers there are.
    pub fn remember_managers(
        &mut self,
        dir: &Path,
        managers: &[String],
        ids: &[String],
    ) -> Result<(), FileError> {
        if !managers.is_empty() && self.managers != managers {
            self.managers = managers.to_vec();
            write_addresses(&dir.join("control"), managers)?;
        }
        if !ids.is_empty() && self.manager_ids != ids {
            self.manager_ids = ids.to_vec();
            write_addresses(&dir.join(MANAGER_IDS), ids)?;
        }
        Ok(())
    }

    /// Writes the bundle to `dir` (made 0700; the key 0600).
    pub fn write(&self, dir: &Path) -> Result<(), FileError> {
        files::create_private_dir(dir)?;
        files::write_atomic(&dir.join("ca.crt"), self.ca_pem.as_bytes(), PUBLIC)?;
        files::write_atomic(&dir.join("admin.crt"), self.identity.cert_pem.as_bytes(), PUBLIC)?;
        files::write_atomic(&dir.join("admin.key"), self.identity.key_pem.as_bytes(), SECRET)?;
        write_addresses(&dir.join("control"), &self.managers)?;
        write_addresses(&dir.join(MANAGER_IDS), &self.manager_ids)
    }
}

/// The file of the managers' node IDs, in a bundle or a node's state directory.
pub const MANAGER_IDS: &str = "managers";

/// Node IDs from `path`, one per line; none when the file does not exist.
pub fn read_ids(path: &Path) -> Result<Vec<String>, FileError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(addresses(&files::read_string(path)?))
}

/// Manager addresses from a file: one per line (or separated by commas), blank lines ignored.
pub fn addresses(text: &str) -> Vec<String> {
    text.split(['\n', ',']).map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect()
}

/// Writes manager addresses one per line.
pub fn write_addresses(path: &Path, managers: &[String]) -> Result<(), FileError> {
    let text: String = managers.iter().map(|m| format!("{m}\n")).collect();
    files::write_atomic(path, text.as_bytes(), PUBLIC)
}
