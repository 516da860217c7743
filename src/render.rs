//! Renders each target's Tera 2 template against the [`Cluster`] into owned bytes ([`Rendered`]).
//! Templates are compiled once per configuration load; a syntax error is reported with its
//! `file:line:col` and caret exactly as Tera prints it. The context is documented in the README.

use std::path::PathBuf;

use serde::Serialize;
use tera::{Kwargs, State, Tera, TeraResult, Value};

use crate::model::{Cluster, Member};
use crate::target::{ClusterSettings, Target};

/// One target's rendered bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The target's name.
    pub name: String,
    /// The bytes to write.
    pub bytes: Vec<u8>,
}

/// Errors of the render stage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    /// The template does not load or parse.
    #[error("template {path} does not compile:\n{report}")]
    Compile {
        /// Template path.
        path: PathBuf,
        /// Tera's report, with file:line:col and a caret.
        report: String,
    },
    /// The template failed while rendering (undefined variable, `throw`, filter error...).
    #[error("template {path} failed to render for target {target:?}:\n{report}")]
    Render {
        /// Target name.
        target: String,
        /// Template path.
        path: PathBuf,
        /// Tera's report.
        report: String,
    },
    /// The target needs a leader and the cluster has none. Worded for every mode: `render`
    /// writes nothing anyway, and `once`/`run` leave the last good file where it is.
    #[error("target {target:?} needs a leader and cluster {scope:?} has none; nothing is written to {dest}")]
    NoLeader {
        /// Target name.
        target: String,
        /// Scope.
        scope: String,
        /// Destination kept.
        dest: PathBuf,
    },
    /// `--template NAME` named nothing.
    #[error("no template named {0:?} in the config")]
    UnknownTarget(String),
}

/// One cluster as the render sees it: an ordinary Patroni cluster (one model, group None) or a
/// Citus cluster (one model per group, sorted by group), and its `[clusters.<scope>]` settings.
#[derive(Debug, Clone, Copy)]
pub struct ScopeView<'a> {
    /// Patroni's scope.
    pub scope: &'a str,
    /// The models: one, or one per Citus group.
    pub groups: &'a [std::sync::Arc<Cluster>],
    /// `[clusters.<scope>]`, when configured.
    pub settings: Option<&'a ClusterSettings>,
}

impl<'a> ScopeView<'a> {
    /// The model of an ordinary cluster, or the coordinator (group 0) of a Citus cluster; None
    /// for a Citus cluster whose coordinator is not in the view (a worker is never taken for it).
    pub fn main(&self) -> Option<&'a Cluster> {
        self.groups
            .iter()
            .find(|c| c.group.is_none() || c.group == Some(0))
            .map(|c| &**c)
    }

    /// Whether the scope is a Citus cluster.
    pub fn is_citus(&self) -> bool {
        self.groups.iter().any(|g| g.group.is_some())
    }
}

/// What one render covers: every cluster (the `clusters` list), and the one cluster a flat
/// context is built from (`etcd.scope`, or a per-cluster `dest`).
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Patroni's namespace.
    pub namespace: &'a str,
    /// Every cluster, sorted by scope.
    pub clusters: &'a [ScopeView<'a>],
    /// The cluster of the flat context, when the target renders one.
    pub flat: Option<ScopeView<'a>>,
}

/// The context every template sees. Field by field in the README.
#[derive(Debug, Serialize)]
pub struct Context<'a> {
    /// Patroni namespace.
    pub namespace: &'a str,
    /// The flat context of one cluster (`scope`, `leader`, `members`, ...), when the target
    /// renders one.
    #[serde(flatten)]
    pub flat: Option<ClusterContext<'a>>,
    /// Every cluster, sorted by scope.
    pub clusters: Vec<ClusterContext<'a>>,
    /// Config variables (global `[vars]` merged with the template's `vars`).
    pub vars: &'a serde_json::Map<String, serde_json::Value>,
    /// The target being rendered.
    pub target: TargetInfo<'a>,
    /// haconfd itself.
    pub haconfd: HaconfdInfo,
}

