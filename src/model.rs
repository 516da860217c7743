//! Turns a [`Snapshot`] into a validated Patroni [`Cluster`]: the leader from the `leader` key, then
//! `members/<leader>`; members sorted by name with host, port, API address, role, state, tags,
//! timeline and lag. Every value that can reach a rendered file is validated here, so a hostile or
//! broken member is skipped with a warning naming its key and never becomes config text.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::snapshot::Snapshot;

/// A Patroni cluster as the templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// Patroni's namespace, e.g. `/service`.
    pub namespace: String,
    /// Patroni's scope.
    pub scope: String,
    /// The Citus group (0 is the coordinator) when the scope keeps Patroni's keys one level
    /// down, per group; None for an ordinary cluster.
    pub group: Option<u64>,
    /// The leader's name, when the `leader` key names a valid member.
    pub leader_name: Option<String>,
    /// The name the `leader` key holds (a valid name), whether or not its member key is there
    /// and usable: a leader whose key is present is never fenced. Not in the render context.
    #[serde(skip)]
    pub leader_key: Option<String>,
    /// Valid members, sorted by name.
    pub members: Vec<Member>,
    /// The synchronous standbys Patroni's `sync` key names for the current leader (3.x
    /// `sync_standby`; 4.x quorum mode lists them comma-separated), sorted; empty without
    /// synchronous mode, or when the key names another leader (it is rewritten after a
    /// failover).
    pub sync_standbys: Vec<String>,
    /// A Patroni standby cluster: its `config` key has a `standby_cluster` section (without a
    /// `config` key: its leader's role is `standby_leader`). Its leader replicates from another
    /// cluster and takes no writes; it serves reads with the replicas. The `config` key changes
    /// first at a promotion (`patronictl edit-config` removing the section) and at a demotion,
    /// before Patroni rewrites the leader's member key.
    pub standby_cluster: bool,
    /// Patroni's `ttl` from the `config` key, in seconds: how long a crashed leader's key
    /// lives on (its lease), so the longest a leader change can leave writes without a
    /// primary. None without a readable `config` key.
    pub ttl: Option<u64>,
    /// Patroni's `loop_wait` from the `config` key, in seconds.
    pub loop_wait: Option<u64>,
    /// Patroni's `retry_timeout` from the `config` key, in seconds: how long the new leader's
    /// DCS and PostgreSQL operations may take once the lease has run out.
    pub retry_timeout: Option<u64>,
    /// A pending switchover or failover from Patroni's `failover` key; None when the key is
    /// absent, `{}` (Patroni leaves that behind after a switchover) or refused. Templates do not
    /// see it (it is not in the render context): it drives events, not file contents.
    pub failover: Option<Failover>,
}

/// A switchover or failover requested through Patroni's `failover` key (`patronictl switchover`
/// writes `{"leader":"pg1","member":"pg2"}`, with `scheduled_at` when planned for later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    /// The leader to step down, when named.
    pub leader: Option<String>,
    /// The candidate to take over, when named.
    pub member: Option<String>,
    /// When the switchover is scheduled (Patroni's ISO 8601 text), for a planned one.
    pub scheduled_at: Option<String>,
}

/// One valid member.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// Member name (safe characters only).
    pub name: String,
    /// PostgreSQL host from `conn_url` (hostname or IP, IPv6 without brackets).
    pub host: String,
    /// PostgreSQL port from `conn_url`.
    pub port: u16,
    /// `host:port`, with IPv6 hosts bracketed: ready for a `server` line.
    pub address: String,
    /// Patroni REST API scheme (`http` or `https`).
    pub api_scheme: String,
    /// Patroni REST API host.
    pub api_host: String,
    /// Patroni REST API port (HAProxy's `check port`).
    pub api_port: u16,
    /// Patroni's role: `primary`/`master`, `replica`, `standby_leader`, ...
    pub role: String,
    /// Patroni's state: `running`, `streaming`, `starting`, ...
    pub state: String,
    /// True for the member named by the `leader` key.
    pub is_leader: bool,
    /// True for a synchronous standby of the leader (Patroni's `sync` key).
    pub is_sync: bool,
    /// Validated tags (booleans, numbers and safe strings).
    pub tags: BTreeMap<String, serde_json::Value>,
    /// `tags.nofailover`.
    pub nofailover: bool,
    /// `tags.noloadbalance`.
    pub noloadbalance: bool,
    /// `tags.nosync`.
    pub nosync: bool,
    /// PostgreSQL timeline.
    pub timeline: Option<u64>,
    /// WAL position (`xlog_location`).
    pub xlog_location: Option<u64>,
    /// Bytes behind the leader's WAL position (None when unknown).
    pub lag: Option<u64>,
    /// Patroni version.
    pub version: Option<String>,
    /// Patroni's `pending_restart`.
    pub pending_restart: bool,
}

/// A key that did not make it into the model, and why. Logged as a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The full etcd key.
    pub key: String,
    /// Why it was skipped.
    pub reason: String,
    /// A member key whose member is kept, only this field of it dropped.
    pub member_kept: bool,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// The model built from one snapshot, with what was skipped.
#[derive(Debug, Clone)]
pub struct Built {
    /// The cluster.
    pub cluster: Cluster,
    /// Keys refused, in key order.
    pub skipped: Vec<Skipped>,
}

