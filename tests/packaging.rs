//! Packaging checks: the image (docker/Dockerfile), the compose demo (docker/compose.yml), the
//! Kubernetes sidecar (docker/k8s/haconfd-sidecar.yaml) and the systemd units (examples/*.service)
//! are parsed for real and held against haconfd's own command line (`Cli`), config struct
//! (`RawConfig::resolve`) and shipped templates: every haconfd command line parses, every config
//! they mount resolves, template paths are files the image ships, HAProxy runs in master-worker
//! mode with the socket and pidfile the reload config names, published ports are the rendered
//! listeners, users are not root, probes hit /healthz and /readyz on `http.listen`'s port.
//! Expectations come from the files themselves, so a change on one side only fails here.
//!
//! Then both sidecar wirings run for real: haconfd with the shipped config and HAProxy with the
//! exact command line of the compose file or manifest, the shared volume moved into a temp dir,
//! on the shared etcd with fake Patroni members.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use haconfd::cli::{Cli, Command as Mode};
use haconfd::config::{RawConfig, Settings};
use haconfd::consumers::reload::Reload;
use haconfd::pipeline::Engine;
use haconfd::snapshot::Snapshot;
use haconfd::target::Target;
use yaml_rust2::{Yaml, YamlLoader};

use common::docs::doc_files;
use common::procs::*;

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `/var/run` is a symlink to `/run` on every systemd host.
fn host_path(p: &Path) -> PathBuf {
    match p.strip_prefix("/var/run") {
        Ok(rest) => Path::new("/run").join(rest),
        Err(_) => p.to_path_buf(),
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instr {
    cmd: String,
    args: String,
}

#[derive(Debug, Clone)]
struct Stage {
    base: String,
    name: Option<String>,
    instrs: Vec<Instr>,
}

impl Stage {
    fn all(&self, cmd: &str) -> impl Iterator<Item = &Instr> + '_ {
        let cmd = cmd.to_string();
        self.instrs.iter().filter(move |i| i.cmd == cmd)
    }

    fn last(&self, cmd: &str) -> Option<&Instr> {
        self.all(cmd).last()
    }

    /// The exec form of ENTRYPOINT/CMD (JSON), or the shell form wrapped in `/bin/sh -c`.
    fn exec_form(&self, cmd: &str) -> Option<Vec<String>> {
        self.last(cmd).map(|i| exec_form(&i.args))
    }
}

fn exec_form(args: &str) -> Vec<String> {
    if args.trim_start().starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("bad JSON form {args:?}: {e}"))
    } else {
        vec!["/bin/sh".into(), "-c".into(), args.to_string()]
    }
}

/// One `COPY`: flags (`--from=build`), sources, destination.
#[derive(Debug)]
struct CopyInstr {
    from: Option<String>,
    srcs: Vec<String>,
    dest: String,
}

fn parse_copy(args: &str) -> CopyInstr {
    let words: Vec<String> = args.split_whitespace().map(str::to_string).collect();
    let (flags, rest): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let rest = if rest.len() == 1 && rest[0].starts_with('[') {
        exec_form(&rest[0])
    } else {
        rest
    };
    assert!(
        rest.len() >= 2,
        "COPY needs sources and a destination: {args}"
    );
    let from = flags
        .iter()
        .find_map(|f| f.strip_prefix("--from=").map(str::to_string));
    let (dest, srcs) = rest.split_last().unwrap();
    CopyInstr {
        from,
        srcs: srcs.to_vec(),
        dest: dest.clone(),
    }
}

struct Dockerfile {
    path: PathBuf,
    /// The build context the COPY sources are relative to.
    context: PathBuf,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load(path: &Path, context: &Path) -> Dockerfile {
        let text = read(path);
        // Logical lines: comments dropped (also inside continuations, as Docker does), `\`
        // continuations joined.
        let mut logical = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if let Some(body) = t.strip_suffix('\\') {
                cur.push_str(body.trim());
                cur.push(' ');
                continue;
            }
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
        assert!(cur.trim().is_empty(), "{}: dangling `\\`", path.display());
        let mut stages: Vec<Stage> = Vec::new();
        // ARGs before the first FROM: their defaults are what FROM lines name when no
        // --build-arg is given (the official images; the tests pass local ones).
        let mut global_args: BTreeMap<String, String> = BTreeMap::new();
        for l in logical {
            let (cmd, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
            let cmd = cmd.to_ascii_uppercase();
            let args = args.trim().to_string();
            if cmd == "ARG" && stages.is_empty() {
                let (name, default) = args.split_once('=').unwrap_or((&args, ""));
                global_args.insert(name.trim().to_string(), default.trim().to_string());
                continue;
            }
            if cmd == "FROM" {
                let args = substitute_args(&args, &global_args)
                    .unwrap_or_else(|e| panic!("{}: FROM {args:?}: {e}", path.display()));
                let w: Vec<&str> = args.split_whitespace().collect();
                let name = match w.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                    [_] => None,
                    _ => panic!("{}: unexpected FROM {args:?}", path.display()),
                };
                stages.push(Stage {
                    base: w[0].to_string(),
                    name,
                    instrs: Vec::new(),
                });
            } else {
                stages
                    .last_mut()
                    .unwrap_or_else(|| panic!("{}: {cmd} before FROM", path.display()))
                    .instrs
                    .push(Instr { cmd, args });
            }
        }
        assert!(!stages.is_empty(), "{}: no FROM", path.display());
        Dockerfile {
            path: path.to_path_buf(),
            context: context.to_path_buf(),
            stages,
        }
    }

    /// The stage `docker build` produces without `--target`: the last one.
    fn runtime(&self) -> &Stage {
        self.stages.last().unwrap()
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no stage named {name}", self.path.display()))
    }

    /// The file of the build context that ends up at `image_path` in the runtime stage, if a COPY
    /// from the context puts one there.
    fn shipped(&self, image_path: &Path) -> Option<PathBuf> {
        for i in self.runtime().all("COPY") {
            let c = parse_copy(&i.args);
            if c.from.is_some() {
                continue;
            }
            for src in &c.srcs {
                let local = self.context.join(src);
                let dest = Path::new(&c.dest);
                if local.is_dir() {
                    if let Ok(rel) = image_path.strip_prefix(dest) {
                        let f = local.join(rel);
                        if f.is_file() {
                            return Some(f);
                        }
                    }
                } else {
                    let target = if c.dest.ends_with('/') {
                        dest.join(local.file_name().unwrap())
                    } else {
                        dest.to_path_buf()
                    };
                    if target == image_path && local.is_file() {
                        return Some(local);
                    }
                }
            }
        }
        None
    }

    /// `USER` of the runtime stage as a uid; non-numeric users are refused (Kubernetes'
    /// runAsNonRoot can only verify a numeric one).
    fn uid(&self) -> u32 {
        let user = self
            .runtime()
            .last("USER")
            .unwrap_or_else(|| panic!("{}: the runtime stage sets no USER", self.path.display()))
            .args
            .clone();
        let uid = user.split(':').next().unwrap();
        uid.parse().unwrap_or_else(|_| {
            panic!(
                "{}: USER {user:?} is not numeric; Kubernetes' runAsNonRoot cannot verify a name",
                self.path.display()
            )
        })
    }

    /// The image's command line when a container overrides neither ENTRYPOINT nor CMD.
    fn argv(&self) -> Vec<String> {
        let mut argv = self.runtime().exec_form("ENTRYPOINT").unwrap_or_default();
        argv.extend(self.runtime().exec_form("CMD").unwrap_or_default());
        argv
    }
}

/// `$NAME` and `${NAME}` in a FROM line, replaced by the global ARG's default.
fn substitute_args(text: &str, args: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or("unclosed ${")?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = args
            .get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("${name} is no global ARG with a default"))?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

fn haconfd_dockerfile() -> Dockerfile {
    Dockerfile::load(&root().join("docker/Dockerfile"), &root())
}

// ---------------------------------------------------------------------------------------------
// haconfd's command line and config
// ---------------------------------------------------------------------------------------------

/// Parses a haconfd command line with the binary's real flags; returns the config path of a `run`.
fn parse_run(argv: &[String], origin: &str) -> PathBuf {
    assert!(
        argv.first()
            .is_some_and(|a| Path::new(a).file_name().unwrap() == "haconfd"),
        "{origin}: {argv:?} does not run haconfd"
    );
    let cli = Cli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{origin}: {argv:?} does not parse:\n{e}"));
    assert!(
        matches!(cli.command, Mode::Run(_)),
        "{origin}: {argv:?} is not `haconfd run`"
    );
    cli.global.config
}

/// The argv with its config path replaced (for running it for real).
fn with_config(argv: &[String], config: &Path) -> Vec<String> {
    let mut out = vec!["-c".to_string(), config.display().to_string()];
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "-c" || a == "--config" {
            it.next();
        } else if !a.starts_with("--config=") {
            out.push(a.clone());
        }
    }
    out
}

