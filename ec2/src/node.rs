//! The node agent's read of EC2: every ENI attached to its instance in one
//! `DescribeNetworkInterfaces` (filter `attachment.instance-id`), not one call per pod; the
//! instance id from IMDSv2; and the ENIs of MACs that are not this instance's.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::Filter;

use crate::Result;
use crate::eni::{Ec2, eni_addresses};
use crate::mac::MacAddress;
use crate::model::EniAddresses;

/// EC2 accepts up to 200 values per filter.
const MAX_FILTER_VALUES: usize = 200;

impl Ec2 {
    /// Every ENI attached to `instance_id`, by MAC: the only ENIs the node agent ever changes.
    pub async fn instance_enis(
        &self,
        instance_id: &str,
    ) -> Result<BTreeMap<MacAddress, EniAddresses>> {
        let filter = Filter::builder()
            .name("attachment.instance-id")
            .values(instance_id)
            .build();
        let described = self.describe_pages(filter).await.map_err(|f| f.error)?;
        Ok(described
            .iter()
            .filter(|n| {
                // The filter is EC2's; checking it again costs nothing and keeps an endpoint
                // that ignores it from handing us another instance's ENIs.
                n.attachment()
                    .and_then(|a| a.instance_id())
                    .is_some_and(|id| id == instance_id)
            })
            .filter_map(|n| Some((n.mac_address().and_then(parse_mac)?, eni_addresses(n))))
            .collect())
    }

    /// The ENIs carrying `macs`, by MAC. A MAC missing from the answer has no ENI (macvlan,
    /// SR-IOV, or not in this account). One call per 200 MACs (plus pages).
    pub async fn find_by_macs(
        &self,
        macs: &[MacAddress],
    ) -> Result<BTreeMap<MacAddress, EniAddresses>> {
        let mut found = BTreeMap::new();
        for chunk in macs.chunks(MAX_FILTER_VALUES) {
            let filter = Filter::builder()
                .name("mac-address")
                .set_values(Some(chunk.iter().map(ToString::to_string).collect()))
                .build();
            let described = self.describe_pages(filter).await.map_err(|f| f.error)?;
            for n in &described {
                let Some(mac) = n.mac_address().and_then(parse_mac) else {
                    continue;
                };
                if chunk.contains(&mac) {
                    found.insert(mac, eni_addresses(n));
                }
            }
        }
        Ok(found)
    }
}

/// This instance's id from IMDSv2 (`/latest/meta-data/instance-id`): the agent runs with
/// `hostNetwork`, so a hop limit of 1 is enough.
pub async fn instance_id_from_imds() -> std::result::Result<String, String> {
    let client = aws_config::imds::Client::builder().build();
    client
        .get("/latest/meta-data/instance-id")
        .await
        .map(|id| id.as_ref().trim().to_string())
        .map_err(|e| e.to_string())
}

/// `0e:1a:2b:3c:4d:5e` (either case) as a MAC.
pub fn parse_mac(s: &str) -> Option<MacAddress> {
    let mut bytes = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut bytes {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(MacAddress(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_either_case_and_print_back_lowercase() {
        let mac = parse_mac("0E:1a:2b:3c:4d:5e");
        assert_eq!(mac.map(|m| m.to_string()), Some("0e:1a:2b:3c:4d:5e".into()));
        assert_eq!(parse_mac("0e:1a:2b:3c:4d"), None);
        assert_eq!(parse_mac("0e:1a:2b:3c:4d:5e:6f"), None);
        assert_eq!(parse_mac("0e:1a:2b:3c:4d:zz"), None);
    }
}
