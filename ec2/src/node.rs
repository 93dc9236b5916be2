//! The node agent's read of EC2: every ENI of the node in one `DescribeNetworkInterfaces`
//! (filter `mac-address` with all the node's MACs), not one call per pod.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::Filter;

use crate::Result;
use crate::eni::{Ec2, eni_addresses};
use crate::mac::MacAddress;
use crate::model::EniAddresses;

/// EC2 accepts up to 200 values per filter.
const MAX_FILTER_VALUES: usize = 200;

impl Ec2 {
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
