//! The `haconfd` binary: parses the command line, loads the settings, wires the stages for the
//! chosen mode and maps errors to the documented exit codes.

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{CommandFactory, Parser};

use haconfd::cli::{exit, Cli, Command};
use haconfd::config::{self, Settings};
use haconfd::logging::Logging;
use haconfd::pipeline::{Engine, PassError};
use haconfd::render::RenderError;
use haconfd::snapshot::Snapshot;
use haconfd::source;
use haconfd::status::Status;

fn main() -> ExitCode {
    // First, before any thread: as PID 1, an init stays behind and the daemon goes on here.
    haconfd::init::split_if_pid1();
    let cli = Cli::parse();
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "haconfd",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let Command::Manpage = &cli.command {
        return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => ExitCode::from(fail(exit::FAILURE, &format!("man page: {e}"))),
        };
    }
    if let Command::Status(args) = &cli.command {
        return ExitCode::from(status_cmd(&cli, args));
    }
    let overrides = cli.overrides();
    let settings = match config::load_settings(&cli.global.config, &overrides) {
        Ok(s) => s,
        Err(e) => {
            // Logging is not set up yet: the config chooses its format.
            eprintln!("haconfd: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // A level given by flag or env wins over the file's; the refusal names the one in force.
    let origin = match &cli.global.log_level {
        Some(_) => "--log-level (or HACONFD_LOG_LEVEL)".to_owned(),
        None => format!("log.level of {}", cli.global.config.display()),
    };
    let logging = match Logging::init(settings.log.format, &settings.log.level, &origin) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("haconfd: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // One thread is plenty for a watcher that runs a pass at a time, and keeps idle RSS low. The
    // blocking pool (file I/O of a pass, config loads, name look-ups) keeps at most two threads,
    // let go after a second idle: each thread costs its stack and a malloc arena while it lives.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("haconfd: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = runtime.block_on(dispatch(cli, settings, overrides, logging));
    ExitCode::from(code)
}

async fn dispatch(
    cli: Cli,
    settings: Settings,
    overrides: config::Overrides,
    logging: Logging,
) -> u8 {
    tracing::debug!(settings = ?settings, "effective settings (secrets masked)");
    match cli.command {
        Command::Run(_) => {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                endpoints = ?settings.etcd.endpoints,
                prefix = %settings.etcd.prefix(),
                auth = settings.etcd.auth.as_ref().map(|(u, _)| u.as_str()),
                tls = settings.etcd.tls.is_some(),
                targets = ?settings.targets.iter().map(|t| format!("{} -> {}", t.name, t.dest.display())).collect::<Vec<_>>(),
                "starting"
            );
            let status = Arc::new(Mutex::new(Status::default()));
            let config_path = cli.global.config.clone();
            match haconfd::daemon::run(config_path, overrides, settings, status, logging).await {
                Ok(()) => exit::OK,
                Err(e) => fail(exit::FAILURE, &format!("{e:#}")),
            }
        }
        Command::Once(args) => once(settings, !args.no_reload).await,
        Command::Render(args) => render_cmd(settings, args).await,
        Command::Check(args) => check_cmd(settings, args).await,
        Command::Completions { .. } | Command::Manpage | Command::Status(_) => exit::OK,
    }
}

/// Prints the reason (its first line says what failed; details such as a check's output follow)
/// and returns `code`.
fn fail(code: u8, message: &str) -> u8 {
    eprintln!("haconfd: {message}");
    code
}

fn pass_code(e: &PassError) -> u8 {
    match e {
        PassError::Guard(_) => exit::GUARD,
        PassError::Render(_) => exit::RENDER,
        PassError::Apply(haconfd::apply::ApplyError::Check { .. }) => exit::CHECK,
        PassError::Apply(_) => exit::WRITE,
        PassError::Reload { .. } => exit::RELOAD,
    }
}

async fn snapshot_from(
    settings: &Settings,
    file: Option<&std::path::Path>,
) -> Result<Snapshot, u8> {
    match file {
        Some(path) => Snapshot::from_file(path).map_err(|e| fail(exit::CONFIG, &e.to_string())),
        None => source::fetch_once(&settings.etcd, settings.daemon.once_timeout)
            .await
            .map_err(|e| fail(exit::ETCD, &e.to_string())),
    }
}

/// The snapshot (from etcd or a file) and an engine with compiled templates: what every one-shot
/// mode starts from. An empty scope is refused (exit 4) naming the scopes that exist, unless
/// `force` (or the guard is forced or its floor is 0 in the config): then it is a warning.
async fn prepare(
    settings: Settings,
    snapshot_file: Option<&std::path::Path>,
    force: bool,
) -> Result<(Snapshot, Engine), u8> {
    let snap = snapshot_from(&settings, snapshot_file).await?;
    let force = force || settings.guard.force || settings.guard.min_members == 0;
    refuse_empty_scope(&settings, &snap, snapshot_file.is_some(), force).await?;
    let engine = Engine::new(Arc::new(settings)).map_err(|e| fail(exit::CONFIG, &e.to_string()))?;
    Ok((snap, engine))
}

/// A wrong scope, confd's whole prefix as the namespace, or the other etcd API: the followed
/// scope shows no key. Says what is there instead (in the dump, or in either etcd store).
async fn refuse_empty_scope(
    settings: &Settings,
    snap: &Snapshot,
    from_dump: bool,
    force: bool,
) -> Result<(), u8> {
    use haconfd::source::scopes;
    if scopes::has_scope_keys(&settings.etcd, snap) {
        return Ok(());
    }
    let found = if from_dump {
        vec![scopes::scopes_in(
            snap.kvs.keys().map(String::as_str),
            &settings.etcd.namespace,
        )]
    } else {
        scopes::look_around(&settings.etcd, std::time::Duration::from_secs(2)).await
    };
    let message = scopes::empty_scope_message(&settings.etcd, &found);
    if force {
        eprintln!("haconfd: warning: {message}");
        return Ok(());
    }
    Err(fail(exit::GUARD, &message))
}

async fn once(settings: Settings, reload: bool) -> u8 {
    let (snap, mut engine) = match prepare(settings, None, false).await {
        Ok(p) => p,
        Err(c) => return c,
    };
    let result = engine.pass(&snap, reload).await;
    // A target kept as it was for want of a leader taking writes is not up to date: `once`
    // says so instead of reporting success.
    let awaiting = &engine.last_stats().awaiting;
    if result.is_ok() && !awaiting.is_empty() {
        return fail(
            exit::RENDER,
            &format!(
                "{} not written: the leader is not confirmed to take writes (its REST API's \
                 /primary does not answer 200 yet; a Patroni standby cluster's leader, role \
                 standby_leader, never does); the last files stay",
                awaiting.join(", ")
            ),
        );
    }
    match result {
        Ok(o) if o.is_noop() => {
            tracing::info!(revision = snap.revision, "up to date");
            exit::OK
        }
        Ok(o) => {
            tracing::info!(revision = snap.revision, written = ?o.written, reloaded = ?o.reloaded, runtime = ?o.runtime, "applied");
            exit::OK
        }
        Err(e) => fail(pass_code(&e), &format!("{e:#}")),
    }
}

async fn render_cmd(settings: Settings, args: haconfd::cli::RenderArgs) -> u8 {
    let force = args.force || args.context;
    let (snap, mut engine) = match prepare(settings, args.snapshot.as_deref(), force).await {
        Ok(p) => p,
        Err(c) => return c,
    };
    if !args.context {
        if let Some(e) = engine.guard_refusal(&snap) {
            if !args.force {
                return fail(
                    exit::GUARD,
                    &format!(
                        "the guard would refuse this view, so once and run would keep the last \
                         good files: {e}"
                    ),
                );
            }
            eprintln!("haconfd: warning: the guard would refuse this view (printed because of --force): {e}");
        }
    }
    let mut out = std::io::stdout().lock();
    if args.context {
        let mut contexts = match engine.contexts(&snap, args.template.as_deref()) {
            Ok(c) => c,
            Err(e) => return fail(exit::CONFIG, &e.to_string()),
        };
        let json = if contexts.len() == 1 {
            serde_json::to_string_pretty(&contexts.remove(0).1)
        } else {
            let map: serde_json::Map<String, serde_json::Value> = contexts.into_iter().collect();
            serde_json::to_string_pretty(&map)
        };
        let _ = writeln!(out, "{}", json.unwrap_or_default());
        return exit::OK;
    }
    match engine.render(&snap, args.template.as_deref()) {
        Ok(rendered) => {
            let many = rendered.len() > 1;
            for r in rendered {
                if many {
                    let _ = writeln!(out, "==> {} <==", r.name);
                }
                let _ = out.write_all(&r.bytes);
            }
            exit::OK
        }
        Err(e @ RenderError::UnknownTarget(_)) => fail(exit::CONFIG, &e.to_string()),
        Err(e) => fail(exit::RENDER, &e.to_string()),
    }
}

async fn check_cmd(settings: Settings, args: haconfd::cli::CheckArgs) -> u8 {
    // Hooks run only when events come: a command that cannot run is found now, not at the
    // failover that needed it.
    for h in &settings.hooks {
        if let Err(e) = h.check_runnable() {
            return fail(exit::CONFIG, &e);
        }
    }
    let hooks = settings.hooks.len();
    if let Err(e) = check_destinations(&settings) {
        return fail(exit::WRITE, &e);
    }
    let (snap, mut engine) = match prepare(settings, args.snapshot.as_deref(), false).await {
        Ok(p) => p,
        Err(c) => return c,
    };
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            return fail(
                exit::FAILURE,
                &format!("cannot create a scratch directory: {e}"),
            )
        }
    };
    if let Err(e) = check_stats_sockets(engine.settings()).await {
        return fail(exit::CONFIG, &e);
    }
    if let Err(e) = check_declared_sockets(&mut engine, &snap) {
        return fail(exit::CONFIG, &e);
    }
    match engine.check_only(&snap, scratch.path()).await {
        Ok(names) => {
            println!(
                "ok: config, templates and checks pass for {}{}",
                names.join(", "),
                match hooks {
                    0 => String::new(),
                    n => format!("; {n} hook command(s) found"),
                }
            );
            for line in membership_lines(&mut engine, &snap) {
                println!("{line}");
            }
            exit::OK
        }
        Err(e) => fail(pass_code(&e), &format!("{e:#}")),
    }
}

