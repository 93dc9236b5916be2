//! The node's network namespaces as events: new and deleted entries of `--netns-dir` from
//! inotify, address and link changes inside each pod namespace from a netlink socket opened in
//! that namespace, and the host namespace the same way. What it sees goes to the node task as
//! plain [`Seen`] values; it decides nothing.
//!
//! A netlink socket belongs to the namespace it was created in, whatever thread uses it later:
//! each socket is created on a short-lived thread that entered the namespace (`setns(2)` changes
//! only the calling thread), then served by the agent's runtime. The socket holds a reference to
//! the namespace, so it is closed as soon as the entry leaves the directory: the agent must never
//! keep a deleted pod's interfaces alive.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use multus_eni_sidecar::addresses::{AddressWatcher, InterfaceTable};
use multus_eni_sidecar::reconcile::DesiredInterface;
use nix::sched::{CloneFlags, setns};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::metrics::{LimitLabels, Metrics};
use crate::plan::{NetnsId, PodNetns};

/// What the watcher saw.
#[derive(Debug)]
pub enum Seen {
    /// A pod namespace was read: at its first sight, after a change, or when asked to look.
    Pod(PodNetns),
    /// A pod namespace's entry left the directory.
    PodGone { name: String },
    /// A network namespace the agent cannot read (now).
    PodUnreadable { name: String, error: String },
    /// An entry that is no network namespace (a stale regular file): no pod.
    NotANamespace { name: String, error: String },
    /// The host namespace was read.
    Host(Vec<DesiredInterface>),
    /// The directory was read in full: its entries, each watched from now on (at start and
    /// each rescan).
    DirRead { names: BTreeSet<String> },
    /// The directory cannot be read: the node's pods are unknown (not an empty node).
    DirFailed { error: String },
}

/// What the node task asks of the watcher.
#[derive(Debug)]
pub enum Ask {
    /// Read this pod namespace again now (a sidecar claimed or released).
    Look { name: String },
    /// Read the directory and every namespace again (resync).
    Rescan,
}

/// The node task's handle on the watcher.
#[derive(Debug, Clone)]
pub struct WatchHandle {
    asks: mpsc::UnboundedSender<Ask>,
}

impl WatchHandle {
    pub fn ask(&self, ask: Ask) {
        let _ = self.asks.send(ask);
    }
}

/// Starts the watcher of `dir` and of the host namespace; what it sees is sent through `seen`.
pub fn spawn(
    dir: PathBuf,
    max_reads: usize,
    metrics: Arc<Metrics>,
    seen: impl Fn(Seen) + Send + Sync + 'static,
) -> WatchHandle {
    let (asks, inbox) = mpsc::unbounded_channel();
    let watcher = DirWatcher {
        dir,
        reads: Arc::new(Semaphore::new(max_reads.max(1))),
        metrics,
        seen: Arc::new(seen),
        pods: BTreeMap::new(),
    };
    tokio::spawn(watcher.run(inbox));
    WatchHandle { asks }
}

type SeenFn = Arc<dyn Fn(Seen) + Send + Sync>;

/// One pod namespace being watched.
struct PodTask {
    look: mpsc::UnboundedSender<()>,
    task: JoinHandle<()>,
    /// The namespace's identity once opened: an entry whose device/inode changed (renamed over
    /// without an inotify event reaching us) is another pod.
    id: Arc<OnceLock<NetnsId>>,
}

impl Drop for PodTask {
    /// Closes the namespace's netlink socket with the task.
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct DirWatcher {
    dir: PathBuf,
    reads: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    seen: SeenFn,
    pods: BTreeMap<String, PodTask>,
}

// === impl DirWatcher ===

impl DirWatcher {
    async fn run(mut self, mut asks: mpsc::UnboundedReceiver<Ask>) {
        let mut host = self.spawn_host();
        let mut inotify = None;
        loop {
            if inotify.is_none() {
                inotify = match watch_dir(&self.dir) {
                    Ok(stream) => Some(stream),
                    Err(e) => {
                        (self.seen)(Seen::DirFailed {
                            error: format!("cannot watch {}: {e}", self.dir.display()),
                        });
                        None
                    }
                };
                if inotify.is_some() {
                    self.rescan();
                }
            }
            tokio::select! {
                event = next_event(&mut inotify) => match event {
                    Some(Ok(event)) => {
                        if self.on_event(event.mask, event.name) {
                            // The watched directory itself is gone: watch it anew at the next
                            // resync (it may be created again).
                            inotify = None;
                        }
                    }
                    Some(Err(e)) => {
                        (self.seen)(Seen::DirFailed { error: format!("inotify on {}: {e}", self.dir.display()) });
                        inotify = None;
                    }
                    None => inotify = None,
                },
                ask = asks.recv() => match ask {
                    Some(Ask::Look { name }) => {
                        if let Some(pod) = self.pods.get(&name) {
                            let _ = pod.look.send(());
                        }
                    }
                    Some(Ask::Rescan) => {
                        if inotify.is_some() {
                            self.rescan();
                        }
                        if host.task.is_finished() {
                            // Its socket failed: the host's addresses are watched anew.
                            tracing::warn!(action = "netns", outcome = "restarted", "the host namespace's watch had stopped: restarted");
                            host = self.spawn_host();
                        }
                        let _ = host.look.send(());
                        for pod in self.pods.values() {
                            let _ = pod.look.send(());
                        }
                    }
                    None => return,
                },
            }
        }
    }

