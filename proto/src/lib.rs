//! The protocol on the node agent's Unix socket (docs/contract.md, "Node agent protocol"):
//! newline-delimited JSON, one object per line, each carrying the protocol version `v`.
//!
//! No AWS type here: the sidecar in agent mode links this crate, not the EC2 client.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Version 2 adds [`AddressState::Conflict`]; an agent
/// answers each line in the version it came in ([`answer_version`]), so sidecars of the previous
/// release keep working, and answers a line of a version it does not know with
/// [`Answer::Error`].
pub const VERSION: u32 = 2;

/// The oldest version an agent of this build still answers.
pub const OLDEST_VERSION: u32 = 1;

/// The version to answer a line of version `v` in; `None` when this build does not speak it.
pub fn answer_version(v: u32) -> Option<u32> {
    (OLDEST_VERSION..=VERSION).contains(&v).then_some(v)
}

/// A line from the sidecar to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The complete set of addresses the pod holds on its managed interfaces; replaces the
    /// previous claim of this connection. `seq` grows with every claim and is echoed in the
    /// answers, so a status about an older set is recognised.
    Claim {
        v: u32,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        interfaces: Vec<InterfaceClaim>,
    },
    /// The pod is terminating: the agent answers [`Answer::Released`] at once and unassigns
    /// the addresses (batched) afterwards.
    Release { v: u32 },
}

/// One managed interface: its name (for logs), MAC (which ENI) and usable addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceClaim {
    pub name: String,
    /// `0e:1a:2b:3c:4d:5e`, as the kernel and EC2 print it.
    pub mac: String,
    pub addresses: Vec<IpAddr>,
}

/// A line from the agent to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    /// Where every claimed address stands; sent after each claim and whenever it changes.
    Status {
        v: u32,
        seq: u64,
        /// Every claimed address is `routable` or `no_eni`: the pod may start.
        routable: bool,
        addresses: Vec<AddressStatus>,
    },
    /// The release was recorded; the sidecar may exit.
    Released { v: u32 },
    /// A line the agent could not use (bad JSON, other version); the connection stays open.
    Error { v: u32, message: String },
}

/// One claimed address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub address: IpAddr,
    pub interface: String,
    pub state: AddressState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<String>,
    /// Why it is refused or still pending (last EC2 error), for the sidecar's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where one claimed address stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressState {
    /// On its ENI.
    Routable,
    /// Queued or being assigned.
    Pending,
    /// Never assigned: not held in the caller's network namespace, or the ENI lacks
    /// `node.k8s.amazonaws.com/no_manage=true`.
    Refused,
    /// No ENI carries the interface's MAC (macvlan, SR-IOV...): left alone, not waited for.
    NoEni,
    /// Version 2: the address is wanted on another node's ENI too; the agent took it back once
    /// and now waits (minutes, doubling) before it tries again. `eni` names the other ENI.
    Conflict,
    /// HTTP startup gate only: no pod network namespace of the node holds the address (yet).
    Unknown,
}

impl AddressState {
    /// Whether this address lets the pod start.
    pub fn lets_pod_start(self) -> bool {
        matches!(self, AddressState::Routable | AddressState::NoEni)
    }

    /// The state as a sidecar speaking version `v` knows it: version 1 has no `conflict` (nor
    /// `unknown`), which it reads as `pending`.
    pub fn in_version(self, v: u32) -> Self {
        match self {
            AddressState::Conflict | AddressState::Unknown if v < 2 => AddressState::Pending,
            s => s,
        }
    }
}

/// The answer of the agent's read-only HTTP startup gate (`GET /v1/addresses`): where each
/// asked address stands on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateAnswer {
    /// Changes whenever the agent's view of the node changes: pass it back as `since` to wait
    /// for the next change (long poll).
    pub generation: u64,
    /// Every asked address is `routable` or `no_eni`.
    pub routable: bool,
    pub addresses: Vec<GateAddress>,
}

/// One address of a [`GateAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateAddress {
    pub address: IpAddr,
    pub state: AddressState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One line (JSON plus `\n`).
pub fn encode<T: Serialize>(message: &T) -> String {
    // Serialising these plain types cannot fail (no maps with non-string keys, no I/O).
    let mut line = serde_json::to_string(message).unwrap_or_default();
    line.push('\n');
    line
}

/// Parses one line.
pub fn decode<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_one_line_of_tagged_json_and_round_trips() {
        let claim = Request::Claim {
            v: VERSION,
            seq: 3,
            pod: Some("web-0".into()),
            namespace: None,
            interfaces: vec![InterfaceClaim {
                name: "net1".into(),
                mac: "0e:00:00:00:00:01".into(),
                addresses: vec!["10.0.1.5".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))],
            }],
        };
        let line = encode(&claim);
        assert_eq!(
            line,
            "{\"type\":\"claim\",\"v\":2,\"seq\":3,\"pod\":\"web-0\",\"interfaces\":[{\"name\":\"net1\",\"mac\":\"0e:00:00:00:00:01\",\"addresses\":[\"10.0.1.5\"]}]}\n"
        );
        assert_eq!(decode::<Request>(&line).ok(), Some(claim));
    }

    #[test]
    fn answers_round_trip_and_unknown_types_fail() {
        let status = Answer::Status {
            v: VERSION,
            seq: 1,
            routable: false,
            addresses: vec![AddressStatus {
                address: "2001:db8::1".parse().unwrap_or(IpAddr::from([0u16; 8])),
                interface: "net1".into(),
                state: AddressState::Refused,
                eni: Some("eni-1".into()),
                reason: Some("not held".into()),
            }],
        };
        assert_eq!(decode::<Answer>(&encode(&status)).ok(), Some(status));
        assert_eq!(
            decode::<Request>("{\"type\":\"release\",\"v\":1}").ok(),
            Some(Request::Release { v: 1 })
        );
        assert!(decode::<Request>("{\"type\":\"steal\",\"v\":1}").is_err());
        assert!(AddressState::NoEni.lets_pod_start());
        assert!(!AddressState::Pending.lets_pod_start());
    }

    #[test]
    fn a_version_1_sidecar_is_answered_in_its_own_words() {
        assert_eq!(answer_version(1), Some(1));
        assert_eq!(answer_version(VERSION), Some(VERSION));
        assert_eq!(answer_version(0), None);
        assert_eq!(answer_version(VERSION + 1), None);
        assert_eq!(
            AddressState::Conflict.in_version(1),
            AddressState::Pending,
            "v1 sidecars cannot decode `conflict`"
        );
        assert_eq!(AddressState::Conflict.in_version(2), AddressState::Conflict);
        assert_eq!(AddressState::Routable.in_version(1), AddressState::Routable);
        let v1_line = "{\"type\":\"status\",\"v\":1,\"seq\":1,\"routable\":false,\"addresses\":[{\"address\":\"10.0.1.5\",\"interface\":\"net1\",\"state\":\"pending\"}]}";
        assert!(decode::<Answer>(v1_line).is_ok());
    }
}