/// One cluster in the context: an element of `clusters`, and the flat context.
#[derive(Debug, Serialize)]
pub struct ClusterContext<'a> {
    /// Patroni scope.
    pub scope: &'a str,
    /// The scope as a config identifier and file name ([`crate::model::scope_id`]): the scope
    /// itself when it is letters, digits, `_`, `-` and `.`; use it where the scope names a
    /// listener, a backend or a file.
    pub scope_id: String,
    /// Whether `[clusters.<scope>]` is configured.
    pub configured: bool,
    /// `[clusters.<scope>]`, or an empty table.
    pub settings: &'a serde_json::Map<String, serde_json::Value>,
    /// Whether the cluster is a Citus cluster (`groups` lists them).
    pub citus: bool,
    /// The leader member, or null (for Citus: the coordinator's).
    #[serde(flatten)]
    pub main: GroupContext<'a>,
    /// Citus groups, sorted by number; empty for an ordinary cluster.
    pub groups: Vec<GroupContext<'a>>,
}

/// One Patroni cluster or Citus group: its leader and members.
#[derive(Debug, Serialize)]
pub struct GroupContext<'a> {
    /// The Citus group number, null for an ordinary cluster.
    pub group: Option<u64>,
    /// The leader member, or null.
    pub leader: Option<&'a Member>,
    /// The leader's name, or null.
    pub leader_name: Option<&'a str>,
    /// Every valid member, sorted by name.
    pub members: &'a [Member],
    /// Members other than the leader, sorted by name.
    pub replicas: Vec<&'a Member>,
    /// The leader's synchronous standbys (Patroni's `sync` key), sorted by name.
    pub sync_standbys: Vec<&'a Member>,
    /// A Patroni standby cluster (`standby_cluster` in its `config` key): the leader takes no
    /// writes and serves reads.
    pub standby_cluster: bool,
    /// Patroni's `ttl` (seconds) from the `config` key, or null: the longest a crashed
    /// leader's key lives on.
    pub ttl: Option<u64>,
    /// Patroni's `loop_wait` (seconds) from the `config` key, or null.
    pub loop_wait: Option<u64>,
    /// Patroni's `retry_timeout` (seconds) from the `config` key, or null.
    pub retry_timeout: Option<u64>,
    /// The longest a crashed leader can leave the cluster without a primary, in milliseconds:
    /// `ttl` + `retry_timeout` (10 s when unset), or null without a `ttl`. haconfd's crash hold
    /// lasts at most this; the shipped HAProxy templates hold new write connections as long.
    pub lease_bound_ms: Option<u64>,
}

/// `target.*` in the context.
#[derive(Debug, Serialize)]
pub struct TargetInfo<'a> {
    /// Target name.
    pub name: &'a str,
    /// Destination path.
    pub dest: String,
    /// The HAProxy server-state file, when configured.
    pub server_state_file: Option<String>,
    /// The stats socket haconfd talks to (`server_state.stats_socket`), when configured: the
    /// shipped HAProxy templates declare it unless `vars.stats_socket` names another.
    pub stats_socket: Option<String>,
}

/// `haconfd.*` in the context.
#[derive(Debug, Serialize)]
pub struct HaconfdInfo {
    /// Crate version.
    pub version: &'static str,
}

static NO_SETTINGS: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
    std::sync::LazyLock::new(serde_json::Map::new);
static NO_MEMBERS: [Member; 0] = [];

fn group_context(c: Option<&Cluster>) -> GroupContext<'_> {
    match c {
        Some(c) => GroupContext {
            group: c.group,
            leader: c.leader(),
            leader_name: c.leader_name.as_deref(),
            members: &c.members,
            replicas: c.members.iter().filter(|m| !m.is_leader).collect(),
            sync_standbys: c.members.iter().filter(|m| m.is_sync).collect(),
            standby_cluster: c.standby_cluster,
            ttl: c.ttl,
            loop_wait: c.loop_wait,
            retry_timeout: c.retry_timeout,
            lease_bound_ms: c.lease_bound().map(|d| d.as_millis() as u64),
        },
        None => GroupContext {
            group: None,
            leader: None,
            leader_name: None,
            members: &NO_MEMBERS,
            replicas: Vec::new(),
            sync_standbys: Vec::new(),
            standby_cluster: false,
            ttl: None,
            loop_wait: None,
            retry_timeout: None,
            lease_bound_ms: None,
        },
    }
}