/// A config as a container or host sees it: parsed and resolved with the real config struct.
struct Loaded {
    origin: String,
    raw: RawConfig,
    settings: Settings,
}

fn load_config(text: &str, path_in_place: &Path, origin: &str) -> Loaded {
    let raw = RawConfig::parse(text, path_in_place)
        .unwrap_or_else(|e| panic!("{origin}: config does not parse: {e}"));
    let base = path_in_place.parent().unwrap();
    let settings = raw
        .clone()
        .resolve(base)
        .unwrap_or_else(|e| panic!("{origin}: config does not resolve: {e}"));
    Loaded {
        origin: origin.to_string(),
        raw,
        settings,
    }
}

impl Loaded {
    /// The target HAProxy reads: the one checked by `haproxy -c` or carrying server state.
    fn haproxy_target(&self) -> &Target {
        self.settings
            .targets
            .iter()
            .find(|t| {
                t.server_state().is_some()
                    || t.check
                        .first()
                        .is_some_and(|c| Path::new(c).file_name().unwrap() == "haproxy")
            })
            .unwrap_or_else(|| panic!("{}: no HAProxy target", self.origin))
    }

    fn var_u16(&self, t: &Target, name: &str) -> u16 {
        t.vars
            .get(name)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("{}: vars.{name} is not a number", self.origin))
            as u16
    }

    fn http_port(&self) -> u16 {
        let listen = self
            .settings
            .http
            .listen
            .as_deref()
            .unwrap_or_else(|| panic!("{}: http.listen is not set", self.origin));
        listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("{}: http.listen {listen:?} has no port", self.origin))
    }

    fn http_host(&self) -> String {
        let listen = self.settings.http.listen.clone().unwrap_or_default();
        listen.rsplit_once(':').unwrap().0.to_string()
    }

    /// Every file or socket haconfd touches for a target: dest, server state, reload paths.
    fn paths(t: &Target) -> Vec<PathBuf> {
        let mut v = vec![t.dest.clone()];
        if let Some(ss) = t.server_state() {
            v.push(ss.file.clone());
            v.push(ss.stats_socket.clone());
        }
        match &t.reload {
            Some(Reload::Signal {
                pidfile,
                master_socket,
                ..
            }) => {
                v.push(pidfile.clone());
                v.extend(master_socket.clone());
            }
            Some(Reload::MasterSocket { path, .. }) => v.push(path.clone()),
            _ => {}
        }
        v
    }

    /// Template sources must be files the image ships (`shipped` maps an in-place path to the
    /// repository file), and those must be the repository's own templates/.
    fn assert_templates_shipped(&self, shipped: impl Fn(&Path) -> Option<PathBuf>) {
        let templates = std::fs::canonicalize(root().join("templates")).unwrap();
        for t in &self.settings.targets {
            let local = shipped(&t.src).unwrap_or_else(|| {
                panic!(
                    "{}: template {:?} src {} is not shipped",
                    self.origin,
                    t.name,
                    t.src.display()
                )
            });
            let local = std::fs::canonicalize(&local).unwrap();
            assert!(
                local.starts_with(&templates),
                "{}: {} is not one of templates/",
                self.origin,
                local.display()
            );
        }
    }

    /// Renders the HAProxy target with the real engine from a real Patroni dump (templates taken
    /// from the repository through `shipped`), checks it with `haproxy -c`, and returns the
    /// rendered listeners: `listen` section name → bind port.
    fn render_haproxy(&self, shipped: impl Fn(&Path) -> Option<PathBuf>) -> BTreeMap<String, u16> {
        let mut raw = self.raw.clone();
        raw.etcd.scope = Some("demo".into()); // the fixture's scope
        for t in &mut raw.templates {
            t.src = shipped(&t.src).unwrap();
        }
        let name = self.haproxy_target().name.clone();
        let settings = raw.resolve(Path::new("/")).unwrap();
        let mut engine = Engine::new(Arc::new(settings))
            .unwrap_or_else(|e| panic!("{}: templates do not compile: {e}", self.origin));
        let snap = Snapshot::from_file(&root().join("tests/fixtures/patroni3-kv.json")).unwrap();
        let out = engine
            .render(&snap, Some(&name))
            .unwrap_or_else(|e| panic!("{}: render failed: {e}", self.origin));
        let text = String::from_utf8(out[0].bytes.clone()).unwrap();
        assert!(
            text.contains("server "),
            "{}: rendered no server:\n{text}",
            self.origin
        );

        let dir = temp_dir("packaging-render");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, &text).unwrap();
        let (ok, output) = Haproxy::check_config(&cfg);
        assert!(
            ok,
            "{}: `haproxy -c` refuses the rendered config:\n{output}\n{text}",
            self.origin
        );

        let mut listeners = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["listen" | "frontend", name, ..] => section = name.to_string(),
                ["bind", addr, ..] => {
                    let port = addr.rsplit_once(':').unwrap().1.parse().unwrap();
                    listeners.insert(section.clone(), port);
                }
                _ => {}
            }
        }
        listeners
    }

    /// The ports the HAProxy target's vars ask for, checked against the rendered listeners and
    /// the template's own defaults. Returns them (primary, replicas, stats).
    fn haproxy_ports(&self, shipped: impl Fn(&Path) -> Option<PathBuf> + Copy) -> [u16; 3] {
        let t = self.haproxy_target();
        let vars = [
            self.var_u16(t, "primary_port"),
            self.var_u16(t, "replica_port"),
            self.var_u16(t, "stats_port"),
        ];
        let rendered = self.render_haproxy(shipped);
        let want: BTreeMap<String, u16> = [
            ("primary".to_string(), vars[0]),
            ("replicas".to_string(), vars[1]),
            ("stats".to_string(), vars[2]),
        ]
        .into();
        assert_eq!(
            rendered, want,
            "{}: rendered listeners vs vars",
            self.origin
        );
        let template = read(&shipped(&t.src).unwrap());
        for (var, port) in [
            ("primary_port", vars[0]),
            ("replica_port", vars[1]),
            ("stats_port", vars[2]),
        ] {
            let default = template_default(&template, var)
                .unwrap_or_else(|| panic!("the template has no default for vars.{var}"));
            assert_eq!(
                default, port,
                "{}: vars.{var} = {port} but the template's default is {default}",
                self.origin
            );
        }
        vars
    }
}

/// `N` in `vars.<name> | default(value=N)`.
fn template_default(template: &str, name: &str) -> Option<u16> {
    let needle = format!("vars.{name} | default(value=");
    let at = template.find(&needle)? + needle.len();
    let rest = &template[at..];
    rest[..rest.find(')')?].trim().parse().ok()
}

// ---------------------------------------------------------------------------------------------
// HAProxy command lines
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct HaproxyCmd {
    argv: Vec<String>,
    master_worker: bool,
    foreground: bool,
    daemon: bool,
    master_socket: Option<PathBuf>,
    pidfile: Option<PathBuf>,
    cfgs: Vec<PathBuf>,
}

/// The HAProxy argv of a container command: either `haproxy ...` itself, or a `sh -c` script
/// whose `exec haproxy ...` line starts it.
fn haproxy_argv(cmd: &[String], origin: &str) -> Vec<String> {
    let base = |s: &str| {
        Path::new(s)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string()
    };
    if cmd.first().is_some_and(|c| base(c) == "haproxy") {
        return cmd.to_vec();
    }
    if cmd.len() == 3 && base(&cmd[0]).ends_with("sh") && cmd[1] == "-c" {
        for line in cmd[2].lines() {
            let w: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            if w.len() > 1 && w[0] == "exec" && base(&w[1]) == "haproxy" {
                return w[1..].to_vec();
            }
        }
    }
    panic!("{origin}: no `haproxy` or `sh -c '... exec haproxy ...'` in {cmd:?}")
}

fn parse_haproxy(argv: &[String]) -> HaproxyCmd {
    let mut h = HaproxyCmd {
        argv: argv.to_vec(),
        ..Default::default()
    };
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-W" | "-Ws" => h.master_worker = true,
            "-db" => h.foreground = true,
            "-D" => h.daemon = true,
            // `-S <path>[,<bind options>...]`
            "-S" => h.master_socket = it.next().map(|s| s.split(',').next().unwrap().into()),
            "-p" => h.pidfile = it.next().map(PathBuf::from),
            "-f" => h.cfgs.extend(it.next().map(PathBuf::from)),
            _ => {}
        }
    }
    h
}

