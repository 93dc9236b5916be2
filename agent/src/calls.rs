//! The EC2 calls of one ENI's batch: an assign that cannot take anything first, then, for what
//! EC2 refused, who else holds it; a move only where it can land and the conflict history
//! allows it; the calls in order, split when EC2 rejects a part. What happened goes back to the
//! node task as a [`BatchOutcome`].

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
    /// Addresses another Multus ENI held before this batch took them, with that ENI.
    pub moved: BTreeMap<IpAddr, EniId>,
    /// Addresses another Multus ENI holds and this batch left there (the conflict history
    /// makes the take wait, or the move could not land), with that ENI.
    pub left_with: BTreeMap<IpAddr, EniId>,
}

/// What the node allows a batch to do beyond an exclusive assign.
#[derive(Debug, Default, Clone)]
pub struct Permissions {
    /// Addresses known to be on another ENI (taken from ours): looked up at once, without an
    /// exclusive assign that EC2 would refuse.
    pub elsewhere: BTreeSet<IpAddr>,
    /// Addresses the conflict history lets this agent take from another Multus ENI now.
    pub may_take: BTreeSet<IpAddr>,
    /// Our ENI has a free address slot for a moved address: no assign on it was refused for
    /// its limit since its last unassign.
    pub room: bool,
}

