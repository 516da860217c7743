//! When the followed scope shows no key: what is under the namespace instead, in either etcd
//! store (or in a dump), and the sentence that names the likely scope. A wrong scope, confd's
//! whole `-prefix` pasted into `namespace`, or the other API's store all look the same from the
//! prefix alone.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{fetch_with, Clusters, EtcdApi, EtcdSettings};
use crate::snapshot::Snapshot;

/// Where a listing came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// etcd, through this API.
    Etcd(EtcdApi),
    /// A dump given with `--snapshot`.
    Dump,
}

/// What one store (or dump) holds under the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The store or dump.
    pub origin: Origin,
    /// Scopes with a `leader` or `members/` key (directly, or in a Citus group), sorted.
    pub scopes: Vec<String>,
    /// The namespace itself holds `leader` or `members/` keys: it names a cluster, as confd's
    /// `-prefix` does.
    pub namespace_is_scope: bool,
}

/// The scopes under `namespace` (normalised, `/service` style or empty for the root) among
/// `keys`.
pub fn scopes_in<'a>(keys: impl Iterator<Item = &'a str>, namespace: &str) -> Found {
    let base = format!("{namespace}/");
    let mut scopes = BTreeSet::new();
    let mut namespace_is_scope = false;
    for rest in keys.filter_map(|k| k.strip_prefix(base.as_str())) {
        if is_patroni_path(rest) {
            namespace_is_scope = true;
        }
        if let Some((scope, below)) = rest.split_once('/') {
            let citus = below
                .split_once('/')
                .filter(|(g, _)| !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()));
            if is_patroni_path(below) || citus.is_some_and(|(_, b)| is_patroni_path(b)) {
                scopes.insert(scope.to_owned());
            }
        }
    }
    Found {
        origin: Origin::Dump,
        scopes: scopes.into_iter().collect(),
        namespace_is_scope,
    }
}

fn is_patroni_path(rest: &str) -> bool {
    rest == "leader" || rest.starts_with("members/")
}

/// Lists the namespace through each API (the configured one first), each within `timeout`; a
/// store that does not answer (an etcd without v2, say) is left out.
pub async fn look_around(cfg: &EtcdSettings, timeout: Duration) -> Vec<Found> {
    let mut out = Vec::new();
    let other = match cfg.api {
        EtcdApi::V3 => EtcdApi::V2,
        EtcdApi::V2 => EtcdApi::V3,
    };
    for api in [cfg.api, other] {
        let wide = EtcdSettings {
            api,
            clusters: Clusters::Discover,
            ..cfg.clone()
        };
        let listed = match api {
            EtcdApi::V3 => fetch_with::<super::etcd3::Etcd3>(&wide, timeout).await,
            EtcdApi::V2 => fetch_with::<super::etcd2::Etcd2>(&wide, timeout).await,
        };
        if let Ok(snap) = listed {
            let mut found = scopes_in(snap.kvs.keys().map(String::as_str), &cfg.namespace);
            found.origin = Origin::Etcd(api);
            out.push(found);
        }
    }
    out
}

/// Whether `snap` holds any key of the one followed scope; true when several are followed.
pub fn has_scope_keys(cfg: &EtcdSettings, snap: &Snapshot) -> bool {
    if cfg.single_scope().is_none() {
        return true;
    }
    let prefix = cfg.prefix();
    snap.kvs
        .range(prefix.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&prefix))
}