/// HAProxy's command line agrees with haconfd's reload config for the target it reads.
fn assert_haproxy_matches(h: &HaproxyCmd, cfg: &Loaded, origin: &str) {
    let t = cfg.haproxy_target();
    let p = |x: &Path| host_path(x);
    assert!(
        h.master_worker,
        "{origin}: HAProxy is not in master-worker mode (-W/-Ws): {:?}",
        h.argv
    );
    assert_eq!(
        h.cfgs.iter().map(|c| p(c)).collect::<Vec<_>>(),
        vec![p(&t.dest)],
        "{origin}: HAProxy's -f vs the haproxy target's dest"
    );
    let socket = match &t.reload {
        Some(Reload::MasterSocket { path, .. }) => Some(path),
        Some(Reload::Signal {
            pidfile,
            signal,
            process,
            master_socket,
            ..
        }) => {
            assert_eq!(
                h.pidfile.as_deref().map(p),
                Some(p(pidfile)),
                "{origin}: HAProxy's -p vs reload.pidfile"
            );
            assert_eq!(
                *signal,
                nix::sys::signal::Signal::SIGUSR2,
                "{origin}: a master-worker HAProxy reloads on SIGUSR2"
            );
            assert_eq!(
                process, "haproxy",
                "{origin}: reload.process must be the name of HAProxy's master"
            );
            master_socket.as_ref()
        }
        other => panic!("{origin}: the haproxy target reloads with {other:?}"),
    };
    if let Some(s) = socket {
        assert_eq!(
            h.master_socket.as_deref().map(p),
            Some(p(s)),
            "{origin}: HAProxy's -S vs reload.master_socket"
        );
    }
    if let Some(ss) = t.server_state() {
        let stats = t
            .vars
            .get("stats_socket")
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{origin}: vars.stats_socket is not set"));
        assert_eq!(
            Path::new(stats),
            ss.stats_socket,
            "{origin}: the template's stats socket (vars.stats_socket) vs server_state.stats_socket"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------------------------

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn ystr(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn ylist(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(a) => a.iter().map(|v| ystr(v).unwrap()).collect(),
        Yaml::BadValue | Yaml::Null => Vec::new(),
        other => vec![ystr(other).unwrap()],
    }
}

fn ymap(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (ystr(k).unwrap(), ystr(v).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------------------

struct Compose {
    dir: PathBuf,
    doc: Yaml,
}

/// A short-syntax volume: `source:target[:mode]`.
struct Mount {
    source: String,
    target: PathBuf,
}

/// A short-syntax port: `[ip:]host:container`.
#[derive(Debug)]
struct Published {
    ip: Option<String>,
    host: u16,
    container: u16,
}

/// Compose's variable interpolation with nothing set in the environment: `${VAR:-default}` and
/// `${VAR-default}` become the default. A bare `${VAR}` or `$VAR` is refused: the file must work
/// as it is, with no variable set.
fn compose_default(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let body = &rest[at + 2..];
        let end = body
            .find('}')
            .unwrap_or_else(|| panic!("compose.yml: unclosed ${{ in {text:?}"));
        let expr = &body[..end];
        let default = expr
            .split_once(":-")
            .or_else(|| expr.split_once('-'))
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("compose.yml: {expr:?} in {text:?} has no default"));
        out.push_str(default);
        rest = &body[end + 1..];
    }
    assert!(
        !rest.contains('$'),
        "compose.yml: {text:?}: only ${{VAR:-default}} is used"
    );
    out.push_str(rest);
    out
}

impl Compose {
    fn load() -> Compose {
        let path = root().join("docker/compose.yml");
        Compose {
            dir: path.parent().unwrap().to_path_buf(),
            doc: yaml_docs(&path).remove(0),
        }
    }

    fn service(&self, name: &str) -> &Yaml {
        let s = &self.doc["services"][name];
        assert!(!s.is_badvalue(), "compose.yml has no service {name}");
        s
    }

    fn services(&self) -> Vec<(String, &Yaml)> {
        self.doc["services"]
            .as_hash()
            .expect("compose.yml has no services")
            .iter()
            .map(|(k, v)| (ystr(k).unwrap(), v))
            .collect()
    }

    /// The service built from docker/Dockerfile, and that Dockerfile with the service's context.
    fn haconfd(&self) -> (String, Dockerfile) {
        for (name, s) in self.services() {
            let b = &s["build"];
            if let Some(df) = b["dockerfile"].as_str() {
                let context = normalize(&self.dir.join(b["context"].as_str().unwrap_or(".")));
                if normalize(&context.join(df)) == root().join("docker/Dockerfile") {
                    return (name, Dockerfile::load(&context.join(df), &context));
                }
            }
        }
        panic!("no compose service is built from docker/Dockerfile")
    }

    fn mounts(&self, service: &str) -> Vec<Mount> {
        ylist(&self.service(service)["volumes"])
            .into_iter()
            .map(|v| {
                let parts: Vec<&str> = v.split(':').collect();
                assert!(
                    parts.len() >= 2,
                    "{service}: volume {v:?} is not source:target"
                );
                Mount {
                    source: parts[0].to_string(),
                    target: PathBuf::from(parts[1]),
                }
            })
            .collect()
    }

    /// The image a service runs when no variable is set.
    fn image(&self, service: &str) -> Option<String> {
        self.service(service)["image"].as_str().map(compose_default)
    }

    fn ports(&self, service: &str) -> Vec<Published> {
        ylist(&self.service(service)["ports"])
            .into_iter()
            .map(|p| compose_default(&p))
            .map(|p| {
                let parts: Vec<&str> = p.split('/').next().unwrap().split(':').collect();
                let num = |s: &str| -> u16 { s.parse().unwrap_or_else(|_| panic!("port {p:?}")) };
                match parts.as_slice() {
                    [ip, h, c] => Published {
                        ip: Some(ip.to_string()),
                        host: num(h),
                        container: num(c),
                    },
                    [h, c] => Published {
                        ip: None,
                        host: num(h),
                        container: num(c),
                    },
                    _ => panic!("{service}: port {p:?} is not [ip:]host:container"),
                }
            })
            .collect()
    }

    /// The container's command line: `entrypoint` overrides the image's ENTRYPOINT and clears its
    /// CMD; `command` overrides CMD.
    fn argv(&self, service: &str, image: Option<&Dockerfile>) -> Vec<String> {
        let s = self.service(service);
        let words = |y: &Yaml| match y {
            Yaml::String(s) => s.split_whitespace().map(str::to_string).collect(),
            other => ylist(other),
        };
        let entry_set = !s["entrypoint"].is_badvalue();
        let mut argv: Vec<String> = if entry_set {
            words(&s["entrypoint"])
        } else {
            image
                .and_then(|d| d.runtime().exec_form("ENTRYPOINT"))
                .unwrap_or_default()
        };
        if !s["command"].is_badvalue() {
            argv.extend(words(&s["command"]));
        } else if !entry_set {
            argv.extend(
                image
                    .and_then(|d| d.runtime().exec_form("CMD"))
                    .unwrap_or_default(),
            );
        }
        argv
    }

    /// The service whose command runs HAProxy.
    fn haproxy_service(&self) -> String {
        self.services()
            .into_iter()
            .map(|(n, _)| n)
            .find(|n| {
                let argv = self.argv(n, None);
                argv.first()
                    .is_some_and(|a| a.ends_with("haproxy") || a.ends_with("sh"))
                    && argv.join(" ").contains("haproxy -")
            })
            .expect("no compose service runs haproxy")
    }

    fn uid(&self, service: &str) -> Option<u32> {
        ystr(&self.service(service)["user"]).map(|u| {
            u.split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{service}: user {u:?} is not numeric"))
        })
    }
}

/// The config file mounted at `config` in the compose service, loaded.
fn compose_config(c: &Compose, service: &str, config: &Path) -> Loaded {
    let m = c
        .mounts(service)
        .into_iter()
        .find(|m| m.target == config)
        .unwrap_or_else(|| {
            panic!(
                "compose {service}: nothing is mounted at {}, the config its command reads",
                config.display()
            )
        });
    assert!(
        m.source.starts_with('.') || m.source.starts_with('/'),
        "compose {service}: the config comes from volume {:?}, not a file",
        m.source
    );
    let file = normalize(&c.dir.join(&m.source));
    load_config(&read(&file), config, &format!("compose {service}"))
}

#[test]
fn dockerfile_builds_the_locked_release_binary_and_ships_the_templates() {
    let df = haconfd_dockerfile();
    assert!(df.stages.len() >= 2, "not a multi-stage build");
    let rt = df.runtime();

    // The runtime copies the binary built by the build stage, from where cargo puts it.
    let copy_bin = rt
        .all("COPY")
        .map(|i| parse_copy(&i.args))
        .find(|c| c.from.is_some() && c.dest == "/usr/local/bin/haconfd")
        .expect("the runtime stage does not COPY --from=<build> ... /usr/local/bin/haconfd");
    let build = df.stage(copy_bin.from.as_deref().unwrap());
    let cargo = build
        .all("RUN")
        .find(|i| i.args.contains("cargo build"))
        .expect("the build stage runs no `cargo build`");
    for flag in ["--release", "--locked"] {
        assert!(
            cargo.args.split_whitespace().any(|w| w == flag),
            "`{}` lacks {flag}",
            cargo.args
        );
    }
    let bin = env!("CARGO_PKG_NAME");
    if let Some(b) = cargo
        .args
        .split_whitespace()
        .skip_while(|w| *w != "--bin")
        .nth(1)
    {
        assert_eq!(b.trim_end_matches(';'), bin, "cargo builds another binary");
    }
    let workdir = build
        .last("WORKDIR")
        .expect("the build stage has no WORKDIR");
    assert_eq!(
        copy_bin.srcs,
        vec![format!(
            "{}/target/release/{bin}",
            workdir.args.trim_end_matches('/')
        )],
        "the runtime copies something else than cargo's output"
    );
    assert!(
        build.all("RUN").any(|i| i
            .args
            .split_whitespace()
            .any(|w| w.trim_end_matches(';') == "protobuf-compiler")),
        "the build stage does not install protobuf-compiler (etcd-client's build needs protoc)"
    );

    // The binary is linked against the build stage's glibc: the runtime must be the same Debian
    // release (an older one lacks the symbol versions; the tag must say which one it is).
    let release = |image: &str| {
        ["bookworm", "trixie", "bullseye", "buster"]
            .into_iter()
            .find(|r| image.ends_with(&format!("-{r}")) || image.contains(&format!("-{r}-")))
            .unwrap_or_else(|| panic!("{image}: the tag does not name its Debian release"))
    };
    assert_eq!(
        release(&build.base),
        release(&rt.base),
        "build stage {} and runtime {} are different Debian releases",
        build.base,
        rt.base
    );

    // The build stage copies everything cargo reads: manifest, lock, build script, sources and
    // every target Cargo.toml declares.
    let manifest: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))).unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".into(),
        "src/main.rs".into(),
        "src/lib.rs".into(),
    ];
    if root().join("build.rs").exists() {
        needed.push("build.rs".into());
    }
    for (kind, dir) in [
        ("bench", "benches"),
        ("bin", "src/bin"),
        ("example", "examples"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = t.get("path").and_then(|p| p.as_str()).map(str::to_string);
            let name = t["name"].as_str().unwrap();
            needed.push(path.unwrap_or_else(|| format!("{dir}/{name}.rs")));
        }
    }
    let copied: Vec<String> = build
        .all("COPY")
        .map(|i| parse_copy(&i.args))
        .filter(|c| c.from.is_none())
        .flat_map(|c| c.srcs)
        .map(|s| s.trim_end_matches('/').to_string())
        .collect();
    for n in &needed {
        assert!(
            copied
                .iter()
                .any(|c| n == c || n.starts_with(&format!("{c}/"))),
            "the build stage does not copy {n} (copies {copied:?})"
        );
        assert!(root().join(n).exists(), "{n} does not exist");
    }

    // Every shipped template lands in /usr/share/haconfd/templates/.
    for e in std::fs::read_dir(root().join("templates")).unwrap() {
        let name = e.unwrap().file_name();
        let image_path = Path::new("/usr/share/haconfd/templates").join(&name);
        assert_eq!(
            df.shipped(&image_path),
            Some(root().join("templates").join(&name)),
            "templates/{} is not shipped at {}",
            name.to_string_lossy(),
            image_path.display()
        );
    }

    // Not root; stops haconfd gracefully; runs `haconfd run` on the default config.
    assert_ne!(df.uid(), 0, "the image runs as root");
    let stop = rt.last("STOPSIGNAL").map(|i| i.args.clone());
    assert!(
        matches!(stop.as_deref(), Some("SIGTERM" | "SIGINT" | "15" | "2")),
        "STOPSIGNAL {stop:?}: the base image's would be inherited; haconfd stops gracefully on SIGTERM"
    );
    assert!(
        rt.last("ENTRYPOINT").is_some(),
        "the runtime stage must set ENTRYPOINT (else the base image's is inherited)"
    );
    let config = parse_run(&df.argv(), "docker/Dockerfile ENTRYPOINT + CMD");
    assert_eq!(config, Path::new(haconfd::config::DEFAULT_CONFIG_PATH));
    Cli::command().debug_assert();
}