    /// Applies one inotify event; returns true when the directory itself is gone.
    fn on_event(&mut self, mask: EventMask, name: Option<OsString>) -> bool {
        if mask.contains(EventMask::Q_OVERFLOW) {
            self.rescan();
            return false;
        }
        if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED) {
            (self.seen)(Seen::DirFailed {
                error: format!("{} was removed or moved", self.dir.display()),
            });
            return true;
        }
        let Some(name) = name.and_then(|n| n.into_string().ok()) else {
            return false;
        };
        if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
            if self.pods.remove(&name).is_some() {
                (self.seen)(Seen::PodGone { name });
            }
        } else if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            self.start_pod(name);
        }
        false
    }

    /// Reads the directory: starts a watch for each new entry (or one whose watch ended),
    /// drops those whose entry is gone.
    fn rescan(&mut self) {
        let names: BTreeSet<String> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) => {
                (self.seen)(Seen::DirFailed {
                    error: format!("cannot read {}: {e}", self.dir.display()),
                });
                return;
            }
        };
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.pods.remove(&name);
            (self.seen)(Seen::PodGone { name });
        }
        for name in &names {
            let replaced = self.pods.get(name).is_some_and(|p| {
                let now = std::fs::metadata(self.dir.join(name))
                    .ok()
                    .map(|m| NetnsId {
                        dev: m.dev(),
                        ino: m.ino(),
                    });
                matches!((p.id.get(), now), (Some(was), Some(now)) if *was != now)
            });
            if replaced {
                // Another namespace under the same name: the old pod is gone.
                self.pods.remove(name);
                (self.seen)(Seen::PodGone { name: name.clone() });
            }
            if self.pods.get(name).is_none_or(|p| p.task.is_finished()) {
                self.start_pod(name.clone());
            }
        }
        (self.seen)(Seen::DirRead { names });
    }

    fn spawn_host(&self) -> PodTask {
        self.spawn_namespace(
            String::new(),
            PathBuf::from("/proc/self/ns/net"),
            Kind::Host,
        )
    }

    fn start_pod(&mut self, name: String) {
        let path = self.dir.join(&name);
        let task = self.spawn_namespace(name.clone(), path, Kind::Pod);
        self.pods.insert(name, task);
    }

    fn spawn_namespace(&self, name: String, path: PathBuf, kind: Kind) -> PodTask {
        let (look, looks) = mpsc::unbounded_channel();
        let id = Arc::new(OnceLock::new());
        let watch = NamespaceWatch {
            name,
            path,
            kind,
            reads: self.reads.clone(),
            metrics: self.metrics.clone(),
            seen: self.seen.clone(),
            id: id.clone(),
        };
        PodTask {
            look,
            task: tokio::spawn(watch.run(looks)),
            id,
        }
    }
}

fn watch_dir(dir: &Path) -> io::Result<inotify::EventStream<Vec<u8>>> {
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF,
    )?;
    inotify.into_event_stream(vec![0u8; 16 * 1024])
}

async fn next_event(
    stream: &mut Option<inotify::EventStream<Vec<u8>>>,
) -> Option<io::Result<inotify::Event<OsString>>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Host,
}

/// The watch of one namespace: its socket, its table, and the looks asked of it.
struct NamespaceWatch {
    name: String,
    path: PathBuf,
    kind: Kind,
    reads: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    seen: SeenFn,
    id: Arc<OnceLock<NetnsId>>,
}

/// Attempts to open an entry that is not a network namespace yet (the runtime creates the
/// file, then bind-mounts the namespace on it): 50 ms doubling, about 3 s in all.
const OPEN_ATTEMPTS: u32 = 7;