fn cluster_context<'a>(v: &ScopeView<'a>) -> ClusterContext<'a> {
    let citus = v.is_citus();
    ClusterContext {
        scope: v.scope,
        scope_id: crate::model::scope_id(v.scope),
        configured: v.settings.is_some(),
        settings: v.settings.map_or(&*NO_SETTINGS, |s| &s.vars),
        citus,
        main: group_context(v.main()),
        groups: if citus {
            v.groups.iter().map(|g| group_context(Some(g))).collect()
        } else {
            Vec::new()
        },
    }
}

/// Builds the context for one target.
pub fn context<'a>(view: &View<'a>, target: &'a Target) -> Context<'a> {
    Context {
        namespace: view.namespace,
        flat: view.flat.as_ref().map(cluster_context),
        clusters: view.clusters.iter().map(cluster_context).collect(),
        vars: &target.vars,
        target: TargetInfo {
            name: &target.name,
            dest: target.dest.display().to_string(),
            server_state_file: target.server_state().map(|s| s.file.display().to_string()),
            stats_socket: target
                .server_state()
                .map(|s| s.stats_socket.display().to_string()),
        },
        haconfd: HaconfdInfo {
            version: env!("CARGO_PKG_VERSION"),
        },
    }
}

/// Renders one cluster with the flat context, as a single-cluster haconfd does: for `render`,
/// `check` and tests.
pub fn one_cluster<R>(
    cluster: &Cluster,
    settings: Option<&ClusterSettings>,
    f: impl FnOnce(&View<'_>) -> R,
) -> R {
    let groups = [std::sync::Arc::new(cluster.clone())];
    let scope = ScopeView {
        scope: &cluster.scope,
        groups: &groups,
        settings,
    };
    let list = [scope];
    f(&View {
        namespace: &cluster.namespace,
        clusters: &list,
        flat: Some(scope),
    })
}

/// Compiled templates for a set of targets.
pub struct Renderer {
    tera: Tera,
    /// Template keys whose text may read `xlog_location` or `lag` (see [`reads_wal`]).
    wal_readers: std::collections::HashSet<String>,
    /// Each template's text by key, for the hint a failed render gets ([`crate::confd`]).
    texts: std::collections::HashMap<String, String>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer").finish_non_exhaustive()
    }
}

impl Renderer {
    /// Loads and compiles every target's template. Templates are named by their path, so Tera's
    /// reports name the file.
    pub fn load(targets: &[Target]) -> Result<Self, RenderError> {
        let mut tera = Tera::new();
        register_filters(&mut tera);
        let mut wal_readers = std::collections::HashSet::new();
        let mut texts = std::collections::HashMap::new();
        for t in targets {
            let key = t.src.display().to_string();
            if tera.contains_template(&key) {
                continue;
            }
            let text = std::fs::read_to_string(&t.src).map_err(|e| RenderError::Compile {
                path: t.src.clone(),
                report: format!("cannot read: {e}"),
            })?;
            tera.add_raw_template(&key, &text)
                .map_err(|e| RenderError::Compile {
                    path: t.src.clone(),
                    report: with_hint(e.to_string(), &text),
                })?;
            if reads_wal(&text) {
                wal_readers.insert(key.clone());
            }
            texts.insert(key, text);
        }
        Ok(Self {
            tera,
            wal_readers,
            texts,
        })
    }

    /// Whether `target`'s template may read a member's WAL position or lag, which change on
    /// every Patroni heartbeat: if not, a change of only those cannot change its output.
    pub fn reads_wal(&self, target: &Target) -> bool {
        self.wal_readers
            .contains(target.src.display().to_string().as_str())
    }

    /// Renders one target for one cluster, with the flat context.
    pub fn render(&self, target: &Target, cluster: &Cluster) -> Result<Rendered, RenderError> {
        one_cluster(cluster, None, |view| self.render_view(target, view))
    }