/// The message for an empty scope: what exists instead and what to set. Never suggests
/// `--force`: forcing an empty view renders files with no server.
pub fn empty_scope_message(cfg: &EtcdSettings, found: &[Found]) -> String {
    let scope = cfg.single_scope().unwrap_or_default();
    let mut msg = format!(
        "no key under {} (scope {scope:?} of namespace {:?}): nothing to render from",
        cfg.prefix(),
        display_namespace(&cfg.namespace)
    );
    if let Some(f) = found.iter().find(|f| f.namespace_is_scope) {
        let (parent, last) = cfg
            .namespace
            .rsplit_once('/')
            .unwrap_or(("", cfg.namespace.as_str()));
        msg += &format!(
            ". The namespace {:?} itself holds a Patroni cluster ({}): it is confd's whole \
             -prefix. haconfd's namespace is the part before the scope: set namespace = {:?} and \
             scope = {last:?}",
            cfg.namespace,
            origin_name(f.origin),
            display_namespace(parent)
        );
        return msg;
    }
    let listed: Vec<String> = found
        .iter()
        .filter(|f| !f.scopes.is_empty())
        .map(|f| format!("{} ({})", quoted(&f.scopes), origin_name(f.origin)))
        .collect();
    if listed.is_empty() {
        msg += &format!(
            ". No Patroni scope is under {}/ in {}: check etcd.namespace (Patroni's \
             `namespace`, default /service) and etcd.endpoints",
            cfg.namespace,
            found
                .iter()
                .map(|f| origin_name(f.origin))
                .collect::<Vec<_>>()
                .join(" or ")
        );
        return msg;
    }
    msg += &format!(". Under {}/: {}", cfg.namespace, listed.join("; "));
    let all: Vec<(&str, Origin)> = found
        .iter()
        .flat_map(|f| f.scopes.iter().map(move |s| (s.as_str(), f.origin)))
        .collect();
    if let Some((likely, origin)) = likely(scope, &all) {
        msg += &format!(". Did you mean scope = {likely:?} (--scope {likely})");
        if let Origin::Etcd(api) = origin {
            if api != cfg.api {
                msg += &format!(
                    " with etcd.api = {:?} ({})",
                    api_name(api),
                    match api {
                        EtcdApi::V2 => "Patroni's `etcd:` section",
                        EtcdApi::V3 => "Patroni's `etcd3:` section",
                    }
                );
            }
        }
        msg += "?";
    }
    msg
}

/// The scope most like `wanted`: the only one, or the nearest by edit distance when it is
/// near enough to be a typo or a different case.
fn likely<'a>(wanted: &str, all: &[(&'a str, Origin)]) -> Option<(&'a str, Origin)> {
    let distinct: BTreeSet<&str> = all.iter().map(|(s, _)| *s).collect();
    if distinct.len() == 1 {
        return all.first().copied();
    }
    let best = all
        .iter()
        .map(|&(s, o)| (distance(&wanted.to_lowercase(), &s.to_lowercase()), s, o))
        .min_by_key(|(d, _, _)| *d)?;
    (best.0 <= wanted.chars().count().max(3) / 3 + 1).then_some((best.1, best.2))
}

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn quoted(scopes: &[String]) -> String {
    scopes
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn display_namespace(ns: &str) -> &str {
    if ns.is_empty() {
        "/"
    } else {
        ns
    }
}

fn api_name(api: EtcdApi) -> &'static str {
    match api {
        EtcdApi::V3 => "v3",
        EtcdApi::V2 => "v2",
    }
}

fn origin_name(o: Origin) -> String {
    match o {
        Origin::Etcd(api) => format!("etcd {} store", api_name(api)),
        Origin::Dump => "the dump".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Found {
        scopes_in(list.iter().copied(), "/service")
    }

    #[test]
    fn scopes_are_those_with_patroni_keys_citus_groups_included() {
        let f = keys(&[
            "/service/batman/leader",
            "/service/batman/members/pg1",
            "/service/citus/0/members/c1",
            "/service/odd/config",
            "/other/x/leader",
        ]);
        assert_eq!(f.scopes, vec!["batman", "citus"]);
        assert!(!f.namespace_is_scope);
        let f = scopes_in(
            ["/service/batman/leader", "/service/batman/members/pg1"].into_iter(),
            "/service/batman",
        );
        assert!(f.namespace_is_scope);
    }

    #[test]
    fn the_likely_scope_is_a_near_name_or_the_only_one() {
        let d = Origin::Dump;
        assert_eq!(
            likely("batmn", &[("batman", d), ("robin", d)]).map(|x| x.0),
            Some("batman")
        );
        assert_eq!(likely("zzz", &[("batman", d), ("robin", d)]), None);
        assert_eq!(likely("zzz", &[("demo", d)]).map(|x| x.0), Some("demo"));
    }
}