/// The fast path moves HAProxy through each `server_state.stats_socket`: a socket HAProxy
/// serves below `level admin` refuses every move (`Permission denied`). One that does not
/// answer now (HAProxy not started yet) is noted, not refused.
async fn check_stats_sockets(settings: &Settings) -> Result<(), String> {
    if !settings.failover.enabled {
        return Ok(());
    }
    for t in &settings.targets {
        let Some(ss) = t.server_state() else { continue };
        let socket = ss.stats_socket.display();
        match haconfd::consumers::haproxy::runtime::socket_level(
            &ss.stats_socket,
            std::time::Duration::from_secs(2),
        )
        .await
        {
            Some(level) if level == "admin" => {}
            Some(level) => {
                return Err(format!(
                    "template {:?}: HAProxy's stats socket {socket} (server_state.stats_socket) \
                     is at level {level:?}: the failover fast path's moves need `level admin` \
                     (`stats socket {socket} mode 660 level admin` in haproxy.cfg), or set \
                     [failover] enabled = false",
                    t.name
                ))
            }
            None => eprintln!(
                "haconfd: note: template {:?}: HAProxy's stats socket {socket} does not answer \
                 now; its level (the fast path needs `level admin`) is not checked",
                t.name
            ),
        }
    }
    Ok(())
}

