//! A reload of the settings (SIGHUP, or a template file changed): the config file and templates
//! read again and applied all at once, or refused whole with the running ones kept; which
//! settings changed, named as the config file spells them; and the watch on the template
//! directories that triggers it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::parts::{tls_contents, HttpServer, Source};
use super::{Daemon, DaemonError};
use crate::config::{self, Settings};
use crate::logging;
use crate::pipeline::{Engine, Mode};
use crate::source::SourceState;

impl Daemon {
    /// Re-reads the config and templates and applies all of it, or none of it. Returns true
    /// when the etcd source was restarted (so the snapshot in hand is stale).
    pub(super) async fn reload(&mut self, why: &str) -> bool {
        let result = self.try_reload(why).await;
        let mut st = self.status.lock().expect("status lock");
        match result {
            Ok(restarted) => {
                st.config_reloads += 1;
                st.config_error = None;
                restarted
            }
            Err(e) => {
                tracing::error!(
                    trigger = why,
                    config = %self.config_path.display(),
                    "new configuration refused, the running one stays: {e:#}"
                );
                st.config_error = Some(format!("{e:#}"));
                false
            }
        }
    }

    async fn try_reload(&mut self, why: &str) -> Result<bool, DaemonError> {
        // Reading the files and resolving user and group names (NSS may ask LDAP) run on the
        // blocking pool: a slow look-up must not stall the etcd keepalive or the fast path.
        let (path, overrides) = (self.config_path.clone(), self.overrides.clone());
        let loaded = tokio::task::spawn_blocking(move || config::load_settings(&path, &overrides))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let new = Arc::new(loaded?);
        let old = Arc::clone(self.engine.settings());
        let mut changed = changed_settings(&old, &new);
        // Certificates are rotated in place, under the same paths: compare what they hold.
        let tls = tls_contents(&new);
        if tls != self.source.tls && !changed.iter().any(|c| c == "etcd.tls") {
            changed.push("etcd.tls".into());
        }
        let has = |name: &str| changed.iter().any(|c| c == name);
        // Everything that can fail comes first; nothing is committed until all of it passed.
        let log = if has("log.level") || has("log.format") {
            let origin = format!("log.level of {}", self.config_path.display());
            Some(logging::parse_level(&new.log.level, &origin)?)
        } else {
            None
        };
        let http = if has("http.listen") {
            Some(match &new.http.listen {
                Some(addr) => Some(HttpServer::bind(addr, &self.status, &self.metrics).await?),
                None => None,
            })
        } else {
            None
        };
        let other_cluster = has("etcd.namespace") || has("etcd.scope");
        if other_cluster {
            // Another cluster: what the guard remembers of the old one says nothing about it.
            self.engine = Engine::new(Arc::clone(&new))?;
            self.engine.attach_router(
                self.confirm_tx.clone(),
                super::failover_observers(&self.metrics, &self.hook_tx),
                self.metrics.lag_observers(),
            );
        } else {
            self.engine.replace(Arc::clone(&new))?;
        }
        if let Some(h) = http {
            self.http = h; // dropping the old server closes its listener
        }
        if has("hooks") {
            // The running dispatcher takes the new hooks over with its waiting runs.
            self.hooks
                .replace(new.hooks_config.clone(), new.hooks.clone());
        }
        if let Some(filter) = log {
            if let Err(e) = self.logging.apply(new.log.format, filter) {
                tracing::warn!("{e}");
            }
        }
        let restart = changed.iter().any(|c| {
            c.starts_with("etcd.") || c == "daemon.resync_interval" || c == "daemon.max_backoff"
        });
        if restart {
            self.source = Source::start(&new);
            self.update_source_status(&SourceState::default());
            if other_cluster {
                let mut st = self.status.lock().expect("status lock");
                st.cluster = None;
                st.last_pass_ok = None;
            }
        }
        tracing::info!(trigger = why, config = %self.config_path.display(), changed = ?changed, "configuration and templates reloaded");
        if restart {
            tracing::info!(
                endpoints = ?new.etcd.endpoints,
                prefix = %new.etcd.prefix(),
                "etcd source restarted with the new settings; the next pass waits for its first list"
            );
        }
        Ok(restart)
    }
}

/// The names of the settings that differ, as the config file spells them (`template "name"`
/// for anything of one template). Secrets are compared, never shown.
fn changed_settings(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let mut diff = |name: &str, differs: bool| {
        if differs {
            out.push(name.to_owned());
        }
    };
    changed_etcd(&old.etcd, &new.etcd, &mut diff);
    let (a, b) = (&old.daemon, &new.daemon);
    diff("daemon.min_interval", a.min_interval != b.min_interval);
    diff(
        "daemon.resync_interval",
        a.resync_interval != b.resync_interval,
    );
    diff("daemon.max_backoff", a.max_backoff != b.max_backoff);
    diff("daemon.once_timeout", a.once_timeout != b.once_timeout);
    diff(
        "daemon.retry_interval",
        a.retry_interval != b.retry_interval,
    );
    let (a, b) = (&old.guard, &new.guard);
    diff("guard.min_members", a.min_members != b.min_members);
    diff(
        "guard.max_removed_fraction",
        a.max_removed_fraction != b.max_removed_fraction,
    );
    diff("guard.force", a.force != b.force);
    diff("guard.state_file", a.state_file != b.state_file);
    diff("log.format", old.log.format != new.log.format);
    diff("log.level", old.log.level != new.log.level);
    diff("http.listen", old.http.listen != new.http.listen);
    diff("clusters", old.clusters != new.clusters);
    // Applied by the engine's new router, which keeps the state of a leader change under way.
    diff("failover", old.failover != new.failover);
    diff(
        "hooks",
        old.hooks != new.hooks || old.hooks_config != new.hooks_config,
    );
    let mut names: Vec<&str> = old
        .targets
        .iter()
        .chain(&new.targets)
        .map(|t| t.name.as_str())
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let find = |s: &Settings| {
            s.targets
                .iter()
                .find(|t| t.name == name)
                .map(|t| format!("{t:?}"))
        };
        diff(&format!("template {name:?}"), find(old) != find(new));
    }
    out
}

