//! The pod's QoS class, computed the way the kubelet does, so the injected sidecar never changes it.
//!
//! Init containers count: a sidecar whose requests differ from its limits turns a Guaranteed
//! pod Burstable, which costs it its exclusive cores under the static CPU manager and can make a
//! LimitRange reject it. The rules follow Kubernetes' `ComputePodQOS`: only `cpu` and `memory`
//! count, zero quantities count as unset, requests default to limits per resource (the API
//! server's defaulting, which the offline `inject` does not get), and a pod is Guaranteed only
//! when every container, init containers included, has both limits and the pod's requests equal
//! its limits.

use serde_json::Value;

/// The QoS class the kubelet assigns to a pod (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The name Kubernetes uses (`status.qosClass`), also written to the status annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

/// The two resources that decide the QoS class.
const QOS_RESOURCES: [&str; 2] = ["cpu", "memory"];

/// Per-resource sums of requests and limits over the pod's containers, in nano-units.
#[derive(Debug, Default)]
struct Totals {
    requests: [Option<i128>; 2],
    limits: [Option<i128>; 2],
}

/// The QoS class of a pod spec (`spec` of a pod or pod template).
///
/// A quantity the API server would reject makes the answer `Burstable`: the webhook then injects
/// the sidecar it always did, never one that claims a class the pod may not have.
pub fn pod_qos_class(spec: Option<&Value>) -> QosClass {
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|list| spec.and_then(|s| s.get(*list)).and_then(Value::as_array))
        .flatten();
    let mut totals = Totals::default();
    let mut every_container_has_both_limits = true;
    for container in containers {
        let resources = container.get("resources");
        let limits = resources.and_then(|r| r.get("limits"));
        let requests = resources.and_then(|r| r.get("requests"));
        for (i, name) in QOS_RESOURCES.iter().enumerate() {
            let Ok(limit) = positive_quantity(limits, name) else {
                return QosClass::Burstable;
            };
            // The API server defaults a missing request to the limit, resource by resource.
            let request = match requests.and_then(|r| r.get(*name)) {
                Some(_) => positive_quantity(requests, name),
                None => Ok(limit),
            };
            let Ok(request) = request else {
                return QosClass::Burstable;
            };
            if limit.is_none() {
                every_container_has_both_limits = false;
            }
            if !add(&mut totals.limits[i], limit) || !add(&mut totals.requests[i], request) {
                return QosClass::Burstable;
            }
        }
    }
    if totals.requests.iter().all(Option::is_none) && totals.limits.iter().all(Option::is_none) {
        return QosClass::BestEffort;
    }
    let requests_equal_limits = totals
        .requests
        .iter()
        .zip(&totals.limits)
        .all(|(request, limit)| request.is_none() || request == limit);
    let same_resources = totals.requests.iter().filter(|r| r.is_some()).count()
        == totals.limits.iter().filter(|l| l.is_some()).count();
    if every_container_has_both_limits && requests_equal_limits && same_resources {
        QosClass::Guaranteed
    } else {
        QosClass::Burstable
    }
}

/// Adds `value` to a running sum; `false` on overflow.
fn add(sum: &mut Option<i128>, value: Option<i128>) -> bool {
    let Some(value) = value else {
        return true;
    };
    match sum.unwrap_or(0).checked_add(value) {
        Some(total) => {
            *sum = Some(total);
            true
        }
        None => false,
    }
}

/// A resource's quantity in nano-units when it is set and positive; `Err` when it is not a
/// valid quantity.
fn positive_quantity(list: Option<&Value>, name: &str) -> Result<Option<i128>, ()> {
    let Some(value) = list.and_then(|l| l.get(name)) else {
        return Ok(None);
    };
    let nanos = match value {
        Value::String(s) => parse_quantity(s).ok_or(())?,
        Value::Number(n) => parse_quantity(&n.to_string()).ok_or(())?,
        Value::Null => return Ok(None),
        _ => return Err(()),
    };
    Ok((nanos > 0).then_some(nanos))
}

