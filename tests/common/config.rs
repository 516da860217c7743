//! One builder for the haconfd TOML config a test runs the daemon under: etcd, daemon timings,
//! guard, http, failover, hooks, vars and templates, written as text in a known layout.
//!
//! ```ignore
//! let cfg = ConfigBuilder::new()
//!     .endpoints([etcd.endpoint()])
//!     .scope(&scope)
//!     .daemon("min_interval", "100ms")
//!     .http_listen(format!("127.0.0.1:{port}"))
//!     .var("primary_port", primary_port)
//!     .template(
//!         Template::new("haproxy", shipped("haproxy.cfg.tera"), dir.join("haproxy.cfg"))
//!             .check(["haproxy", "-c", "-f", "{{staged}}"])
//!             .reload(Reload::master_socket(h.master_socket()).timeout("10s")),
//!     )
//!     .write_in(dir.path());
//! ```
//!
//! Layout of the text (tests edit it by string replacement and count its lines):
//! - tables in the order of their first use, each `[name]` followed by its `key = value` lines
//!   (a key set again replaces its line in place) and its raw lines, then a blank line;
//! - then the `[[hook]]` entries, then the `[[template]]` entries (each with a
//!   `[template.vars]` table when it has vars), then the raw tail ([`ConfigBuilder::raw`]).
//!
//! Strings are TOML basic strings (JSON string syntax), so `{{staged}}` stays as written.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A TOML basic string for `s` (JSON string syntax is valid TOML).
pub fn toml_str(s: impl AsRef<OsStr>) -> String {
    serde_json::to_string(&s.as_ref().to_string_lossy()).unwrap()
}

/// A TOML array of strings.
pub fn toml_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let parts: Vec<String> = items.into_iter().map(|s| toml_str(s.as_ref())).collect();
    format!("[{}]", parts.join(", "))
}

/// A value written into the config as it is (an inline table, or a deliberately broken value).
#[derive(Debug, Clone)]
pub struct Raw(pub String);

/// Something that can stand on the right of `key = ` in a TOML file.
pub trait TomlValue {
    fn toml(&self) -> String;
}

impl<T: TomlValue + ?Sized> TomlValue for &T {
    fn toml(&self) -> String {
        (**self).toml()
    }
}

impl TomlValue for Raw {
    fn toml(&self) -> String {
        self.0.clone()
    }
}

macro_rules! toml_string {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn toml(&self) -> String {
                toml_str(self)
            }
        }
    )*};
}
toml_string!(str, String, Path, PathBuf);

impl TomlValue for bool {
    fn toml(&self) -> String {
        self.to_string()
    }
}