/// The local stand-ins of docker/local/ (what the container tests build where nothing can be
/// pulled) keep what docker/Dockerfile, compose.yml and the manifest expect of the official
/// images: the haproxy user's numbers, and etcd where compose.yml runs it. tests/containers.rs
/// checks the built images themselves.
#[test]
fn local_bases_keep_the_official_images_users_and_paths() {
    let df = haconfd_dockerfile();
    let user = df.runtime().last("USER").unwrap().args.clone();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, &user));
    let local = Dockerfile::load(
        &root().join("docker/local/haproxy.Dockerfile"),
        &root().join("docker/local"),
    );
    let run: String = local
        .runtime()
        .all("RUN")
        .map(|i| i.args.clone())
        .collect::<Vec<_>>()
        .join(" ");
    let flag = |cmd: &str, flag: &str| -> Option<String> {
        let at = run.find(cmd)?;
        let w: Vec<&str> = run[at..].split_whitespace().collect();
        let i = w.iter().position(|x| *x == flag)?;
        w.get(i + 1).map(|v| v.trim_end_matches(';').to_string())
    };
    assert_eq!(
        flag("groupmod", "--gid").as_deref(),
        Some(gid),
        "docker/local/haproxy.Dockerfile: the haproxy group is not gid {gid} (docker/Dockerfile's USER)"
    );
    assert_eq!(
        flag("usermod", "--uid").as_deref(),
        Some(uid),
        "docker/local/haproxy.Dockerfile: the haproxy user is not uid {uid} (docker/Dockerfile's USER)"
    );
    assert_eq!(
        local.runtime().last("USER").map(|u| u.args.as_str()),
        Some("haproxy"),
        "docker/local/haproxy.Dockerfile: the official image runs as haproxy"
    );
    assert_eq!(
        local.runtime().last("STOPSIGNAL").map(|u| u.args.as_str()),
        Some("SIGUSR1"),
        "docker/local/haproxy.Dockerfile: the official image stops HAProxy with SIGUSR1"
    );

    // compose.yml runs /usr/local/bin/etcd and checks health with /usr/local/bin/etcdctl.
    let etcd = Dockerfile::load(
        &root().join("docker/local/etcd.Dockerfile"),
        &root().join("docker/local"),
    );
    let c = Compose::load();
    let mut used: Vec<String> = c.argv("etcd", None)[..1].to_vec();
    used.extend(
        ylist(&c.service("etcd")["healthcheck"]["test"])
            .into_iter()
            .nth(1),
    );
    for path in used {
        assert!(
            etcd.runtime()
                .all("RUN")
                .any(|i| i.args.contains(&format!(" {path};"))),
            "docker/local/etcd.Dockerfile does not put {path} where compose.yml runs it"
        );
    }
}

