//! Member changes applied to a running HAProxy through its runtime API instead of a reload: a
//! new file that differs from the one HAProxy runs only in `server` lines of existing backends
//! (a member joined, left or moved) becomes `add server`, `del server` and `set server … addr`
//! commands on the admin socket, checked answer by answer, and the live server list is then
//! compared with the new file. Anything else (a new backend, a port, a changed keyword, a host
//! name instead of an address, a refused command, a live list that does not match the file
//! before or after) is for a reload, which the caller does instead.
//!
//! HAProxy 2.6 (Debian 12) takes `add server` and `del server` on an admin socket without
//! `experimental-mode` (2.4 still needed it). A dynamic server inherits nothing from
//! `default-server`, so the keywords the file gives it through `default-server` are passed on
//! the command line; `init-addr` and the resolver keywords are refused for dynamic servers and
//! are left out (only IP literals are added at runtime, so they have nothing to resolve). A new
//! server is created in maintenance with its checks off; the state rules of the server-state
//! carry-over apply to it as to a server new to a reloaded worker ([`super::server_state`]):
//! one that must not serve yet is brought out of maintenance through `drain` (no new
//! connection) and set DOWN before it is made ready, so that it takes traffic only once `rise`
//! checks pass. A removed server is put in maintenance, its sessions are shut once its member
//! is gone from etcd, and it is deleted once HAProxy has no connection left on it: from
//! HAProxy 2.9 on. Before 2.9 `del server` can crash a worker (see [`deletes_safely`]), so the
//! server is parked instead: it stays in maintenance, out of the file, until the next reload
//! drops it, and a member that comes back with the same line is brought back by address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::settings::{Membership, ServerStateConfig};

/// How long one batch of commands may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a removed server's last connections may take to close before `del server` is
/// given up (and the caller reloads instead).
const DELETE_BOUND: Duration = Duration::from_secs(2);
/// The pause between two tries of `del server`.
const DELETE_STEP: Duration = Duration::from_millis(20);
/// How many servers one backend keeps parked in maintenance (HAProxy before 2.9) before a
/// removal reloads instead, which drops them all.
const PARK_LIMIT: usize = 64;

/// Keywords `add server` refuses in HAProxy 2.6 that a `default-server` line commonly carries,
/// each with its one argument: about resolving host names, which a server added at runtime
/// (an IP literal) does not need.
const NOT_FOR_DYNAMIC: [&str; 5] = [
    "init-addr",
    "resolvers",
    "resolve-prefer",
    "resolve-opts",
    "resolve-net",
];

/// A `server` line of a `listen` or `backend` section.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerLine {
    addr: String,
    port: u16,
    /// Everything after the address.
    keywords: Vec<String>,
}

impl ServerLine {
    /// The value of a one-argument keyword (`port`, `addr`).
    fn keyword(&self, name: &str) -> Option<&str> {
        let at = self.keywords.iter().position(|k| k == name)?;
        self.keywords.get(at + 1).map(String::as_str)
    }

    /// The keywords but the health check's own address and port.
    fn keywords_but_check_target(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut words = self.keywords.iter();
        while let Some(w) = words.next() {
            if w == "addr" || w == "port" {
                words.next();
                continue;
            }
            out.push(w.as_str());
        }
        out
    }

    /// Where the health check goes: its own address and port, else the server's.
    fn check_target(&self) -> (String, u16) {
        let addr = self.keyword("addr").unwrap_or(&self.addr).to_owned();
        let port = self
            .keyword("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(self.port);
        (addr, port)
    }
}

/// A rendered haproxy.cfg split in what only a reload can change (every line but the servers
/// of `listen` and `backend` sections) and those servers.
#[derive(Debug, Default)]
pub struct Layout {
    /// Every line but the servers, in order.
    skeleton: Vec<String>,
    /// The servers, by backend and name.
    servers: BTreeMap<(String, String), ServerLine>,
    /// Per backend, the `default-server` keywords in force: the last `defaults` section's,
    /// then the backend's own.
    defaults: BTreeMap<String, Vec<String>>,
    /// `server` lines that could not be read (no `address:port`): only a reload takes them.
    unreadable: Vec<String>,
}

impl Layout {
    /// Reads a rendered haproxy.cfg.
    pub fn parse(cfg: &str) -> Layout {
        let mut out = Layout::default();
        let mut in_defaults: Vec<String> = Vec::new();
        let mut section: Option<String> = None;
        let mut is_defaults = false;
        for line in cfg.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if !line.starts_with(char::is_whitespace)
                && !first.is_empty()
                && !first.starts_with('#')
            {
                is_defaults = first == "defaults";
                if is_defaults {
                    in_defaults.clear();
                }
                section = match first {
                    "listen" | "backend" => words.next().map(str::to_owned),
                    _ => None,
                };
                if let Some(b) = &section {
                    out.defaults.insert(b.clone(), in_defaults.clone());
                }
                out.skeleton.push(line.to_owned());
                continue;
            }
            match (first, &section) {
                ("default-server", None) if is_defaults => {
                    in_defaults.extend(words.map(str::to_owned));
                }
                ("default-server", Some(b)) => {
                    let kws = out.defaults.entry(b.clone()).or_default();
                    kws.extend(words.map(str::to_owned));
                }
                ("server", Some(b)) => {
                    let name = words.next().unwrap_or_default().to_owned();
                    let addr = words.next().and_then(super::server_state::split_addr);
                    match addr {
                        Some((addr, port)) => {
                            let keywords = words.map(str::to_owned).collect();
                            let s = ServerLine {
                                addr,
                                port,
                                keywords,
                            };
                            out.servers.insert((b.clone(), name), s);
                        }
                        None => out.unreadable.push(line.trim().to_owned()),
                    }
                    continue;
                }
                _ => {}
            }
            out.skeleton.push(line.to_owned());
        }
        out
    }