macro_rules! toml_int {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
toml_int!(u16, u32, u64, i32, i64, usize);

impl<S: AsRef<str>> TomlValue for [S] {
    fn toml(&self) -> String {
        toml_array(self.iter().map(|s| s.as_ref()))
    }
}

impl<S: AsRef<str>, const N: usize> TomlValue for [S; N] {
    fn toml(&self) -> String {
        self.as_slice().toml()
    }
}

impl<S: AsRef<str>> TomlValue for Vec<S> {
    fn toml(&self) -> String {
        self.as_slice().toml()
    }
}

/// `key = value` lines in order; setting a key again replaces its line in place.
#[derive(Debug, Clone, Default)]
struct Lines(Vec<(Option<String>, String)>);

impl Lines {
    fn set(&mut self, key: &str, value: impl TomlValue) {
        let line = format!("{key} = {}", value.toml());
        match self.0.iter_mut().find(|(k, _)| k.as_deref() == Some(key)) {
            Some(slot) => slot.1 = line,
            None => self.0.push((Some(key.to_string()), line)),
        }
    }

    fn raw(&mut self, text: &str) {
        self.0.push((None, text.to_string()));
    }

    fn render(&self, out: &mut String) {
        for (_, line) in &self.0 {
            out.push_str(line);
            out.push('\n');
        }
    }
}

/// How a template's consumer is reloaded: the `reload = { ... }` inline table.
#[derive(Debug, Clone)]
pub struct Reload(Lines);

impl Reload {
    fn with(key: &str, value: impl TomlValue) -> Reload {
        let mut l = Lines::default();
        l.set(key, value);
        Reload(l)
    }

    /// `{ pidfile, signal, process }`: `signal` to the PID in `pidfile` when it is `process`.
    pub fn signal(pidfile: impl AsRef<Path>, signal: &str, process: &str) -> Reload {
        Reload::with("pidfile", pidfile.as_ref())
            .set("signal", signal)
            .set("process", process)
    }

    /// `{ master_socket }`: `reload` on HAProxy's master CLI.
    pub fn master_socket(sock: impl AsRef<Path>) -> Reload {
        Reload::with("master_socket", sock.as_ref())
    }

    /// `{ command }`: an argv.
    pub fn command<S: AsRef<str>>(argv: impl IntoIterator<Item = S>) -> Reload {
        Reload::with("command", Raw(toml_array(argv)))
    }

    /// With a signal reload: verify its outcome on HAProxy's master CLI.
    pub fn verify_on(self, sock: impl AsRef<Path>) -> Reload {
        self.set("master_socket", sock.as_ref())
    }

    pub fn timeout(self, t: &str) -> Reload {
        self.set("timeout", t)
    }

    /// Any other key.
    pub fn set(mut self, key: &str, value: impl TomlValue) -> Reload {
        self.0.set(key, value);
        self
    }

    /// The inline table's text.
    pub fn text(&self) -> String {
        let parts: Vec<&str> = self.0 .0.iter().map(|(_, l)| l.as_str()).collect();
        format!("{{ {} }}", parts.join(", "))
    }
}

impl TomlValue for Reload {
    fn toml(&self) -> String {
        self.text()
    }
}

/// One `[[template]]` entry.
#[derive(Debug, Clone)]
pub struct Template {
    lines: Lines,
    vars: Lines,
}

impl Template {
    /// `name`, `src` and `dest` (relative paths are taken from the config file's directory).
    pub fn new(name: &str, src: impl AsRef<Path>, dest: impl AsRef<Path>) -> Template {
        let mut lines = Lines::default();
        lines.set("name", name);
        lines.set("src", src.as_ref());
        lines.set("dest", dest.as_ref());
        Template {
            lines,
            vars: Lines::default(),
        }
    }

    /// The check argv (`{{staged}}` names the staged file).
    pub fn check<S: AsRef<str>>(self, argv: impl IntoIterator<Item = S>) -> Template {
        self.set("check", Raw(toml_array(argv)))
    }

    pub fn reload(self, reload: Reload) -> Template {
        self.set("reload", reload)
    }

    /// [`Template::reload`] when there is one (none: the file is written, nothing reloaded).
    pub fn reload_if(self, reload: Option<Reload>) -> Template {
        match reload {
            Some(r) => self.reload(r),
            None => self,
        }
    }

    pub fn require_leader(self, yes: bool) -> Template {
        self.set("require_leader", yes)
    }

    /// `server_state = { stats_socket, file }`.
    pub fn server_state(self, stats_socket: impl AsRef<Path>, file: impl AsRef<Path>) -> Template {
        let v = format!(
            "{{ stats_socket = {}, file = {} }}",
            toml_str(stats_socket.as_ref()),
            toml_str(file.as_ref())
        );
        self.set("server_state", Raw(v))
    }

    /// `server_state = { stats_socket, file, membership }`: member changes reach HAProxy
    /// through its runtime API (`"runtime"`) or a reload (`"reload"`).
    pub fn server_state_via(
        self,
        stats_socket: impl AsRef<Path>,
        file: impl AsRef<Path>,
        membership: &str,
    ) -> Template {
        let v = format!(
            "{{ stats_socket = {}, file = {}, membership = {} }}",
            toml_str(stats_socket.as_ref()),
            toml_str(file.as_ref()),
            toml_str(membership)
        );
        self.set("server_state", Raw(v))
    }

    /// `pgbouncer_admin = { host, port, user[, pause_timeout] }`.
    pub fn pgbouncer_admin(
        self,
        host: impl AsRef<Path>,
        port: u16,
        user: &str,
        pause_timeout: Option<&str>,
    ) -> Template {
        let mut v = format!(
            "{{ host = {}, port = {port}, user = {}",
            toml_str(host.as_ref()),
            toml_str(user)
        );
        if let Some(t) = pause_timeout {
            v.push_str(&format!(", pause_timeout = {}", toml_str(t)));
        }
        v.push_str(" }");
        self.set("pgbouncer_admin", Raw(v))
    }

    /// The shipped `pgbouncer.ini.tera`'s variables for a test PgBouncer: listening on
    /// 127.0.0.1:`port` and in `dir` (its socket, pidfile, log and `userlist.txt`), trust auth,
    /// `pgbouncer` as admin, transaction pooling.
    pub fn pgbouncer_test_vars(self, dir: &Path, port: u16) -> Template {
        let f = |name: &str| dir.join(name);
        self.var("listen_addr", "127.0.0.1")
            .var("listen_port", port)
            .var("unix_socket_dir", dir)
            .var("auth_type", "trust")
            .var("auth_file", f("userlist.txt"))
            .var("admin_users", "pgbouncer")
            .var("pool_mode", "transaction")
            .var("pidfile", f("pgbouncer.pid"))
            .var("logfile", f("pgbouncer.log"))
    }

    /// Any other key of the entry (`check_timeout`, `mode`, ...).
    pub fn set(mut self, key: &str, value: impl TomlValue) -> Template {
        self.lines.set(key, value);
        self
    }

    /// A line written into the entry as it is.
    pub fn raw(mut self, text: &str) -> Template {
        self.lines.raw(text);
        self
    }

    /// One of the entry's own vars (a `[template.vars]` table after the entry's keys).
    pub fn var(mut self, key: &str, value: impl TomlValue) -> Template {
        self.vars.set(key, value);
        self
    }

    fn render(&self, out: &mut String) {
        out.push_str("[[template]]\n");
        self.lines.render(out);
        if !self.vars.0.is_empty() {
            out.push_str("[template.vars]\n");
            self.vars.render(out);
        }
    }
}

/// One `[[hook]]` entry.
#[derive(Debug, Clone)]
pub struct Hook(Lines);

impl Hook {
    pub fn new<S: AsRef<str>>(name: &str, command: impl IntoIterator<Item = S>) -> Hook {
        let mut l = Lines::default();
        l.set("name", name);
        l.set("command", Raw(toml_array(command)));
        Hook(l)
    }

    pub fn events<S: AsRef<str>>(self, events: impl IntoIterator<Item = S>) -> Hook {
        self.set("events", Raw(toml_array(events)))
    }

    pub fn timeout(self, t: &str) -> Hook {
        self.set("timeout", t)
    }

    pub fn set(mut self, key: &str, value: impl TomlValue) -> Hook {
        self.0.set(key, value);
        self
    }
}

/// haconfd's config under test. See the module docs for the layout of the text.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    tables: Vec<(String, Lines)>,
    hooks: Vec<Hook>,
    templates: Vec<Template>,
    tail: String,
}