/// The calls of one ENI's batch, in order. An assign goes out first without taking anything:
/// IPv4 without `AllowReassignment`, so EC2 itself refuses an address another ENI holds (IPv6
/// is never moved by an assign). Only the addresses EC2 refused, and those the node already
/// knows to be elsewhere, are then looked up:
/// - an address an ENI without `no_manage` holds (the VPC CNI's, on any instance) is left out;
/// - one another Multus ENI holds moves only when the move can land (same subnet, room on our
///   ENI) and the conflict history allows a take (`may_take`): IPv4 by `AllowReassignment`,
///   IPv6 by an unassign there first; otherwise it stays there (`left_with`);
/// - one nobody holds keeps EC2's rejection, or, if it was only known to be elsewhere, gets an
///   exclusive assign now.
///
/// After a throttled or failed call the rest is not attempted: the node backs off first. A
/// rejected call naming several addresses is split by the shared [`Ec2::apply_splitting`]
/// (unassigns by [`Ec2::apply_unassign`]: one refused because an address is gone is not split,
/// the node reads the ENI instead).
pub async fn call_batch(
    ec2: &Ec2,
    ours: Option<&EniAddresses>,
    changes: Vec<Change>,
    allowed: &Permissions,
) -> BatchOutcome {
    let mut out = BatchOutcome::default();
    let mut stopped = false;
    for change in changes {
        if stopped {
            out.results.push((change, None));
            continue;
        }
        let (Some(ours), true) = (ours, is_assign(&change)) else {
            stopped |= apply(ec2.apply_unassign(&change).await, &mut out);
            continue;
        };
        let (known, fresh): (Vec<IpAddr>, Vec<IpAddr>) = change
            .addresses()
            .into_iter()
            .partition(|a| allowed.elsewhere.contains(a));
        let mut refused: BTreeMap<IpAddr, (Change, multus_eni_ec2::Error)> = BTreeMap::new();
        if let Some(fresh) = with_addresses(&change, &fresh) {
            stopped |= assign_exclusive(ec2, &fresh, &mut refused, &mut out).await;
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
        match free_addresses(ec2, ours, &look, allowed, &mut out).await {
            Ok(freed) => {
                let mut unheld_known = Vec::new();
                for a in freed.nobody {
                    match refused.remove(&a) {
                        // Nobody else holds it: EC2 refused it for its own sake.
                        Some((c, e)) => out.results.push((with_one(&c, a), Some(Err(e)))),
                        None => unheld_known.push(a),
                    }
                }
                if let Some(now_free) = with_addresses(&change, &unheld_known) {
                    let mut refused_again = BTreeMap::new();
                    stopped |= assign_exclusive(ec2, &now_free, &mut refused_again, &mut out).await;
                    for (_, (c, e)) in refused_again {
                        out.results.push((c, Some(Err(e))));
                    }
                }
                if let Some(moving) = with_addresses(&change, &freed.movable)
                    && !stopped
                {
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

/// An assign that takes nothing; what EC2 rejects goes to `refused` (by address), everything
/// else to `out`. True when a call failed for a reason other than a rejection.
async fn assign_exclusive(
    ec2: &Ec2,
    change: &Change,
    refused: &mut BTreeMap<IpAddr, (Change, multus_eni_ec2::Error)>,
    out: &mut BatchOutcome,
) -> bool {
    let mut stopped = false;
    for outcome in ec2.apply_splitting_exclusive(change).await {
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
                    out,
                )
            }
        }
    }
    stopped
}

/// `change` narrowed to `address` when it names more (a rejected part of several).
fn with_one(change: &Change, address: IpAddr) -> Change {
    with_addresses(change, &[address]).unwrap_or_else(|| change.clone())
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

/// What [`free_addresses`] found.
#[derive(Debug, Default)]
struct Freed {
    /// Held by another Multus ENI and free to move here (IPv6: already unassigned there).
    movable: Vec<IpAddr>,
    /// Held by no other ENI.
    nobody: Vec<IpAddr>,
}

/// Who holds the addresses of `change` besides `ours`: an address an ENI without `no_manage`
/// holds is left out (`out.held_elsewhere`). One another Multus ENI holds may move only when
/// the move can land here: the holder is in our subnet (an address of another subnet is refused
/// by EC2 here, and an IPv6 holder would already have lost it), our ENI has room, and the
/// conflict history allows a take now; otherwise it stays with its holder (`out.left_with`).
/// A movable IPv6 address is unassigned from its holder first (IPv6 has no reassignment).
/// `Err` after a failure other than a rejection (the node backs off): `Some` with the holder
/// lookup's error, `None` when an unassign failed (recorded in `out`).
async fn free_addresses(
    ec2: &Ec2,
    ours: &EniAddresses,
    change: &Change,
    allowed: &Permissions,
    out: &mut BatchOutcome,
) -> std::result::Result<Freed, Option<multus_eni_ec2::Error>> {
    let wanted: BTreeSet<IpAddr> = change.addresses().into_iter().collect();
    let holders = ec2.holder_enis(ours, &wanted).await.map_err(Some)?;
    let mut nobody = wanted.clone();
    let mut movable = Vec::new();
    for holder in holders {
        let held: Vec<IpAddr> = wanted
            .iter()
            .copied()
            .filter(|a| holder.holds(*a))
            .collect();
        for &a in &held {
            nobody.remove(&a);
        }
        if !holder.no_manage {
            for a in held {
                out.held_elsewhere.push((a, holder.id.clone()));
            }
            continue;
        }
        let lands =
            allowed.room && holder.subnet_id.is_some() && holder.subnet_id == ours.subnet_id;
        // An address inside the holder's delegated prefix never moves: EC2 moves no part of a
        // prefix, and the agent never forces one.
        let (moving, staying): (Vec<IpAddr>, Vec<IpAddr>) = held.into_iter().partition(|a| {
            lands && allowed.may_take.contains(a) && holder.prefix_over(*a).is_none()
        });
        for a in staying {
            out.left_with.insert(a, holder.id.clone());
        }
        for &a in &moving {
            out.moved.insert(a, holder.id.clone());
        }
        movable.extend(moving.iter().copied());
        let v6: Vec<Ipv6Addr> = moving
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
            if outcome.result.is_err() {
                // Still there: not moved.
                for a in outcome.change.addresses() {
                    out.moved.remove(&a);
                    movable.retain(|m| *m != a);
                    out.left_with.insert(a, holder.id.clone());
                }
            }
            out.results.push((outcome.change, Some(outcome.result)));
            if failed {
                return Err(None);
            }
        }
    }
    Ok(Freed {
        movable,
        nobody: nobody.into_iter().collect(),
    })
}