    /// The keywords an `add server` for a server of `backend` needs: the `default-server`
    /// ones in force (a dynamic server inherits none), then the line's own, without the
    /// keywords dynamic servers refuse.
    fn add_keywords(&self, backend: &str, line: &ServerLine) -> Vec<String> {
        let inherited = self.defaults.get(backend).into_iter().flatten();
        let mut out = Vec::new();
        let mut words = inherited.chain(&line.keywords);
        while let Some(w) = words.next() {
            if NOT_FOR_DYNAMIC.contains(&w.as_str()) {
                words.next();
                continue;
            }
            out.push(w.clone());
        }
        out
    }
}

/// One member change to make on the live HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A server new to an existing backend.
    Add {
        /// Backend.
        backend: String,
        /// Server name.
        server: String,
        /// `address:port`, as `add server` takes it.
        address: String,
        /// Its keywords, `default-server`'s included.
        keywords: Vec<String>,
    },
    /// A server gone from its backend.
    Remove {
        /// Backend.
        backend: String,
        /// Server name.
        server: String,
        /// Its address is IPv6 (where it is parked: see [`Parked`]).
        v6: bool,
    },
    /// A server whose address, port, or health check's address or port changed.
    Readdress {
        /// Backend.
        backend: String,
        /// Server name.
        server: String,
        /// New address.
        addr: String,
        /// New port.
        port: u16,
        /// Where its health check goes now (for a server with `check`): set explicitly, since
        /// HAProxy may hold an address or port from the old line or an earlier change.
        check: Option<(String, u16)>,
        /// It tracks another server (`track`), whose state it takes: no `health` command.
        tracks: bool,
    },
    /// A parked server (see [`Parked`]) whose member came back with the same line: brought
    /// back at its address, as if added.
    Rejoin {
        /// Backend.
        backend: String,
        /// Server name.
        server: String,
        /// Address.
        addr: String,
        /// Port.
        port: u16,
        /// Where its health check goes (for a server with `check`).
        check: Option<(String, u16)>,
        /// Its keywords, as [`Change::Add`] has them.
        keywords: Vec<String>,
    },
}

impl Change {
    /// Whether it deletes a server.
    pub fn is_removal(&self) -> bool {
        matches!(self, Change::Remove { .. })
    }

    /// The backend and server it concerns.
    pub fn server(&self) -> (&str, &str) {
        match self {
            Change::Add {
                backend, server, ..
            }
            | Change::Remove {
                backend, server, ..
            }
            | Change::Readdress {
                backend, server, ..
            }
            | Change::Rejoin {
                backend, server, ..
            } => (backend, server),
        }
    }
}

/// The member changes that take `old` (the file HAProxy runs) to `new`, or why only a reload
/// can: what differs beyond the servers of existing backends.
pub fn diff(old: &Layout, new: &Layout) -> Result<Vec<Change>, String> {
    if let Some(line) = new.unreadable.first() {
        return Err(format!("`{line}` has no address:port haconfd can read"));
    }
    if old.skeleton != new.skeleton {
        let at = old
            .skeleton
            .iter()
            .zip(&new.skeleton)
            .position(|(a, b)| a != b)
            .unwrap_or(old.skeleton.len().min(new.skeleton.len()));
        let line = new.skeleton.get(at).or(old.skeleton.get(at));
        return Err(format!(
            "more than servers changed (`{}`)",
            line.map_or("", |l| l.trim())
        ));
    }
    let mut out = Vec::new();
    for ((backend, server), line) in &new.servers {
        let key = (backend.clone(), server.clone());
        let Some(before) = old.servers.get(&key) else {
            if line.addr.parse::<IpAddr>().is_err() {
                return Err(format!(
                    "server {backend}/{server}: {} is a host name (HAProxy resolves host names of added servers only at a reload)",
                    line.addr
                ));
            }
            out.push(Change::Add {
                backend: backend.clone(),
                server: server.clone(),
                address: join_addr(&line.addr, line.port),
                keywords: new.add_keywords(backend, line),
            });
            continue;
        };
        if before == line {
            continue;
        }
        if before.keywords_but_check_target() != line.keywords_but_check_target() {
            return Err(format!(
                "server {backend}/{server} changed more than its address"
            ));
        }
        let check = line.check_target();
        if [&line.addr, &check.0]
            .iter()
            .any(|a| a.parse::<IpAddr>().is_err())
        {
            return Err(format!(
                "server {backend}/{server}: {} is a host name (HAProxy resolves it only at a reload)",
                line.addr
            ));
        }
        out.push(Change::Readdress {
            backend: backend.clone(),
            server: server.clone(),
            addr: line.addr.clone(),
            port: line.port,
            check: line.keywords.iter().any(|k| k == "check").then_some(check),
            tracks: line.keywords.iter().any(|k| k == "track"),
        });
    }
    // Servers that track another go first: HAProxy deletes no server another one tracks.
    let mut gone: Vec<(&(String, String), &ServerLine)> = (old.servers.iter())
        .filter(|(key, _)| !new.servers.contains_key(*key))
        .collect();
    gone.sort_by_key(|(_, line)| !line.keywords.iter().any(|k| k == "track"));
    for ((backend, server), line) in gone {
        out.push(Change::Remove {
            backend: backend.clone(),
            server: server.clone(),
            v6: line.addr.contains(':'),
        });
    }
    Ok(out)
}