impl ConfigBuilder {
    pub fn new() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    fn table(&mut self, name: &str) -> &mut Lines {
        let i = match self.tables.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                self.tables.push((name.to_string(), Lines::default()));
                self.tables.len() - 1
            }
        };
        &mut self.tables[i].1
    }

    /// Table `table` written even when it stays empty (`[failover]` with its defaults).
    pub fn with_table(mut self, table: &str) -> ConfigBuilder {
        self.table(table);
        self
    }

    /// `key = value` in table `table` (`"etcd"`, `"etcd.tls"`, `"daemon"`, `"log"`, ...).
    pub fn set(mut self, table: &str, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.table(table).set(key, value);
        self
    }

    /// A line (or several) written into table `table` as it is, after the keys set so far.
    pub fn raw_in(mut self, table: &str, text: &str) -> ConfigBuilder {
        self.table(table).raw(text);
        self
    }

    /// Text appended after everything else, as it is: the escape hatch for odd or broken input.
    pub fn raw(mut self, text: &str) -> ConfigBuilder {
        self.tail.push_str(text);
        self
    }

    // ---- [etcd]

    pub fn etcd(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("etcd", key, value)
    }

    pub fn endpoints<S: AsRef<str>>(self, endpoints: impl IntoIterator<Item = S>) -> ConfigBuilder {
        self.etcd("endpoints", Raw(toml_array(endpoints)))
    }

    pub fn endpoint(self, endpoint: impl AsRef<str>) -> ConfigBuilder {
        self.endpoints([endpoint])
    }

    pub fn scope(self, scope: impl AsRef<str>) -> ConfigBuilder {
        self.etcd("scope", scope.as_ref())
    }

    pub fn namespace(self, namespace: impl AsRef<str>) -> ConfigBuilder {
        self.etcd("namespace", namespace.as_ref())
    }

    /// `etcd.api` (`"v2"` or `"v3"`).
    pub fn api(self, api: &str) -> ConfigBuilder {
        self.etcd("api", api)
    }

    /// `[etcd.tls]`.
    pub fn etcd_tls(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("etcd.tls", key, value)
    }

    // ---- [daemon], [guard], [http], [failover], [hooks], [vars]

    /// A `[daemon]` setting, e.g. `.daemon("min_interval", "100ms")`.
    pub fn daemon(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("daemon", key, value)
    }

    pub fn guard(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("guard", key, value)
    }

    /// `[http] listen`.
    pub fn http_listen(self, addr: impl AsRef<str>) -> ConfigBuilder {
        self.set("http", "listen", addr.as_ref())
    }

    pub fn failover(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("failover", key, value)
    }

    /// A `[hooks]` setting (`concurrency`, ...).
    pub fn hooks(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("hooks", key, value)
    }

    /// A `[[hook]]` entry.
    pub fn hook(mut self, hook: Hook) -> ConfigBuilder {
        self.hooks.push(hook);
        self
    }

    /// A global template var.
    pub fn var(self, key: &str, value: impl TomlValue) -> ConfigBuilder {
        self.set("vars", key, value)
    }

    // ---- [[template]]

    pub fn template(mut self, template: Template) -> ConfigBuilder {
        self.templates.push(template);
        self
    }

    /// The config's text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (name, lines) in &self.tables {
            out.push_str(&format!("[{name}]\n"));
            lines.render(&mut out);
            out.push('\n');
        }
        for h in &self.hooks {
            out.push_str("[[hook]]\n");
            h.0.render(&mut out);
            out.push('\n');
        }
        for (i, t) in self.templates.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            t.render(&mut out);
        }
        out.push_str(&self.tail);
        out
    }

    /// Writes the text to `path`; returns `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        std::fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_path_buf()
    }

    /// Writes `dir/haconfd.toml`; returns its path.
    pub fn write_in(&self, dir: impl AsRef<Path>) -> PathBuf {
        self.write(dir.as_ref().join("haconfd.toml"))
    }

    /// Writes the text to `path` through a temp file and a rename (a watcher never sees half).
    pub fn write_atomic(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        let tmp = path.with_extension("toml.tmp");
        self.write(&tmp);
        std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
        path.to_path_buf()
    }
}