impl Cluster {
    /// The leader, when there is one.
    pub fn leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.is_leader)
    }

    /// Builds the cluster under `<namespace>/<scope>/`. Never fails: bad keys are skipped and
    /// reported, stray keys ignored. The result does not depend on key order.
    pub fn build(snapshot: &Snapshot, namespace: &str, scope: &str) -> Built {
        Self::build_with(
            snapshot,
            namespace,
            &ClusterId::plain(scope),
            &mut MemberCache::default(),
        )
    }

    /// The Patroni cluster (or Citus group) `id` under `namespace`, parsing again only the
    /// member values that changed since `cache` last saw them. The result is the same as
    /// without a cache.
    pub fn build_with(
        snapshot: &Snapshot,
        namespace: &str,
        id: &ClusterId,
        cache: &mut MemberCache,
    ) -> Built {
        let prefix = id.prefix(namespace);
        let mut skipped = Vec::new();
        let parsed = cache.parse_members(snapshot, &prefix, &mut skipped);
        let leader_key = format!("{prefix}leader");
        let leader_name = leader_of(snapshot.kvs.get(&leader_key), &leader_key, &mut skipped);
        let failover_key = format!("{prefix}failover");
        let failover = match snapshot.kvs.get(&failover_key).map(|v| Failover::parse(v)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(f))) => Some(f),
            Some(Err(reason)) => {
                skipped.push(Skipped {
                    key: failover_key,
                    reason: format!("failover value refused: {reason}"),
                    member_kept: false,
                });
                None
            }
        };
        let mut members = Vec::with_capacity(parsed.len());
        for (key, member) in parsed {
            match member {
                Ok((mut m, notes)) => {
                    m.is_leader = leader_name.as_deref() == Some(m.name.as_str());
                    members.push(m);
                    skipped.extend(notes.into_iter().map(|reason| Skipped {
                        key: key.clone(),
                        reason,
                        member_kept: true,
                    }));
                }
                Err(reason) => skipped.push(Skipped {
                    key,
                    reason,
                    member_kept: false,
                }),
            }
        }
        let key_holder = leader_name.clone();
        let leader_name = match leader_name {
            Some(l) if members.iter().any(|m| m.name == l) => Some(l),
            Some(l) => {
                skipped.push(Skipped {
                    key: leader_key,
                    reason: format!(
                        "leader {l:?} is not a valid member; treating the cluster as leaderless"
                    ),
                    member_kept: false,
                });
                None
            }
            None => None,
        };
        set_lag(&mut members);
        let sync_key = format!("{prefix}sync");
        let sync_standbys = match snapshot.kvs.get(&sync_key) {
            None => Vec::new(),
            Some(v) => match sync_of(v, leader_name.as_deref(), &members) {
                Ok(names) => names,
                Err(reason) => {
                    skipped.push(Skipped {
                        key: sync_key,
                        reason: format!("sync value refused: {reason}"),
                        member_kept: false,
                    });
                    Vec::new()
                }
            },
        };
        for m in members.iter_mut() {
            m.is_sync = sync_standbys.contains(&m.name);
        }
        let config_key = format!("{prefix}config");
        let config = match snapshot.kvs.get(&config_key).map(|v| DcsConfig::parse(v)) {
            Some(Ok(c)) => Some(c),
            Some(Err(reason)) => {
                skipped.push(Skipped {
                    key: config_key,
                    reason: format!("config value refused: {reason}"),
                    member_kept: false,
                });
                None
            }
            None => None,
        };
        let standby_cluster = match &config {
            Some(c) => c.standby,
            None => leader_name
                .as_deref()
                .and_then(|l| members.iter().find(|m| m.name == l))
                .is_some_and(Member::is_standby_leader),
        };
        skipped.sort_by(|a, b| a.key.cmp(&b.key));
        Built {
            cluster: Cluster {
                namespace: namespace.to_owned(),
                scope: id.scope.clone(),
                group: id.group,
                leader_key: key_holder,
                leader_name,
                members,
                sync_standbys,
                standby_cluster,
                ttl: config.as_ref().and_then(|c| c.ttl),
                loop_wait: config.as_ref().and_then(|c| c.loop_wait),
                retry_timeout: config.as_ref().and_then(|c| c.retry_timeout),
                failover,
            },
            skipped,
        }
    }

    /// The leader of a standby cluster (see [`Cluster::standby_cluster`]): it holds the leader
    /// key but takes no writes. None in an ordinary cluster, or without a leader.
    pub fn standby_leader(&self) -> Option<&Member> {
        self.leader().filter(|_| self.standby_cluster)
    }

    /// The leader, when it is one that takes writes (not a standby cluster's).
    pub fn writable_leader(&self) -> Option<&Member> {
        self.leader().filter(|_| !self.standby_cluster)
    }

    /// The longest a crashed leader can leave the cluster without a primary: its key lives
    /// up to `ttl` after the crash, then the new leader's DCS and PostgreSQL operations take up
    /// to `retry_timeout` (Patroni's default, 10 s, when the `config` key does not say). None
    /// without a `ttl`.
    pub fn lease_bound(&self) -> Option<Duration> {
        self.ttl
            .map(|ttl| Duration::from_secs(ttl + self.retry_timeout.unwrap_or(10)))
    }
}

/// What haconfd reads of Patroni's `config` key (the cluster-wide dynamic configuration).
struct DcsConfig {
    /// A non-null `standby_cluster` object.
    standby: bool,
    /// `ttl` and `loop_wait`, when they are positive whole numbers of seconds; another value
    /// is left out.
    ttl: Option<u64>,
    loop_wait: Option<u64>,
    retry_timeout: Option<u64>,
}

impl DcsConfig {
    /// An error for a value that is not a JSON object.
    fn parse(value: &[u8]) -> Result<DcsConfig, String> {
        let v: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let secs = |k: &str, min: u64| obj.get(k).and_then(|v| v.as_u64()).filter(|s| *s >= min);
        Ok(DcsConfig {
            standby: obj.get("standby_cluster").is_some_and(|s| s.is_object()),
            ttl: secs("ttl", 1),
            loop_wait: secs("loop_wait", 1),
            retry_timeout: secs("retry_timeout", 1),
        })
    }
}

/// The synchronous standbys of Patroni's `sync` value (`{"leader": "pg1", "sync_standby":
/// "pg2"}`, comma-separated in 4.x quorum mode): the members it names, when it names the
/// current leader (after a failover it names the old one until Patroni rewrites it). An error
/// for a value that is not such an object.
fn sync_of(value: &[u8], leader: Option<&str>, members: &[Member]) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let text = |k: &str| match obj.get(k) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(format!("{k} is {other}, not a string")),
    };
    let (of, standbys) = (text("leader")?, text("sync_standby")?);
    if of.is_none() || of != leader {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = standbys
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|n| members.iter().any(|m| m.name == *n))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The name in a `leader` value, validated; a refused one is noted in `skipped`.
fn leader_of(value: Option<&Vec<u8>>, key: &str, skipped: &mut Vec<Skipped>) -> Option<String> {
    let refused = |reason: String| Skipped {
        key: key.to_owned(),
        reason,
        member_kept: false,
    };
    match std::str::from_utf8(value?).map(str::trim) {
        Ok(name) => match validate_name(name) {
            Ok(()) => Some(name.to_owned()),
            Err(reason) => {
                skipped.push(refused(format!("leader name refused: {reason}")));
                None
            }
        },
        Err(_) => {
            skipped.push(refused("leader value is not UTF-8".into()));
            None
        }
    }
}

/// Lag is measured against the leader's WAL position.
fn set_lag(members: &mut [Member]) {
    let leader_pos = members
        .iter()
        .find(|m| m.is_leader)
        .and_then(|m| m.xlog_location);
    for m in members {
        m.lag = match (leader_pos, m.xlog_location) {
            (Some(l), Some(p)) => Some(l.saturating_sub(p)),
            _ => None,
        };
    }
}

impl MemberCache {
    /// Every member key under `prefix`, parsed (or taken from the cache when its value is the
    /// one parsed before), in key order; names refused are noted in `skipped`. Keeps only the
    /// keys present now, and the `leader` and `failover` values the model is built from.
    fn parse_members(
        &mut self,
        snapshot: &Snapshot,
        prefix: &str,
        skipped: &mut Vec<Skipped>,
    ) -> Vec<(String, ParsedMember)> {
        let mut parsed: Vec<(String, ParsedMember)> = Vec::new();
        let mut seen = std::collections::HashMap::with_capacity(self.parsed.len());
        for (key, value) in snapshot.kvs.range(prefix.to_owned()..) {
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            // Anything else below the prefix (config, status, a Citus group's keys when this is
            // the scope of a Citus cluster) is not a member.
            let Some(name) = rest.strip_prefix("members/") else {
                continue;
            };
            if let Err(reason) = validate_name(name) {
                skipped.push(Skipped {
                    key: key.clone(),
                    reason: format!("member name refused: {reason}"),
                    member_kept: false,
                });
                continue;
            }
            let member = match self.parsed.remove_entry(key) {
                Some((k, (v, m))) if v == *value => (k, (v, m)),
                _ => (key.clone(), (value.clone(), Member::parse(name, value))),
            };
            parsed.push((member.0.clone(), member.1 .1.clone()));
            seen.insert(member.0, member.1);
        }
        // Only keys present now are kept: a departed member's entry goes with it.
        self.parsed = seen;
        self.leader = snapshot.kvs.get(&format!("{prefix}leader")).cloned();
        self.failover = snapshot.kvs.get(&format!("{prefix}failover")).cloned();
        self.sync = snapshot.kvs.get(&format!("{prefix}sync")).cloned();
        self.config = snapshot.kvs.get(&format!("{prefix}config")).cloned();
        parsed
    }
}