/// The `etcd.*` settings that differ between `a` and `b`, told to `diff`.
fn changed_etcd(
    a: &crate::source::EtcdSettings,
    b: &crate::source::EtcdSettings,
    diff: &mut impl FnMut(&str, bool),
) {
    diff("etcd.api", a.api != b.api);
    diff("etcd.endpoints", a.endpoints != b.endpoints);
    diff("etcd.namespace", a.namespace != b.namespace);
    // Another single cluster, or one cluster ↔ several: the guard's memory says nothing of it.
    let one = |s: &crate::source::EtcdSettings| Mode::of(s).one().map(str::to_owned);
    diff(
        "etcd.scope",
        one(a) != one(b) && (one(a).is_some() || one(b).is_some()),
    );
    // Another list of clusters (or discovery): each cluster keeps its own state.
    diff(
        "etcd.scopes",
        a.clusters != b.clusters && one(a).is_none() && one(b).is_none(),
    );
    diff(
        "etcd.connect_timeout",
        a.connect_timeout != b.connect_timeout,
    );
    diff(
        "etcd.request_timeout",
        a.request_timeout != b.request_timeout,
    );
    diff(
        "etcd.keepalive_interval",
        a.keepalive_interval != b.keepalive_interval,
    );
    diff(
        "etcd.keepalive_timeout",
        a.keepalive_timeout != b.keepalive_timeout,
    );
    let user = |e: &crate::source::EtcdSettings| e.auth.as_ref().map(|(u, _)| u.clone());
    let password = |e: &crate::source::EtcdSettings| e.auth.as_ref().map(|(_, p)| p.clone());
    diff("etcd.username", user(a) != user(b));
    diff("etcd.password", password(a) != password(b));
    diff("etcd.tls", format!("{:?}", a.tls) != format!("{:?}", b.tls));
}

/// Watches the directories holding the templates (not the files: editors and ConfigMaps replace
/// files by renaming, which a file watch would lose) and the directories above them (a template
/// directory renamed over, or a symlink to it swapped, is a new inode that only its parent sees).
/// Call again after each reload: the watch of a replaced directory is dead.
pub(super) fn watch_templates(
    settings: &Settings,
    tx: mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let files: Vec<PathBuf> = settings.targets.iter().map(|t| t.src.clone()).collect();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_owned()))
        .collect();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let template_dirs = dirs.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        // ConfigMaps swap a `..data` symlink; count any change to it as a template change.
        let relevant = ev.paths.iter().any(|p| {
            template_dirs.iter().any(|d| p == d)
                || p.file_name()
                    .is_some_and(|n| names.iter().any(|x| x == n) || n == "..data")
        });
        if relevant {
            let _ = tx.try_send("template change");
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch template files; SIGHUP still reloads"))
    .ok()?;
    let mut parents: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .filter(|p| !dirs.contains(p))
        .collect();
    parents.sort();
    parents.dedup();
    for d in &dirs {
        if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
            // Possibly mid-swap: the parent's watch sees it come back.
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch template directory");
        }
    }
    for p in &parents {
        if let Err(e) = watcher.watch(p, notify::RecursiveMode::NonRecursive) {
            tracing::debug!(dir = %p.display(), error = %e, "cannot watch the directory above the templates");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Settings {
        let raw = config::RawConfig::parse(toml, Path::new("t.toml")).unwrap();
        raw.resolve(Path::new("/etc/haconfd")).unwrap()
    }

    const BASE: &str = r#"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
scope = "a"
password = "secret1"
username = "u"
[[template]]
name = "t"
src = "x.tera"
dest = "/tmp/x.cfg"
"#;

    #[test]
    fn changed_settings_name_each_difference_and_never_a_secret() {
        let a = settings(BASE);
        assert!(changed_settings(&a, &a).is_empty());
        let b = settings(
            &(BASE
                .replace("\"a\"", "\"b\"")
                .replace("secret1", "secret2")
                .replace("x.cfg", "y.cfg")
                + "[daemon]\nmax_backoff = \"3s\"\n[http]\nlisten = \"127.0.0.1:1\"\n[log]\nlevel = \"debug\"\n"),
        );
        let changed = changed_settings(&a, &b);
        assert_eq!(
            changed,
            [
                "etcd.scope",
                "etcd.password",
                "daemon.max_backoff",
                "log.level",
                "http.listen",
                "template \"t\""
            ]
            .map(String::from)
        );
        assert!(!format!("{changed:?}").contains("secret"));
    }
}
