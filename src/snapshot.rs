//! The store's view: a complete set of keys and values at one revision, built from etcd or from a
//! JSON dump (`etcdctl get --prefix -w json` output or a flat `{"key": "value"}` object). It hands
//! the model an owned [`Snapshot`], never a half-applied view.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// Keys and raw values under Patroni's prefix, at `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision this view is current at (0 for a file).
    pub revision: i64,
    /// Full keys (`/service/demo/members/pg1`) to raw values.
    pub kvs: BTreeMap<String, Vec<u8>>,
}

/// Errors reading a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read.
    #[error("cannot read snapshot {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not JSON, or not one of the two accepted shapes.
    #[error("snapshot {path}: {message}")]
    Format {
        /// Path.
        path: PathBuf,
        /// What is wrong, with line and column for JSON errors.
        message: String,
    },
}

impl Snapshot {
    /// An empty snapshot at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a put.
    pub fn put(&mut self, key: String, value: Vec<u8>) {
        self.kvs.insert(key, value);
    }

    /// Applies a delete.
    pub fn delete(&mut self, key: &str) {
        self.kvs.remove(key);
    }

    /// Reads a snapshot file.
    pub fn from_file(path: &Path) -> Result<Self, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_bytes(&bytes).map_err(|message| SnapshotError::Format {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses either accepted JSON shape. Duplicate keys are an error: they would make the
    /// result depend on the order of the dump.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("expected a JSON object (etcdctl -w json output or {\"key\": \"value\"})")?;
        if obj.contains_key("kvs") || obj.contains_key("header") {
            return Self::from_etcdctl(obj);
        }
        // Flat form; serde_json keeps the last of duplicate keys, so look for them in the text.
        check_flat_duplicates(bytes)?;
        let mut snap = Snapshot::new();
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => {
                    return Err(format!(
                        "key {k:?}: value must be a string (the raw etcd value), got {}",
                        kind(other)
                    ))
                }
            };
            snap.put(k.clone(), text.into_bytes());
        }
        Ok(snap)
    }

    fn from_etcdctl(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let revision = obj
            .get("header")
            .and_then(|h| h.get("revision"))
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let mut snap = Snapshot {
            revision,
            kvs: BTreeMap::new(),
        };
        let kvs = match obj.get("kvs") {
            None | Some(serde_json::Value::Null) => return Ok(snap),
            Some(serde_json::Value::Array(a)) => a,
            Some(other) => return Err(format!("`kvs` must be an array, got {}", kind(other))),
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        for (i, kv) in kvs.iter().enumerate() {
            let field = |name: &str| -> Result<Vec<u8>, String> {
                let s = kv
                    .get(name)
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| format!("kvs[{i}]: missing string field `{name}`"))?;
                b64.decode(s)
                    .map_err(|e| format!("kvs[{i}].{name}: not base64: {e}"))
            };
            let key = String::from_utf8(field("key")?)
                .map_err(|_| format!("kvs[{i}].key is not UTF-8"))?;
            // etcd omits `value` for an empty value.
            let value = if kv.get("value").is_some() {
                field("value")?
            } else {
                Vec::new()
            };
            if snap.kvs.contains_key(&key) {
                return Err(format!("kvs[{i}]: duplicate key {key:?}"));
            }
            snap.put(key, value);
        }
        Ok(snap)
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Walks the top-level object of a flat dump and rejects a key that appears twice.
fn check_flat_duplicates(bytes: &[u8]) -> Result<(), String> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Result<(), String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::BTreeSet::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !seen.insert(k.clone()) {
                    return Ok(Err(format!("duplicate key {k:?}")));
                }
            }
            Ok(Ok(()))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_map(Keys)
        .map_err(|e| format!("invalid JSON: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcdctl_and_flat_dumps_of_the_same_cluster_agree() {
        let a =
            Snapshot::from_json_bytes(include_bytes!("../tests/fixtures/patroni3-etcdctl.json"))
                .unwrap();
        let b = Snapshot::from_json_bytes(include_bytes!("../tests/fixtures/patroni3-kv.json"))
            .unwrap();
        assert_eq!(a.revision, 130);
        assert_eq!(
            a.kvs.keys().collect::<Vec<_>>(),
            b.kvs.keys().collect::<Vec<_>>()
        );
        assert_eq!(a.kvs["/service/demo/leader"], b"pg1");
    }

    #[test]
    fn duplicate_flat_key_is_refused() {
        let err = Snapshot::from_json_bytes(br#"{"/a": "1", "/a": "2"}"#).unwrap_err();
        assert!(err.contains("duplicate key \"/a\""), "{err}");
    }

    #[test]
    fn non_string_flat_value_is_refused_with_its_key() {
        let err = Snapshot::from_json_bytes(br#"{"/service/x/leader": 5}"#).unwrap_err();
        assert!(err.contains("/service/x/leader"), "{err}");
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = Snapshot::from_json_bytes(b"{\n\"a\": }").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