/// The placeholder for a cluster's scope: in a per-cluster `dest` (one file per cluster) and in
/// HAProxy backend names (each cluster's own backends). It stands for the scope's
/// [`scope_id`].
pub const SCOPE_PLACEHOLDER: &str = "{scope}";

/// The longest [`scope_id`] a file name or identifier takes.
pub const SCOPE_ID_MAX: usize = 200;

/// A scope as a file name and a config identifier: letters, digits, `_`, `-` and `.` (not
/// first) as they are, every other byte of its UTF-8 as `:` and two uppercase hex digits. So
/// `bad scope` is `bad:20scope`, `zürich` is `z:C3:BCrich` and `..dots` is `:2E.dots`: never a
/// path component (`.`, `..`, a hidden file), never a character that ends a config word, and
/// reversible ([`scope_of_id`]). Scopes made of those characters (nearly all) are their own id.
pub fn scope_id(scope: &str) -> String {
    let mut out = String::with_capacity(scope.len());
    for (i, b) in scope.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!(":{b:02X}"));
        }
    }
    out
}

/// The scope a [`scope_id`] stands for; None when `id` is not one.
pub fn scope_of_id(id: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(id.len());
    let mut rest = id.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b':' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Why haconfd cannot follow a scope, if it cannot: Patroni writes any name but `/`, and every
/// one is followed but a name holding control characters (nothing can carry it into a file, a
/// log line or an environment variable unchanged) or one whose [`scope_id`] is longer than
/// [`SCOPE_ID_MAX`] bytes.
pub fn scope_refusal(scope: &str) -> Option<String> {
    if scope.is_empty() {
        return Some("an empty scope".into());
    }
    if scope.chars().any(char::is_control) {
        return Some(format!("scope {scope:?} holds control characters"));
    }
    let id = scope_id(scope);
    (id.len() > SCOPE_ID_MAX).then(|| {
        format!(
            "scope {scope:?} is {} bytes as a file name ({id:?}), more than {SCOPE_ID_MAX}",
            id.len()
        )
    })
}

/// Which Patroni cluster (or Citus group) a model is of: Patroni's keys live under
/// `<namespace>/<scope>/`, or `<namespace>/<scope>/<group>/` for a Citus group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId {
    /// Patroni's scope.
    pub scope: String,
    /// The Citus group, None for an ordinary cluster.
    pub group: Option<u64>,
}

impl ClusterId {
    /// An ordinary cluster.
    pub fn plain(scope: &str) -> ClusterId {
        ClusterId {
            scope: scope.to_owned(),
            group: None,
        }
    }

    /// The prefix Patroni writes this cluster's keys under.
    pub fn prefix(&self, namespace: &str) -> String {
        match self.group {
            None => format!("{namespace}/{}/", self.scope),
            Some(g) => format!("{namespace}/{}/{g}/", self.scope),
        }
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.group {
            None => f.write_str(&self.scope),
            Some(g) => write!(f, "{}/{g}", self.scope),
        }
    }
}

/// What the keys of one scope show: an ordinary cluster, or the Citus groups found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// Whether Patroni keys of an ordinary cluster (`leader`, `members/`) are there.
    pub plain: bool,
    /// Citus groups with a `leader` or `members/` key (`<group>/leader`).
    pub groups: std::collections::BTreeSet<u64>,
    /// The ordinary `leader` and `members/` keys (below the scope) found next to Citus groups:
    /// strays (a node that joined without its `citus:` section), at most [`STRAYS_NAMED`].
    pub strays: Vec<String>,
    /// Why the scope cannot be followed ([`scope_refusal`]), when it cannot.
    pub refused: Option<String>,
}

/// How many stray keys of a Citus scope a warning names.
pub const STRAYS_NAMED: usize = 10;

impl Layout {
    /// Whether Patroni keys of a cluster are there (a leader or member key, of the scope or of
    /// a group).
    pub fn has_cluster(&self) -> bool {
        self.plain || !self.groups.is_empty()
    }

    /// Whether the scope is a Citus cluster: it has groups. Ordinary keys next to them are
    /// strays, named in [`Layout::strays`], never a reason to drop the groups.
    pub fn is_citus(&self) -> bool {
        !self.groups.is_empty()
    }

    /// The clusters to model for `scope`: its groups for Citus, else the scope itself (also
    /// when no key is there: an emptied store is the guard's to judge).
    pub fn ids(&self, scope: &str) -> Vec<ClusterId> {
        if self.is_citus() {
            self.groups
                .iter()
                .map(|&g| ClusterId {
                    scope: scope.to_owned(),
                    group: Some(g),
                })
                .collect()
        } else {
            vec![ClusterId::plain(scope)]
        }
    }
}

/// The scopes under `namespace` holding Patroni keys, each with its layout. With `only`, just
/// those scopes are looked at (each one present in the result, with an empty layout when it
/// has no key). A scope haconfd cannot follow is in the result with [`Layout::refused`] set.
pub fn layouts(
    snapshot: &Snapshot,
    namespace: &str,
    only: Option<&[String]>,
) -> BTreeMap<String, Layout> {
    let mut out = BTreeMap::new();
    if let Some(scopes) = only {
        for scope in scopes {
            let prefix = format!("{namespace}/{scope}/");
            let mut layout = Layout::default();
            for (key, _) in snapshot.kvs.range(prefix.clone()..) {
                let Some(rest) = key.strip_prefix(&prefix) else {
                    break;
                };
                note_key(&mut layout, rest);
            }
            out.insert(scope.clone(), layout);
        }
        return out;
    }
    let root = format!("{namespace}/");
    // Keys come sorted, so one scope's keys come together: its name is checked and copied once.
    let mut current: Option<(&str, Layout)> = None;
    for (key, _) in snapshot.kvs.range(root.clone()..) {
        let Some(rest) = key.strip_prefix(&root) else {
            break;
        };
        let Some((scope, below)) = rest.split_once('/') else {
            continue;
        };
        match &mut current {
            Some((s, layout)) if *s == scope => {
                note_key(layout, below);
            }
            _ => {
                if let Some((s, layout)) = current.take() {
                    if layout.has_cluster() {
                        out.insert(s.to_owned(), layout);
                    }
                }
                let mut layout = Layout {
                    refused: scope_refusal(scope),
                    ..Layout::default()
                };
                note_key(&mut layout, below);
                current = Some((scope, layout));
            }
        }
    }
    if let Some((s, layout)) = current {
        if layout.has_cluster() {
            out.insert(s.to_owned(), layout);
        }
    }
    out
}

/// Records what key `rest` (below a scope) says of the layout; true when it is a Patroni
/// leader or member key.
fn note_key(layout: &mut Layout, rest: &str) -> bool {
    if rest == "leader" || rest.starts_with("members/") {
        layout.plain = true;
        // Keys come sorted and a group's digits sort before `leader` and `members/`: the groups
        // of this scope are known by now.
        if !layout.groups.is_empty() && layout.strays.len() < STRAYS_NAMED {
            layout.strays.push(rest.to_owned());
        }
        return true;
    }
    let Some((group, key)) = rest.split_once('/') else {
        return false;
    };
    if !(key == "leader" || key.starts_with("members/"))
        || group.is_empty()
        || group.len() > 9
        || !group.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    match group.parse() {
        Ok(g) => {
            layout.groups.insert(g);
            true
        }
        Err(_) => false,
    }
}

