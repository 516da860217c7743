//! What people see of a running haconfd, built from `/status`: per cluster the leader, each
//! member with its role, state and HAProxy's live state of it, what the fast path holds (fences,
//! pauses, a leader change under way) and the last failover's timeline. `haconfd status` prints
//! it as a table ([`Overview::table`]) or JSON; the HTTP endpoint serves it as a self-contained
//! page at `/` ([`Overview::html`]). [`fetch`] reads a running haconfd's `/status`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

/// The whole view.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// haconfd's version (`0.1.0 (git revision)`).
    pub version: Option<String>,
    /// What `/readyz` says: etcd reachable, the watch current, the last pass good.
    pub ready: bool,
    /// The etcd watch is established and current.
    pub etcd_connected: bool,
    /// The last etcd error while disconnected.
    pub etcd_error: Option<String>,
    /// The revision of the view.
    pub revision: i64,
    /// Passes run, and failed.
    pub passes: u64,
    /// Passes failed.
    pub failed_passes: u64,
    /// The last pass's error, if it failed.
    pub last_error: Option<String>,
    /// Seconds since the last successful pass.
    pub last_success_age_s: Option<f64>,
    /// Every cluster (each Citus group).
    pub clusters: Vec<ClusterOverview>,
}

/// One cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterOverview {
    /// `scope`, or `scope/group` for a Citus group.
    pub name: String,
    /// The leader etcd shows.
    pub leader: Option<String>,
    /// Why the guard refused its last view, if it did.
    pub refused: Option<String>,
    /// Its members, by name.
    pub members: Vec<MemberOverview>,
    /// HAProxy targets whose stats socket did not answer, with why.
    pub haproxy_errors: Vec<String>,
    /// Fences in force: servers haconfd drained in the primary backends.
    pub fences: Vec<FenceOverview>,
    /// PgBouncer pauses in progress.
    pub pauses: Vec<PauseOverview>,
    /// The crash hold in force, in a line: the dead primary, what the probes saw, how long, and
    /// when its bound releases it.
    pub crash_hold: Option<String>,
    /// Seconds since a leader change began, while one is under way.
    pub change_under_way_s: Option<f64>,
    /// Runtime-API moves refused since start, and the last one.
    pub moves_refused: u64,
    /// The last refused move.
    pub last_refused: Option<String>,
    /// The last leader change as the fast path handled it.
    pub last_failover: Option<FailoverOverview>,
}

/// One member.
#[derive(Debug, Clone, Serialize)]
pub struct MemberOverview {
    /// Patroni's name.
    pub name: String,
    /// Role (`primary`, `replica`, ...).
    pub role: String,
    /// State (`running`, `streaming`, ...).
    pub state: String,
    /// PostgreSQL's `host:port`.
    pub address: String,
    /// Bytes behind the leader.
    pub lag: Option<u64>,
    /// Holds the leader key.
    pub leader: bool,
    /// HAProxy's live state of this member in each backend, where haconfd knows it.
    pub haproxy: Vec<HaproxyState>,
}

/// A member's server in one HAProxy backend.
#[derive(Debug, Clone, Serialize)]
pub struct HaproxyState {
    /// The HAProxy target (shown when there are several).
    pub target: String,
    /// The backend.
    pub backend: String,
    /// `UP`, `DOWN`, `STARTING`, `STOPPING`.
    pub state: String,
    /// `drain` or `maint`, when set.
    pub admin: Option<String>,
}

/// A fence in force.
#[derive(Debug, Clone, Serialize)]
pub struct FenceOverview {
    /// The drained server.
    pub server: String,
    /// Why.
    pub why: String,
    /// Seconds it has lasted.
    pub for_s: f64,
    /// Seconds until its bound lifts it.
    pub lifted_in_s: f64,
}

