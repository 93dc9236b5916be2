//! Reading other network namespaces: the addresses a caller's namespace really holds
//! (`/proc/<pid>/ns/net` of the socket peer) and those of every namespace in `--netns-dir`.
//!
//! `setns(2)` changes the calling thread only, so every read runs on a short-lived thread of
//! its own (never a runtime worker) with its own single-threaded runtime for the netlink
//! dump. Needs CAP_SYS_ADMIN (setns) and, for `/proc/<pid>/ns/net`, CAP_SYS_PTRACE.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::TryStreamExt;
use multus_eni_ec2::MacAddress;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::LinkAttribute;

/// A network namespace's identity: device and inode of its nsfs file, the same through
/// `/proc/<pid>/ns/net` and a bind mount in `--netns-dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// Global addresses of one namespace, by the MAC of the interface that carries them.
pub type Addresses = BTreeMap<MacAddress, BTreeSet<IpAddr>>;

/// The namespaces of `--netns-dir` and what they hold.
#[derive(Debug, Clone)]
pub struct Scan {
    /// When the scan began: claims that arrived later may name addresses it did not see.
    pub started: Instant,
    pub by_netns: BTreeMap<NetnsId, BTreeSet<IpAddr>>,
}

impl Scan {
    /// Every address held in some namespace of the directory.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        self.by_netns.values().flatten().copied().collect()
    }
}

/// The namespace of process `pid` and its addresses.
pub async fn read_pid(pid: i32) -> io::Result<(NetnsId, Addresses)> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    on_thread(move || read_one(&path)).await?
}

/// Every namespace in `dir` and its addresses; entries that vanish meanwhile are skipped.
pub async fn scan_dir(dir: PathBuf) -> io::Result<Scan> {
    on_thread(move || {
        let mut scan = Scan {
            started: Instant::now(),
            by_netns: BTreeMap::new(),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            match read_one(&entry.path()) {
                Ok((id, addresses)) => {
                    scan.by_netns
                        .entry(id)
                        .or_default()
                        .extend(addresses.into_values().flatten());
                }
                Err(e) => tracing::debug!(
                    action = "netns_scan",
                    path = %entry.path().display(),
                    error = %e,
                    "skipping an entry of the netns directory"
                ),
            }
        }
        Ok(scan)
    })
    .await?
}

async fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-read".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("netns reader thread died"))
}

/// On the calling (dedicated) thread: enter the namespace at `path`, dump it.
fn read_one(path: &Path) -> io::Result<(NetnsId, Addresses)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let id = NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addresses = runtime.block_on(dump())?;
    Ok((id, addresses))
}

async fn dump() -> io::Result<Addresses> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = async {
        let mut macs = BTreeMap::new();
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(io::Error::other)? {
            let mac = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(bytes) => MacAddress::from_bytes(bytes),
                _ => None,
            });
            if let Some(mac) = mac {
                macs.insert(link.header.index, mac);
            }
        }
        let mut out = Addresses::new();
        let mut addresses = handle.address().get().execute();
        while let Some(msg) = addresses.try_next().await.map_err(io::Error::other)? {
            if let (Some(mac), Some(ip)) = (macs.get(&msg.header.index), held_address(&msg)) {
                out.entry(*mac).or_default().insert(ip);
            }
        }
        Ok(out)
    }
    .await;
    connection.abort();
    result
}

/// The global address of a message, unless its duplicate address detection failed
/// (`IFA_LOCAL` for IPv4, `IFA_ADDRESS` for IPv6). Tentative IPv6 addresses count: they
/// are held, and protect the address from reclaim.
fn held_address(msg: &AddressMessage) -> Option<IpAddr> {
    if msg.header.scope != AddressScope::Universe {
        return None;
    }
    let flags = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())));
    if flags.contains(AddressFlags::Dadfailed) {
        return None;
    }
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip @ IpAddr::V4(_)) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}