    /// Renders one target for `view`. A `require_leader` target with a flat context refuses a
    /// cluster (or a Citus group) with no leader; over several clusters, the pipeline chose each
    /// cluster's view already.
    pub fn render_view(&self, target: &Target, view: &View<'_>) -> Result<Rendered, RenderError> {
        if let Some(flat) = view.flat.filter(|_| target.require_leader) {
            let leaderless =
                flat.groups.is_empty() || flat.groups.iter().any(|g| g.leader().is_none());
            if leaderless {
                return Err(RenderError::NoLeader {
                    target: target.name.clone(),
                    scope: flat.scope.to_owned(),
                    dest: target.dest.clone(),
                });
            }
        }
        let key = target.src.display().to_string();
        let ctx = tera::Context::from_serialize(&context(view, target)).map_err(|e| {
            RenderError::Render {
                target: target.name.clone(),
                path: target.src.clone(),
                report: e.to_string(),
            }
        })?;
        let out = self
            .tera
            .render(&key, &ctx)
            .map_err(|e| RenderError::Render {
                target: target.name.clone(),
                path: target.src.clone(),
                report: with_hint(
                    e.to_string(),
                    self.texts.get(&key).map_or("", String::as_str),
                ),
            })?;
        Ok(Rendered {
            name: target.name.clone(),
            bytes: out.into_bytes(),
        })
    }

    /// Renders every target, in order; the first failure stops the pass.
    pub fn render_all(
        &self,
        targets: &[Target],
        cluster: &Cluster,
    ) -> Result<Vec<Rendered>, RenderError> {
        targets.iter().map(|t| self.render(t, cluster)).collect()
    }
}

/// `report`, followed by what a confd user should write instead, when that is recognised.
fn with_hint(report: String, text: &str) -> String {
    match crate::confd::template_hint(text, &report) {
        Some(hint) => format!("{report}\nhint: {hint}"),
        None => report,
    }
}

/// Whether a template's text may read `xlog_location` or `lag`: it names one of them (as an
/// attribute or in a string such as `attribute="lag"`), or uses something that reaches a map's
/// fields without naming them (the context dump, `to_json`, `pairs`, `values`, `keys`, `get`,
/// `group_by`) or another template (`include`, `extends`). Judged on whole words, so `flag` is
/// not `lag`. What this cannot see is a field name built at render time (`"la" ~ "g"`, a name
/// taken from `vars`) or a whole member printed as `{{ m }}`: such a template gets the WAL
/// fields as of its last render caused by another change (the README says so).
pub fn reads_wal(text: &str) -> bool {
    const WORDS: &[&str] = &[
        "xlog_location",
        "lag",
        "__tera_context",
        "to_json",
        "pairs",
        "values",
        "keys",
        "get",
        "group_by",
        "include",
        "import",
        "extends",
    ];
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| WORDS.contains(&w))
}

fn to_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Filters that Tera 2 does not ship and confd users reach for (see the migration guide).
fn register_filters(tera: &mut Tera) {
    // confd `base`: the last path segment.
    tera.register_filter("base", |s: &str, _: Kwargs, _: &State| {
        s.rsplit('/').next().unwrap_or("").to_owned()
    });
    // confd `dir`: everything before the last segment.
    tera.register_filter("dir", |s: &str, _: Kwargs, _: &State| match s.rfind('/') {
        Some(0) => "/".to_owned(),
        Some(i) => s[..i].to_owned(),
        None => ".".to_owned(),
    });
    // confd `json`: parse a JSON string into a value.
    tera.register_filter(
        "from_json",
        |s: &str, _: Kwargs, _: &State| -> TeraResult<Value> {
            let v: serde_json::Value = serde_json::from_str(s)
                .map_err(|e| tera::Error::message(format!("from_json: {e}")))?;
            Ok(Value::from_serializable(&v))
        },
    );
    tera.register_filter("to_json", |v: Value, _: Kwargs, _: &State| {
        serde_json::to_string(&to_json(&v)).unwrap_or_default()
    });
    // Jinja-style list filters: keep or drop maps whose attribute is truthy, or equals `value`.
    tera.register_filter(
        "selectattr",
        |list: &[Value], kw: Kwargs, _: &State| -> TeraResult<Vec<Value>> {
            select(list, &kw, true)
        },
    );
    tera.register_filter(
        "rejectattr",
        |list: &[Value], kw: Kwargs, _: &State| -> TeraResult<Vec<Value>> {
            select(list, &kw, false)
        },
    );
    tera.register_filter(
        "map",
        |list: &[Value], kw: Kwargs, _: &State| -> TeraResult<Vec<Value>> {
            let attr = kw.must_get::<&str>("attribute")?;
            Ok(list
                .iter()
                .map(|v| v.get_from_path(attr).cloned().unwrap_or_else(Value::none))
                .collect())
        },
    );
}