fn join_addr(addr: &str, port: u16) -> String {
    match addr.contains(':') {
        true => format!("[{addr}]:{port}"),
        false => format!("{addr}:{port}"),
    }
}

/// What the state rules say of a server a change concerns (see
/// [`super::server_state::Owners::rules_for`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// It must not take traffic before its checks pass (a replica in a primary backend, a
    /// server new to a replica backend).
    pub starts_down: bool,
    /// Its member is still in etcd: a removed server's sessions are not shut.
    pub in_etcd: bool,
}

/// A command and the answer that says HAProxy carried it out.
#[derive(Debug, Clone)]
struct Command {
    text: String,
    /// A text the answer contains; None: an empty answer.
    expect: Option<&'static [&'static str]>,
}

impl Command {
    fn quiet(text: String) -> Command {
        Command { text, expect: None }
    }

    fn answering(text: String, expect: &'static [&'static str]) -> Command {
        Command {
            text,
            expect: Some(expect),
        }
    }

    fn accepts(&self, answer: &str) -> bool {
        match self.expect {
            None => answer.trim().is_empty(),
            Some(texts) => texts.iter().any(|t| answer.contains(t)),
        }
    }
}

/// The commands of every change but the deletions, in order, then the deletions (each tried
/// until HAProxy has no connection left on the server). With `deletes` false (HAProxy before
/// 2.9), a removed server is parked: put in maintenance and left there, with no deletion.
fn commands(changes: &[(Change, Rules)], deletes: bool) -> (Vec<Command>, Vec<String>) {
    let mut cmds = Vec::new();
    let mut deletions = Vec::new();
    for (change, rules) in changes {
        let (backend, server) = change.server();
        let srv = format!("{backend}/{server}");
        match change {
            Change::Add {
                address, keywords, ..
            } => {
                let kws = keywords.join(" ");
                cmds.push(Command::answering(
                    format!("add server {srv} {address} {kws}")
                        .trim_end()
                        .to_owned(),
                    &["New server registered"],
                ));
                if keywords.iter().any(|k| k == "check") {
                    cmds.push(Command::quiet(format!("enable health {srv}")));
                }
                if keywords.iter().any(|k| k == "agent-check") {
                    cmds.push(Command::quiet(format!("enable agent {srv}")));
                }
                bring_in(&mut cmds, &srv, keywords, rules);
            }
            Change::Rejoin {
                addr,
                port,
                check,
                keywords,
                ..
            } => {
                readdress(&mut cmds, &srv, addr, *port, check);
                bring_in(&mut cmds, &srv, keywords, rules);
            }
            Change::Readdress {
                addr,
                port,
                check,
                tracks,
                ..
            } => {
                if rules.starts_down && !tracks {
                    cmds.push(Command::quiet(format!("set server {srv} health down")));
                }
                readdress(&mut cmds, &srv, addr, *port, check);
            }
            Change::Remove { v6, .. } => {
                cmds.push(Command::quiet(format!("set server {srv} state maint")));
                if !rules.in_etcd {
                    cmds.push(Command::quiet(format!("shutdown sessions server {srv}")));
                }
                if deletes {
                    deletions.push(srv);
                } else {
                    // Parked at the unspecified address: no state of it outlives the parking
                    // (a reload that brings its member back finds no saved line at its
                    // address, and starts it by the state rules, not in maintenance).
                    let nowhere = match v6 {
                        true => "::",
                        false => "0.0.0.0",
                    };
                    cmds.push(Command::answering(
                        format!("set server {srv} addr {nowhere}"),
                        &["changed", "no need to change"],
                    ));
                }
            }
        }
    }
    (cmds, deletions)
}

/// Takes a server in maintenance (just added, or parked) out of it as the state rules say.
fn bring_in(cmds: &mut Vec<Command>, srv: &str, keywords: &[String], rules: &Rules) {
    // `disabled` in the file: it stays in maintenance, as a reload would start it.
    if keywords.iter().any(|k| k == "disabled") {
        return;
    }
    // A server that tracks another takes that one's state (HAProxy refuses `health` on it).
    let tracks = keywords.iter().any(|k| k == "track");
    if rules.starts_down && !tracks {
        // Out of maintenance through drain (no new connection), DOWN, then ready: `enable
        // server` alone would make it UP at once.
        cmds.push(Command::quiet(format!("set server {srv} state drain")));
        cmds.push(Command::quiet(format!("set server {srv} health down")));
    }
    cmds.push(Command::quiet(format!("set server {srv} state ready")));
}

/// Moves a server to `addr:port`, its health check (if any) to `check`.
fn readdress(
    cmds: &mut Vec<Command>,
    srv: &str,
    addr: &str,
    port: u16,
    check: &Option<(String, u16)>,
) {
    cmds.push(Command::answering(
        format!("set server {srv} addr {addr} port {port}"),
        &["changed", "no need to change"],
    ));
    if let Some((a, p)) = check {
        cmds.push(Command::quiet(format!("set server {srv} check-addr {a}")));
        cmds.push(Command::quiet(format!("set server {srv} check-port {p}")));
    }
}