// === impl NamespaceWatch ===

impl NamespaceWatch {
    async fn run(self, mut looks: mpsc::UnboundedReceiver<()>) {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0;
        let (id, mut watcher) = loop {
            attempt += 1;
            let opened = {
                let _permit = self.permit().await;
                open_in(self.path.clone(), self.kind).await
            };
            match opened {
                Ok(opened) => break opened,
                Err(e) if attempt >= OPEN_ATTEMPTS => {
                    let (name, error) = (self.name.clone(), e.to_string());
                    (self.seen)(if e.kind() == io::ErrorKind::InvalidData {
                        Seen::NotANamespace { name, error }
                    } else {
                        Seen::PodUnreadable { name, error }
                    });
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        };
        let _ = self.id.set(id);
        let mut table = match self.kind {
            Kind::Pod => InterfaceTable::every_interface(),
            Kind::Host => InterfaceTable::addresses_only(),
        };
        loop {
            // A full dump: at the start, when asked, after a dropped event.
            let read = {
                let _permit = self.permit().await;
                watcher.dump(&mut table).await
            };
            if let Err(e) = read {
                (self.seen)(Seen::PodUnreadable {
                    name: self.name.clone(),
                    error: e.to_string(),
                });
                return;
            }
            self.report(id, &table);
            let mut redump = false;
            while !redump {
                tokio::select! {
                    event = watcher.next_event() => {
                        let mut changed = false;
                        let mut event = event;
                        loop {
                            match event {
                                Ok(msg) => {
                                    let applied = table.apply(&msg);
                                    changed |= applied.changed;
                                    if let Some(index) = applied.dump_link
                                        && watcher.dump_link(&mut table, index).await.is_err()
                                    {
                                        redump = true;
                                    }
                                }
                                Err(multus_eni_sidecar::Error::NetlinkOverrun) => redump = true,
                                Err(e) => {
                                    (self.seen)(Seen::PodUnreadable { name: self.name.clone(), error: e.to_string() });
                                    return;
                                }
                            }
                            match watcher.try_next_event() {
                                Some(msg) => event = Ok(msg),
                                None => break,
                            }
                        }
                        if changed && !redump {
                            self.report(id, &table);
                        }
                    }
                    look = looks.recv() => {
                        if look.is_none() {
                            return;
                        }
                        while looks.try_recv().is_ok() {}
                        redump = true;
                    }
                }
            }
        }
    }

    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if let Ok(p) = self.reads.try_acquire() {
            return Some(p);
        }
        self.metrics
            .limit_hits
            .get_or_create(&LimitLabels {
                limit: "netns_reads",
            })
            .inc();
        self.reads.acquire().await.ok()
    }

    fn report(&self, id: NetnsId, table: &InterfaceTable) {
        let interfaces = table.desired();
        (self.seen)(match self.kind {
            Kind::Host => Seen::Host(interfaces),
            Kind::Pod => Seen::Pod(PodNetns {
                name: self.name.clone(),
                id,
                interfaces,
                read_at: Instant::now(),
            }),
        });
    }
}

/// The identity of the namespace at `path` (a file of nsfs).
pub fn netns_id(file: &File) -> io::Result<NetnsId> {
    let meta = file.metadata()?;
    Ok(NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Whether `file` is a network namespace (a file of nsfs); `InvalidData` when it is not.
fn check_nsfs(file: &File) -> io::Result<()> {
    let fs = nix::sys::statfs::fstatfs(file).map_err(io::Error::from)?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a network namespace (not a file of nsfs)",
        ));
    }
    Ok(())
}

/// On a thread of its own: enters the namespace at `path` and opens a netlink socket there,
/// served by the agent's runtime. An entry that is no namespace fails with `InvalidData`. The
/// host's socket hears address events only: the host's addresses are all the agent needs of it,
/// and a node's host namespace has a veth per pod whose link events it would otherwise parse.
async fn open_in(path: PathBuf, kind: Kind) -> io::Result<(NetnsId, AddressWatcher)> {
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-open".into())
        .spawn(move || {
            let opened = (|| {
                let file = File::open(&path)?;
                check_nsfs(&file)?;
                let id = netns_id(&file)?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let _entered = runtime.enter();
                let watcher = match kind {
                    Kind::Pod => AddressWatcher::subscribe(),
                    Kind::Host => AddressWatcher::subscribe_addresses(),
                }
                .map_err(io::Error::other)?;
                Ok((id, watcher))
            })();
            let _ = tx.send(opened);
        })?;
    rx.await
        .map_err(|_| io::Error::other("netns thread died"))?
}