/// Every destination's directory exists: `once` and `run` stage each file next to its
/// destination and cannot create the directory (`{scope}` is only ever in the file name).
fn check_destinations(settings: &Settings) -> Result<(), String> {
    for t in &settings.targets {
        let dir = t.dest.parent().unwrap_or(std::path::Path::new("/"));
        if !dir.is_dir() {
            return Err(format!(
                "template {:?}: dest {}: the directory {} does not exist (once and run stage the \
                 file next to its destination and do not create directories)",
                t.name,
                t.dest.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// The stats socket haconfd talks to (`server_state.stats_socket`) is one the rendered file
/// declares (`stats socket` in its global section): `[vars] stats_socket` may name another.
fn check_declared_sockets(engine: &mut Engine, snap: &Snapshot) -> Result<(), String> {
    let settings = Arc::clone(engine.settings());
    for t in &settings.targets {
        let Some(ss) = t.server_state() else { continue };
        // A render failure is check_only's to report, with its own exit code.
        let Ok(rendered) = engine.render(snap, Some(&t.name)) else {
            continue;
        };
        for r in rendered {
            let declared = haconfd::consumers::haproxy::declared_stats_sockets(
                &String::from_utf8_lossy(&r.bytes),
            );
            let socket = haconfd::config::file_identity(&ss.stats_socket);
            if !declared
                .iter()
                .any(|d| haconfd::config::file_identity(d) == socket)
            {
                return Err(format!(
                    "template {:?}: server_state.stats_socket is {} but the rendered {} declares \
                     {}: haconfd would talk to a socket HAProxy does not serve. Make [vars] \
                     stats_socket (or the template's vars) the same path, or leave it unset: the \
                     shipped templates then declare server_state.stats_socket",
                    t.name,
                    ss.stats_socket.display(),
                    t.dest.display(),
                    match declared.as_slice() {
                        [] => "no `stats socket`".to_owned(),
                        d => d
                            .iter()
                            .map(|p| format!("`stats socket {}`", p.display()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                ));
            }
        }
    }
    Ok(())
}

/// How member changes reach each HAProxy with `server_state`, as `check` prints it.
fn membership_lines(engine: &mut Engine, snap: &Snapshot) -> Vec<String> {
    let settings = Arc::clone(engine.settings());
    let mut out = Vec::new();
    for t in &settings.targets {
        let Some(ss) = t.server_state() else { continue };
        let Ok(rendered) = engine.render(snap, Some(&t.name)) else {
            continue;
        };
        for r in rendered {
            let how = haconfd::consumers::haproxy::membership::describe(
                ss,
                &String::from_utf8_lossy(&r.bytes),
            );
            out.push(format!("members of {:?}: {how}", r.name));
        }
    }
    out
}

/// `haconfd status`: reads a running haconfd's `/status` and prints the overview.
fn status_cmd(cli: &Cli, args: &haconfd::cli::StatusArgs) -> u8 {
    use haconfd::overview;
    let listen = match &args.url {
        Some(_) => None,
        None => match config::RawConfig::load(&cli.global.config) {
            Ok(mut raw) => {
                raw.apply(&cli.overrides());
                raw.http.listen
            }
            Err(e) => return fail(exit::CONFIG, &e.to_string()),
        },
    };
    let addr = match overview::address(args.url.as_deref(), listen.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            return fail(
                exit::CONFIG,
                &format!("{e} ({})", cli.global.config.display()),
            )
        }
    };
    let url = format!("http://{addr}/status");
    let doc = match overview::fetch(&addr, "/status", args.timeout) {
        Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => v,
            Err(e) => return fail(exit::UNREACHABLE, &format!("{url} answered no JSON: {e}")),
        },
        Ok((code, _)) => {
            return fail(
                exit::UNREACHABLE,
                &format!("{url} answered HTTP {code}: is this haconfd's http.listen?"),
            )
        }
        Err(e) => {
            return fail(
                exit::UNREACHABLE,
                &format!(
                    "cannot read {url}: {e}. Is `haconfd run` running with this config \
                     (`systemctl status haconfd`)?"
                ),
            )
        }
    };
    let view = overview::Overview::from_status(&doc);
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        serde_json::to_string_pretty(&view).unwrap_or_default() + "\n"
    } else {
        view.table(&format!("http://{addr}"))
    };
    match out.write_all(text.as_bytes()) {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => fail(exit::FAILURE, &format!("stdout: {e}")),
    }
}
