//! The EC2 calls of one ENI's batch: before an assign, who else holds its addresses; then the
//! calls, in order, split when EC2 rejects a part. What happened goes back to the node task as
//! a [`BatchOutcome`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use multus_eni_ec2::eni::{Ec2, ErrorKind};
use multus_eni_ec2::model::{Change, EniAddresses, EniId};

/// What one ENI's batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Every change with its result; `None` for a change not attempted.
    pub results: Vec<(Change, Option<multus_eni_ec2::Result<()>>)>,
    /// Addresses not assigned because an ENI without `no_manage` holds them, with that ENI.
    pub held_elsewhere: Vec<(IpAddr, EniId)>,
    /// Addresses another Multus ENI held before this batch, with that ENI.
    pub moved: BTreeMap<IpAddr, EniId>,
}

/// The calls of one ENI's batch, in order. Before an assign, the other ENIs that hold its
/// addresses are read: an address an ENI without `no_manage` holds (the VPC CNI's, on any
/// instance) is left out; one that another Multus ENI holds may move (IPv4 by
/// `AllowReassignment`, IPv6 by an unassign there first). After a throttled or failed call
/// the rest is not attempted: the node backs off first. A rejected call naming several
/// addresses is split by the shared [`Ec2::apply_splitting`].
pub async fn call_batch(
    ec2: &Ec2,
    ours: Option<&EniAddresses>,
    changes: Vec<Change>,
) -> BatchOutcome {
    let mut out = BatchOutcome::default();
    let mut stopped = false;
    for change in changes {
        if stopped {
            out.results.push((change, None));
            continue;
        }
        let change = match (&change, ours) {
            (Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }, Some(ours)) => {
                match free_addresses(ec2, ours, &change, &mut out).await {
                    Ok(Some(left)) => left,
                    Ok(None) => continue,
                    Err(e) => {
                        stopped = true;
                        out.results.push((change, e.map(Err)));
                        continue;
                    }
                }
            }
            _ => change,
        };
        for outcome in ec2.apply_splitting(&change).await {
            if let Err(e) = &outcome.result
                && e.kind != ErrorKind::Rejected
            {
                stopped = true;
            }
            out.results.push((outcome.change, Some(outcome.result)));
        }
    }
    out
}

/// The part of an assign that may go out: addresses held by an ENI without `no_manage` are
/// left out (`out.held_elsewhere`); IPv6 addresses another Multus ENI holds are unassigned
/// there first. `Ok(None)` when nothing is left. `Err` after a failure other than a rejection
/// (the node backs off): `Some` with the holder lookup's error, `None` when an unassign
/// failed (recorded in `out`).
async fn free_addresses(
    ec2: &Ec2,
    ours: &EniAddresses,
    change: &Change,
    out: &mut BatchOutcome,
) -> std::result::Result<Option<Change>, Option<multus_eni_ec2::Error>> {
    let wanted: BTreeSet<IpAddr> = change.addresses().into_iter().collect();
    let holders = ec2.holder_enis(ours, &wanted).await.map_err(Some)?;
    let mut left = wanted.clone();
    for holder in holders {
        let held: Vec<IpAddr> = wanted
            .iter()
            .copied()
            .filter(|a| holder.holds(*a))
            .collect();
        if !holder.no_manage {
            for a in held {
                left.remove(&a);
                out.held_elsewhere.push((a, holder.id.clone()));
            }
            continue;
        }
        for &a in &held {
            out.moved.insert(a, holder.id.clone());
        }
        let v6: Vec<Ipv6Addr> = held
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
            .collect();
        if v6.is_empty() {
            continue;
        }
        let unassign = Change::UnassignIpv6 {
            eni: holder.id.clone(),
            addresses: v6,
        };
        for outcome in ec2.apply_splitting(&unassign).await {
            let failed = matches!(&outcome.result, Err(e) if e.kind != ErrorKind::Rejected);
            out.results.push((outcome.change, Some(outcome.result)));
            if failed {
                return Err(None);
            }
        }
    }
    if left.is_empty() {
        return Ok(None);
    }
    let eni = change.eni().to_string();
    Ok(Some(match change {
        Change::AssignIpv4 { .. } => Change::AssignIpv4 {
            eni,
            addresses: left
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        },
        _ => Change::AssignIpv6 {
            eni,
            addresses: left
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                })
                .collect(),
        },
    }))
}