impl Cluster {
    /// Whether `snapshot` holds exactly the keys this model was built from: the same member
    /// values (as `cache` saw them when it was built), the same `leader` and `failover` values.
    /// Then the model can be kept as it is: with thousands of clusters, most passes change one.
    pub fn built_from(&self, snapshot: &Snapshot, id: &ClusterId, cache: &MemberCache) -> bool {
        let prefix = id.prefix(&self.namespace);
        let mut members = 0;
        for (key, value) in snapshot.kvs.range(prefix.clone()..) {
            let Some(rest) = key.strip_prefix(&prefix) else {
                break;
            };
            if rest.starts_with("members/") {
                members += 1;
                match cache.parsed.get(key) {
                    Some((v, _)) if v == value => {}
                    _ => return false,
                }
            }
        }
        if members != cache.parsed.len() {
            return false;
        }
        let raw = |k: &str| snapshot.kvs.get(&format!("{prefix}{k}"));
        raw("leader").map(Vec::as_slice) == cache.leader.as_deref()
            && raw("failover").map(Vec::as_slice) == cache.failover.as_deref()
            && raw("sync").map(Vec::as_slice) == cache.sync.as_deref()
            && raw("config").map(Vec::as_slice) == cache.config.as_deref()
    }

    /// Whether a template sees the same context in `self` and `other`. With `with_wal` false,
    /// the WAL position and lag are left out: Patroni rewrites every member key every
    /// `loop_wait` because they move, and a template that never reads them must not be rendered
    /// again for that. Every other field counts (the destructuring names them all, so that a new
    /// field cannot be forgotten here).
    pub fn same_for_templates(&self, other: &Cluster, with_wal: bool) -> bool {
        let Cluster {
            namespace,
            scope,
            group,
            leader_name,
            members,
            sync_standbys,
            standby_cluster,
            ttl,
            loop_wait,
            retry_timeout,
            // Not in the render context: a switchover request alone renders nothing.
            failover: _,
            leader_key: _,
        } = self;
        standby_cluster == &other.standby_cluster
            && ttl == &other.ttl
            && loop_wait == &other.loop_wait
            && retry_timeout == &other.retry_timeout
            && namespace == &other.namespace
            && scope == &other.scope
            && group == &other.group
            && leader_name == &other.leader_name
            && sync_standbys == &other.sync_standbys
            && members.len() == other.members.len()
            && members
                .iter()
                .zip(&other.members)
                .all(|(a, b)| a.same_for_templates(b, with_wal))
    }
}

impl Member {
    /// The leader of a Patroni standby cluster (role `standby_leader`): it holds the leader key
    /// but replicates from another cluster and takes no writes.
    pub fn is_standby_leader(&self) -> bool {
        self.role == "standby_leader"
    }

    fn same_for_templates(&self, other: &Member, with_wal: bool) -> bool {
        let Member {
            name,
            host,
            port,
            address,
            api_scheme,
            api_host,
            api_port,
            role,
            state,
            is_leader,
            is_sync,
            tags,
            nofailover,
            noloadbalance,
            nosync,
            timeline,
            xlog_location,
            lag,
            version,
            pending_restart,
        } = self;
        name == &other.name
            && host == &other.host
            && port == &other.port
            && address == &other.address
            && api_scheme == &other.api_scheme
            && api_host == &other.api_host
            && api_port == &other.api_port
            && role == &other.role
            && state == &other.state
            && is_leader == &other.is_leader
            && is_sync == &other.is_sync
            && tags == &other.tags
            && nofailover == &other.nofailover
            && noloadbalance == &other.noloadbalance
            && nosync == &other.nosync
            && timeline == &other.timeline
            && version == &other.version
            && pending_restart == &other.pending_restart
            && (!with_wal || (xlog_location == &other.xlog_location && lag == &other.lag))
    }
}

impl Failover {
    /// Parses the `failover` value: `Ok(None)` for `{}` (or an object naming neither leader,
    /// member nor time), an error for anything that is not a JSON object of valid names.
    fn parse(value: &[u8]) -> Result<Option<Self>, String> {
        let v: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let field = |k: &str| -> Result<Option<String>, String> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("{k} must be a string, not {other}")),
            }
        };
        let leader = field("leader")?;
        let member = field("member")?;
        let scheduled_at = field("scheduled_at")?;
        for (k, name) in [("leader", &leader), ("member", &member)] {
            if let Some(n) = name {
                validate_name(n).map_err(|e| format!("{k} name refused: {e}"))?;
            }
        }
        if let Some(t) = &scheduled_at {
            let ok = t.len() <= 40
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '+' | ' '));
            if !ok {
                return Err(format!("scheduled_at {t:?} is not a timestamp"));
            }
        }
        if leader.is_none() && member.is_none() && scheduled_at.is_none() {
            return Ok(None);
        }
        Ok(Some(Failover {
            leader,
            member,
            scheduled_at,
        }))
    }
}

/// Member JSON as Patroni writes it; unknown fields are ignored. Every field is read as any JSON
/// value: a field of an unexpected type is dropped (with a note), never the member with it.
#[derive(Debug, serde::Deserialize)]
struct RawMember {
    #[serde(default)]
    conn_url: Option<serde_json::Value>,
    #[serde(default)]
    api_url: Option<serde_json::Value>,
    #[serde(default)]
    state: Option<serde_json::Value>,
    #[serde(default)]
    role: Option<serde_json::Value>,
    #[serde(default)]
    version: Option<serde_json::Value>,
    #[serde(default)]
    tags: Option<serde_json::Value>,
    #[serde(default)]
    timeline: Option<serde_json::Value>,
    #[serde(default)]
    xlog_location: Option<serde_json::Value>,
    #[serde(default)]
    replay_lsn: Option<serde_json::Value>,
    #[serde(default)]
    pending_restart: Option<serde_json::Value>,
}

/// A parsed member, with the notes on the fields that were dropped from it.
type ParsedMember = Result<(Member, Vec<String>), String>;

/// Members parsed from earlier snapshots, by key, with the value each was parsed from. Patroni
/// rewrites one member key per heartbeat: with this, one member is parsed again, not thousands.
#[derive(Debug, Default)]
pub struct MemberCache {
    parsed: std::collections::HashMap<String, (Vec<u8>, ParsedMember)>,
    /// The `leader` value of the last build.
    leader: Option<Vec<u8>>,
    /// The `failover` value of the last build.
    failover: Option<Vec<u8>>,
    /// The `sync` value of the last build.
    sync: Option<Vec<u8>>,
    /// The `config` value of the last build.
    config: Option<Vec<u8>>,
}

impl Member {
    /// Parses and validates one member value; `is_leader` and `lag` are set by the caller,
    /// which knows the leader. Only the two fields a server line cannot do without refuse the
    /// member: `conn_url` (where PostgreSQL listens) and `api_url` (where its checks go). Any
    /// other field that does not parse or validate is dropped, with a note naming it: Patroni
    /// accepts any tag value, and one odd value must not take a member (let alone the leader)
    /// out of the routing.
    fn parse(name: &str, value: &[u8]) -> ParsedMember {
        let raw = serde_json::from_slice::<RawMember>(value)
            .map_err(|e| format!("member JSON does not parse: {e}"))?;
        Self::from_raw(name.to_owned(), raw)
    }

