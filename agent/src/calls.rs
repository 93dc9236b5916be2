//! The EC2 calls of one ENI's batch: an assign that cannot take anything first, then, for what
//! EC2 refused, who else holds it; the calls in order, split when EC2 rejects a part. What
//! happened goes back to the node task as a [`BatchOutcome`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use multus_eni_ec2::eni::{ChangeOutcome, Ec2, ErrorKind};
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

/// The calls of one ENI's batch, in order. An assign goes out first without taking anything:
/// IPv4 without `AllowReassignment`, so EC2 itself refuses an address another ENI holds (IPv6
/// is never moved by an assign). Only the addresses EC2 refused, and those the node already
/// knows to be elsewhere (`elsewhere`: taken from this ENI), are then looked up: an address an
/// ENI without `no_manage` holds (the VPC CNI's, on any instance) is left out; one another
/// Multus ENI holds moves (IPv4 by `AllowReassignment`, IPv6 by an unassign there first); one
/// nobody holds keeps EC2's rejection. After a throttled or failed call the rest is not
/// attempted: the node backs off first. A rejected call naming several addresses is split by
/// the shared [`Ec2::apply_splitting`].
pub async fn call_batch(
    ec2: &Ec2,
    ours: Option<&EniAddresses>,
    changes: Vec<Change>,
    elsewhere: &BTreeSet<IpAddr>,
) -> BatchOutcome {
    let mut out = BatchOutcome::default();
    let mut stopped = false;
    for change in changes {
        if stopped {
            out.results.push((change, None));
            continue;
        }
        let (Some(ours), true) = (ours, is_assign(&change)) else {
            stopped |= apply(ec2.apply_splitting(&change).await, &mut out);
            continue;
        };
        let (known, fresh): (Vec<IpAddr>, Vec<IpAddr>) = change
            .addresses()
            .into_iter()
            .partition(|a| elsewhere.contains(a));
        let mut refused: BTreeMap<IpAddr, (Change, multus_eni_ec2::Error)> = BTreeMap::new();
        if let Some(fresh) = with_addresses(&change, &fresh) {
            for outcome in ec2.apply_splitting_exclusive(&fresh).await {
                match outcome.result {
                    Err(e) if e.kind == ErrorKind::Rejected => {
                        for a in outcome.change.addresses() {
                            refused.insert(a, (outcome.change.clone(), e.clone()));
                        }
                    }
                    result => {
                        stopped |= apply(
                            vec![ChangeOutcome {
                                change: outcome.change,
                                result,
                            }],
                            &mut out,
                        )
                    }
                }
            }
        }
        let look: Vec<IpAddr> = known.into_iter().chain(refused.keys().copied()).collect();
        let Some(look) = with_addresses(&change, &look) else {
            continue;
        };
        if stopped {
            // The node backs off; whether they were refused for their own sake is asked later.
            out.results.push((look, None));
            continue;
        }
        match free_addresses(ec2, ours, &look, &mut out).await {
            Ok(left) => {
                // Nobody else holds them: EC2 refused them for their own sake.
                for (a, (c, e)) in refused {
                    if !out.moved.contains_key(&a)
                        && !out.held_elsewhere.iter().any(|(h, _)| *h == a)
                    {
                        out.results.push((c, Some(Err(e))));
                    }
                }
                let movable: Vec<IpAddr> = left
                    .into_iter()
                    .filter(|a| out.moved.contains_key(a) || elsewhere.contains(a))
                    .collect();
                if let Some(moving) = with_addresses(&change, &movable) {
                    stopped |= apply(ec2.apply_splitting(&moving).await, &mut out);
                }
            }
            Err(e) => {
                stopped = true;
                out.results.push((look, e.map(Err)));
            }
        }
    }
    out
}

fn is_assign(change: &Change) -> bool {
    matches!(
        change,
        Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
    )
}

/// Records what the calls did; true when one failed for a reason other than a rejection (the
/// node backs off before anything else).
fn apply(outcomes: Vec<ChangeOutcome>, out: &mut BatchOutcome) -> bool {
    let mut stopped = false;
    for outcome in outcomes {
        if let Err(e) = &outcome.result
            && e.kind != ErrorKind::Rejected
        {
            stopped = true;
        }
        out.results.push((outcome.change, Some(outcome.result)));
    }
    stopped
}

/// The same kind of change on the same ENI for `addresses` (`None` when there are none).
fn with_addresses(change: &Change, addresses: &[IpAddr]) -> Option<Change> {
    if addresses.is_empty() {
        return None;
    }
    let eni = change.eni().to_string();
    let v4 = || {
        addresses.iter().filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    };
    let v6 = || {
        addresses.iter().filter_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    };
    Some(match change {
        Change::AssignIpv4 { .. } => Change::AssignIpv4 {
            eni,
            addresses: v4().collect(),
        },
        Change::AssignIpv6 { .. } => Change::AssignIpv6 {
            eni,
            addresses: v6().collect(),
        },
        Change::UnassignIpv4 { .. } => Change::UnassignIpv4 {
            eni,
            addresses: v4().collect(),
        },
        Change::UnassignIpv6 { .. } => Change::UnassignIpv6 {
            eni,
            addresses: v6().collect(),
        },
    })
}

/// Who holds the addresses of `change` besides `ours`: an address an ENI without `no_manage`
/// holds is left out (`out.held_elsewhere`); one another Multus ENI holds is recorded in
/// `out.moved`, and an IPv6 one is unassigned there first. Returns the addresses that may be
/// assigned. `Err` after a failure other than a rejection (the node backs off): `Some` with the
/// holder lookup's error, `None` when an unassign failed (recorded in `out`).
async fn free_addresses(
    ec2: &Ec2,
    ours: &EniAddresses,
    change: &Change,
    out: &mut BatchOutcome,
) -> std::result::Result<Vec<IpAddr>, Option<multus_eni_ec2::Error>> {
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
    Ok(left.into_iter().collect())
}
