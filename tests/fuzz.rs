//! Property tests of the snapshot parser, the member parser and the model: no panic on arbitrary
//! bytes and keys, every member that survives validation is safe to print into a config, and the
//! model does not depend on the order of keys in a dump. The suite runs a few thousand cases; the
//! recorded 10^6-input run is `PROPTEST_CASES=1000000 cargo test --release --test fuzz` (see
//! docs/FUZZING.md).

use haconfd::model::{validate_name, Cluster};
use haconfd::snapshot::Snapshot;
use proptest::prelude::*;

const PREFIX: &str = "/service/demo/";

fn config() -> ProptestConfig {
    // PROPTEST_CASES overrides this, for the long recorded run.
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        ..ProptestConfig::default()
    }
}

/// Strings that mix plausible values with what an attacker would try.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.-]{0,12}",
        "[ -~]{0,24}",
        any::<String>(),
        Just("pg1\n    server evil 10.0.0.1:5432".to_owned()),
        Just("127.0.0.1 backup".to_owned()),
        Just("::1".to_owned()),
        Just("%0a%20server".to_owned()),
        Just("[::1]".to_owned()),
        Just(String::new()),
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u32..70000).prop_map(|p| p.to_string()),
        Just("0".to_owned()),
        Just("x1".to_owned()),
        Just(String::new()),
        nasty(),
    ]
}

fn url(scheme: &'static str) -> impl Strategy<Value = String> {
    (nasty(), port(), prop::bool::ANY).prop_map(move |(h, p, bracket)| {
        if bracket {
            format!("{scheme}://[{h}]:{p}/x")
        } else {
            format!("{scheme}://{h}:{p}/x")
        }
    })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        nasty().prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(nasty(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Member JSON shaped like Patroni's, with every field fair game.
fn member_json() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::option::of(url("postgres")),
        prop::option::of(url("http")),
        prop::option::of(nasty()),
        prop::option::of(prop_oneof![
            Just("master".to_owned()),
            Just("primary".to_owned()),
            Just("replica".to_owned()),
            nasty()
        ]),
        prop::option::of(prop::collection::btree_map(nasty(), json_value(), 0..4)),
        prop::option::of(json_value()),
        prop::bool::ANY,
    )
        .prop_map(|(conn, api, state, role, tags, xlog, garbage)| {
            if garbage {
                return b"{not json".to_vec();
            }
            let mut m = serde_json::Map::new();
            let mut put = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            };
            put("conn_url", conn.map(serde_json::Value::String));
            put("api_url", api.map(serde_json::Value::String));
            put("state", state.map(serde_json::Value::String));
            put("role", role.map(serde_json::Value::String));
            put(
                "tags",
                tags.map(|t| serde_json::Value::Object(t.into_iter().collect())),
            );
            put("xlog_location", xlog);
            serde_json::to_vec(&m).unwrap()
        })
}

fn entries() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let key = prop_oneof![
        nasty().prop_map(|n| format!("{PREFIX}members/{n}")),
        "[a-z]{1,4}".prop_map(|n| format!("{PREFIX}members/{n}")),
        Just(format!("{PREFIX}leader")),
        Just(format!("{PREFIX}failover")),
        nasty().prop_map(|n| format!("{PREFIX}{n}")),
        nasty(),
    ];
    let value = prop_oneof![
        member_json(),
        nasty().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    prop::collection::vec((key, value), 0..8)
}

fn snapshot(entries: &[(String, Vec<u8>)]) -> Snapshot {
    let mut s = Snapshot::new();
    for (k, v) in entries {
        s.put(k.clone(), v.clone());
    }
    s
}

/// A value safe to place between spaces on a config line.
fn safe_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn snapshot_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Snapshot::from_json_bytes(&bytes);
    }

    #[test]
    fn snapshot_parser_never_panics_on_json(v in json_value()) {
        let _ = Snapshot::from_json_bytes(&serde_json::to_vec(&v).unwrap());
        let wrapped = serde_json::json!({"header": {"revision": 1}, "kvs": [v]});
        let _ = Snapshot::from_json_bytes(&serde_json::to_vec(&wrapped).unwrap());
    }

    #[test]
    fn members_that_survive_validation_are_safe_to_render(entries in entries()) {
        let built = Cluster::build(&snapshot(&entries), "/service", "demo");
        let c = &built.cluster;
        for m in &c.members {
            prop_assert!(validate_name(&m.name).is_ok(), "{:?}", m.name);
            prop_assert!(safe_token(&m.host), "{:?}", m.host);
            prop_assert!(safe_token(&m.address), "{:?}", m.address);
            prop_assert!(safe_token(&m.api_host), "{:?}", m.api_host);
            prop_assert!(m.port > 0 && m.api_port > 0);
            prop_assert!(m.role.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            prop_assert!(m.state.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == ' '));
            for (k, v) in &m.tags {
                prop_assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if let Some(s) = v.as_str() {
                    prop_assert!(s.is_empty() || safe_token(s), "{:?}", s);
                }
            }
        }
        // At most one leader, and it is a member.
        prop_assert!(c.members.iter().filter(|m| m.is_leader).count() <= 1);
        if let Some(l) = &c.leader_name {
            prop_assert!(c.members.iter().any(|m| &m.name == l && m.is_leader));
        }
        // Sorted by name.
        prop_assert!(c.members.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn model_does_not_depend_on_key_order_in_a_dump(entries in entries(), seed in any::<u64>()) {
        // The same keys, in two orders, through the flat and the etcdctl dump formats.
        let mut dedup = std::collections::BTreeMap::new();
        for (k, v) in &entries {
            if let Ok(text) = String::from_utf8(v.clone()) {
                dedup.insert(k.clone(), text);
            }
        }
        let mut pairs: Vec<_> = dedup.into_iter().collect();
        let flat = |pairs: &[(String, String)]| {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}: {}", serde_json::json!(k), serde_json::json!(v)))
                .collect();
            format!("{{{}}}", body.join(","))
        };
        let etcdctl = |pairs: &[(String, String)]| {
            use base64::Engine as _;
            let b = base64::engine::general_purpose::STANDARD;
            let kvs: Vec<_> = pairs
                .iter()
                .map(|(k, v)| serde_json::json!({"key": b.encode(k), "value": b.encode(v)}))
                .collect();
            serde_json::json!({"header": {"revision": 7}, "kvs": kvs}).to_string()
        };
        let a = Snapshot::from_json_bytes(flat(&pairs).as_bytes()).unwrap();
        let e1 = Snapshot::from_json_bytes(etcdctl(&pairs).as_bytes()).unwrap();
        // A deterministic shuffle driven by the seed.
        let mut x = seed | 1;
        for i in (1..pairs.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pairs.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let b = Snapshot::from_json_bytes(flat(&pairs).as_bytes()).unwrap();
        let e2 = Snapshot::from_json_bytes(etcdctl(&pairs).as_bytes()).unwrap();
        let model = |s: &Snapshot| Cluster::build(s, "/service", "demo").cluster;
        prop_assert_eq!(model(&a), model(&b));
        prop_assert_eq!(model(&e1), model(&e2));
        prop_assert_eq!(model(&a), model(&e1));
    }
}