    fn from_raw(name: String, raw: RawMember) -> ParsedMember {
        let text = |field: &str, v: Option<serde_json::Value>| -> Result<String, String> {
            match v {
                Some(serde_json::Value::String(s)) => Ok(s),
                None | Some(serde_json::Value::Null) => Err(format!("missing {field}")),
                Some(other) => Err(format!("{field} must be a string, not {other}")),
            }
        };
        let conn_url = text("conn_url", raw.conn_url)?;
        let (_, host, port) = parse_endpoint(&conn_url, Some(5432))
            .map_err(|e| format!("conn_url {conn_url:?}: {e}"))?;
        let api_url = text("api_url", raw.api_url)?;
        let (api_scheme, api_host, api_port) =
            parse_endpoint(&api_url, None).map_err(|e| format!("api_url {api_url:?}: {e}"))?;
        if !matches!(api_scheme.as_str(), "http" | "https") {
            return Err(format!("api_url {api_url:?}: scheme must be http or https"));
        }
        let mut notes = Vec::new();
        let role = word_field("role", raw.role, false, &mut notes);
        let state = word_field("state", raw.state, true, &mut notes);
        let tags = validate_tags(raw.tags, &mut notes);
        let flag = |k: &str| {
            tags.get(k)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        let version = version_field(raw.version, &mut notes);
        let timeline = number_field("timeline", raw.timeline, &mut notes);
        // Prefer replay_lsn (4.1+, what a reader sees) over xlog_location.
        let replay_lsn = number_field("replay_lsn", raw.replay_lsn, &mut notes);
        let xlog_location =
            replay_lsn.or(number_field("xlog_location", raw.xlog_location, &mut notes));
        let pending_restart = match raw.pending_restart {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(other) => {
                notes.push(format!(
                    "field pending_restart dropped: {other} is not true or false"
                ));
                false
            }
        };
        let member = Member {
            address: join_host_port(&host, port),
            nofailover: flag("nofailover"),
            noloadbalance: flag("noloadbalance"),
            nosync: flag("nosync"),
            name,
            host,
            port,
            api_scheme,
            api_host,
            api_port,
            role,
            state,
            is_leader: false,
            is_sync: false,
            tags,
            timeline,
            xlog_location,
            lag: None,
            version,
            pending_restart,
        };
        Ok((member, notes))
    }
}

/// A role or state: a lowercase word (`unknown` when absent, or dropped with a note).
fn word_field(
    field: &str,
    v: Option<serde_json::Value>,
    spaces: bool,
    notes: &mut Vec<String>,
) -> String {
    match v {
        None | Some(serde_json::Value::Null) => "unknown".to_owned(),
        Some(serde_json::Value::String(w)) => match validate_word(&w, spaces) {
            Ok(()) => w,
            Err(e) => {
                notes.push(format!("field {field} dropped: {w:?} {e}"));
                "unknown".to_owned()
            }
        },
        Some(other) => {
            notes.push(format!("field {field} dropped: {other} is not a string"));
            "unknown".to_owned()
        }
    }
}

/// Patroni's version string, or None (dropped with a note when it is not one).
fn version_field(v: Option<serde_json::Value>, notes: &mut Vec<String>) -> Option<String> {
    match v {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(v)) => match validate_version(&v) {
            Ok(()) => Some(v),
            Err(e) => {
                notes.push(format!("field version dropped: {v:?} {e}"));
                None
            }
        },
        Some(other) => {
            notes.push(format!("field version dropped: {other} is not a string"));
            None
        }
    }
}

/// A non-negative integer (or its decimal string), or None (dropped with a note when present
/// and not one).
fn number_field(field: &str, v: Option<serde_json::Value>, notes: &mut Vec<String>) -> Option<u64> {
    let n = as_u64(v.as_ref());
    if n.is_none() && v.as_ref().is_some_and(|v| !v.is_null()) {
        notes.push(format!(
            "field {field} dropped: {} is not a non-negative integer",
            v.unwrap_or_default()
        ));
    }
    n
}

fn as_u64(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses `scheme://host:port/...` into a validated scheme, host and port.
fn parse_endpoint(text: &str, default_port: Option<u16>) -> Result<(String, String, u16), String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".into());
    }
    let url = url::Url::parse(text).map_err(|e| e.to_string())?;
    let host = match url.host() {
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(url::Host::Domain(d)) => {
            // Non-special schemes (postgres://) leave IPv4 literals as "domains".
            if let Ok(ip) = d.parse::<IpAddr>() {
                ip.to_string()
            } else {
                validate_hostname(d)?;
                d.to_ascii_lowercase()
            }
        }
        None => return Err("no host".into()),
    };
    let port = match url.port().or(url.port_or_known_default()).or(default_port) {
        Some(0) => return Err("port 0 is not a valid port".into()),
        Some(p) => p,
        None => return Err("no port".into()),
    };
    Ok((url.scheme().to_owned(), host, port))
}

/// Member names: what Patroni clusters use in practice, and nothing a config file could misread.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > 63 {
        return Err("longer than 63 characters".into());
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() {
        return Err(format!("{name:?} must start with a letter or digit"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {bad:?}; allowed are letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// RFC 1123 hostnames.
fn validate_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("host {h:?} is not a valid hostname"));
    }
    for label in h.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("host {h:?} is not a valid hostname or IP address"));
        }
    }
    Ok(())
}

/// Roles and states: lowercase words; states may have single spaces (`creating replica`).
fn validate_word(w: &str, spaces: bool) -> Result<(), String> {
    let ok = !w.is_empty()
        && w.len() <= 40
        && w.starts_with(|c: char| c.is_ascii_lowercase())
        && !w.ends_with(' ')
        && !w.contains("  ")
        && w.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || (spaces && c == ' '));
    if ok {
        Ok(())
    } else {
        Err("must be lowercase letters and '_'".into())
    }
}

fn validate_version(v: &str) -> Result<(), String> {
    if !v.is_empty()
        && v.len() <= 32
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
    {
        Ok(())
    } else {
        Err("not a version string".into())
    }
}

/// Tag values a template can reach: booleans, numbers and safe strings. A tag whose name or
/// value could smuggle text into a config is dropped, with a note naming it; the other tags and
/// the member stay: a partly-known member routes as it should, while a skipped leader would be
/// fenced and dropped from every file.
fn validate_tags(
    tags: Option<serde_json::Value>,
    notes: &mut Vec<String>,
) -> BTreeMap<String, serde_json::Value> {
    let obj = match tags {
        None | Some(serde_json::Value::Null) => return BTreeMap::new(),
        Some(serde_json::Value::Object(o)) => o,
        Some(other) => {
            notes.push(format!(
                "field tags dropped: {} is not a JSON object",
                truncated(&other.to_string())
            ));
            return BTreeMap::new();
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            notes.push(format!(
                "tag {:?} dropped: tag names are letters, digits and '_'",
                truncated(&k)
            ));
            continue;
        }
        let ok = match &v {
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) | serde_json::Value::Null => {
                true
            }
            serde_json::Value::String(s) => s.len() <= 253 && s.chars().all(safe_tag_char),
            _ => false,
        };
        if !ok {
            notes.push(format!(
                "field tags.{k} dropped: value {} is not a boolean, a number or a string of letters, digits, '.', '_', '-', ':', '/'",
                truncated(&v.to_string())
            ));
            continue;
        }
        out.insert(k, v);
    }
    out
}

