//! The agent's record on the node (`--state-dir`): which ENIs are this node's Multus ENIs
//! (by MAC) and what it assigned, so that a restarted agent reads those ENIs again and
//! reclaims what was orphaned while it was down.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the file's format.
pub const FORMAT: u32 = 1;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// ENI id by MAC (`0e:..`), for every MAC a pod of this node has claimed.
    pub enis: BTreeMap<String, String>,
    /// Addresses this agent assigned and has not unassigned, by ENI id.
    pub assigned: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl Checkpoint {
    /// `agent.json` in the state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("agent.json")
    }

    /// Reads the checkpoint; a missing file is an empty one (first start on this node).
    pub fn load(path: &Path) -> io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&Checkpoint {
            version: FORMAT,
            ..self.clone()
        })
        .map_err(io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)
    }

    pub fn record_assigned(&mut self, eni: &str, addresses: impl IntoIterator<Item = IpAddr>) {
        self.assigned
            .entry(eni.to_string())
            .or_default()
            .extend(addresses);
    }

    pub fn record_unassigned(&mut self, eni: &str, addresses: impl IntoIterator<Item = IpAddr>) {
        if let Some(set) = self.assigned.get_mut(eni) {
            for a in addresses {
                set.remove(&a);
            }
            if set.is_empty() {
                self.assigned.remove(eni);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_checkpoint_loads_back_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = Checkpoint::path(dir.path());
        assert_eq!(Checkpoint::load(&path).ok(), Some(Checkpoint::default()));
        let mut c = Checkpoint::default();
        c.enis.insert("0e:00:00:00:00:01".into(), "eni-1".into());
        let a: IpAddr = "10.0.1.5".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        c.record_assigned("eni-1", [a]);
        c.save(&path).unwrap_or_else(|e| panic!("{e}"));
        let back = Checkpoint::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.version, FORMAT);
        assert_eq!(back.enis, c.enis);
        assert_eq!(back.assigned, c.assigned);
        let mut back = back;
        back.record_unassigned("eni-1", [a]);
        assert!(back.assigned.is_empty());
    }
}