/// Sends `cmds` on one connection and checks each answer (HAProxy ends each with an empty
/// line). The first refused command, with HAProxy's answer, is the error.
async fn send(socket: &Path, cmds: &[Command]) -> Result<(), String> {
    if cmds.is_empty() {
        return Ok(());
    }
    let joined = cmds
        .iter()
        .map(|c| c.text.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let answer = super::cli(socket, &joined, ANSWER_TIMEOUT)
        .await
        .map_err(|e| format!("stats socket {}: {e}", socket.display()))?;
    let answers = super::split_answers(&answer);
    for (i, c) in cmds.iter().enumerate() {
        let a = answers.get(i).map(String::as_str).unwrap_or("");
        if !c.accepts(a) {
            return Err(format!("HAProxy refused `{}`: {}", c.text, a.trim()));
        }
    }
    Ok(())
}

/// Deletes `srv` (`backend/server`, in maintenance), trying again while HAProxy still has a
/// connection on it, up to [`DELETE_BOUND`].
async fn delete(socket: &Path, srv: &str) -> Result<(), String> {
    let started = Instant::now();
    let cmd = Command::answering(format!("del server {srv}"), &["Server deleted"]);
    loop {
        match send(socket, std::slice::from_ref(&cmd)).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() >= DELETE_BOUND => {
                return Err(format!("{e} (for {:?})", started.elapsed()))
            }
            Err(_) => tokio::time::sleep(DELETE_STEP).await,
        }
    }
}

/// Servers of the file's backends that HAProxy runs but the file does not name, in forced
/// maintenance: parked there by haconfd (see [`Parked`]).
pub type ParkedLive = BTreeSet<(String, String)>;

/// Whether the live servers of the file's backends are the file's, by name, address and port;
/// the first difference otherwise. A live server the file does not name is accepted in forced
/// maintenance only (parked), and returned.
fn matches(layout: &Layout, dump: &str) -> Result<ParkedLive, String> {
    // One line at a time, without a copy of its fields: a thousand clusters dump 6,000 lines.
    let mut seen = 0usize;
    let mut parked = ParkedLive::new();
    for line in dump.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 19 || !layout.defaults.contains_key(f[1]) {
            continue;
        }
        let Some(s) = layout.servers.get(&(f[1].to_owned(), f[3].to_owned())) else {
            let admin: u32 = f[6].parse().unwrap_or(0);
            if admin & super::runtime::admin::FMAINT != 0 {
                parked.insert((f[1].to_owned(), f[3].to_owned()));
                continue;
            }
            return Err(format!("server {}/{} is not in the file", f[1], f[3]));
        };
        seen += 1;
        let (addr, port) = (f[4], f[18].parse::<u16>().ok());
        if (addr != s.addr && f[17] != s.addr) || port != Some(s.port) {
            return Err(format!(
                "server {}/{} is at {addr}:{} (the file says {}:{})",
                f[1],
                f[3],
                port.unwrap_or(0),
                s.addr,
                s.port
            ));
        }
        if s.keywords.iter().any(|k| k == "check") && s.addr.parse::<IpAddr>().is_ok() {
            let live = live_check_target(&f);
            let want = s.check_target();
            if live != want {
                return Err(format!(
                    "server {}/{} is checked at {}:{} (the file says {}:{})",
                    f[1], f[3], live.0, live.1, want.0, want.1
                ));
            }
        }
    }
    if seen == layout.servers.len() {
        return Ok(parked);
    }
    let live: std::collections::HashSet<(&str, &str)> = dump
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 19)
        .map(|f| (f[1], f[3]))
        .collect();
    let missing = layout
        .servers
        .keys()
        .find(|(b, n)| !live.contains(&(b.as_str(), n.as_str())));
    match missing {
        Some((b, n)) => Err(format!("server {b}/{n} is missing")),
        None => Ok(parked),
    }
}

/// Where a live server's health check goes: `srv_check_addr` (`-`: the server's address) and
/// `srv_check_port` (0: the server's port), fields 23 and 22 of HAProxy 2.6's dump.
fn live_check_target(f: &[&str]) -> (String, u16) {
    let addr = match f.get(22) {
        Some(a) if *a != "-" => a,
        _ => f[4],
    };
    let port = match f.get(21).and_then(|p| p.parse::<u16>().ok()) {
        Some(p) if p != 0 => p,
        _ => f[18].parse().unwrap_or(0),
    };
    (addr.to_owned(), port)
}

/// The live server list of the backends `layout` declares, compared with it; the parked
/// servers (see [`matches`]). One `show servers state` of every backend: a command per backend
/// would not fit HAProxy's command line with a thousand clusters.
pub async fn verify(socket: &Path, layout: &Layout) -> Result<ParkedLive, String> {
    if layout.defaults.is_empty() {
        return Ok(ParkedLive::new());
    }
    let dump = super::cli(socket, "show servers state", ANSWER_TIMEOUT)
        .await
        .map_err(|e| format!("stats socket {}: {e}", socket.display()))?;
    if !dump.starts_with('1') {
        return Err(format!("`show servers state` answered {:?}", dump.trim()));
    }
    matches(layout, &dump)
}

/// Whether the HAProxy behind `socket` deletes servers safely: version 2.9 or later. Before,
/// `del server` can free a server that a stream still points at, and the worker crashes
/// (HAProxy issue #2323, fixed by "BUG/MEDIUM: server/cli: don't delete a dynamic server that
/// has streams" in 2.9-dev6; seen here with Debian 12's 2.6.12: a worker ended with SIGSEGV
/// after `del server` of a replica that had carried reads). False when the version cannot be
/// read.
pub async fn deletes_safely(socket: &Path) -> bool {
    let Ok(info) = super::cli(socket, "show info", ANSWER_TIMEOUT).await else {
        return false;
    };
    version_at_least(&info, (2, 9))
}