/// Characters a tag string may hold: none that ends a config word or line.
fn safe_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
}

/// At most 80 characters of `s` for a log line (a hostile value may be megabytes).
fn truncated(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Snapshot {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        Snapshot::from_file(std::path::Path::new(&path)).unwrap()
    }

    fn snap(pairs: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::new();
        for (k, v) in pairs {
            s.put(format!("/service/demo/{k}"), v.as_bytes().to_vec());
        }
        s
    }

    const PG1: &str = r#"{"conn_url":"postgres://127.0.0.1:5441/postgres","api_url":"http://127.0.0.1:8011/patroni","state":"running","role":"master","xlog_location":100,"timeline":1}"#;
    const PG2: &str = r#"{"conn_url":"postgres://127.0.0.1:5442/postgres","api_url":"http://127.0.0.1:8012/patroni","state":"streaming","role":"replica","xlog_location":60,"timeline":1}"#;

    #[test]
    fn patroni3_fixture_has_master_leader_and_two_replicas() {
        let b = Cluster::build(&fixture("patroni3-kv.json"), "/service", "demo");
        assert!(b.skipped.is_empty(), "{:?}", b.skipped);
        let c = b.cluster;
        assert_eq!(c.leader_name.as_deref(), Some("pg1"));
        assert_eq!(c.leader().unwrap().role, "master");
        let names: Vec<_> = c.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["pg1", "pg2", "pg3"]);
        assert_eq!(c.members[1].port, 5442);
        assert_eq!(c.members[1].api_port, 8012);
        assert_eq!(c.members[1].lag, Some(0));
    }

    #[test]
    fn patroni4_fixture_uses_primary_and_ignores_stray_keys() {
        let b = Cluster::build(&fixture("patroni4-kv.json"), "/service", "demo");
        assert!(b.skipped.is_empty(), "{:?}", b.skipped);
        assert_eq!(b.cluster.leader().unwrap().name, "pg2");
        assert_eq!(b.cluster.leader().unwrap().role, "primary");
        assert_eq!(b.cluster.members[0].timeline, Some(4));
    }

    #[test]
    fn lag_is_bytes_behind_the_leader() {
        let b = Cluster::build(
            &snap(&[
                ("leader", "pg1"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
            "/service",
            "demo",
        );
        assert_eq!(b.cluster.members[1].lag, Some(40));
        assert_eq!(b.cluster.members[0].lag, Some(0));
    }

    #[test]
    fn leader_key_naming_a_missing_member_leaves_no_leader() {
        let b = Cluster::build(
            &snap(&[("leader", "ghost"), ("members/pg1", PG1)]),
            "/service",
            "demo",
        );
        assert_eq!(b.cluster.leader_name, None);
        assert!(b.skipped[0].key.ends_with("/leader"), "{:?}", b.skipped);
    }

    #[test]
    fn an_odd_tag_value_drops_the_tag_never_the_member_nor_the_leader() {
        let leader = PG1.replace(
            r#""timeline":1"#,
            r#""timeline":1,"tags":{"zone":"eu-west/1a","owner":"team db","nofailover":false}"#,
        );
        let b = Cluster::build(
            &snap(&[("leader", "pg1"), ("members/pg1", &leader)]),
            "/service",
            "demo",
        );
        let c = &b.cluster;
        assert_eq!(c.leader_name.as_deref(), Some("pg1"));
        let m = c.leader().expect("the leader stays");
        assert_eq!(m.tags.get("zone"), Some(&serde_json::json!("eu-west/1a")));
        assert_eq!(m.tags.get("owner"), None);
        assert_eq!(b.skipped.len(), 1, "{:?}", b.skipped);
        assert!(b.skipped[0].member_kept);
        assert_eq!(b.skipped[0].key, "/service/demo/members/pg1");
        assert!(
            b.skipped[0].reason.contains("tags.owner") && b.skipped[0].reason.contains("team db"),
            "{:?}",
            b.skipped
        );
    }

    #[test]
    fn every_member_field_but_the_addresses_is_dropped_alone() {
        for (field, value) in [
            ("role", serde_json::json!("Primary Node")),
            ("role", serde_json::json!(7)),
            (
                "state",
                serde_json::json!("running\nserver evil 1.2.3.4:5432"),
            ),
            ("version", serde_json::json!("3.0.2 beta")),
            ("version", serde_json::json!({"major": 3})),
            ("timeline", serde_json::json!("one")),
            ("xlog_location", serde_json::json!(-5)),
            ("pending_restart", serde_json::json!("yes")),
            ("tags", serde_json::json!(["a", "b"])),
            (
                "tags",
                serde_json::json!({"bad key": 1, "x": {"nested": true}}),
            ),
        ] {
            let mut m: serde_json::Value = serde_json::from_str(PG2).unwrap();
            m[field] = value.clone();
            let b = Cluster::build(
                &snap(&[("members/pg2", &m.to_string())]),
                "/service",
                "demo",
            );
            assert_eq!(
                b.cluster.members.len(),
                1,
                "{field} = {value}: {:?}",
                b.skipped
            );
            assert!(
                !b.skipped.is_empty() && b.skipped.iter().all(|s| s.member_kept),
                "{field} = {value}: {:?}",
                b.skipped
            );
            let named = field.split('.').next().unwrap();
            assert!(
                b.skipped
                    .iter()
                    .any(|s| s.reason.contains(named) || s.reason.contains("tag ")),
                "{field} = {value}: {:?}",
                b.skipped
            );
        }
        // Without an address there is no server line: those refuse the member.
        for field in ["conn_url", "api_url"] {
            let mut m: serde_json::Value = serde_json::from_str(PG2).unwrap();
            m[field] = serde_json::json!(42);
            let b = Cluster::build(
                &snap(&[("members/pg2", &m.to_string())]),
                "/service",
                "demo",
            );
            assert!(b.cluster.members.is_empty(), "{field}");
            assert!(!b.skipped[0].member_kept);
            assert!(b.skipped[0].reason.contains(field), "{:?}", b.skipped);
        }
    }

    #[test]
    fn the_leader_key_is_kept_when_its_member_key_is_unusable() {
        let b = Cluster::build(
            &snap(&[("leader", "pg1"), ("members/pg1", "{not json")]),
            "/service",
            "demo",
        );
        assert_eq!(b.cluster.leader_name, None);
        assert_eq!(b.cluster.leader_key.as_deref(), Some("pg1"));
    }

    /// Any JSON value: scalars, strings of any characters, and nested arrays and objects.
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            "[a-z_/ .:-]{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,10}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever Patroni (or anyone) writes in the tags and the other optional fields of
        /// the leader's key, it stays the leader, and every value kept is safe config text.
        #[test]
        fn odd_member_fields_never_cost_the_member_and_never_reach_a_file_unchecked(
            tags in proptest::collection::btree_map(".{0,12}", any_json(), 0..8),
            role in any_json(),
            state in any_json(),
            version in any_json(),
            timeline in any_json(),
            xlog in any_json(),
            pending in any_json(),
        ) {
            let mut m: serde_json::Value = serde_json::from_str(PG1).unwrap();
            m["tags"] = serde_json::Value::Object(tags.into_iter().collect());
            m["role"] = role;
            m["state"] = state;
            m["version"] = version;
            m["timeline"] = timeline;
            m["xlog_location"] = xlog;
            m["pending_restart"] = pending;
            let b = Cluster::build(
                &snap(&[("leader", "pg1"), ("members/pg1", &m.to_string())]),
                "/service",
                "demo",
            );
            proptest::prop_assert_eq!(b.cluster.leader_name.as_deref(), Some("pg1"));
            proptest::prop_assert!(b.skipped.iter().all(|s| s.member_kept), "{:?}", b.skipped);
            let leader = b.cluster.leader().unwrap();
            let safe = |t: &str| !t.chars().any(|c| c.is_whitespace() && c != ' ' || c.is_control());
            proptest::prop_assert!(safe(&leader.role) && !leader.role.contains(' '));
            proptest::prop_assert!(safe(&leader.state));
            proptest::prop_assert!(leader.version.as_deref().is_none_or(|v| safe(v) && !v.contains(' ')));
            for (k, v) in &leader.tags {
                proptest::prop_assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if let serde_json::Value::String(s) = v {
                    proptest::prop_assert!(s.chars().all(safe_tag_char), "{:?}", s);
                }
                proptest::prop_assert!(!v.is_object() && !v.is_array());
            }
        }
    }

    #[test]
    fn injection_in_host_is_refused_naming_the_key() {
        let evil = PG2.replace("127.0.0.1:5442", "127.0.0.1%0a%20server%20x:5442");
        let b = Cluster::build(&snap(&[("members/pg2", &evil)]), "/service", "demo");
        assert!(b.cluster.members.is_empty());
        assert_eq!(b.skipped[0].key, "/service/demo/members/pg2");
    }

    #[test]
    fn ipv6_host_is_bracketed_in_address() {
        let v6 = PG2.replace("127.0.0.1:5442", "[::1]:5442");
        let b = Cluster::build(&snap(&[("members/pg2", &v6)]), "/service", "demo");
        assert_eq!(b.cluster.members[0].host, "::1");
        assert_eq!(b.cluster.members[0].address, "[::1]:5442");
    }

    #[test]
    fn names_outside_the_safe_set_are_refused() {
        for bad in ["", "a b", "a\nb", "-x", "a/b", "a;b", "x#", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["pg1", "node-1.dc_a", "0abc"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn scope_ids_are_safe_file_names_and_identifiers_and_give_the_scope_back() {
        for (scope, id) in [
            ("alpha", "alpha"),
            ("db.prod-1_x", "db.prod-1_x"),
            ("bad scope", "bad:20scope"),
            ("zürich", "z:C3:BCrich"),
            ("..dots", ":2E.dots"),
            (".", ":2E"),
            ("a:b", "a:3Ab"),
        ] {
            assert_eq!(scope_id(scope), id);
            assert_eq!(scope_of_id(id).as_deref(), Some(scope));
        }
        assert!(scope_refusal(&"é".repeat(40)).is_some());
        assert!(scope_refusal(&"x".repeat(70)).is_none());
    }

    proptest::proptest! {
        /// Any scope's id is one path component of safe characters, and gives the scope back.
        #[test]
        fn any_scope_id_is_a_safe_path_component(scope in "[^/]{1,40}") {
            let id = scope_id(&scope);
            proptest::prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)));
            proptest::prop_assert!(!id.starts_with('.'));
            proptest::prop_assert_eq!(scope_of_id(&id), Some(scope));
        }
    }

    #[test]
    fn citus_groups_are_modelled_one_cluster_per_group() {
        let mut s = Snapshot::new();
        for (g, leader) in [("0", "pg1"), ("1", "pg1"), ("10", "pg2")] {
            s.put(
                format!("/service/demo/{g}/leader"),
                leader.as_bytes().to_vec(),
            );
            s.put(
                format!("/service/demo/{g}/members/pg1"),
                PG1.as_bytes().to_vec(),
            );
            s.put(
                format!("/service/demo/{g}/members/pg2"),
                PG2.as_bytes().to_vec(),
            );
        }
        s.put("/service/demo/2024/notpatroni".into(), b"x".to_vec());
        s.put("/service/plain/members/pg1".into(), PG1.as_bytes().to_vec());
        s.put(
            "/service/bad scope/members/pg1".into(),
            PG1.as_bytes().to_vec(),
        );
        s.put(
            "/service/ctl\u{1}x/members/pg1".into(),
            PG1.as_bytes().to_vec(),
        );
        let found = layouts(&s, "/service", None);
        // Every scope Patroni can write is followed; one holding control characters is refused.
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            ["bad scope", "ctl\u{1}x", "demo", "plain"]
        );
        assert_eq!(found["bad scope"].refused, None);
        assert!(found["ctl\u{1}x"].refused.is_some());
        let demo = &found["demo"];
        assert!(demo.is_citus());
        let ids = demo.ids("demo");
        assert_eq!(
            ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["demo/0", "demo/1", "demo/10"]
        );
        let g10 = Cluster::build_with(&s, "/service", &ids[2], &mut MemberCache::default());
        assert_eq!(g10.cluster.group, Some(10));
        assert_eq!(g10.cluster.leader_name.as_deref(), Some("pg2"));
        assert_eq!(g10.cluster.members.len(), 2);
        assert!(g10.skipped.is_empty(), "{:?}", g10.skipped);
        assert!(!found["plain"].is_citus());
        assert_eq!(found["plain"].ids("plain"), [ClusterId::plain("plain")]);
        // A listed scope with no key at all is still there, for the guard to judge.
        let listed = layouts(&s, "/service", Some(&["gone".to_owned()]));
        assert_eq!(listed["gone"], Layout::default());
        assert_eq!(listed["gone"].ids("gone"), [ClusterId::plain("gone")]);
    }

    #[test]
    fn a_new_wal_position_is_invisible_only_when_wal_fields_are_left_out() {
        let before = Cluster::build(
            &snap(&[
                ("leader", "pg1"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
            "/service",
            "demo",
        )
        .cluster;
        let heartbeat = PG2.replace("\"xlog_location\":60", "\"xlog_location\":90");
        let after = Cluster::build(
            &snap(&[
                ("leader", "pg1"),
                ("members/pg1", PG1),
                ("members/pg2", &heartbeat),
            ]),
            "/service",
            "demo",
        )
        .cluster;
        assert!(after.same_for_templates(&before, false));
        assert!(!after.same_for_templates(&before, true));
        let promoted = Cluster::build(
            &snap(&[
                ("leader", "pg2"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
            "/service",
            "demo",
        )
        .cluster;
        assert!(!promoted.same_for_templates(&before, false));
    }

    #[test]
    fn a_cached_build_equals_a_fresh_one_across_changes() {
        let mut cache = MemberCache::default();
        let steps = [
            snap(&[
                ("leader", "pg1"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
            snap(&[
                ("leader", "pg2"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
            snap(&[("leader", "pg2"), ("members/pg2", &PG2.replace("60", "70"))]),
            snap(&[
                ("leader", "pg1"),
                ("members/pg1", "{"),
                ("members/pg2", PG2),
            ]),
            snap(&[
                ("leader", "pg1"),
                ("members/pg1", PG1),
                ("members/pg2", PG2),
            ]),
        ];
        for s in steps {
            let cached = Cluster::build_with(&s, "/service", &ClusterId::plain("demo"), &mut cache);
            let fresh = Cluster::build(&s, "/service", "demo");
            assert_eq!(cached.cluster, fresh.cluster);
            assert_eq!(cached.skipped, fresh.skipped);
        }
        assert_eq!(cache.parsed.len(), 2);
    }

    /// The `config` key says whether the cluster is a standby cluster, and it wins over the
    /// leader's member key (promotion and demotion change it first); without it, the leader's
    /// role decides.
    #[test]
    fn the_config_key_says_whether_the_cluster_is_a_standby_cluster() {
        let standby_leader = PG1.replace(r#""role":"master""#, r#""role":"standby_leader""#);
        assert_ne!(standby_leader, PG1, "the fixture's role did not change");
        let with = |leader: &str, config: Option<&str>| {
            let mut kvs = vec![
                ("leader", "pg1"),
                ("members/pg1", leader),
                ("members/pg2", PG2),
            ];
            if let Some(c) = config {
                kvs.push(("config", c));
            }
            let b = Cluster::build(&snap(&kvs), "/service", "demo");
            (
                b.cluster.standby_cluster,
                b.cluster.writable_leader().is_some(),
                b.skipped.len(),
            )
        };
        let standby = r#"{"ttl":30,"standby_cluster":{"host":"10.0.0.1","port":5432}}"#;
        assert_eq!(with(&standby_leader, Some(standby)), (true, false, 0));
        assert_eq!(with(&standby_leader, None), (true, false, 0));
        // Promoted: the config key changed, the member key not yet.
        assert_eq!(
            with(&standby_leader, Some(r#"{"ttl":30}"#)),
            (false, true, 0)
        );
        assert_eq!(
            with(&standby_leader, Some(r#"{"standby_cluster":null}"#)),
            (false, true, 0)
        );
        // Demoted: the config key changed, the member key still says primary.
        assert_eq!(with(PG1, Some(standby)), (true, false, 0));
        assert_eq!(with(PG1, None), (false, true, 0));
        // A bad value: skipped with a note, the cluster is not a standby cluster.
        assert_eq!(with(PG1, Some("[1,2]")), (false, true, 1));
        // Its lease timing, for the hold's bound: whole seconds only.
        let timing = |config: &str| {
            let kvs = [("leader", "pg1"), ("members/pg1", PG1), ("config", config)];
            let c = Cluster::build(&snap(&kvs), "/service", "demo").cluster;
            (c.ttl, c.loop_wait)
        };
        assert_eq!(timing(r#"{"ttl":30,"loop_wait":10}"#), (Some(30), Some(10)));
        assert_eq!(timing(r#"{"ttl":"30","loop_wait":-1}"#), (None, None));
        assert_eq!(timing("{}"), (None, None));
    }

    #[test]
    fn the_sync_key_names_the_leaders_synchronous_standbys_and_a_bad_one_is_ignored() {
        let pg3 = PG2.replace("5442", "5443").replace("8012", "8013");
        let with = |sync: &str| {
            let b = Cluster::build(
                &snap(&[
                    ("leader", "pg1"),
                    ("members/pg1", PG1),
                    ("members/pg2", PG2),
                    ("members/pg3", &pg3),
                    ("sync", sync),
                ]),
                "/service",
                "demo",
            );
            let flags: Vec<bool> = b.cluster.members.iter().map(|m| m.is_sync).collect();
            (b.cluster.sync_standbys.clone(), flags, b.skipped)
        };
        // Patroni 3: one standby; 4 in quorum mode: several, comma-separated.
        let (names, flags, skipped) = with(r#"{"leader":"pg1","sync_standby":"pg2"}"#);
        assert_eq!(
            (names, flags),
            (vec!["pg2".to_owned()], vec![false, true, false])
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        let (names, _, _) = with(r#"{"leader":"pg1","sync_standby":"pg3,pg2","quorum":1}"#);
        assert_eq!(names, ["pg2", "pg3"]);
        // Left over from an earlier leader, or naming no member: none.
        assert!(with(r#"{"leader":"pg2","sync_standby":"pg3"}"#)
            .0
            .is_empty());
        assert!(with(r#"{"leader":"pg1","sync_standby":null}"#).0.is_empty());
        assert!(with(r#"{"leader":"pg1","sync_standby":"pg9\nserver x"}"#)
            .0
            .is_empty());
        for bad in ["{", "[]", r#"{"leader":"pg1","sync_standby":7}"#] {
            let (names, _, skipped) = with(bad);
            assert!(names.is_empty(), "{bad}");
            assert_eq!(skipped.len(), 1, "{bad}: {skipped:?}");
            assert!(
                skipped[0].reason.starts_with("sync value refused"),
                "{skipped:?}"
            );
        }
    }

    #[test]
    fn the_failover_key_is_parsed_and_a_bad_one_is_ignored_naming_the_key() {
        let with = |f: &str| {
            Cluster::build(
                &snap(&[("leader", "pg1"), ("members/pg1", PG1), ("failover", f)]),
                "/service",
                "demo",
            )
        };
        let b =
            with(r#"{"leader":"pg1","member":"pg2","scheduled_at":"2026-11-30T15:00:00+00:00"}"#);
        assert!(b.skipped.is_empty(), "{:?}", b.skipped);
        assert_eq!(
            b.cluster.failover,
            Some(Failover {
                leader: Some("pg1".into()),
                member: Some("pg2".into()),
                scheduled_at: Some("2026-11-30T15:00:00+00:00".into()),
            })
        );
        let empty = with("{}");
        assert!(empty.skipped.is_empty(), "{:?}", empty.skipped);
        assert_eq!(
            empty.cluster.failover, None,
            "{{}} is what a switchover leaves behind"
        );
        for bad in [
            "{",
            "[]",
            "\"pg2\"",
            r#"{"member":7}"#,
            r#"{"member":"pg2\nserver evil 1.2.3.4:5432"}"#,
            r#"{"leader":"../x","member":"pg2"}"#,
            r#"{"member":"pg2","scheduled_at":"now; rm -rf"}"#,
        ] {
            let b = with(bad);
            assert_eq!(b.cluster.failover, None, "{bad}");
            assert_eq!(b.cluster.leader_name.as_deref(), Some("pg1"), "{bad}");
            assert_eq!(b.skipped.len(), 1, "{bad}: {:?}", b.skipped);
            assert_eq!(b.skipped[0].key, "/service/demo/failover");
            assert!(
                b.skipped[0].reason.starts_with("failover value refused"),
                "{:?}",
                b.skipped
            );
        }
        // A switchover request alone renders nothing: templates do not see it.
        assert!(with(r#"{"member":"pg2"}"#)
            .cluster
            .same_for_templates(&empty.cluster, true));
    }

    #[test]
    fn other_scopes_and_groups_do_not_leak_in() {
        let mut s = snap(&[("members/pg1", PG1)]);
        s.put("/service/demo2/members/x".into(), PG2.as_bytes().to_vec());
        s.put("/service/dem/members/y".into(), PG2.as_bytes().to_vec());
        let b = Cluster::build(&s, "/service", "demo");
        assert_eq!(b.cluster.members.len(), 1);
    }
}
