//! The node's namespaces as the watcher last reported them: the pods under `--netns-dir`, the
//! host, and whether the directory itself could be read (an unreadable directory is an
//! unknown node, never an empty one). An entry listed but not read yet is unknown too: the
//! agent is not ready until every listed entry was read once.

use std::collections::{BTreeMap, BTreeSet};

use multus_eni_sidecar::reconcile::DesiredInterface;

use crate::plan::{NetnsId, PodNetns};
use crate::watch::Seen;

/// The pods' namespaces and the host's.
#[derive(Debug, Default)]
pub struct View {
    pub pods: BTreeMap<String, PodNetns>,
    pub host: Vec<DesiredInterface>,
    /// The directory was read in full at least once.
    pub dir_read: bool,
    /// The last directory read (or watch) failed.
    pub dir_failed: Option<String>,
    /// Entries that are network namespaces the agent cannot read (now): what they held stays
    /// wanted, and nothing is reclaimed while there is one.
    pub unreadable: BTreeMap<String, String>,
    /// Entries that are no network namespace at all (a stale regular file): no pod, ignored.
    pub not_namespaces: BTreeMap<String, String>,
    /// The entries of the last full read of the directory.
    pub listed: BTreeSet<String>,
}

impl View {
    /// Applies what the watcher saw; returns the identity of a pod namespace that went away.
    pub fn apply(&mut self, seen: Seen) -> Option<NetnsId> {
        match seen {
            Seen::Pod(pod) => {
                self.unreadable.remove(&pod.name);
                self.not_namespaces.remove(&pod.name);
                self.pods.insert(pod.name.clone(), pod);
            }
            Seen::PodGone { name } => {
                self.unreadable.remove(&name);
                self.not_namespaces.remove(&name);
                self.listed.remove(&name);
                let pod = self.pods.remove(&name)?;
                tracing::info!(action = "netns", outcome = "gone", netns = %name, "a pod network namespace was deleted");
                return Some(pod.id);
            }
            Seen::PodUnreadable { name, error } => {
                // What was last seen of it stays: a namespace the agent cannot read now is not
                // a namespace that let go of its addresses.
                if self
                    .unreadable
                    .insert(name.clone(), error.clone())
                    .is_none()
                {
                    tracing::warn!(action = "netns", outcome = "unreadable", netns = %name, error = %error, "an entry of --netns-dir cannot be read; what it held stays wanted, and nothing is reclaimed while it stays so");
                }
            }
            Seen::NotANamespace { name, error } => {
                self.unreadable.remove(&name);
                if let Some(pod) = self.pods.remove(&name) {
                    // Was a namespace, is a plain file now: the pod is gone.
                    self.not_namespaces.insert(name, error);
                    return Some(pod.id);
                }
                if self
                    .not_namespaces
                    .insert(name.clone(), error.clone())
                    .is_none()
                {
                    tracing::warn!(action = "netns", outcome = "ignored", netns = %name, error = %error, "an entry of --netns-dir is no network namespace (a stale file?): ignored, it is no pod");
                }
            }
            Seen::Host(interfaces) => self.host = interfaces,
            Seen::DirRead { names } => {
                if self.dir_failed.take().is_some() || !self.dir_read {
                    tracing::info!(
                        action = "netns_dir",
                        outcome = "read",
                        entries = names.len(),
                        "read --netns-dir"
                    );
                }
                self.pods.retain(|n, _| names.contains(n));
                self.unreadable.retain(|n, _| names.contains(n));
                self.not_namespaces.retain(|n, _| names.contains(n));
                self.listed = names;
                self.dir_read = true;
            }
            Seen::DirFailed { error } => {
                if self.dir_failed.is_none() {
                    tracing::error!(action = "netns_dir", outcome = "failed", error = %error, "cannot read --netns-dir: not ready, nothing released or reclaimed until it can be read");
                }
                self.dir_failed = Some(error);
            }
        }
        None
    }

    pub fn pod_by_id(&self, id: NetnsId) -> Option<&PodNetns> {
        self.pods.values().find(|p| p.id == id)
    }

    /// Whether what the node holds is known well enough to unassign what no pod holds.
    pub fn complete(&self) -> bool {
        self.dir_read && self.dir_failed.is_none()
    }

    /// Whether every namespace could be read too: needed before reclaiming leaks.
    pub fn every_namespace_read(&self) -> bool {
        self.complete() && self.unreadable.is_empty()
    }

    /// Whether every entry of the last full read has been read once (a pod, unreadable, or no
    /// namespace): needed before the agent says it is ready.
    pub fn every_entry_seen(&self) -> bool {
        self.complete()
            && self.listed.iter().all(|n| {
                self.pods.contains_key(n)
                    || self.unreadable.contains_key(n)
                    || self.not_namespaces.contains_key(n)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pod(name: &str, ino: u64) -> PodNetns {
        PodNetns {
            name: name.into(),
            id: NetnsId { dev: 4, ino },
            interfaces: Vec::new(),
            read_at: Instant::now(),
        }
    }

    #[test]
    fn an_unreadable_directory_is_an_unknown_node_not_an_empty_one() {
        let mut v = View::default();
        assert!(!v.complete(), "nothing read yet");
        v.apply(Seen::DirRead {
            names: ["a".to_string()].into(),
        });
        assert!(!v.every_entry_seen(), "listed, not read yet");
        v.apply(Seen::Pod(pod("a", 1)));
        assert!(v.every_namespace_read() && v.every_entry_seen());
        v.apply(Seen::DirFailed {
            error: "EACCES".into(),
        });
        assert!(!v.complete());
        assert_eq!(v.pods.len(), 1, "what was seen is kept");
        v.apply(Seen::DirRead {
            names: ["a".to_string(), "b".to_string()].into(),
        });
        v.apply(Seen::PodUnreadable {
            name: "b".into(),
            error: "not a netns".into(),
        });
        assert!(v.complete() && !v.every_namespace_read());
        // A namespace read before and unreadable now keeps what it held.
        let unreadable = Seen::PodUnreadable {
            name: "a".into(),
            error: "EIO".into(),
        };
        assert_eq!(v.apply(unreadable), None);
        assert!(v.pod_by_id(NetnsId { dev: 4, ino: 1 }).is_some());
        assert_eq!(
            v.apply(Seen::PodGone { name: "a".into() }),
            Some(NetnsId { dev: 4, ino: 1 })
        );
        assert!(v.pod_by_id(NetnsId { dev: 4, ino: 1 }).is_none());
    }

    #[test]
    fn a_stale_file_is_no_pod_and_does_not_stop_reclaim() {
        let mut v = View::default();
        v.apply(Seen::DirRead {
            names: ["a".to_string(), "stale".to_string()].into(),
        });
        v.apply(Seen::Pod(pod("a", 1)));
        v.apply(Seen::NotANamespace {
            name: "stale".into(),
            error: "not a network namespace".into(),
        });
        assert!(
            v.every_namespace_read(),
            "a plain file is no unreadable pod"
        );
        assert!(v.every_entry_seen());
        // A namespace whose entry became a plain file (the pod is gone).
        let gone = v.apply(Seen::NotANamespace {
            name: "a".into(),
            error: "not a network namespace".into(),
        });
        assert_eq!(gone, Some(NetnsId { dev: 4, ino: 1 }));
        assert!(v.pods.is_empty());
    }
}