/// Whether `show info`'s `Version:` line is at least `want` (major, minor).
pub fn version_at_least(show_info: &str, want: (u32, u32)) -> bool {
    let Some(v) = show_info
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(str::trim)
    else {
        return false;
    };
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((major, minor), (Some(a), Some(b)) if (a, b) >= want)
}

/// The servers haconfd parked in maintenance instead of deleting them (HAProxy before 2.9,
/// whose `del server` can crash a worker), each with the line it had in the file. A parked
/// server is out of the file and takes no connection; the next reload drops it. A member that
/// comes back with the same line is brought back by address ([`Change::Rejoin`]); one parked by
/// an earlier run, or coming back with other keywords, needs a reload.
#[derive(Debug, Clone, Default)]
pub struct Parked(BTreeMap<(String, String), ServerLine>);

impl Parked {
    /// How many servers are parked.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `changes` as they are sent to a HAProxy that has `live` servers parked and `parked` known
/// to haconfd: a server added back where one is parked is a [`Change::Rejoin`], and each
/// removal parks its server unless HAProxy `deletes`. The parked servers afterwards, or why
/// only a reload can do it.
fn plan(
    old: &Layout,
    new: &Layout,
    changes: &[(Change, Rules)],
    parked: &Parked,
    live: &ParkedLive,
    deletes: bool,
) -> Result<(Vec<(Change, Rules)>, Parked), String> {
    let mut after: BTreeMap<_, _> = (parked.0.iter())
        .filter(|(k, _)| live.contains(*k))
        .map(|(k, l)| (k.clone(), l.clone()))
        .collect();
    let mut out = Vec::with_capacity(changes.len());
    for (change, rules) in changes {
        let (b, s) = change.server();
        let key = (b.to_owned(), s.to_owned());
        match change {
            Change::Add { keywords, .. } if live.contains(&key) => {
                let line = new
                    .servers
                    .get(&key)
                    .ok_or("an added server not in the file")?;
                match after.remove(&key) {
                    Some(was)
                        if was.keywords_but_check_target() == line.keywords_but_check_target() =>
                    {
                        let check = line.keywords.iter().any(|k| k == "check");
                        out.push((
                            Change::Rejoin {
                                backend: key.0,
                                server: key.1,
                                addr: line.addr.clone(),
                                port: line.port,
                                check: check.then(|| line.check_target()),
                                keywords: keywords.clone(),
                            },
                            *rules,
                        ));
                    }
                    Some(_) => {
                        return Err(format!(
                            "server {b}/{s} is parked in maintenance with other keywords than the file gives it now"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "server {b}/{s} is parked in maintenance by an earlier run, with a line haconfd does not know"
                        ))
                    }
                }
            }
            Change::Remove { .. } if !deletes => {
                if let Some(line) = old.servers.get(&key) {
                    after.insert(key, line.clone());
                }
                out.push((change.clone(), *rules));
            }
            _ => out.push((change.clone(), *rules)),
        }
    }
    // Parked servers of each backend, those of earlier runs included.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    let rejoined: BTreeSet<(&str, &str)> = out
        .iter()
        .filter(|(c, _)| matches!(c, Change::Rejoin { .. }))
        .map(|(c, _)| c.server())
        .collect();
    let keys = live.iter().chain(after.keys()).collect::<BTreeSet<_>>();
    for (b, s) in keys {
        if !rejoined.contains(&(b.as_str(), s.as_str())) {
            *per_backend.entry(b.as_str()).or_default() += 1;
        }
    }
    if let Some((b, n)) = per_backend.iter().find(|(_, n)| **n > PARK_LIMIT) {
        return Err(format!(
            "backend {b} would keep {n} servers parked in maintenance (at most {PARK_LIMIT}): a reload drops them"
        ));
    }
    Ok((out, Parked(after)))
}

/// Applies `changes` (from [`diff`] of `old` and `new`, each with its [`Rules`]) to the HAProxy
/// behind `socket`: first checks that it runs `old`'s servers, then sends the commands, then
/// checks that it runs `new`'s. A removed server is deleted when HAProxy `deletes` safely
/// (2.9 and later), else parked. Returns the servers parked afterwards (`parked` are those
/// haconfd parked before). Any refusal or difference is the error, and the caller reloads.
pub async fn apply(
    socket: &Path,
    old: &Layout,
    new: &Layout,
    changes: &[(Change, Rules)],
    parked: &Parked,
    deletes: bool,
) -> Result<Parked, String> {
    let live = verify(socket, old)
        .await
        .map_err(|e| format!("HAProxy does not run the file it was given: {e}"))?;
    let (changes, parked) = plan(old, new, changes, parked, &live, deletes)?;
    let (cmds, deletions) = commands(&changes, deletes);
    send(socket, &cmds).await?;
    for srv in &deletions {
        delete(socket, srv).await?;
    }
    let live = verify(socket, new)
        .await
        .map_err(|e| format!("after the runtime changes, {e}"))?;
    if let Some((b, s)) = parked.0.keys().find(|k| !live.contains(*k)) {
        return Err(format!(
            "after the runtime changes, server {b}/{s} is not parked in maintenance"
        ));
    }
    Ok(parked)
}

/// What `haconfd check` says of how member changes will reach the HAProxy of `ss` whose file
/// renders as `cfg`: the mechanism, and what in the file still needs a reload.
pub fn describe(ss: &ServerStateConfig, cfg: &str) -> String {
    if ss.membership == Membership::Reload {
        return "a reload for every change (server_state.membership = \"reload\")".to_owned();
    }
    let layout = Layout::parse(cfg);
    let mut reloads = Vec::new();
    let named: Vec<String> = (layout.servers.iter())
        .filter(|(_, s)| s.addr.parse::<IpAddr>().is_err())
        .map(|((b, n), s)| format!("{b}/{n} at {}", s.addr))
        .collect();
    if !named.is_empty() {
        reloads.push(format!(
            "a server at a host name ({}) is added or moved by a reload",
            named.join(", ")
        ));
    }
    for (backend, how) in static_backends(&layout) {
        reloads.push(format!(
            "backend {backend} balances with `{how}`, which takes no server at runtime: its changes reload"
        ));
    }
    let mut out = format!(
        "HAProxy's runtime API on {} (add server, set server addr, and del server from HAProxy 2.9 on: before, a server that leaves is parked in maintenance until the next reload; the live list checked with show servers state; a reload when more than servers change or HAProxy refuses)",
        ss.stats_socket.display()
    );
    for r in reloads {
        out.push_str("; ");
        out.push_str(&r);
    }
    out
}

/// Backends whose load-balancing algorithm is not dynamic (HAProxy 2.6 refuses `add server`
/// there): `static-rr`, and a hash without `hash-type consistent`.
fn static_backends(layout: &Layout) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    let (mut balance, mut consistent) = (None::<String>, false);
    let (mut default_balance, mut default_consistent) = (None::<String>, false);
    let mut close = |section: &Option<String>, balance: &Option<String>, consistent: bool| {
        if let (Some(b), Some(how)) = (section, balance) {
            let hashed = !matches!(
                how.split_whitespace().next(),
                Some("roundrobin" | "leastconn" | "first" | "random")
            );
            if how.starts_with("static-rr") || (hashed && !consistent) {
                out.push((b.clone(), format!("balance {how}")));
            }
        }
    };
    for line in &layout.skeleton {
        let t = line.trim();
        if !line.starts_with(char::is_whitespace) && !t.is_empty() && !t.starts_with('#') {
            close(&section, &balance, consistent);
            let mut words = t.split_whitespace();
            let first = words.next().unwrap_or_default();
            section = matches!(first, "listen" | "backend")
                .then(|| words.next().map(str::to_owned))
                .flatten();
            if first == "defaults" {
                (default_balance, default_consistent) = (None, false);
            }
            (balance, consistent) = (default_balance.clone(), default_consistent);
            continue;
        }
        let in_defaults = section.is_none();
        if let Some(how) = t.strip_prefix("balance ") {
            balance = Some(how.trim().to_owned());
            if in_defaults {
                default_balance = balance.clone();
            }
        } else if t.starts_with("hash-type ") {
            consistent = t.contains("consistent");
            if in_defaults {
                default_consistent = consistent;
            }
        }
    }
    close(&section, &balance, consistent);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_mechanism_and_what_still_reloads() {
        let ss = super::super::server_state::test_config();
        let text = describe(&ss, OLD);
        assert!(text.starts_with("HAProxy's runtime API on /s"), "{text}");
        assert!(
            !text.contains("host name") && !text.contains("balances"),
            "{text}"
        );
        let odd = OLD.replace("server pg2 127.0.0.1:5442 check", "server pg2 db2.example:5442 check")
            + "backend b\n    balance static-rr\nbackend c\n    balance source\nbackend d\n    balance source\n    hash-type consistent\n";
        let text = describe(&ss, &odd);
        assert!(text.contains("replicas/pg2 at db2.example"), "{text}");
        assert!(
            text.contains("backend b balances with `balance static-rr`"),
            "{text}"
        );
        assert!(text.contains("backend c balances"), "{text}");
        assert!(!text.contains("backend d"), "{text}");
        let reload = ServerStateConfig {
            membership: Membership::Reload,
            ..ss
        };
        assert!(describe(&reload, OLD).starts_with("a reload for every change"));
    }