/// Parses a Kubernetes quantity (`100m`, `1.5Gi`, `2`, `1e3`, `500M`) into nano-units, rounding
/// a finer fraction up as the API server does. `None` when it is not a quantity or overflows.
pub fn parse_quantity(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    // value = digits × 10^(exponent10) × 2^(exponent2)
    let (exponent10, exponent2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        s if s.starts_with(['e', 'E']) => (s[1..].parse().ok()?, 0),
        _ => return None,
    };
    let digits = format!("{whole}{fraction}");
    let mut mantissa: i128 = 0;
    for d in digits.bytes() {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(i128::from(d - b'0'))?;
    }
    mantissa = mantissa.checked_mul(1i128.checked_shl(exponent2)?)?;
    // Scale to nano-units: 10^(exponent10 + 9 - fraction digits).
    let fraction_digits = i32::try_from(fraction.len()).ok()?;
    let scale = exponent10.checked_add(9)?.checked_sub(fraction_digits)?;
    let nanos = if scale >= 0 {
        mantissa.checked_mul(10i128.checked_pow(u32::try_from(scale).ok()?)?)?
    } else {
        let divisor = 10i128.checked_pow(u32::try_from(-scale).ok()?)?;
        // Below one nano-unit the API server rounds up.
        mantissa / divisor + i128::from(mantissa % divisor != 0)
    };
    Some(if negative { -nanos } else { nanos })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(resources: Value) -> Value {
        json!({ "name": "c", "image": "i", "resources": resources })
    }

    fn class(containers: Vec<Value>, init: Vec<Value>) -> QosClass {
        pod_qos_class(Some(
            &json!({ "containers": containers, "initContainers": init }),
        ))
    }

    #[test]
    fn quantities_compare_by_value() {
        assert_eq!(parse_quantity("1"), parse_quantity("1000m"));
        assert_eq!(parse_quantity("1Gi"), parse_quantity("1073741824"));
        assert_eq!(parse_quantity("1.5"), parse_quantity("1500m"));
        assert_eq!(parse_quantity("1e3"), parse_quantity("1k"));
        assert_eq!(parse_quantity("0.5Gi"), parse_quantity("512Mi"));
        assert_eq!(parse_quantity("100m"), Some(100_000_000));
        assert_eq!(parse_quantity("1n"), Some(1));
        assert_eq!(
            parse_quantity("0.1n"),
            Some(1),
            "rounded up like the API server"
        );
        assert_eq!(parse_quantity("-1"), Some(-1_000_000_000));
        for bad in ["", "m", "1.2.3", "1Xi", "abc", "1e", "--1", "1e999"] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_resources_is_best_effort() {
        assert_eq!(
            class(vec![container(json!({}))], vec![]),
            QosClass::BestEffort
        );
        assert_eq!(pod_qos_class(None), QosClass::BestEffort);
        let zero = json!({ "requests": { "cpu": "0", "memory": "0" } });
        assert_eq!(class(vec![container(zero)], vec![]), QosClass::BestEffort);
        // Resources other than cpu and memory do not count.
        let other = json!({ "limits": { "hugepages-1Gi": "2Gi" } });
        assert_eq!(class(vec![container(other)], vec![]), QosClass::BestEffort);
    }

    #[test]
    fn equal_requests_and_limits_everywhere_is_guaranteed() {
        let equal = json!({
            "requests": { "cpu": "2", "memory": "1Gi" },
            "limits": { "cpu": "2000m", "memory": "1024Mi" },
        });
        assert_eq!(class(vec![container(equal)], vec![]), QosClass::Guaranteed);
    }

    #[test]
    fn limits_alone_are_guaranteed_because_requests_default_to_them() {
        let limits_only = json!({ "limits": { "cpu": "4", "memory": "8Gi" } });
        assert_eq!(
            class(vec![container(limits_only.clone())], vec![]),
            QosClass::Guaranteed
        );
        // A request given for one resource only; the other defaults to its limit.
        let mixed =
            json!({ "limits": { "cpu": "4", "memory": "8Gi" }, "requests": { "cpu": "4" } });
        assert_eq!(class(vec![container(mixed)], vec![]), QosClass::Guaranteed);
    }

    #[test]
    fn init_containers_count() {
        let guaranteed = json!({ "limits": { "cpu": "1", "memory": "1Gi" } });
        let burstable =
            json!({ "requests": { "cpu": "10m" }, "limits": { "cpu": "100m", "memory": "64Mi" } });
        assert_eq!(
            class(
                vec![container(guaranteed.clone())],
                vec![container(burstable)]
            ),
            QosClass::Burstable
        );
        assert_eq!(
            class(
                vec![container(guaranteed.clone())],
                vec![container(json!({}))]
            ),
            QosClass::Burstable,
            "an init container without limits"
        );
        assert_eq!(
            class(
                vec![container(guaranteed.clone())],
                vec![container(guaranteed)]
            ),
            QosClass::Guaranteed
        );
    }

    #[test]
    fn partial_limits_or_lower_requests_are_burstable() {
        let cpu_only = json!({ "limits": { "cpu": "1" } });
        assert_eq!(
            class(vec![container(cpu_only)], vec![]),
            QosClass::Burstable
        );
        let lower = json!({ "requests": { "cpu": "500m", "memory": "1Gi" }, "limits": { "cpu": "1", "memory": "1Gi" } });
        assert_eq!(class(vec![container(lower)], vec![]), QosClass::Burstable);
        let requests_only = json!({ "requests": { "memory": "1Gi" } });
        assert_eq!(
            class(vec![container(requests_only)], vec![]),
            QosClass::Burstable
        );
    }

    #[test]
    fn invalid_quantities_never_claim_guaranteed() {
        let bad = json!({ "limits": { "cpu": "lots", "memory": "1Gi" } });
        assert_eq!(class(vec![container(bad)], vec![]), QosClass::Burstable);
        let not_a_string = json!({ "limits": { "cpu": [1], "memory": "1Gi" } });
        assert_eq!(
            class(vec![container(not_a_string)], vec![]),
            QosClass::Burstable
        );
        let numeric = json!({ "limits": { "cpu": 2, "memory": "1Gi" } });
        assert_eq!(
            class(vec![container(numeric)], vec![]),
            QosClass::Guaranteed
        );
    }
}