#[test]
fn compose_demo_agrees_with_the_binary_the_config_and_the_templates() {
    let c = Compose::load();
    let (svc, df) = c.haconfd();
    let origin = format!("compose {svc}");
    assert_eq!(
        std::fs::canonicalize(&df.context).unwrap(),
        std::fs::canonicalize(root()).unwrap(),
        "{origin}: the build context is not the repository root the Dockerfile's COPYs assume"
    );

    // The command line parses; the config it reads is mounted and resolves; its templates are
    // the image's.
    let argv = c.argv(&svc, Some(&df));
    let config_path = parse_run(&argv, &origin);
    let cfg = compose_config(&c, &svc, &config_path);
    let shipped = |p: &Path| df.shipped(p);
    cfg.assert_templates_shipped(shipped);

    // HAProxy: master-worker, in the foreground, with the socket/pidfile/config haconfd uses,
    // from the image haconfd checks with.
    let hsvc = c.haproxy_service();
    let h = parse_haproxy(&haproxy_argv(&c.argv(&hsvc, None), &hsvc));
    assert!(
        h.foreground && !h.daemon,
        "compose {hsvc}: HAProxy must stay in the foreground (-db) or the container exits"
    );
    assert_haproxy_matches(&h, &cfg, &format!("compose {hsvc}"));
    let check = &cfg.haproxy_target().check;
    assert_eq!(
        check.first().map(String::as_str),
        Some("haproxy"),
        "{origin}: the haproxy target is not checked with haproxy -c"
    );
    assert_eq!(
        c.image(&hsvc).as_deref(),
        Some(df.runtime().base.as_str()),
        "the haproxy service's image differs from the one haconfd's image (and its `haproxy -c`) is built on"
    );
    // Also when the images are changed from the environment: haconfd's image is built on the one
    // the haproxy service runs, named by the same expression.
    assert_eq!(
        c.service(&svc)["build"]["args"]["RUNTIME_BASE"].as_str(),
        c.service(&hsvc)["image"].as_str(),
        "{origin}: build.args.RUNTIME_BASE is not the haproxy service's image"
    );

    // Everything haconfd and HAProxy share is on one volume mounted at the same place in both.
    let shared: Vec<Mount> = c
        .mounts(&svc)
        .into_iter()
        .filter(|m| {
            c.mounts(&hsvc)
                .iter()
                .any(|o| o.source == m.source && o.target == m.target)
        })
        .collect();
    for t in &cfg.settings.targets {
        for p in Loaded::paths(t) {
            assert!(
                shared.iter().any(|m| p.starts_with(&m.target)),
                "{origin}: {} is not on a volume shared with {hsvc}",
                p.display()
            );
        }
    }

    // Same non-root uid in both containers (sockets, files and signals need no extra rights).
    let haconfd_uid = c.uid(&svc).unwrap_or_else(|| df.uid());
    let haproxy_uid = c
        .uid(&hsvc)
        .unwrap_or_else(|| panic!("compose {hsvc}: set `user:` explicitly"));
    assert_ne!(haconfd_uid, 0, "{origin} runs as root");
    assert_eq!(
        haconfd_uid, haproxy_uid,
        "haconfd and HAProxy must run as the same uid"
    );

    // Published ports: HAProxy's are the rendered listeners (= vars = template defaults);
    // haconfd's is http.listen's. All on the host's loopback.
    let ports = cfg.haproxy_ports(shipped);
    let published: BTreeSet<u16> = c.ports(&hsvc).iter().map(|p| p.container).collect();
    assert_eq!(
        published,
        ports.into_iter().collect::<BTreeSet<_>>(),
        "compose {hsvc}: published ports vs HAProxy's listeners"
    );
    let hp = c.ports(&svc);
    assert_eq!(
        hp.iter().map(|p| p.container).collect::<Vec<_>>(),
        vec![cfg.http_port()],
        "{origin}: published port vs http.listen"
    );
    assert_eq!(
        cfg.http_host(),
        "0.0.0.0",
        "{origin}: http.listen must be on the container's interface for the published port to reach it"
    );
    for p in c.ports(&hsvc).iter().chain(&hp) {
        assert_eq!(
            p.ip.as_deref(),
            Some("127.0.0.1"),
            "{p:?} is published beyond the host's loopback"
        );
        assert_eq!(
            p.host, p.container,
            "{p:?}: host and container ports differ"
        );
    }
}

