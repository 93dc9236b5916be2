//! The Multus `k8s.v1.cni.cncf.io/networks` annotation: which secondary networks a pod asks
//! for, and the interface name each one gets inside the pod.
//!
//! Follows Multus (`pkg/k8sclient` `parsePodNetworkAnnotation`, and `getIfname` for naming):
//! the annotation is JSON when it contains `[`, `{` or `"`, read as Go's `encoding/json` reads
//! it; otherwise a comma list of `[namespace/]name[@ifname]` with Multus's checks. An entry
//! without an interface name gets `net<k>`, where k is its 1-based position in the whole list
//! (named entries use up their position too) plus the count of Multus default networks.

use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use std::collections::BTreeSet;

/// The Multus annotation that lists a pod's secondary networks.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";

/// One secondary network attachment requested by a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSelection {
    /// Namespace of the NetworkAttachmentDefinition, when the entry names one.
    pub namespace: Option<String>,
    /// Name of the NetworkAttachmentDefinition.
    pub name: String,
    /// The interface name inside the pod (`net1`, or what the entry asked for).
    pub interface: String,
    /// Static IPs requested in the JSON form (`"ips"`). Not checked and not used by the
    /// injection (Multus checks them when it attaches the network); kept for library users.
    pub ips: Vec<String>,
    /// MAC requested in the JSON form (`"mac"`); like `ips`, read but not used.
    pub mac: Option<String>,
}

/// Why an annotation could not be understood. The pod is still admitted (with a warning).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworksError {
    /// The JSON form did not parse as a list of network selection objects.
    #[error("not a JSON list of network objects: {0}")]
    Json(String),
    /// A comma-list entry is empty (`a,,b` or a trailing comma).
    #[error("entry {position} is empty")]
    EmptyEntry { position: usize },
    /// A comma-list entry has more than one `/` or `@`.
    #[error("entry {position} {entry:?}: more than one '{separator}'")]
    Separator {
        position: usize,
        entry: String,
        separator: char,
    },
    /// A JSON-form entry without a `name` (Multus would look up a network called "").
    #[error("entry {position} has no name")]
    MissingName { position: usize },
    /// A comma-form namespace or network name is not a DNS-1123 label, as Multus requires.
    #[error(
        "entry {position}: {value:?} is not a valid name (lower case alphanumerics and '-', starting and ending alphanumeric)"
    )]
    InvalidName { position: usize, value: String },
    /// An interface name the kernel (or the sidecar's `--interfaces` list) would refuse.
    #[error(
        "entry {position}: interface name {value:?} is invalid (1-15 characters, no '/', ':', ',' or whitespace)"
    )]
    InvalidInterface { position: usize, value: String },
    /// Two entries end up with the same interface name.
    #[error("interface name {0:?} is used by more than one entry")]
    DuplicateInterface(String),
}

/// Parses the networks annotation into the attachments a pod asked for, in order.
///
/// An empty (or all-whitespace) annotation yields an empty list.
pub fn parse_networks(
    annotation: &str,
    default_networks: u32,
) -> Result<Vec<NetworkSelection>, NetworksError> {
    let annotation = annotation.trim();
    if annotation.is_empty() {
        return Ok(Vec::new());
    }
    let entries = if annotation.contains(['[', '{', '"']) {
        parse_json_form(annotation)?
    } else {
        parse_comma_form(annotation)?
    };
    let mut seen = BTreeSet::new();
    let mut selections = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let position = index + 1;
        let interface = match entry.interface {
            Some(requested) => {
                if !is_valid_interface(&requested) {
                    return Err(NetworksError::InvalidInterface {
                        position,
                        value: requested,
                    });
                }
                requested
            }
            None => format!("net{}", position as u64 + u64::from(default_networks)),
        };
        if !seen.insert(interface.clone()) {
            return Err(NetworksError::DuplicateInterface(interface));
        }
        selections.push(NetworkSelection {
            namespace: entry.namespace,
            name: entry.name,
            interface,
            ips: entry.ips,
            mac: entry.mac,
        });
    }
    Ok(selections)
}

/// The interface names of a parsed annotation, in annotation order.
pub fn interface_names(selections: &[NetworkSelection]) -> Vec<&str> {
    selections.iter().map(|s| s.interface.as_str()).collect()
}

/// An entry before interface naming.
struct Entry {
    namespace: Option<String>,
    name: String,
    interface: Option<String>,
    ips: Vec<String>,
    mac: Option<String>,
}