fn select(list: &[Value], kw: &Kwargs, keep: bool) -> TeraResult<Vec<Value>> {
    let attr = kw.must_get::<&str>("attribute")?;
    let want = kw.get::<Value>("value")?;
    Ok(list
        .iter()
        .filter(|v| {
            let got = v.get_from_path(attr);
            let hit = match (&want, got) {
                (Some(w), Some(g)) => to_json(w) == to_json(g),
                (None, Some(g)) => g.is_truthy(),
                (_, None) => false,
            };
            hit == keep
        })
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    fn target(src: &std::path::Path) -> Target {
        Target::bare("t", src, std::path::Path::new("/tmp/none"))
    }

    fn cluster() -> Cluster {
        let s = Snapshot::from_json_bytes(include_bytes!("../tests/fixtures/patroni4-kv.json"))
            .unwrap();
        Cluster::build(&s, "/service", "demo").cluster
    }

    fn render_str(tpl: &str) -> Result<String, RenderError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tera");
        std::fs::write(&p, tpl).unwrap();
        let t = target(&p);
        let r = Renderer::load(std::slice::from_ref(&t))?;
        r.render(&t, &cluster())
            .map(|r| String::from_utf8(r.bytes).unwrap())
    }

    #[test]
    fn filters_select_and_map_members() {
        let out = render_str(
            "{{ members | selectattr(attribute=\"is_leader\") | map(attribute=\"name\") | join(sep=\",\") }}|{{ members | rejectattr(attribute=\"role\", value=\"primary\") | length }}|{{ \"/a/b/c\" | base }}|{{ \"/a/b/c\" | dir }}",
        )
        .unwrap();
        assert_eq!(out, "pg2|2|c|/a/b");
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let err = render_str("ok\n{% for m in members %}\n{{ m.name }\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t.tera:3:"), "{msg}");
    }

    #[test]
    fn undefined_variable_is_a_render_error() {
        let err = render_str("{{ nope.port }}").unwrap_err();
        assert!(matches!(err, RenderError::Render { .. }), "{err}");
        assert!(err.to_string().contains("t.tera:1:"), "{err}");
    }

    #[test]
    fn wal_readers_are_told_apart_by_whole_words() {
        for t in [
            "{{ m.xlog_location }}",
            "{% if m.lag > 100 %}",
            "{{ members | selectattr(attribute=\"lag\") | length }}",
            "{{ m | to_json }}",
            "{{ __tera_context }}",
            "{% for k, v in m | pairs %}",
            "{% include \"other\" %}",
        ] {
            assert!(reads_wal(t), "{t}");
        }
        for t in [
            "{{ m.flag }} {{ m.laggard }} {{ m.name }}",
            include_str!("../templates/haproxy.cfg.tera"),
            include_str!("../templates/pgbouncer.ini.tera"),
        ] {
            assert!(!reads_wal(t), "{t}");
        }
    }

    #[test]
    fn a_citus_cluster_without_its_coordinator_has_no_leader_of_a_worker() {
        let workers: Vec<std::sync::Arc<Cluster>> = [1, 2]
            .into_iter()
            .map(|g| {
                let mut c = cluster();
                c.group = Some(g);
                std::sync::Arc::new(c)
            })
            .collect();
        let v = ScopeView {
            scope: "citus",
            groups: &workers,
            settings: None,
        };
        assert!(
            v.main().is_none(),
            "a worker group was taken for the coordinator"
        );
        let ctx = cluster_context(&v);
        assert!(ctx.main.leader.is_none() && ctx.main.members.is_empty());
        assert_eq!(ctx.groups.len(), 2);
    }

    #[test]
    fn json_round_trip_filters() {
        let out =
            render_str("{{ '{\"a\":[1,2]}' | from_json | get(key=\"a\") | to_json }}").unwrap();
        assert_eq!(out, "[1,2]");
    }
}