#[test]
fn compose_etcd_and_patroni_match_the_watched_prefix() {
    let c = Compose::load();
    let (svc, df) = c.haconfd();
    let cfg = compose_config(&c, &svc, &parse_run(&c.argv(&svc, Some(&df)), &svc));
    let etcd = &cfg.settings.etcd;

    // Each endpoint is a compose service whose etcd advertises exactly that URL; every flag of
    // its command is one the real etcd accepts.
    let help = Command::new(require_bin("etcd"))
        .arg("--help")
        .output()
        .unwrap();
    let help =
        String::from_utf8_lossy(&help.stdout).to_string() + &String::from_utf8_lossy(&help.stderr);
    let mut endpoints = Vec::new();
    for ep in &etcd.endpoints {
        let u = url::Url::parse(ep).unwrap();
        let host = u.host_str().unwrap().to_string();
        let port = u.port_or_known_default().unwrap();
        let argv = c.argv(&host, None);
        assert!(
            argv.first().is_some_and(|a| a.ends_with("etcd")),
            "compose {host}: {argv:?} does not run etcd"
        );
        let flag = |name: &str| -> Vec<String> {
            argv.iter()
                .filter_map(|a| a.strip_prefix(&format!("--{name}=")))
                .flat_map(|v| v.split(','))
                .map(str::to_string)
                .collect()
        };
        assert!(
            flag("advertise-client-urls")
                .iter()
                .any(|a| a.trim_end_matches('/') == ep.trim_end_matches('/')),
            "compose {host}: --advertise-client-urls does not include {ep}"
        );
        assert!(
            flag("listen-client-urls")
                .iter()
                .any(|l| url::Url::parse(l).unwrap().port() == Some(port)),
            "compose {host}: etcd does not listen on port {port}"
        );
        for a in &argv[1..] {
            let name = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} "))
                    || help.contains(&format!("{name}="))
                    || help.contains(&format!("{name}\n")),
                "compose {host}: etcd has no flag {name}"
            );
        }
        endpoints.push(format!("{host}:{port}"));
    }

    // Every Patroni node: same scope and namespace, the etcd3 section on those endpoints, and the
    // YAML its entrypoint writes says so too.
    let patroni: Vec<String> = c
        .services()
        .into_iter()
        .filter(|(_, s)| s["build"].as_str() == Some("./patroni"))
        .map(|(n, _)| n)
        .collect();
    assert!(
        patroni.len() >= 3,
        "fewer than three Patroni nodes: {patroni:?}"
    );
    let pdf = Dockerfile::load(&c.dir.join("patroni/Dockerfile"), &c.dir.join("patroni"));
    assert_ne!(
        pdf.runtime().last("USER").map(|u| u.args.as_str()),
        Some("root"),
        "Patroni runs as root"
    );
    assert!(
        pdf.runtime().last("USER").is_some(),
        "the Patroni image sets no USER"
    );
    let entry = pdf
        .runtime()
        .exec_form("ENTRYPOINT")
        .expect("no ENTRYPOINT");
    let script = pdf
        .runtime()
        .all("COPY")
        .map(|i| parse_copy(&i.args))
        .find(|cp| cp.dest == entry[0])
        .map(|cp| pdf.context.join(&cp.srcs[0]))
        .expect("the Patroni ENTRYPOINT is not a copied script");
    for name in &patroni {
        let env = ymap(&c.service(name)["environment"]);
        assert!(
            !env.keys().any(|k| k.starts_with("PATRONI_ETCD_")),
            "compose {name}: PATRONI_ETCD_* is the v2 API, invisible to haconfd's v3 watch"
        );
        let dir = temp_dir("packaging-patroni");
        let yml = dir.path().join("patroni.yml");
        let out = Command::new("sh")
            .arg(&script)
            .arg("true")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(&env)
            .env("CONFIG_FILE", &yml)
            .env("CONNECT_HOST", "10.0.0.7")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compose {name}: the entrypoint failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let y = YamlLoader::load_from_str(&read(&yml)).unwrap().remove(0);
        assert!(
            y["etcd"].is_badvalue(),
            "compose {name}: the Patroni YAML has an etcd (v2) section"
        );
        let hosts: Vec<String> = ystr(&y["etcd3"]["hosts"])
            .unwrap_or_else(|| panic!("compose {name}: no etcd3.hosts in the Patroni YAML"))
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        assert_eq!(
            hosts, endpoints,
            "compose {name}: Patroni's etcd3.hosts vs haconfd's endpoints"
        );
        assert_eq!(
            y["scope"].as_str(),
            etcd.single_scope(),
            "compose {name}: scope"
        );
        assert_eq!(
            format!("/{}", y["namespace"].as_str().unwrap().trim_matches('/')),
            etcd.namespace,
            "compose {name}: namespace"
        );
        for section in ["restapi", "postgresql"] {
            let port = |k: &str| {
                ystr(&y[section][k])
                    .unwrap()
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .to_string()
            };
            assert_eq!(
                port("listen"),
                port("connect_address"),
                "compose {name}: {section} listens and advertises different ports"
            );
        }
        assert_eq!(
            ystr(&y["postgresql"]["connect_address"]).as_deref(),
            Some("10.0.0.7:5432"),
            "compose {name}: connect_address is not CONNECT_HOST"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

struct K8s {
    docs: Vec<Yaml>,
}

impl K8s {
    fn load() -> K8s {
        K8s {
            docs: yaml_docs(&root().join("docker/k8s/haconfd-sidecar.yaml")),
        }
    }

    fn all(&self, kind: &str) -> Vec<&Yaml> {
        self.docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Yaml {
        let v = self.all(kind);
        assert_eq!(v.len(), 1, "expected one {kind}");
        v[0]
    }

    fn pod(&self) -> &Yaml {
        &self.one("Deployment")["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> &Yaml {
        self.pod()["containers"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// Kubernetes semantics: `command` replaces ENTRYPOINT, `args` replaces CMD.
    fn argv(&self, name: &str, image: Option<&Dockerfile>) -> Vec<String> {
        let c = self.container(name);
        let mut argv = if c["command"].is_badvalue() {
            image
                .and_then(|d| d.runtime().exec_form("ENTRYPOINT"))
                .unwrap_or_default()
        } else {
            ylist(&c["command"])
        };
        if c["args"].is_badvalue() {
            if c["command"].is_badvalue() {
                argv.extend(
                    image
                        .and_then(|d| d.runtime().exec_form("CMD"))
                        .unwrap_or_default(),
                );
            }
        } else {
            argv.extend(ylist(&c["args"]));
        }
        argv
    }

    /// Container port by name or number.
    fn port(&self, container: &str, port: &Yaml) -> u16 {
        if let Some(n) = port.as_i64() {
            return n as u16;
        }
        let name = port.as_str().unwrap();
        self.container(container)["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("container {container} has no port named {name}"))
            as u16
    }

    /// (volume name, mount path) of a container.
    fn mounts(&self, container: &str) -> Vec<(String, PathBuf)> {
        self.container(container)["volumeMounts"]
            .as_vec()
            .map(|v| {
                v.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap().to_string(),
                            PathBuf::from(m["mountPath"].as_str().unwrap()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn volume(&self, name: &str) -> &Yaml {
        self.pod()["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The config the haconfd container reads: the ConfigMap key mounted at its path.
    fn config(&self, config: &Path) -> (Loaded, String) {
        let (vol, dir) = self
            .mounts("haconfd")
            .into_iter()
            .find(|(_, dir)| config.parent() == Some(dir.as_path()))
            .unwrap_or_else(|| {
                panic!(
                    "nothing is mounted at {}",
                    config.parent().unwrap().display()
                )
            });
        let cm_name = self.volume(&vol)["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("volume {vol} at {} is not a ConfigMap", dir.display()));
        let cm = self
            .all("ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"].as_str() == Some(cm_name))
            .unwrap_or_else(|| panic!("no ConfigMap {cm_name}"));
        let key = config.file_name().unwrap().to_str().unwrap();
        let text = cm["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {key}"))
            .to_string();
        (load_config(&text, config, "k8s haconfd"), text)
    }

    fn uid(&self, container: &str) -> Option<i64> {
        let c = self.container(container);
        c["securityContext"]["runAsUser"]
            .as_i64()
            .or_else(|| self.pod()["securityContext"]["runAsUser"].as_i64())
    }
}

#[test]
fn k8s_sidecar_agrees_with_the_binary_the_config_and_the_templates() {
    let k = K8s::load();
    let df = haconfd_dockerfile();
    let shipped = |p: &Path| df.shipped(p);

    let config_path = parse_run(&k.argv("haconfd", Some(&df)), "k8s haconfd");
    let (cfg, _) = k.config(&config_path);
    cfg.assert_templates_shipped(shipped);

    // HAProxy, with the paths haconfd's reload uses; a signal reload needs the shared PID
    // namespace, and the check binary is the serving one.
    let h = parse_haproxy(&haproxy_argv(&k.argv("haproxy", None), "k8s haproxy"));
    assert!(
        h.foreground && !h.daemon,
        "k8s haproxy: HAProxy must stay in the foreground (-db)"
    );
    assert_haproxy_matches(&h, &cfg, "k8s haproxy");
    let signal_reload = cfg
        .settings
        .targets
        .iter()
        .any(|t| matches!(t.reload, Some(Reload::Signal { .. })));
    if signal_reload {
        assert_eq!(
            k.pod()["shareProcessNamespace"].as_bool(),
            Some(true),
            "a pidfile reload needs shareProcessNamespace: true"
        );
    }
    assert_eq!(
        k.container("haproxy")["image"].as_str(),
        Some(df.runtime().base.as_str()),
        "the haproxy container's image differs from the one haconfd's image is built on"
    );

    // Shared emptyDir at the same path in both containers.
    let hm = k.mounts("haproxy");
    for t in &cfg.settings.targets {
        for p in Loaded::paths(t) {
            let m = k
                .mounts("haconfd")
                .into_iter()
                .find(|(v, dir)| p.starts_with(dir) && hm.contains(&(v.clone(), dir.clone())))
                .unwrap_or_else(|| {
                    panic!("{} is not on a volume shared with haproxy", p.display())
                });
            assert!(
                !k.volume(&m.0)["emptyDir"].is_badvalue(),
                "shared volume {} is not an emptyDir",
                m.0
            );
        }
    }

    // Non-root, same uid, no privilege escalation.
    assert_eq!(
        k.pod()["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true),
        "the pod does not set runAsNonRoot"
    );
    let (u1, u2) = (k.uid("haconfd"), k.uid("haproxy"));
    assert!(u1.is_some_and(|u| u != 0), "haconfd's runAsUser: {u1:?}");
    assert_eq!(u1, u2, "haconfd and HAProxy must run as the same uid");
    assert_eq!(
        u1,
        Some(df.uid() as i64),
        "runAsUser differs from the image's USER"
    );
    for c in ["haconfd", "haproxy"] {
        assert_eq!(
            k.container(c)["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{c}: allowPrivilegeEscalation"
        );
    }

    // Probes: /healthz and /readyz on http.listen's port, which must be the pod's interface.
    let http = cfg.http_port();
    let mut probed = BTreeSet::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let g = &k.container("haconfd")[probe]["httpGet"];
        if g.is_badvalue() {
            continue;
        }
        assert_eq!(
            k.port("haconfd", &g["port"]),
            http,
            "{probe}: port vs http.listen"
        );
        assert!(
            g["host"].is_badvalue(),
            "{probe}: a host makes the kubelet probe elsewhere"
        );
        probed.insert(g["path"].as_str().unwrap().to_string());
    }
    assert_eq!(
        probed,
        ["/healthz", "/readyz"].map(String::from).into(),
        "haconfd's probes"
    );
    assert_ne!(
        cfg.http_host(),
        "127.0.0.1",
        "the kubelet probes the pod IP: http.listen on loopback would fail every probe"
    );

    // The Service serves HAProxy's primary and replica listeners, on the same port numbers.
    let ports = cfg.haproxy_ports(shipped);
    let svc = k.one("Service");
    let mut served = BTreeSet::new();
    for p in svc["spec"]["ports"].as_vec().unwrap() {
        let target = k.port("haproxy", &p["targetPort"]);
        assert_eq!(
            p["port"].as_i64(),
            Some(target as i64),
            "Service port vs target"
        );
        served.insert(target);
    }
    assert_eq!(
        served,
        [ports[0], ports[1]].into(),
        "Service ports vs HAProxy's primary and replica listeners"
    );
    let containers: BTreeSet<u16> = k.container("haproxy")["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap() as u16)
        .collect();
    assert_eq!(
        containers,
        ports.into(),
        "haproxy containerPorts vs its listeners"
    );

    // Selector matches the pods.
    let labels = ymap(&k.one("Deployment")["spec"]["template"]["metadata"]["labels"]);
    for (key, v) in ymap(&svc["spec"]["selector"]) {
        assert_eq!(
            labels.get(&key),
            Some(&v),
            "the Service selects no pod of the Deployment"
        );
    }
}

#[test]
fn k8s_config_is_the_compose_config_but_for_the_reload_and_logs() {
    let k = K8s::load();
    let df = haconfd_dockerfile();
    let (_, k8s_text) = k.config(&parse_run(&k.argv("haconfd", Some(&df)), "k8s haconfd"));
    let compose_text = read(&root().join("docker/haconfd.toml"));
    let strip = |text: &str| {
        let mut v: toml::Table = toml::from_str(text).unwrap();
        v.remove("log");
        for t in v["template"].as_array_mut().unwrap() {
            t.as_table_mut().unwrap().remove("reload");
        }
        v
    };
    assert_eq!(
        strip(&k8s_text),
        strip(&compose_text),
        "the ConfigMap's haconfd.toml drifted from docker/haconfd.toml"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

struct Unit {
    path: PathBuf,
    text: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(rel: &str) -> Unit {
        let path = root().join(rel);
        let text = read(&path);
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if cur.is_empty() && (t.is_empty() || t.starts_with('#') || t.starts_with(';')) {
                continue;
            }
            if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            if let Some(body) = t.strip_suffix('\\') {
                cur.push_str(body);
                cur.push(' ');
                continue;
            }
            cur.push_str(t);
            let (k, v) = cur
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: not key=value: {cur:?}"));
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
            cur.clear();
        }
        Unit {
            path,
            text,
            entries,
        }
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.all("Service", key).last().copied()
    }

    /// Space-separated values of every `key=` line (ReadWritePaths=, SupplementaryGroups=...).
    fn words(&self, key: &str) -> Vec<String> {
        self.all("Service", key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect()
    }

    /// An Exec*= line as argv (prefixes `-@:+!` dropped; no quoting in these units).
    fn exec(&self, line: &str) -> Vec<String> {
        assert!(
            !line.contains('"') && !line.contains('\''),
            "{}: quoted Exec lines are not parsed here",
            self.path.display()
        );
        line.trim_start_matches(['-', '@', ':', '+', '!'])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn systemd_units_agree_with_the_binary_the_sample_config_and_each_other() {
    let haconfd = Unit::load("examples/haconfd.service");
    let haproxy = Unit::load("examples/haproxy.service");

    // haconfd.service: `haconfd run` under Type=notify; SIGHUP reloads it; not root.
    assert_eq!(
        haconfd.get("Type"),
        Some("notify"),
        "haconfd notifies systemd"
    );
    let argv = haconfd.exec(haconfd.get("ExecStart").expect("no ExecStart"));
    let config = parse_run(&argv, "haconfd.service ExecStart");
    assert_eq!(
        haconfd.exec(haconfd.get("ExecReload").expect("no ExecReload")),
        ["/bin/kill", "-HUP", "$MAINPID"],
        "haconfd re-reads its config on SIGHUP"
    );
    let user = haconfd.get("User").expect("haconfd.service sets no User=");
    assert!(
        user != "root" && user != "0",
        "haconfd.service runs as root"
    );
    assert_eq!(haconfd.get("Restart"), Some("on-failure"));

    // The config it names is the sample, installed there (so says the unit's install notes).
    assert!(
        haconfd
            .text
            .contains(&format!("examples/haconfd.toml {}", config.display())),
        "haconfd.service does not say how examples/haconfd.toml becomes {}",
        config.display()
    );
    let sample = root().join("examples/haconfd.toml");
    let cfg = load_config(&read(&sample), &sample, "examples/haconfd.toml");
    cfg.assert_templates_shipped(|p| p.is_file().then(|| p.to_path_buf()));
    // `haproxy -c -q` prints nothing in HAProxy 2.6: a refused file would come with no reason.
    assert!(
        !cfg.haproxy_target().check.iter().any(|a| a == "-q"),
        "examples/haconfd.toml: the haproxy check uses -q, which hides HAProxy's reason: {:?}",
        cfg.haproxy_target().check
    );

    // The sandbox lets it write every destination directory, and nothing hides the PIDs it checks.
    let rw: Vec<PathBuf> = haconfd
        .words("ReadWritePaths")
        .iter()
        .map(|w| PathBuf::from(w.trim_start_matches('-')))
        .collect();
    for t in &cfg.settings.targets {
        let mut dirs = vec![t.dest.parent().unwrap().to_path_buf()];
        dirs.extend(
            t.server_state()
                .map(|s| s.file.parent().unwrap().to_path_buf()),
        );
        for d in dirs {
            assert!(
                rw.iter().any(|r| d.starts_with(r)),
                "haconfd.service: {} (target {:?}) is not in ReadWritePaths={rw:?}",
                d.display(),
                t.name
            );
        }
    }
    assert_ne!(
        haconfd.get("ProtectProc"),
        Some("invisible"),
        "ProtectProc=invisible hides the processes haconfd must verify"
    );
    // Signalling processes of other users (root's HAProxy master, postgres' PgBouncer) takes
    // CAP_KILL.
    if cfg
        .settings
        .targets
        .iter()
        .any(|t| matches!(t.reload, Some(Reload::Signal { .. })))
    {
        for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
            assert!(
                haconfd.words(key).iter().any(|c| c == "CAP_KILL"),
                "haconfd.service: signal reloads need CAP_KILL in {key}="
            );
        }
    }

    // haproxy.service: master-worker with the paths of the sample's haproxy target.
    assert_eq!(
        haproxy.get("Type"),
        Some("notify"),
        "haproxy -Ws notifies systemd"
    );
    let h = parse_haproxy(&haproxy.exec(haproxy.get("ExecStart").expect("no ExecStart")));
    assert!(
        h.argv.contains(&"-Ws".to_string()),
        "systemd needs -Ws: {:?}",
        h.argv
    );
    assert!(
        !h.daemon,
        "haproxy.service: Type=notify needs HAProxy in the foreground"
    );
    assert_haproxy_matches(&h, &cfg, "haproxy.service");
    let reload_signal = match &cfg.haproxy_target().reload {
        Some(Reload::Signal { signal, .. }) => {
            Some(signal.as_str().trim_start_matches("SIG").to_string())
        }
        _ => None,
    };
    let kill = haproxy
        .all("Service", "ExecReload")
        .into_iter()
        .map(|l| haproxy.exec(l))
        .find(|a| a[0].ends_with("kill"))
        .expect("haproxy.service has no ExecReload=kill ...");
    assert_eq!(
        kill[1..],
        ["-USR2".to_string(), "$MAINPID".into()],
        "haproxy.service: a master-worker HAProxy reloads on SIGUSR2 to the master"
    );
    if let Some(sig) = reload_signal {
        assert_eq!(
            format!("-{sig}"),
            kill[1],
            "haconfd and systemd reload HAProxy differently"
        );
    }

    // The sockets haconfd uses are group-owned by HAProxy's group, and haconfd is in it; their
    // directory is HAProxy's RuntimeDirectory.
    let group = haproxy
        .get("Group")
        .expect("haproxy.service sets no Group=");
    assert!(
        haconfd
            .words("SupplementaryGroups")
            .iter()
            .any(|g| g == group)
            || haconfd.get("Group") == Some(group),
        "haconfd.service is not in HAProxy's group {group}"
    );
    let t = cfg.haproxy_target();
    let runtime: Vec<PathBuf> = haproxy
        .words("RuntimeDirectory")
        .iter()
        .map(|d| Path::new("/run").join(d))
        .collect();
    let mut sockets: Vec<PathBuf> = t
        .server_state()
        .iter()
        .map(|s| s.stats_socket.clone())
        .collect();
    sockets.extend(h.master_socket.clone());
    for s in sockets {
        assert!(
            runtime.iter().any(|r| host_path(&s).starts_with(r)),
            "{} is not in haproxy.service's RuntimeDirectory={runtime:?}",
            s.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar wirings, for real
// ---------------------------------------------------------------------------------------------

/// Runs haconfd (the given argv, with `cfg`) and HAProxy (the container command) the way the
/// compose file or manifest wires them, with the shared volume `volume` moved into a temp dir,
/// on the shared etcd; adds a member and checks that HAProxy was reloaded with it.
fn run_sidecar_for_real(
    origin: &str,
    cfg: &Loaded,
    haconfd_argv: &[String],
    haproxy_cmd: &[String],
    volume: &Path,
    shipped: impl Fn(&Path) -> Option<PathBuf>,
) {
    let etcd = Etcd::shared();
    let dir = temp_dir("packaging-live");
    let vol = dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    let moved = |p: &Path| -> PathBuf {
        match p.strip_prefix(volume) {
            Ok(rel) => vol.join(rel),
            Err(_) => panic!("{origin}: {} is not on the shared volume", p.display()),
        }
    };
    let vol_str = volume.display().to_string();
    let moved_str = vol.display().to_string();

    // The config, as shipped, but for where things are on this machine.
    let scope = unique_name("packaging");
    let mut raw = cfg.raw.clone();
    raw.etcd.endpoints = vec![etcd.endpoint()];
    raw.etcd.scope = Some(scope.clone());
    raw.daemon.min_interval = Duration::from_millis(100);
    raw.daemon.retry_interval = Duration::from_millis(200);
    let http = free_port();
    raw.http.listen = Some(format!("127.0.0.1:{http}"));
    let (primary, stats) = (free_port(), free_port());
    raw.vars.insert("bind_address".into(), "127.0.0.1".into());
    raw.vars
        .insert("primary_port".into(), i64::from(primary).into());
    raw.vars
        .insert("replica_port".into(), i64::from(free_port()).into());
    raw.vars
        .insert("stats_port".into(), i64::from(stats).into());
    for (_, v) in raw.vars.iter_mut() {
        let new = v
            .as_str()
            .filter(|s| s.starts_with(&vol_str))
            .map(|s| s.replacen(&vol_str, &moved_str, 1));
        if let Some(n) = new {
            *v = n.into();
        }
    }
    for t in &mut raw.templates {
        t.src = shipped(&t.src).unwrap();
        t.dest = moved(&t.dest);
        if let Some(r) = &mut t.reload {
            r.pidfile = r.pidfile.as_deref().map(&moved);
            r.master_socket = r.master_socket.as_deref().map(&moved);
        }
        if let Some(ss) = &mut t.server_state {
            ss.file = moved(&ss.file);
            ss.stats_socket = moved(&ss.stats_socket);
        }
    }
    let cfg_file = dir.path().join("haconfd.toml");
    std::fs::write(&cfg_file, toml::to_string(&raw).unwrap()).unwrap();
    let settings = raw.clone().resolve(dir.path()).unwrap();
    let t = settings
        .targets
        .iter()
        .find(|t| t.name == cfg.haproxy_target().name)
        .unwrap();
    let h = parse_haproxy(&haproxy_argv(haproxy_cmd, origin));
    let master_socket = moved(h.master_socket.as_deref().expect("no -S"));

    // Two members, then haconfd, then HAProxy waiting for its config as in the container.
    let prefix = format!("{}/{scope}", settings.etcd.namespace);
    let members = [
        FakeMember::start("pg1", Role::Primary),
        FakeMember::start("pg2", Role::Replica),
        FakeMember::start("pg3", Role::Replica),
    ];
    etcd.put(
        &format!("{prefix}/members/pg1"),
        &members[0].member_json("master"),
    );
    etcd.put(
        &format!("{prefix}/members/pg2"),
        &members[1].member_json("replica"),
    );
    etcd.put(&format!("{prefix}/leader"), "pg1");

    let haproxy_dir = require_bin("haproxy").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        haproxy_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(haconfd_bin());
    cmd.args(with_config(haconfd_argv, &cfg_file))
        .env("PATH", &path);
    let haconfd = Proc::spawn_logged("haconfd", cmd, &dir.path().join("haconfd.log"));
    let mut cmd = Command::new(&haproxy_cmd[0]);
    cmd.args(
        haproxy_cmd[1..]
            .iter()
            .map(|a| a.replace(&vol_str, &moved_str)),
    )
    .env("PATH", &path);
    let haproxy = Proc::spawn_logged("haproxy", cmd, &dir.path().join("haproxy.log"));
    let logs = || format!("haconfd:\n{}\nhaproxy:\n{}", haconfd.log(), haproxy.log());

    let show_proc = || {
        unix_cmd(&master_socket, "show proc", Duration::from_secs(2))
            .ok()
            .map(|s| ShowProc::parse(&s))
    };
    assert!(
        wait_until(Duration::from_secs(20), || show_proc()
            .is_some_and(|p| !p.workers.is_empty())),
        "{origin}: HAProxy did not come up from haconfd's first config\n{}",
        logs()
    );
    assert!(
        wait_until(Duration::from_secs(15), || http_get(http, "/readyz")
            .is_some_and(|(code, _)| code == 200)),
        "{origin}: /readyz never answered 200: {:?}\n{}",
        http_get(http, "/readyz"),
        logs()
    );
    assert_eq!(http_get(http, "/healthz").map(|r| r.0), Some(200));
    assert!(
        wait_until(Duration::from_secs(10), || tcp_banner(
            primary,
            Duration::from_millis(500)
        )
        .is_ok_and(|b| b == "pg1")),
        "{origin}: writes do not reach the leader through HAProxy\n{}",
        logs()
    );
    let before = show_proc().unwrap().reloads();

    // A member joins at an address: haconfd renders it, checks it, swaps it in and hands it to
    // HAProxy through the wiring's admin socket, with no reload.
    etcd.put(
        &format!("{prefix}/members/pg3"),
        &members[2].member_json("replica"),
    );
    let admin = &t
        .server_state()
        .expect("the wiring sets server_state")
        .stats_socket;
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(&t.dest).is_ok_and(|c| c.contains("server pg3 "))
                && unix_cmd(admin, "show servers state replicas", Duration::from_secs(2))
                    .is_ok_and(|d| d.contains(" pg3 "))
        }),
        "{origin}: the new member did not reach HAProxy: {:?}\n{}",
        show_proc(),
        logs()
    );
    assert_eq!(show_proc().map(|p| p.reloads()), Some(before), "{}", logs());

    // One at a host name (HAProxy resolves those only at a reload): haconfd reloads HAProxy
    // through the wiring under test.
    let pg4 = serde_json::json!({
        "conn_url": format!("postgres://localhost:{}/postgres", members[2].port()),
        "api_url": format!("http://localhost:{}/patroni", members[2].api_port()),
        "state": "running",
        "role": "replica",
    });
    etcd.put(&format!("{prefix}/members/pg4"), &pg4.to_string());
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(&t.dest).is_ok_and(|c| c.contains("server pg4 "))
                && show_proc().is_some_and(|p| p.reloads() > before && p.failed == 0)
        }),
        "{origin}: HAProxy was not reloaded with the new member: {:?}\n{}",
        show_proc(),
        logs()
    );
    assert!(haconfd.is_running() && haproxy.is_running(), "{}", logs());
    etcd.delete_prefix(&format!("{prefix}/"));
}

#[test]
fn compose_sidecar_wiring_runs_for_real() {
    let c = Compose::load();
    let (svc, df) = c.haconfd();
    let argv = c.argv(&svc, Some(&df));
    let cfg = compose_config(&c, &svc, &parse_run(&argv, &svc));
    let hsvc = c.haproxy_service();
    let volume = c
        .mounts(&svc)
        .into_iter()
        .find(|m| cfg.haproxy_target().dest.starts_with(&m.target))
        .expect("the haproxy.cfg is on no volume")
        .target;
    run_sidecar_for_real("compose", &cfg, &argv, &c.argv(&hsvc, None), &volume, |p| {
        df.shipped(p)
    });
}

#[test]
fn k8s_sidecar_wiring_runs_for_real() {
    let k = K8s::load();
    let df = haconfd_dockerfile();
    let argv = k.argv("haconfd", Some(&df));
    let (cfg, _) = k.config(&parse_run(&argv, "k8s haconfd"));
    let volume = k
        .mounts("haconfd")
        .into_iter()
        .find(|(_, d)| cfg.haproxy_target().dest.starts_with(d))
        .expect("the haproxy.cfg is on no volume")
        .1;
    run_sidecar_for_real("k8s", &cfg, &argv, &k.argv("haproxy", None), &volume, |p| {
        df.shipped(p)
    });
}

// ---------------------------------------------------------------------------------------------
// The migration guide's translation of Patroni's confd setup
// ---------------------------------------------------------------------------------------------

#[test]
fn migration_guide_translation_renders_like_confd_and_passes_its_checks() {
    require_bin("haproxy");
    let files = doc_files(&read(&root().join("docs/MIGRATING-FROM-CONFD.md")));
    assert!(
        files.contains_key("haconfd.toml") && files.len() >= 3,
        "the guide's haconfd files: {:?}",
        files.keys()
    );
    let dir = temp_dir("packaging-migration");
    for (name, text) in &files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }
    let cfg = dir.path().join("haconfd.toml");
    let fixture = root().join("tests/fixtures/patroni3-kv.json");
    let run = |args: &[&str]| {
        let out = Command::new(haconfd_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["--scope", "demo"]) // the fixture's scope
            .args(args)
            .arg("--snapshot")
            .arg(&fixture)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "haconfd {args:?} on the guide's files: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    run(&["check"]);

    // What Patroni's confd template would print for each member, computed the way it does
    // (split conn_url on "/", take [2], "@" → "/", base; split api_url likewise, then ":").
    let kv: BTreeMap<String, String> = serde_json::from_str(&read(&fixture)).unwrap();
    let confd_servers: Vec<String> = kv
        .iter()
        .filter(|(k, _)| k.starts_with("/service/demo/members/"))
        .map(|(k, v)| {
            let data: serde_json::Value = serde_json::from_str(v).unwrap();
            let conn = data["conn_url"]
                .as_str()
                .unwrap()
                .split('/')
                .nth(2)
                .unwrap();
            let hostport = conn.replace('@', "/");
            let hostport = hostport.rsplit('/').next().unwrap();
            let api = data["api_url"].as_str().unwrap().split('/').nth(2).unwrap();
            let api_port = api.split(':').nth(1).unwrap();
            format!(
                "server {} {hostport} maxconn 100 check port {api_port}",
                k.rsplit('/').next().unwrap()
            )
        })
        .collect();
    assert_eq!(confd_servers.len(), 3);
    let haproxy = run(&["render", "--template", "haproxy"]);
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in haproxy.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("listen ") {
            section = name.to_string();
        } else if t.starts_with("server ") {
            sections
                .entry(section.clone())
                .or_default()
                .push(t.to_string());
        }
    }
    for listener in ["primary", "replicas"] {
        assert_eq!(
            sections.get(listener),
            Some(&confd_servers),
            "listener {listener}: the translation differs from Patroni's confd template"
        );
    }

    // PgBouncer: the leader's host and port, as confd's template extracts them.
    let leader = &kv["/service/demo/leader"];
    let data: serde_json::Value =
        serde_json::from_str(&kv[&format!("/service/demo/members/{leader}")]).unwrap();
    let hostport = data["conn_url"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    let pgbouncer = run(&["render", "--template", "pgbouncer"]);
    assert!(
        pgbouncer
            .lines()
            .any(|l| l == format!("* = host={host} port={port} pool_size=10")),
        "the translated pgbouncer.ini does not point at the leader {hostport}:\n{pgbouncer}"
    );
}