/// The golden tests' config: scope `demo`, the templates in `templates` (the shipped ones) for
/// `haproxy` (with server state) and `pgbouncer` (leader required), no etcd endpoints.
pub fn golden_config(
    templates: &Path,
    stats_socket: &Path,
    state_file: &Path,
    haproxy_cfg: &Path,
    pgbouncer_ini: &Path,
) -> ConfigBuilder {
    ConfigBuilder::new()
        .scope("demo")
        .var("stats_socket", stats_socket)
        .template(
            Template::new("haproxy", templates.join("haproxy.cfg.tera"), haproxy_cfg)
                .server_state(stats_socket, state_file),
        )
        .template(
            Template::new(
                "pgbouncer",
                templates.join("pgbouncer.ini.tera"),
                pgbouncer_ini,
            )
            .require_leader(true),
        )
}

/// The etcd tests' daemon: writes `dir/list.tera` (the leader, then one line per member) and
/// `dir/haconfd.toml` rendering it into `dir/out.txt`, with short etcd timeouts, passes 20 ms
/// apart and `[http]` on `http_port`; `extra` adds settings (`api`, credentials, `[etcd.tls]`).
pub fn write_list_config(
    dir: &Path,
    endpoints: &[String],
    scope: &str,
    http_port: u16,
    extra: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> PathBuf {
    std::fs::write(
        dir.join("list.tera"),
        "leader={{ leader_name }}\n{% for m in members %}{{ m.name }} {{ m.address }}\n{% endfor %}",
    )
    .unwrap();
    let builder = ConfigBuilder::new()
        .endpoints(endpoints)
        .scope(scope)
        .etcd("keepalive_interval", "2s")
        .etcd("keepalive_timeout", "2s")
        .etcd("request_timeout", "2s")
        .etcd("connect_timeout", "1s");
    extra(builder)
        .daemon("min_interval", "20ms")
        .daemon("once_timeout", "2s")
        .http_listen(format!("127.0.0.1:{http_port}"))
        .template(Template::new("list", "list.tera", dir.join("out.txt")))
        .write_in(dir)
}