/// A PgBouncer pause in progress.
#[derive(Debug, Clone, Serialize)]
pub struct PauseOverview {
    /// The PgBouncer target.
    pub target: String,
    /// The database paused, when only one is.
    pub database: Option<String>,
    /// `checking`, `pausing`, `paused`, `session`, `failed`, `resuming`.
    pub stage: String,
    /// Why it began.
    pub why: String,
    /// Seconds since it began.
    pub for_s: f64,
}

/// The last failover's timeline, in milliseconds after the pass that saw the new leader key.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverOverview {
    /// The leader before.
    pub old: Option<String>,
    /// The new leader.
    pub new: String,
    /// When the new leader key was seen (RFC 3339, UTC).
    pub at: String,
    /// When the old leader was fenced (the switchover request), negative: before the key.
    pub fence_ms: Option<f64>,
    /// When the new leader was confirmed to take writes.
    pub confirm_ms: Option<f64>,
    /// What confirmed it: `rest` or `member key`.
    pub confirmed_by: Option<String>,
    /// When HAProxy took the move.
    pub haproxy_ms: Option<f64>,
    /// When PgBouncer was re-pointed and resumed.
    pub pgbouncer_ms: Option<f64>,
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn list<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Unix seconds as RFC 3339 in UTC, to the millisecond.
fn rfc3339(at: f64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs_f64(at.max(0.0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl Overview {
    /// The view of a `/status` document (an older haconfd's too: what it lacks is left out).
    pub fn from_status(st: &Value) -> Overview {
        let clusters = list(st, "clusters")
            .iter()
            .map(|c| cluster(c, st))
            .collect();
        let etcd_connected = st
            .get("etcd_connected")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let last_ok = st.get("last_pass_ok").and_then(Value::as_bool);
        Overview {
            version: s(st, "version").filter(|v| !v.is_empty()),
            ready: etcd_connected && last_ok == Some(true),
            etcd_connected,
            etcd_error: s(st, "etcd_error"),
            revision: st.get("revision").and_then(Value::as_i64).unwrap_or(0),
            passes: u(st, "passes"),
            failed_passes: u(st, "failed_passes"),
            last_error: s(st, "last_error"),
            last_success_age_s: f(st, "last_success_age_seconds"),
            clusters,
        }
    }

    /// The view of this process's own status (the page at `/`).
    pub fn from(st: &crate::status::Status) -> Overview {
        Overview::from_status(&serde_json::to_value(st).unwrap_or(Value::Null))
    }

    /// The first line: version, readiness, etcd, passes.
    fn headline(&self) -> (String, String) {
        let ready = if self.ready {
            "ready".to_owned()
        } else if !self.etcd_connected {
            format!(
                "NOT READY: etcd not reachable ({})",
                self.etcd_error.as_deref().unwrap_or("connecting")
            )
        } else {
            match &self.last_error {
                Some(e) => format!(
                    "NOT READY: last pass failed: {}",
                    e.lines().next().unwrap_or("")
                ),
                None => "NOT READY: no pass yet".to_owned(),
            }
        };
        let mut etc = format!(
            "etcd {} at revision {}; passes: {} ({} failed)",
            if self.etcd_connected {
                "connected"
            } else {
                "disconnected"
            },
            self.revision,
            self.passes,
            self.failed_passes
        );
        if let Some(a) = self.last_success_age_s {
            let _ = write!(etc, ", last good {} ago", secs(a));
        }
        (ready, etc)
    }

    /// The table for people.
    pub fn table(&self, from: &str) -> String {
        let mut out = String::new();
        let (ready, etc) = self.headline();
        let _ = writeln!(
            out,
            "haconfd {} at {from}: {ready}",
            self.version.as_deref().unwrap_or("(version unknown)")
        );
        let _ = writeln!(out, "{etc}");
        if self.clusters.is_empty() {
            let _ = writeln!(out, "\nno cluster seen yet");
        }
        for c in &self.clusters {
            let _ = writeln!(
                out,
                "\ncluster {}: leader {}{}",
                c.name,
                c.leader.as_deref().unwrap_or("NONE"),
                c.refused
                    .as_ref()
                    .map(|r| format!(" (view refused by the guard: {r})"))
                    .unwrap_or_default()
            );
            let several = c.several_haproxy();
            let mut rows = vec![[
                "MEMBER".to_owned(),
                "ROLE".to_owned(),
                "STATE".to_owned(),
                "ADDRESS".to_owned(),
                "LAG".to_owned(),
                "HAPROXY".to_owned(),
            ]];
            for m in &c.members {
                rows.push([
                    format!("{}{}", m.name, if m.leader { " *" } else { "" }),
                    m.role.clone(),
                    m.state.clone(),
                    m.address.clone(),
                    m.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    m.haproxy_text(several),
                ]);
            }
            let widths: Vec<usize> = (0..6)
                .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                .collect();
            for r in &rows {
                let mut line = String::from("  ");
                for (i, cell) in r.iter().enumerate() {
                    if i == 5 {
                        line.push_str(cell);
                    } else {
                        let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
                    }
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
            for e in &c.haproxy_errors {
                let _ = writeln!(out, "  HAProxy not read: {e}");
            }
            for l in c.in_progress() {
                let _ = writeln!(out, "  {l}");
            }
            let _ = writeln!(out, "  last failover: {}", c.failover_text());
        }
        out
    }

    /// A self-contained page (no script, no external asset), every value escaped.
    /// `refresh`: seconds between reloads of the page, if any.
    pub fn html(&self, refresh: Option<u32>) -> String {
        let (ready, etc) = self.headline();
        let title = match self.clusters.as_slice() {
            [c] => format!(
                "haconfd: {} leader {}",
                c.name,
                c.leader.as_deref().unwrap_or("none")
            ),
            _ => "haconfd".to_owned(),
        };
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        if let Some(r) = refresh {
            let _ = writeln!(h, "<meta http-equiv=\"refresh\" content=\"{r}\">");
        }
        let _ = writeln!(
            h,
            "<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
            esc(&title)
        );
        let _ = writeln!(
            h,
            "<header><h1>haconfd <small>{}</small></h1>\n<p id=\"ready\" class=\"{}\">{}</p>\n<p>{}</p></header>",
            esc(self.version.as_deref().unwrap_or("")),
            if self.ready { "ok" } else { "bad" },
            esc(&ready),
            esc(&etc)
        );
        if self.clusters.is_empty() {
            h.push_str("<p>No cluster seen yet.</p>\n");
        }
        for c in &self.clusters {
            let several = c.several_haproxy();
            let _ = writeln!(
                h,
                "<section class=\"cluster\" data-cluster=\"{n}\" data-leader=\"{l}\">\n<h2>{n} <span class=\"leader\">leader <b class=\"{cls}\">{lt}</b></span></h2>",
                n = esc(&c.name),
                l = esc(c.leader.as_deref().unwrap_or("")),
                cls = if c.leader.is_some() { "ok" } else { "bad" },
                lt = esc(c.leader.as_deref().unwrap_or("none"))
            );
            if let Some(r) = &c.refused {
                let _ = writeln!(
                    h,
                    "<p class=\"bad\">View refused by the guard: {}</p>",
                    esc(r)
                );
            }
            h.push_str("<table class=\"members\">\n<thead><tr><th>Member</th><th>Role</th><th>State</th><th>Address</th><th>Lag</th><th>HAProxy</th></tr></thead>\n<tbody>\n");
            for m in &c.members {
                let _ = writeln!(
                    h,
                    "<tr data-member=\"{n}\"{lead}><td>{n}{star}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&m.role),
                    esc(&m.state),
                    esc(&m.address),
                    m.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    esc(&m.haproxy_text(several)),
                    n = esc(&m.name),
                    lead = if m.leader { " class=\"is-leader\"" } else { "" },
                    star = if m.leader { " &#9733;" } else { "" },
                );
            }
            h.push_str("</tbody>\n</table>\n");
            for e in &c.haproxy_errors {
                let _ = writeln!(h, "<p class=\"bad\">HAProxy not read: {}</p>", esc(e));
            }
            h.push_str("<ul class=\"in-progress\">\n");
            for l in c.in_progress() {
                let _ = writeln!(h, "<li>{}</li>", esc(&l));
            }
            h.push_str("</ul>\n");
            let _ = writeln!(
                h,
                "<p class=\"failover\">Last failover: {}</p>\n</section>",
                esc(&c.failover_text())
            );
        }
        let _ = writeln!(
            h,
            "<footer>Generated {}. Read-only; the same data as <code>haconfd status</code>; JSON at <a href=\"/status\">/status</a>, metrics at <a href=\"/metrics\">/metrics</a>.</footer>\n</body>\n</html>",
            esc(&humantime::format_rfc3339_seconds(SystemTime::now()).to_string())
        );
        h
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
h1 small{font-weight:normal;font-size:55%;color:#666}\
table{border-collapse:collapse;margin:.5em 0}\
th,td{border-bottom:1px solid #ddd;padding:.25em .8em;text-align:left}\
th{background:#f3f3f3}\
tr.is-leader td{font-weight:bold}\
.ok{color:#17692a}.bad{color:#b00020;font-weight:bold}\
section{margin-top:1.5em}\
footer{margin-top:2em;color:#666;font-size:90%}";

/// HTML escaping for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn secs(x: f64) -> String {
    format!("{x:.1} s")
}

fn ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v < 0.0 => format!("{v:.0} ms"),
        Some(v) => format!("+{v:.0} ms"),
        None => "-".to_owned(),
    }
}

fn cluster(c: &Value, st: &Value) -> ClusterOverview {
    let scope = s(c, "scope").unwrap_or_default();
    let name = match c.get("group").and_then(Value::as_u64) {
        Some(g) => format!("{scope}/{g}"),
        None => scope,
    };
    // An older haconfd lists members only in the single cluster's model.
    let members: Vec<Value> = match c.get("member_list").and_then(Value::as_array) {
        Some(l) => l.clone(),
        None => st
            .get("cluster")
            .map(|m| list(m, "members").to_vec())
            .unwrap_or_default(),
    };
    let (haproxy_errors, states) = haproxy_states(c);
    let leader = s(c, "leader");
    let members = members
        .iter()
        .map(|m| member(m, leader.as_deref(), &states))
        .collect();
    let fp = c.get("fast_path").unwrap_or(&Value::Null);
    ClusterOverview {
        name,
        leader,
        refused: s(c, "refused"),
        members,
        haproxy_errors,
        fences: list(fp, "fences")
            .iter()
            .map(|x| FenceOverview {
                server: s(x, "server").unwrap_or_default(),
                why: s(x, "why").unwrap_or_default(),
                for_s: f(x, "for_s").unwrap_or(0.0),
                lifted_in_s: f(x, "lifted_in_s").unwrap_or(0.0),
            })
            .collect(),
        pauses: list(fp, "pauses")
            .iter()
            .map(|x| PauseOverview {
                target: s(x, "target").unwrap_or_default(),
                database: s(x, "database"),
                stage: s(x, "stage").unwrap_or_default(),
                why: s(x, "why").unwrap_or_default(),
                for_s: f(x, "for_s").unwrap_or(0.0),
            })
            .collect(),
        crash_hold: fp.get("crash_hold").filter(|h| h.is_object()).map(|h| {
            format!(
                "{} is down ({}), its clients held for {}, released in {} at the latest",
                s(h, "server").unwrap_or_default(),
                s(h, "why").unwrap_or_default(),
                secs(f(h, "for_s").unwrap_or(0.0)),
                secs(f(h, "released_in_s").unwrap_or(0.0)),
            )
        }),
        change_under_way_s: f(fp, "change_under_way_s"),
        moves_refused: u(fp, "moves_refused"),
        last_refused: s(fp, "last_refused"),
        last_failover: c
            .get("last_failover")
            .filter(|t| t.is_object())
            .map(|t| FailoverOverview {
                old: s(t, "old"),
                new: s(t, "new").unwrap_or_default(),
                at: rfc3339(f(t, "leader_key_at").unwrap_or(0.0)),
                fence_ms: f(t, "switchover_requested_ms_before").map(|x| -x),
                confirm_ms: f(t, "confirmed_after_ms"),
                confirmed_by: s(t, "confirmed_by"),
                haproxy_ms: f(t, "haproxy_after_ms"),
                pgbouncer_ms: f(t, "pgbouncer_after_ms"),
            }),
    }
}

/// HAProxy's live state of each server, by server name, from a cluster's `haproxy` list; with
/// the errors of the sockets that did not answer.
fn haproxy_states(c: &Value) -> (Vec<String>, Vec<(String, HaproxyState)>) {
    let mut errors = Vec::new();
    let mut states = Vec::new();
    for h in list(c, "haproxy") {
        let target = s(h, "target").unwrap_or_default();
        if let Some(e) = s(h, "error") {
            errors.push(format!("{target}: {e}"));
        }
        for sv in list(h, "servers") {
            let state = HaproxyState {
                target: target.clone(),
                backend: s(sv, "backend").unwrap_or_default(),
                state: s(sv, "state").unwrap_or_default(),
                admin: s(sv, "admin"),
            };
            states.push((s(sv, "server").unwrap_or_default(), state));
        }
    }
    (errors, states)
}

/// One member line from `/status`'s `member_list`.
fn member(m: &Value, leader: Option<&str>, states: &[(String, HaproxyState)]) -> MemberOverview {
    let name = s(m, "name").unwrap_or_default();
    MemberOverview {
        address: format!(
            "{}:{}",
            s(m, "host").unwrap_or_default(),
            m.get("port").and_then(Value::as_u64).unwrap_or(0)
        ),
        role: s(m, "role").unwrap_or_default(),
        state: s(m, "state").unwrap_or_default(),
        lag: m.get("lag").and_then(Value::as_u64),
        leader: leader == Some(name.as_str()),
        haproxy: states
            .iter()
            .filter(|(server, _)| *server == name)
            .map(|(_, st)| st.clone())
            .collect(),
        name,
    }
}

impl MemberOverview {
    /// `primary UP, replicas DOWN` (each backend prefixed with its target when there are
    /// several HAProxy targets); `-` when haconfd does not know.
    pub fn haproxy_text(&self, with_target: bool) -> String {
        if self.haproxy.is_empty() {
            return "-".to_owned();
        }
        self.haproxy
            .iter()
            .map(|h| {
                let mut t = String::new();
                if with_target {
                    let _ = write!(t, "{}/", h.target);
                }
                let _ = write!(t, "{} {}", h.backend, h.state);
                match h.admin.as_deref() {
                    Some("drain") => t.push_str(" (drained)"),
                    Some(a) => {
                        let _ = write!(t, " ({a})");
                    }
                    None => {}
                }
                t
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ClusterOverview {
    fn several_haproxy(&self) -> bool {
        let mut targets: Vec<&str> = self
            .members
            .iter()
            .flat_map(|m| m.haproxy.iter().map(|h| h.target.as_str()))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        targets.len() > 1
    }

    /// What the fast path holds now, one line each (or one line saying nothing is held).
    pub fn in_progress(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(h) = &self.crash_hold {
            v.push(format!("crash hold: {h}"));
        }
        for x in &self.fences {
            v.push(format!(
                "fence: {} drained ({}) for {}, lifted in {} at the latest",
                x.server,
                x.why,
                secs(x.for_s),
                secs(x.lifted_in_s)
            ));
        }
        for p in &self.pauses {
            v.push(format!(
                "pause: PgBouncer {}{} {} ({}) for {}",
                p.target,
                p.database
                    .as_ref()
                    .map(|d| format!(" database {d}"))
                    .unwrap_or_default(),
                p.stage,
                p.why,
                secs(p.for_s)
            ));
        }
        if let Some(t) = self.change_under_way_s {
            v.push(format!(
                "hold: a leader change under way for {} (HAProxy's reloads wait; hold.lua, where configured, holds new connections to the primary port)",
                secs(t)
            ));
        }
        if v.is_empty() {
            v.push("in progress: nothing (no fence, pause or leader change)".to_owned());
        }
        if self.moves_refused > 0 {
            v.push(format!(
                "moves refused since start: {} (last: {})",
                self.moves_refused,
                self.last_refused.as_deref().unwrap_or("-")
            ));
        }
        v
    }

    /// The last failover's timeline in one line.
    pub fn failover_text(&self) -> String {
        match &self.last_failover {
            None => "none since start".to_owned(),
            Some(t) => format!(
                "{} -> {} at {}: fence {}, confirm {}{}, HAProxy {}, PgBouncer {}",
                t.old.as_deref().unwrap_or("(none)"),
                t.new,
                t.at,
                ms(t.fence_ms),
                ms(t.confirm_ms),
                t.confirmed_by
                    .as_ref()
                    .map(|b| format!(" ({b})"))
                    .unwrap_or_default(),
                ms(t.haproxy_ms),
                ms(t.pgbouncer_ms)
            ),
        }
    }
}

/// Where to read a running haconfd: `url` (`http://host:port` or `host:port`) if given, else
/// `http.listen` of its config, with an unspecified address (`0.0.0.0`, `[::]`) asked on
/// loopback.
pub fn address(url: Option<&str>, listen: Option<&str>) -> Result<String, String> {
    let raw = match (url, listen) {
        (Some(u), _) => u.trim_start_matches("http://").trim_end_matches('/'),
        (None, Some(l)) => l,
        (None, None) => return Err("http.listen is not set in the config: `haconfd run` serves no /status to read (set [http] listen = \"127.0.0.1:9187\", or give --url)".to_owned()),
    };
    Ok(match raw.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        _ => raw.to_owned(),
    })
}

/// The largest `/status` read (a daemon following thousands of members stays far below).
const MAX_BODY: u64 = 16 << 20;

/// GETs `path` from haconfd at `addr` (connect within `timeout`, the whole answer within
/// twice that); the status code and body.
pub fn fetch(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let io = |e: std::io::Error| e.to_string();
    stream.set_read_timeout(Some(timeout * 2)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: haconfd-status\r\n\r\n"
    )
    .map_err(io)?;
    let mut buf = Vec::new();
    stream
        .take(MAX_BODY)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "an answer that is not HTTP".to_owned())?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "an answer that is not HTTP".to_owned())?;
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "version": "0.1.0 (abc)",
            "etcd_connected": true,
            "revision": 42,
            "passes": 3,
            "failed_passes": 0,
            "last_pass_ok": true,
            "last_success_age_seconds": 1.5,
            "clusters": [{
                "scope": "demo",
                "leader": "pg2",
                "refused": null,
                "member_list": [
                    {"name": "pg1", "role": "replica", "state": "streaming", "host": "10.0.0.1", "port": 5432, "lag": 0},
                    {"name": "<b>pg2</b>", "role": "primary", "state": "running", "host": "10.0.0.2", "port": 5432, "lag": null}
                ],
                "haproxy": [{"target": "haproxy", "error": null, "servers": [
                    {"backend": "primary", "server": "pg1", "state": "UP", "admin": "drain"},
                    {"backend": "replicas", "server": "pg1", "state": "UP", "admin": null}
                ]}],
                "fast_path": {"fences": [{"server": "pg1", "why": "switchover requested", "for_s": 1.2, "lifted_in_s": 3.8}],
                              "pauses": [{"target": "pgbouncer", "stage": "paused", "why": "switchover requested", "for_s": 1.1, "console": "x"}],
                              "change_under_way_s": 1.3, "moves_refused": 0, "last_refused": null},
                "last_failover": {"old": "pg1", "new": "pg2", "leader_key_at": 1.0e9,
                    "switchover_requested_ms_before": 2410.0, "confirmed_after_ms": 183.0, "confirmed_by": "rest",
                    "haproxy_after_ms": 185.4, "pgbouncer_after_ms": null}
            }]
        })
    }

    #[test]
    fn the_table_shows_leader_members_haproxy_holds_and_timeline() {
        let o = Overview::from_status(&doc());
        let t = o.table("127.0.0.1:9187");
        assert!(
            t.starts_with("haconfd 0.1.0 (abc) at 127.0.0.1:9187: ready\n"),
            "{t}"
        );
        assert!(t.contains("cluster demo: leader pg2\n"), "{t}");
        assert!(
            t.lines().any(|l| l.starts_with("  pg1 ")
                && l.contains("replica")
                && l.ends_with("primary UP (drained), replicas UP")),
            "{t}"
        );
        assert!(t.contains("fence: pg1 drained (switchover requested) for 1.2 s, lifted in 3.8 s at the latest"), "{t}");
        assert!(
            t.contains("pause: PgBouncer pgbouncer paused (switchover requested) for 1.1 s"),
            "{t}"
        );
        assert!(
            t.contains("hold: a leader change under way for 1.3 s"),
            "{t}"
        );
        assert!(t.contains("last failover: pg1 -> pg2 at 2001-09-09T01:46:40.000Z: fence -2410 ms, confirm +183 ms (rest), HAProxy +185 ms, PgBouncer -"), "{t}");
    }

    #[test]
    fn a_crash_hold_shows_with_what_the_probes_saw_and_its_bound() {
        let mut d = doc();
        d["clusters"][0]["fast_path"]["crash_hold"] = serde_json::json!({
            "server": "pg2", "why": "PostgreSQL refused connections for 0 ms (2 probes)",
            "since": 1.0e9, "for_s": 4.2, "bound_s": 40.0, "released_in_s": 35.8
        });
        let t = Overview::from_status(&d).table("127.0.0.1:9187");
        assert!(
            t.contains("crash hold: pg2 is down (PostgreSQL refused connections for 0 ms (2 probes)), its clients held for 4.2 s, released in 35.8 s at the latest"),
            "{t}"
        );
        assert!(!Overview::from_status(&doc())
            .table("x")
            .contains("crash hold"));
    }

    #[test]
    fn the_page_escapes_everything_etcd_says() {
        let o = Overview::from_status(&doc());
        let h = o.html(None);
        assert!(
            !h.contains("<b>pg2</b>"),
            "a member name is text, never markup"
        );
        assert!(h.contains("&lt;b&gt;pg2&lt;/b&gt;"));
        assert!(!h.contains("<script"), "no script");
        assert!(
            !h.contains("http://") && !h.contains("https://"),
            "no external asset"
        );
        assert!(h.contains("data-leader=\"pg2\""));
    }

    #[test]
    fn an_unspecified_listen_address_is_asked_on_loopback() {
        assert_eq!(
            address(None, Some("0.0.0.0:9187")).unwrap(),
            "127.0.0.1:9187"
        );
        assert_eq!(address(None, Some("[::]:9187")).unwrap(), "[::1]:9187");
        assert_eq!(
            address(Some("http://10.1.2.3:80/"), Some("x:1")).unwrap(),
            "10.1.2.3:80"
        );
        assert!(address(None, None)
            .unwrap_err()
            .contains("http.listen is not set"));
    }
}