/// One element of the JSON form, read the way Go's `encoding/json` fills Multus's
/// `NetworkSelectionElement`, so the webhook names interfaces exactly as Multus will: keys
/// match case-insensitively, `null` leaves a field unset, the later of two keys for one field
/// wins, and unknown keys (`default-route`, `cni-args`, ...) are ignored.
#[derive(Default)]
struct JsonEntry {
    name: Option<String>,
    namespace: Option<String>,
    interface: Option<String>,
    /// `interfaceRequest`, the pre-3.2 spelling Multus still reads when `interface` is empty.
    deprecated_interface: Option<String>,
    ips: Option<Vec<String>>,
    mac: Option<String>,
}

impl<'de> Deserialize<'de> for JsonEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(JsonEntryVisitor)
    }
}

struct JsonEntryVisitor;

impl<'de> Visitor<'de> for JsonEntryVisitor {
    type Value = JsonEntry;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a network selection object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonEntry, A::Error> {
        let mut entry = JsonEntry::default();
        while let Some(key) = map.next_key::<String>()? {
            let slot = match fold_key(&key).as_str() {
                "name" => &mut entry.name,
                "namespace" => &mut entry.namespace,
                "interface" => &mut entry.interface,
                "interfacerequest" => &mut entry.deprecated_interface,
                "mac" => &mut entry.mac,
                // Go sets a slice to nil on `null`.
                "ips" => {
                    entry.ips = map.next_value()?;
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            // Go leaves a string field as it was on `null`.
            if let Some(value) = map.next_value::<Option<String>>()? {
                *slot = Some(value);
            }
        }
        Ok(entry)
    }
}

/// Go's `encoding/json` key folding, enough for ASCII field names: ASCII case is ignored, and
/// the Kelvin sign and the long s fold to `k` and `s` (Unicode simple folding).
fn fold_key(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{212A}' => 'k',
            '\u{017F}' => 's',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// The JSON form. Multus does not check names here (a NetworkAttachmentDefinition name is a
/// DNS subdomain, dots included), so neither does the webhook; an entry needs a name only.
fn parse_json_form(annotation: &str) -> Result<Vec<Entry>, NetworksError> {
    let parsed: Vec<JsonEntry> =
        serde_json::from_str(annotation).map_err(|e| NetworksError::Json(e.to_string()))?;
    parsed
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let position = index + 1;
            let name = e
                .name
                .filter(|n| !n.is_empty())
                .ok_or(NetworksError::MissingName { position })?;
            let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
            Ok(Entry {
                namespace: non_empty(e.namespace),
                name,
                interface: non_empty(e.interface).or(non_empty(e.deprecated_interface)),
                ips: e.ips.unwrap_or_default(),
                mac: non_empty(e.mac),
            })
        })
        .collect()
}

fn parse_comma_form(annotation: &str) -> Result<Vec<Entry>, NetworksError> {
    annotation
        .split(',')
        .enumerate()
        .map(|(index, raw)| parse_comma_entry(index + 1, raw.trim()))
        .collect()
}

/// `[namespace/]name[@ifname]`, with Multus's checks.
fn parse_comma_entry(position: usize, entry: &str) -> Result<Entry, NetworksError> {
    if entry.is_empty() {
        return Err(NetworksError::EmptyEntry { position });
    }
    let separator_error = |separator| NetworksError::Separator {
        position,
        entry: entry.to_owned(),
        separator,
    };
    let (namespace, rest) = match entry.split_once('/') {
        Some((_, rest)) if rest.contains('/') => return Err(separator_error('/')),
        Some((ns, rest)) => (Some(ns.trim().to_owned()), rest),
        None => (None, entry),
    };
    let (name, interface) = match rest.split_once('@') {
        Some((_, ifname)) if ifname.contains('@') => return Err(separator_error('@')),
        // Multus treats an empty `@` suffix as no interface name.
        Some((name, ifname)) => (
            name.trim().to_owned(),
            Some(ifname.trim().to_owned()).filter(|i| !i.is_empty()),
        ),
        None => (rest.trim().to_owned(), None),
    };
    let namespace = namespace.filter(|ns| !ns.is_empty());
    for value in namespace.iter().chain(std::iter::once(&name)) {
        if !is_dns1123_label(value) {
            return Err(NetworksError::InvalidName {
                position,
                value: value.clone(),
            });
        }
    }
    if let Some(ifname) = &interface
        && !is_valid_interface(ifname)
    {
        return Err(NetworksError::InvalidInterface {
            position,
            value: ifname.clone(),
        });
    }
    Ok(Entry {
        namespace,
        name,
        interface,
        ips: Vec::new(),
        mac: None,
    })
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, the pattern Multus checks names against.
fn is_dns1123_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// The kernel's `dev_valid_name` (< 16 bytes, not `.`/`..`, no `/`, `:` or whitespace), plus
/// no `,` because the sidecar takes interfaces as a comma list.
fn is_valid_interface(value: &str) -> bool {
    !value.is_empty()
        && value.len() < 16
        && value != "."
        && value != ".."
        && !value
            .chars()
            .any(|c| c == '/' || c == ':' || c == ',' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(annotation: &str, default_networks: u32) -> Vec<String> {
        parse_networks(annotation, default_networks)
            .unwrap_or_else(|e| panic!("{annotation:?} should parse: {e}"))
            .into_iter()
            .map(|s| s.interface)
            .collect()
    }

    #[test]
    fn comma_form_numbers_interfaces_by_position() {
        assert_eq!(names("ipvlan-a,ipvlan-b", 0), ["net1", "net2"]);
    }

    #[test]
    fn comma_form_allows_spaces_around_entries_and_parts() {
        let parsed = parse_networks("  a , other / b @ n3 ,c  ", 0).unwrap_or_default();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1].namespace.as_deref(), Some("other"));
        assert_eq!(parsed[1].name, "b");
        assert_eq!(parsed[1].interface, "n3");
        assert_eq!(interface_names(&parsed), ["net1", "n3", "net3"]);
    }

    #[test]
    fn named_entries_use_up_their_position() {
        assert_eq!(names("a@eth9,b,c@x,d", 0), ["eth9", "net2", "x", "net4"]);
    }

    #[test]
    fn default_networks_shift_numbering() {
        assert_eq!(names("a,b", 1), ["net2", "net3"]);
        assert_eq!(names("a@n3,b", 2), ["n3", "net4"]);
    }

    #[test]
    fn namespaces_are_kept_in_both_forms() {
        let comma = parse_networks("kube-system/macvlan", 0).unwrap_or_default();
        assert_eq!(comma[0].namespace.as_deref(), Some("kube-system"));
        let json =
            parse_networks(r#"[{"name":"macvlan","namespace":"nets"}]"#, 0).unwrap_or_default();
        assert_eq!(json[0].namespace.as_deref(), Some("nets"));
        assert_eq!(json[0].interface, "net1");
    }

    #[test]
    fn json_form_reads_interface_ips_and_mac() {
        let parsed = parse_networks(
            r#"[ {"name":"n3network-free5gc-free5gc-upf","interface":"n3","ips":["10.100.50.233/29"]},
                {"name":"n6network","mac":"02:00:00:00:00:01","default-route":["10.100.100.1"]},
                {"name":"n4network","interface":"n4"} ]"#,
            0,
        )
        .unwrap_or_default();
        assert_eq!(interface_names(&parsed), ["n3", "net2", "n4"]);
        assert_eq!(parsed[0].ips, ["10.100.50.233/29"]);
        assert_eq!(parsed[1].mac.as_deref(), Some("02:00:00:00:00:01"));
    }

    #[test]
    fn a_quote_makes_it_json() {
        // Multus treats any '"' as JSON; a quoted bare name is not a JSON list.
        assert!(matches!(
            parse_networks(r#""ipvlan""#, 0),
            Err(NetworksError::Json(_))
        ));
    }

    #[test]
    fn json_object_instead_of_list_is_an_error() {
        assert!(matches!(
            parse_networks(r#"{"name":"a"}"#, 0),
            Err(NetworksError::Json(_))
        ));
    }

    #[test]
    fn json_entry_without_name_is_an_error() {
        for annotation in [r#"[{"interface":"n3"}]"#, r#"[{"name":""}]"#] {
            assert_eq!(
                parse_networks(annotation, 0),
                Err(NetworksError::MissingName { position: 1 }),
                "{annotation}"
            );
        }
    }

    #[test]
    fn json_form_reads_the_deprecated_interface_request_like_multus() {
        assert_eq!(
            names(r#"[{"name":"a","interfaceRequest":"n3"}]"#, 0),
            ["n3"]
        );
        assert_eq!(
            names(
                r#"[{"name":"a","interface":"","interfaceRequest":"n3"}]"#,
                0
            ),
            ["n3"]
        );
        // `interface` wins when both are set.
        assert_eq!(
            names(
                r#"[{"name":"a","interface":"n4","interfaceRequest":"n3"}]"#,
                0
            ),
            ["n4"]
        );
    }

    #[test]
    fn json_form_accepts_any_name_multus_accepts() {
        // NetworkAttachmentDefinition names are DNS subdomains; Multus checks no JSON name.
        let parsed = parse_networks(
            r#"[{"name":"n3.upf.example","namespace":"Other.NS","interface":"n3"},{"name":"UPPER"}]"#,
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed[0].name, "n3.upf.example");
        assert_eq!(parsed[0].namespace.as_deref(), Some("Other.NS"));
        assert_eq!(interface_names(&parsed), ["n3", "net2"]);
        // The comma form keeps Multus's DNS-1123 label check.
        assert!(matches!(
            parse_networks("n3.upf", 0),
            Err(NetworksError::InvalidName { .. })
        ));
    }

    #[test]
    fn json_keys_match_case_insensitively_as_in_go() {
        assert_eq!(
            names(
                r#"[{"Name":"a","INTERFACE":"n3"},{"nAmE":"b","InterfaceRequest":"n4"}]"#,
                0
            ),
            ["n3", "n4"]
        );
        // Go's simple folding: the Kelvin sign is a `k`, the long s an `s`.
        let parsed =
            parse_networks("[{\"name\":\"a\",\"name\u{17F}pace\":\"x\"}]", 0).unwrap_or_default();
        assert_eq!(parsed[0].namespace.as_deref(), Some("x"));
        assert_eq!(fold_key("\u{212A}"), "k");
        // The later key wins, whatever its case; `null` leaves the field as it was.
        assert_eq!(
            names(r#"[{"name":"a","interface":"n3","Interface":"n5"}]"#, 0),
            ["n5"]
        );
        assert_eq!(
            names(r#"[{"name":"a","interface":"n3","interface":null}]"#, 0),
            ["n3"]
        );
    }

    #[test]
    fn json_values_of_the_wrong_type_are_errors_as_in_go() {
        for annotation in [
            r#"[{"name":5}]"#,
            r#"[{"name":"a","interface":["n3"]}]"#,
            r#"[{"name":"a","ips":"10.0.0.1"}]"#,
            r#"[{"name":"a","ips":[1]}]"#,
            r#"[null]"#,
            r#"["a"]"#,
        ] {
            assert!(
                matches!(parse_networks(annotation, 0), Err(NetworksError::Json(_))),
                "{annotation}"
            );
        }
    }

    #[test]
    fn empty_and_blank_annotations_select_nothing() {
        assert_eq!(parse_networks("", 0), Ok(Vec::new()));
        assert_eq!(parse_networks("   ", 0), Ok(Vec::new()));
        assert_eq!(parse_networks("[]", 0), Ok(Vec::new()));
    }

    #[test]
    fn empty_entries_are_errors() {
        assert_eq!(
            parse_networks("a,,b", 0),
            Err(NetworksError::EmptyEntry { position: 2 })
        );
        assert_eq!(
            parse_networks("a,", 0),
            Err(NetworksError::EmptyEntry { position: 2 })
        );
    }

    #[test]
    fn same_network_twice_gets_two_interfaces() {
        assert_eq!(names("a,a", 0), ["net1", "net2"]);
    }

    #[test]
    fn duplicate_interface_names_are_errors() {
        assert_eq!(
            parse_networks("a@eth1,b@eth1", 0),
            Err(NetworksError::DuplicateInterface("eth1".into()))
        );
        // An explicit name that collides with a generated one.
        assert_eq!(
            parse_networks("a@net2,b", 0),
            Err(NetworksError::DuplicateInterface("net2".into()))
        );
    }

    #[test]
    fn garbage_is_rejected_with_the_reason() {
        assert!(matches!(
            parse_networks("a/b/c", 0),
            Err(NetworksError::Separator { separator: '/', .. })
        ));
        assert!(matches!(
            parse_networks("a@b@c", 0),
            Err(NetworksError::Separator { separator: '@', .. })
        ));
        assert!(matches!(
            parse_networks("Upper_Case", 0),
            Err(NetworksError::InvalidName { .. })
        ));
        assert!(matches!(
            parse_networks("-leading", 0),
            Err(NetworksError::InvalidName { .. })
        ));
        assert!(matches!(
            parse_networks("[not json", 0),
            Err(NetworksError::Json(_))
        ));
    }

    #[test]
    fn bad_interface_names_are_rejected() {
        assert_eq!(names("a@", 0), ["net1"]);
        for bad in [
            "a@this-name-is-too-long",
            "a@x:y",
            "a@..",
            r#"[{"name":"a","interface":"has space"}]"#,
            r#"[{"name":"a","interface":"a,b"}]"#,
        ] {
            assert!(
                matches!(
                    parse_networks(bad, 0),
                    Err(NetworksError::InvalidInterface { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
        assert_eq!(names("a@abcdefghijklmno", 0), ["abcdefghijklmno"]);
    }

    #[test]
    fn dns1123_labels() {
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("ipvlan-multus-1"));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label("a-"));
        assert!(!is_dns1123_label("a.b"));
    }
}
