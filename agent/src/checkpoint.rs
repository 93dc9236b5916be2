//! The agent's record on the node (`--state-dir`): which addresses of its instance's Multus ENIs
//! are its own (it assigned them, or saw them there while a pod of this node held them), and the
//! conflict history. A restarted agent knows from it which missing addresses were taken from it
//! (a conflict) rather than never assigned, and which addresses on its ENIs it may reclaim: an
//! address no pod of this node ever held is not its own (`unowned`) and stays. It is a memory,
//! never a source of truth: the ENIs come from EC2 (attached to this instance) and what is
//! wanted from the pods' namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::conflict::SavedConflict;

/// Version of the file's format (2: `owned` replaced `assigned`, `conflicts` added; a version 1
/// file loads, its `assigned` read as `owned`. 3: `prefixes` added; older files load without
/// any).
pub const FORMAT: u32 = 3;

/// The file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// ENI id by MAC (`0e:..`): this instance's Multus ENIs at the last read (for humans).
    pub enis: BTreeMap<String, String>,
    /// Addresses that are this agent's own, by ENI id: it assigned them, or saw them on the
    /// ENI while a pod of this node held them there; until it unassigned them.
    #[serde(alias = "assigned")]
    pub owned: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The conflict history by address ([`crate::conflict`]).
    #[serde(default)]
    pub conflicts: BTreeMap<IpAddr, SavedConflict>,
    /// Delegated prefixes that are this agent's own, by ENI id (prefix mode): it assigned them,
    /// or saw them on the ENI while a pod of this node held an address inside; until it
    /// unassigned them. A restart keeps them, and their idle delay starts over.
    #[serde(default)]
    pub prefixes: BTreeMap<String, BTreeSet<IpNet>>,
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

    /// Writes the checkpoint atomically and durably: a temporary file, synced, renamed over
    /// the old one, and the directory synced, so a crash or power loss leaves either the old
    /// or the new file, never an empty one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::io::Write;

        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&Checkpoint {
            version: FORMAT,
            ..self.clone()
        })
        .map_err(io::Error::other)?;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Records addresses as this agent's own on `eni`; returns whether one is new.
    pub fn record_owned(&mut self, eni: &str, addresses: impl IntoIterator<Item = IpAddr>) -> bool {
        let set = self.owned.entry(eni.to_string()).or_default();
        let before = set.len();
        set.extend(addresses);
        set.len() != before
    }

    /// Forgets addresses this agent unassigned from `eni` (or that left it while released).
    pub fn record_unassigned(&mut self, eni: &str, addresses: impl IntoIterator<Item = IpAddr>) {
        if let Some(set) = self.owned.get_mut(eni) {
            for a in addresses {
                set.remove(&a);
            }
            if set.is_empty() {
                self.owned.remove(eni);
            }
        }
    }

    /// Whether `address` on `eni` is this agent's own.
    pub fn owns(&self, eni: &str, address: IpAddr) -> bool {
        self.owned.get(eni).is_some_and(|s| s.contains(&address))
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
        assert!(c.record_owned("eni-1", [a]));
        assert!(!c.record_owned("eni-1", [a]), "already owned: nothing new");
        c.save(&path).unwrap_or_else(|e| panic!("{e}"));
        let back = Checkpoint::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.version, FORMAT);
        assert_eq!(back.enis, c.enis);
        assert_eq!(back.owned, c.owned);
        assert!(back.owns("eni-1", a));
        let mut back = back;
        back.record_unassigned("eni-1", [a]);
        assert!(back.owned.is_empty());
    }

    #[test]
    fn a_version_1_checkpoint_reads_its_assigned_addresses_as_owned() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = Checkpoint::path(dir.path());
        let v1 = r#"{"version":1,"enis":{},"assigned":{"eni-1":["10.0.1.5"]}}"#;
        std::fs::write(&path, v1).unwrap_or_else(|e| panic!("{e}"));
        let c = Checkpoint::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let a: IpAddr = "10.0.1.5".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert!(c.owns("eni-1", a));
        assert!(c.conflicts.is_empty());
        assert!(c.prefixes.is_empty());
    }

    #[test]
    fn prefixes_round_trip_and_a_version_2_checkpoint_loads_without_any() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = Checkpoint::path(dir.path());
        let v2 = r#"{"version":2,"enis":{},"owned":{"eni-1":["10.0.1.5"]},"conflicts":{}}"#;
        std::fs::write(&path, v2).unwrap_or_else(|e| panic!("{e}"));
        let mut c = Checkpoint::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.prefixes.is_empty());
        let p4: IpNet = "10.0.1.64/28".parse().unwrap_or_else(|e| panic!("{e}"));
        let p6: IpNet = "2001:db8::7:0:0:0/80"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        c.prefixes.insert("eni-1".into(), [p4, p6].into());
        c.save(&path).unwrap_or_else(|e| panic!("{e}"));
        let back = Checkpoint::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.version, FORMAT);
        assert_eq!(back.prefixes, c.prefixes);
        assert_eq!(back.owned, c.owned);
    }
}