    const OLD: &str = "global\n    stats socket /s level admin\ndefaults\n    mode tcp\n    default-server inter 3s\nlisten primary\n    bind *:5000\n    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions init-addr last,libc,none\n    server pg1 127.0.0.1:5441 maxconn 100 check port 8011\n    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\nlisten replicas\n    bind *:5001\n    server pg1 127.0.0.1:5441 check port 8011\n    server pg2 127.0.0.1:5442 check port 8012\n";

    fn changes(old: &str, new: &str) -> Result<Vec<Change>, String> {
        diff(&Layout::parse(old), &Layout::parse(new))
    }

    #[test]
    fn a_joining_member_is_added_with_the_default_server_keywords_a_dynamic_server_takes() {
        let new = OLD.replace(
            "    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\n",
            "    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\n    server pg3 127.0.0.1:5443 maxconn 100 check port 8013\n",
        );
        let c = changes(OLD, &new).unwrap();
        assert_eq!(
            c,
            vec![Change::Add {
                backend: "primary".into(),
                server: "pg3".into(),
                address: "127.0.0.1:5443".into(),
                keywords: "inter 3s inter 1s fall 2 rise 2 on-marked-down shutdown-sessions maxconn 100 check port 8013"
                    .split(' ')
                    .map(str::to_owned)
                    .collect(),
            }]
        );
        let (cmds, dels) = commands(
            &[(
                c[0].clone(),
                Rules {
                    starts_down: true,
                    in_etcd: true,
                },
            )],
            true,
        );
        let texts: Vec<_> = cmds.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts[1..],
            [
                "enable health primary/pg3",
                "set server primary/pg3 state drain",
                "set server primary/pg3 health down",
                "set server primary/pg3 state ready"
            ]
        );
        assert!(dels.is_empty());
    }

    #[test]
    fn a_leaving_member_is_shut_and_deleted_only_once_gone_from_etcd() {
        let new = OLD.replace("    server pg2 127.0.0.1:5442 check port 8012\n", "");
        let c = changes(OLD, &new).unwrap();
        assert_eq!(
            c,
            vec![Change::Remove {
                backend: "replicas".into(),
                server: "pg2".into(),
                v6: false,
            }]
        );
        for (in_etcd, shut) in [(true, false), (false, true)] {
            let rules = Rules {
                starts_down: false,
                in_etcd,
            };
            let (cmds, dels) = commands(&[(c[0].clone(), rules)], true);
            assert_eq!(cmds[0].text, "set server replicas/pg2 state maint");
            assert_eq!(
                cmds.iter().any(|c| c.text.starts_with("shutdown sessions")),
                shut
            );
            assert_eq!(dels, ["replicas/pg2"]);
            // Before HAProxy 2.9: parked, no deletion, and moved to the unspecified address
            // (no saved state of it outlives the parking).
            let (parked, dels) = commands(&[(c[0].clone(), rules)], false);
            let texts = |c: &[Command]| c.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
            let mut want = texts(&cmds);
            want.push("set server replicas/pg2 addr 0.0.0.0".into());
            assert_eq!(texts(&parked), want);
            assert!(dels.is_empty());
        }
    }

    /// A parked server whose member comes back with the same line is brought back by address
    /// (no `add server`: the name is taken); with other keywords, or parked by an earlier run,
    /// only a reload can; and a backend keeps at most [`PARK_LIMIT`] parked.
    #[test]
    fn a_parked_server_rejoins_by_address_only_with_the_line_it_had() {
        let without = OLD.replace("    server pg2 127.0.0.1:5442 check port 8012\n", "");
        let (old, gone) = (Layout::parse(OLD), Layout::parse(&without));
        let leave = diff(&old, &gone).unwrap();
        let rules = |c: Vec<Change>| {
            c.into_iter()
                .map(|c| (c, Rules::default()))
                .collect::<Vec<_>>()
        };
        let none = ParkedLive::new();
        let (_, parked) = plan(
            &old,
            &gone,
            &rules(leave.clone()),
            &Parked::default(),
            &none,
            false,
        )
        .unwrap();
        assert_eq!(parked.len(), 1);
        // Deleted (2.9 and later): nothing parked.
        let (_, kept) = plan(&old, &gone, &rules(leave), &Parked::default(), &none, true).unwrap();
        assert!(kept.is_empty());

        let live = ParkedLive::from([("replicas".into(), "pg2".into())]);
        let back = OLD.replace(
            "server pg2 127.0.0.1:5442 check port 8012",
            "server pg2 127.0.0.7:5442 check port 8012",
        );
        let back = Layout::parse(&back);
        let join = rules(diff(&gone, &back).unwrap());
        let (sent, after) = plan(&gone, &back, &join, &parked, &live, false).unwrap();
        assert!(after.is_empty());
        let (cmds, dels) = commands(&sent, false);
        let texts: Vec<_> = cmds.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "set server replicas/pg2 addr 127.0.0.7 port 5442",
                "set server replicas/pg2 check-addr 127.0.0.7",
                "set server replicas/pg2 check-port 8012",
                "set server replicas/pg2 state ready"
            ]
        );
        assert!(dels.is_empty());

        // Parked by an earlier run (haconfd does not know its line), or back with other keywords.
        let err = plan(&gone, &back, &join, &Parked::default(), &live, false).unwrap_err();
        assert!(
            err.contains("replicas/pg2 is parked in maintenance by an earlier run"),
            "{err}"
        );
        let other = Layout::parse(&OLD.replace(
            "server pg2 127.0.0.1:5442 check port 8012",
            "server pg2 127.0.0.1:5442 check port 8012 weight 5",
        ));
        let join = rules(diff(&gone, &other).unwrap());
        let err = plan(&gone, &other, &join, &parked, &live, false).unwrap_err();
        assert!(err.contains("with other keywords"), "{err}");

        // The limit: a backend that already keeps PARK_LIMIT servers parked reloads instead.
        let full: ParkedLive = (0..PARK_LIMIT)
            .map(|i| ("replicas".to_owned(), format!("old{i}")))
            .collect();
        let leave = rules(diff(&old, &gone).unwrap());
        let err = plan(&old, &gone, &leave, &Parked::default(), &full, false).unwrap_err();
        assert!(
            err.contains(&format!(
                "backend replicas would keep {} servers parked",
                PARK_LIMIT + 1
            )),
            "{err}"
        );
    }

    #[test]
    fn servers_are_deleted_at_runtime_from_haproxy_2_9_on() {
        assert!(!version_at_least(
            "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\n",
            (2, 9)
        ));
        assert!(!version_at_least("Version: 2.8.5-aaba8d0\n", (2, 9)));
        assert!(version_at_least("Version: 2.9.0\n", (2, 9)));
        assert!(version_at_least("Version: 3.0.1-1\n", (2, 9)));
        assert!(!version_at_least("no version here", (2, 9)));
    }

    #[test]
    fn a_server_that_tracks_a_leaving_one_is_deleted_first() {
        let old = OLD.to_owned()
            + "    server pg2-primary 127.0.0.1:5442 maxconn 100 backup track primary/pg2\n";
        let new = OLD
            .replace(
                "    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\n",
                "",
            )
            .replace("    server pg2 127.0.0.1:5442 check port 8012\n", "");
        let c = changes(&old, &new).unwrap();
        let order: Vec<_> = c.iter().map(|c| c.server()).collect();
        assert_eq!(
            order,
            [
                ("replicas", "pg2-primary"),
                ("primary", "pg2"),
                ("replicas", "pg2")
            ]
        );
    }

    #[test]
    fn a_moved_member_is_readdressed_with_its_check() {
        let new = OLD.replace(
            "    server pg2 127.0.0.1:5442 check port 8012\n",
            "    server pg2 127.0.0.2:5442 check addr 127.0.0.3 port 8012\n",
        );
        let c = changes(OLD, &new).unwrap();
        assert_eq!(
            c,
            vec![Change::Readdress {
                backend: "replicas".into(),
                server: "pg2".into(),
                addr: "127.0.0.2".into(),
                port: 5442,
                check: Some(("127.0.0.3".into(), 8012)),
                tracks: false,
            }]
        );
        // The REST API stays where the server was: the check must not follow the server to its
        // new address (HAProxy's checks go to the server's address when no check address is
        // set).
        let new = OLD.replace(
            "    server pg2 127.0.0.1:5442 check port 8012\n",
            "    server pg2 127.0.0.2:5442 check addr 127.0.0.1 port 8012\n",
        );
        let c = changes(OLD, &new).unwrap();
        let (cmds, _) = commands(&[(c[0].clone(), Rules::default())], true);
        let texts: Vec<_> = cmds.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "set server replicas/pg2 addr 127.0.0.2 port 5442",
                "set server replicas/pg2 check-addr 127.0.0.1",
                "set server replicas/pg2 check-port 8012"
            ]
        );
    }

    #[test]
    fn anything_but_servers_of_existing_backends_is_for_a_reload() {
        let cases = [
            OLD.replace("bind *:5001", "bind *:5002"),
            OLD.to_owned() + "listen other\n    bind *:6000\n    server x 127.0.0.1:1 check\n",
            OLD.replace("127.0.0.1:5442 check port 8012", "127.0.0.1:5442 check port 8012 backup"),
            OLD.replace(
                "    server pg2 127.0.0.1:5442 check port 8012\n",
                "    server pg2 127.0.0.1:5442 check port 8012\n    server pg3 db3.example:5443 check\n",
            ),
            OLD.replace("server pg2 127.0.0.1:5442 check", "server pg2 db2.example:5442 check"),
            OLD.replace("server pg2 127.0.0.1:5442 check", "server pg2 /run/pg.sock check"),
        ];
        for new in cases {
            assert!(changes(OLD, &new).is_err(), "{new}");
        }
        assert_eq!(changes(OLD, OLD), Ok(vec![]));
    }

    #[test]
    fn the_live_list_matches_by_name_address_port_and_check() {
        let layout = Layout::parse(OLD);
        let line = |b: &str, s: &str, a: &str, p: u16, check: u16| {
            format!("3 {b} 1 {s} {a} 2 0 1 1 20 15 3 4 6 0 0 0 - {p} - 0 {check} - - 0\n")
        };
        let good = line("primary", "pg1", "127.0.0.1", 5441, 8011)
            + &line("primary", "pg2", "127.0.0.1", 5442, 8012)
            + &line("replicas", "pg1", "127.0.0.1", 5441, 8011)
            + &line("replicas", "pg2", "127.0.0.1", 5442, 8012)
            + &line("stats", "x", "127.0.0.1", 1, 0);
        assert_eq!(matches(&layout, &good), Ok(ParkedLive::new()));
        let missing = good.replace(&line("replicas", "pg2", "127.0.0.1", 5442, 8012), "");
        assert!(matches(&layout, &missing)
            .unwrap_err()
            .contains("replicas/pg2 is missing"));
        let moved = good.replace(" 5442 - 0", " 6442 - 0");
        assert!(matches(&layout, &moved).is_err());
        let extra = good.clone() + &line("replicas", "pg9", "127.0.0.9", 5449, 0);
        assert!(matches(&layout, &extra).unwrap_err().contains("pg9"));
        // A server the file does not name, in forced maintenance: parked, accepted.
        let parked = good.clone()
            + "3 replicas 9 pg9 127.0.0.9 0 1 1 1 20 15 3 4 6 0 0 0 - 5449 - 0 0 - - 0\n";
        assert_eq!(
            matches(&layout, &parked),
            Ok(ParkedLive::from([("replicas".into(), "pg9".into())]))
        );
        // Checked elsewhere than the file says.
        let checked = good.replace(
            &line("replicas", "pg2", "127.0.0.1", 5442, 8012),
            "3 replicas 1 pg2 127.0.0.1 2 0 1 1 20 15 3 4 6 0 0 0 - 5442 - 0 8013 127.0.0.9 - 0\n",
        );
        assert!(matches(&layout, &checked)
            .unwrap_err()
            .contains("checked at 127.0.0.9:8013"));
    }

    #[test]
    fn answers_are_split_per_command() {
        let a = "New server registered.\n\n\n\nServer deleted.\n\n";
        assert_eq!(
            super::super::split_answers(a),
            ["New server registered.", "", "", "Server deleted."]
        );
    }
}
