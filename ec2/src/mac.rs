//! Ethernet MAC addresses: what ties a pod interface (an ipvlan child carries its master's
//! MAC) to its ENI.

use std::fmt;

/// An Ethernet MAC address; printed as EC2 prints it (`0e:1a:2b:3c:4d:5e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The MAC in `bytes`, if they are exactly six.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddress)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}
