//! YAML output for offline `inject` that reads back the same under YAML 1.1.
//!
//! kubectl reads manifests as YAML 1.1 (sigs.k8s.io/yaml over go-yaml v2), where plain `yes`,
//! `off`, `y`, `0644`, `1e3` or `1_000` are booleans and numbers, and then rejects a boolean
//! where a string belongs. serde_yaml_ng quotes only what YAML 1.2 would misread, so this
//! writer quotes every string that is not plainly a string under both versions.

use serde_json::{Map, Value};
use std::fmt::Write;

/// One YAML document (without the `---` line) for `value`.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// A block mapping at `indent`; with `inline_first` the first key continues the current line
/// (a mapping that is a sequence item: `- name: x`).
fn write_map(out: &mut String, map: &Map<String, Value>, indent: usize, inline_first: bool) {
    for (index, (key, value)) in map.iter().enumerate() {
        if index > 0 || !inline_first {
            pad(out, indent);
        }
        out.push_str(&string_text(key));
        out.push(':');
        match value {
            Value::Object(child) if !child.is_empty() => {
                out.push('\n');
                write_map(out, child, indent + 2, false);
            }
            // Sequences under a key at the key's own indentation, as kubectl writes them.
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                write_seq(out, items, indent);
            }
            scalar => {
                out.push(' ');
                out.push_str(&scalar_text(scalar));
                out.push('\n');
            }
        }
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        pad(out, indent);
        out.push('-');
        match item {
            Value::Object(child) if !child.is_empty() => {
                out.push(' ');
                write_map(out, child, indent + 2, true);
            }
            Value::Array(nested) if !nested.is_empty() => {
                out.push('\n');
                write_seq(out, nested, indent + 2);
            }
            scalar => {
                out.push(' ');
                out.push_str(&scalar_text(scalar));
                out.push('\n');
            }
        }
    }
}

/// A scalar or an empty collection, on one line.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number_text(n),
        Value::String(s) => string_text(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// Numbers as JSON writes them, except that an exponent gets a fraction and a sign
/// (`1e21` → `1.0e+21`), the only float spelling YAML 1.1 readers agree on.
fn number_text(n: &serde_json::Number) -> String {
    let text = n.to_string();
    if !n.is_f64() {
        return text;
    }
    match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let mantissa = if mantissa.contains('.') {
                mantissa.to_owned()
            } else {
                format!("{mantissa}.0")
            };
            let exponent = if exponent.starts_with(['-', '+']) {
                exponent.to_owned()
            } else {
                format!("+{exponent}")
            };
            format!("{mantissa}e{exponent}")
        }
        None if !text.contains('.') => format!("{text}.0"),
        None => text,
    }
}

/// Plain when the string can only be read as that string under YAML 1.1 and 1.2; otherwise
/// double-quoted.
fn string_text(s: &str) -> String {
    if is_plain_string(s) {
        s.to_owned()
    } else {
        double_quoted(s)
    }
}

/// Conservative: starts with a letter, `/` or `_` (so never a number, date, `.inf`, `~`, `<<`
/// or an indicator), uses only characters that are never syntax in block context, does not end
/// in a space, and is not one of YAML 1.1's boolean or null words in any case.
fn is_plain_string(s: &str) -> bool {
    const WORDS: [&str; 9] = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    let Some(first) = s.chars().next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == '/' || first == '_')
        && !s.ends_with(' ')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._/-@,()+=".contains(c))
        && !WORDS.iter().any(|w| s.eq_ignore_ascii_case(w))
}

/// A YAML double-quoted scalar; escapes what YAML does not allow raw (controls, DEL, C1,
/// BOM, line and paragraph separators).
fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c < ' '
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}') =>
            {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    /// YAML 1.1 spellings of booleans, nulls and numbers, and YAML syntax.
    const TRICKY: &[&str] = &[
        "yes",
        "No",
        "ON",
        "off",
        "y",
        "N",
        "true",
        "False",
        "null",
        "~",
        "",
        "0644",
        "0o17",
        "0x1F",
        "1e3",
        "1_000",
        "1:20",
        "190:20:30.15",
        "-1",
        "+1",
        ".5",
        ".inf",
        "-.Inf",
        ".NaN",
        "2001-12-14",
        "2001-12-14t21:59:43.10-05:00",
        "<<",
        "=",
        "- a",
        "a: b",
        "a #b",
        "#c",
        "[x]",
        "{x}",
        "&a",
        "*a",
        "!tag",
        "%x",
        "@x",
        "`x",
        "'q'",
        "\"q\"",
        "|",
        ">",
        "?",
        "trailing ",
        " leading",
        "multi\nline",
        "tab\tx",
        "nul\0",
        "\u{85}",
        "\u{2028}",
        "é",
        "10m",
        "16Mi",
    ];

    #[test]
    fn strings_read_back_as_the_same_strings() {
        for s in TRICKY {
            let doc = json!({ "key": s, "list": [s], *s: "v" });
            let text = to_yaml(&doc);
            let back = serde_yaml_ng::Deserializer::from_str(&text)
                .next()
                .map(Value::deserialize);
            let Some(Ok(back)) = back else {
                panic!("{s:?} gave unreadable YAML:\n{text}");
            };
            assert_eq!(back, doc, "{s:?}:\n{text}");
        }
    }

    #[test]
    fn yaml_1_1_words_and_numbers_are_quoted() {
        for s in TRICKY {
            assert!(!is_plain_string(s), "{s:?} must be quoted");
        }
        for s in [
            "busybox",
            "multus-eni-sidecar",
            "/usr/local/bin/x",
            "run",
            "Always",
        ] {
            assert!(is_plain_string(s), "{s:?} can stay plain");
        }
    }

    #[test]
    fn layout_is_block_style_with_empty_collections_inline() {
        let doc = json!({
            "a": {"b": [1, {"c": "d", "e": []}], "f": {}},
            "g": [[1, 2]],
            "h": 1.5e300,
            "i": null,
        });
        assert_eq!(
            to_yaml(&doc),
            "a:\n  b:\n  - 1\n  - c: d\n    e: []\n  f: {}\ng:\n-\n  - 1\n  - 2\nh: 1.5e+300\ni: null\n"
        );
        assert_eq!(
            number_text(&serde_json::Number::from_f64(2.0).unwrap_or(0.into())),
            "2.0"
        );
    }
}
