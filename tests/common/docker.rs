//! Docker for the container tests (tests/containers.rs): images built on this machine (no registry
//! is reachable), and containers, networks and compose projects that are removed when their guard
//! drops, also when a test panics.
//!
//! # Images
//! [`images`] builds, once per test binary and under a machine-wide file lock (two test binaries
//! never build at once), the local stand-ins of docker/local/ and then the project's own images
//! from the very Dockerfiles users build:
//! - `haconfd-local/debian:bookworm-<hash>`: docker/local/mkbase.sh (debootstrap, `docker import`);
//! - `haconfd-local/haproxy:2.6-bookworm-<hash>`, `haconfd-local/etcd:3.4-bookworm-<hash>`,
//!   `haconfd-local/keepalived:bookworm-<hash>`: docker/local/{haproxy,etcd,keepalived}.Dockerfile
//!   on it;
//! - `haconfd-local/patroni:bookworm-<hash>`: docker/patroni/Dockerfile with `BASE` = the local base;
//! - `haconfd-local/prebuilt:<hash>`: the base with the haconfd binary this test run built (the
//!   debug binary, debug info stripped), docker/local/prebuilt.Dockerfile;
//! - `haconfd-local/haconfd:<hash>`: docker/Dockerfile with `BUILD_BASE` = that, `PREBUILT`, and
//!   `RUNTIME_BASE` = the local HAProxy image.
//!
//! Each tag carries a hash of what the image is made from (the scripts, Dockerfiles, the machine's
//! apt sources, the binary, the templates), so an image whose tag exists is reused as it is: the
//! bases cost minutes once, then nothing; the haconfd image is rebuilt only when the binary or the
//! templates change. Per-binary tags older than a day are removed when a new one is made (unless
//! a container still uses them: `docker rmi` refuses those).
//!
//! # Resources
//! Everything a test makes is named `hcdt-<pid>-<process start time>-<n>-<what>` and removed by its
//! guard ([`Container`], [`Network`], [`Compose`]). Things left behind by a test binary that was
//! killed are found by that name at the next run and removed when the process that made them is
//! gone; nothing else is ever removed.
//!
//! Every command and every wait is bounded.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::procs::{find_bin, haconfd_bin, run_with_timeout};

/// What to run when Docker or debootstrap is missing.
pub const DOCKER_HINT: &str =
    "the container tests need a running Docker engine, docker-compose and \
debootstrap, run as root: `sudo apt-get install -y docker.io docker-compose debootstrap` (or run \
`bash tests/run.sh`, which installs them)";

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// Running docker
// ---------------------------------------------------------------------------------------------

/// Runs `docker ARGS` within `timeout`; stdout on success, a message naming the command and its
/// stderr otherwise.
pub fn docker_try(args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    output_text(&mut cmd, timeout, &format!("docker {}", args.join(" ")))
}

/// [`docker_try`] with a 120 s limit, panicking on failure.
pub fn docker(args: &[&str]) -> String {
    docker_try(args, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
}

fn output_text(cmd: &mut Command, timeout: Duration, what: &str) -> Result<String, String> {
    match run_with_timeout(cmd, timeout) {
        Ok(Output {
            status,
            stdout,
            stderr,
        }) => {
            if status.success() {
                Ok(String::from_utf8_lossy(&stdout).into_owned())
            } else {
                Err(format!(
                    "`{what}` failed ({status}):\n{}{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ))
            }
        }
        Err(e) => Err(format!("`{what}`: {e}")),
    }
}

/// Panics with [`DOCKER_HINT`] unless docker, docker-compose and debootstrap are installed and
/// the engine answers. Tests never skip.
pub fn require_docker() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        for bin in ["docker", "docker-compose", "debootstrap"] {
            if find_bin(bin).is_none() {
                return Err(format!("`{bin}` not found"));
            }
        }
        docker_try(
            &["version", "--format", "{{.Server.Version}}"],
            Duration::from_secs(20),
        )
        .map(|_| ())
        .map_err(|e| format!("the Docker engine does not answer: {e}"))
    });
    if let Err(e) = r {
        panic!("{e}: {DOCKER_HINT}");
    }
}

/// Serializes the container tests of one binary: they share the machine's two cores, and some
/// measure time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Names and leftovers
// ---------------------------------------------------------------------------------------------

const PREFIX: &str = "hcdt";
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The start time of a process (field 22 of /proc/PID/stat), to tell a PID from a reused one.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn owner() -> String {
    let pid = std::process::id();
    format!("{PREFIX}-{pid}-{}", start_time(pid).unwrap_or(0))
}

/// A fresh name for something this test binary makes: `hcdt-<pid>-<start>-<n>-<what>`.
pub fn unique(what: &str) -> String {
    sweep_leftovers();
    format!(
        "{}-{}-{what}",
        owner(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a name made by [`unique`] belongs to a process that is gone.
fn orphaned(name: &str) -> bool {
    let mut parts = name.trim_start_matches('/').splitn(4, '-');
    if parts.next() != Some(PREFIX) {
        return false;
    }
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts
            .next()
            .and_then(|s| s.split(['_', '-']).next())
            .and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    start_time(pid) != Some(start)
}

/// Removes what an earlier, killed test binary left behind (by name, see the module docs).
fn sweep_leftovers() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let t = Duration::from_secs(60);
        let list = |args: &[&str]| -> Vec<String> {
            docker_try(args, t)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .filter(|n| n.starts_with(PREFIX) && orphaned(n))
                .collect()
        };
        for c in list(&["ps", "-a", "--format", "{{.Names}}"]) {
            let _ = docker_try(&["rm", "-f", "-v", &c], t);
        }
        for n in list(&["network", "ls", "--format", "{{.Name}}"]) {
            let _ = docker_try(&["network", "rm", &n], t);
        }
        for v in list(&["volume", "ls", "--format", "{{.Name}}"]) {
            let _ = docker_try(&["volume", "rm", "-f", &v], t);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// The images of this run (tags).
#[derive(Debug, Clone)]
pub struct Images {
    /// The debootstrapped Debian 12 base.
    pub debian: String,
    /// The local stand-in for haproxy:2.6-bookworm.
    pub haproxy: String,
    /// The local stand-in for the etcd image.
    pub etcd: String,
    /// Debian 12's keepalived, for the VIP in front of load-balancer hosts.
    pub keepalived: String,
    /// docker/patroni/Dockerfile on the local base.
    pub patroni: String,
    /// docker/Dockerfile's build stage base, with this run's binary.
    pub prebuilt: String,
    /// docker/Dockerfile on the local bases: haconfd's image.
    pub haconfd: String,
    /// Seconds spent building (0 when everything was cached), per image.
    pub build_seconds: BTreeMap<String, f64>,
}

/// A hex digest of some bytes (sha256sum), shortened to 16 characters.
pub fn digest(parts: &[&[u8]]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    {
        let mut stdin = child.stdin.take().unwrap();
        for p in parts {
            // Length-prefixed, so that moving bytes between parts changes the digest.
            stdin.write_all(format!("{}:", p.len()).as_bytes()).unwrap();
            stdin.write_all(p).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..16].to_string()
}

fn read_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn image_exists(tag: &str) -> bool {
    docker_try(
        &["image", "inspect", "--format", "{{.Id}}", tag],
        Duration::from_secs(30),
    )
    .is_ok()
}

/// `docker build` with a 20-minute limit; the output is kept only for the error.
fn build(args: &[&str], what: &str) {
    let mut full = vec!["build", "--quiet"];
    full.extend_from_slice(args);
    docker_try(&full, Duration::from_secs(1200))
        .unwrap_or_else(|e| panic!("building {what} failed:\n{e}"));
}

/// Holds an exclusive lock on a file for as long as it lives.
struct FileLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl FileLock {
    fn acquire(path: &Path, timeout: Duration) -> FileLock {
        let deadline = Instant::now() + timeout;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => return FileLock(l),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err((_, e)) => panic!(
                    "{} stayed locked for {timeout:?} (another test run building images?): {e}",
                    path.display()
                ),
            }
        }
    }
}

/// The images, built or found (see the module docs). Panics with [`DOCKER_HINT`] when Docker or
/// debootstrap are missing.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        require_docker();
        let _lock = FileLock::acquire(
            Path::new("/tmp/haconfd-local-images.lock"),
            Duration::from_secs(1800),
        );
        let mut seconds = BTreeMap::new();
        let mut timed = |name: &str, tag: &str, f: &mut dyn FnMut()| {
            if image_exists(tag) {
                seconds.insert(name.to_string(), 0.0);
                return;
            }
            let t = Instant::now();
            f();
            assert!(image_exists(tag), "{tag} was not built");
            seconds.insert(name.to_string(), t.elapsed().as_secs_f64());
        };

        // The base: the script and the machine's apt sources it copies.
        let sources = std::fs::read("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
        let debian = format!(
            "haconfd-local/debian:bookworm-{}",
            digest(&[&read_bytes("docker/local/mkbase.sh"), &sources])
        );
        timed("debian", &debian, &mut || {
            let mut cmd = Command::new("sh");
            cmd.arg(root().join("docker/local/mkbase.sh")).arg(&debian);
            output_text(
                &mut cmd,
                Duration::from_secs(1200),
                "docker/local/mkbase.sh",
            )
            .unwrap_or_else(|e| panic!("{e}\n{DOCKER_HINT}"));
        });
        let base_arg = format!("BASE={debian}");

        let local = |file: &str, repo: &str| -> String {
            format!(
                "{repo}-{}",
                digest(&[
                    debian.as_bytes(),
                    &read_bytes(&format!("docker/local/{file}"))
                ])
            )
        };
        let haproxy = local("haproxy.Dockerfile", "haconfd-local/haproxy:2.6-bookworm");
        let etcd = local("etcd.Dockerfile", "haconfd-local/etcd:3.4-bookworm");
        let keepalived = local("keepalived.Dockerfile", "haconfd-local/keepalived:bookworm");
        for (name, tag, file) in [
            ("haproxy", &haproxy, "haproxy.Dockerfile"),
            ("etcd", &etcd, "etcd.Dockerfile"),
            ("keepalived", &keepalived, "keepalived.Dockerfile"),
        ] {
            let df = root().join("docker/local").join(file);
            let ctx = root().join("docker/local");
            timed(name, tag, &mut || {
                build(
                    &[
                        "-f",
                        df.to_str().unwrap(),
                        "--build-arg",
                        &base_arg,
                        "-t",
                        tag,
                        ctx.to_str().unwrap(),
                    ],
                    tag,
                )
            });
        }

        let patroni = format!(
            "haconfd-local/patroni:bookworm-{}",
            digest(&[
                debian.as_bytes(),
                &read_bytes("docker/patroni/Dockerfile"),
                &read_bytes("docker/patroni/entrypoint.sh"),
            ])
        );
        timed("patroni", &patroni, &mut || {
            build(
                &[
                    "--build-arg",
                    &base_arg,
                    "-t",
                    &patroni,
                    root().join("docker/patroni").to_str().unwrap(),
                ],
                &patroni,
            )
        });

        // This run's binary, debug info stripped (the debug build is ~160 MB with it, ~35 without).
        let ctx = tempfile::Builder::new()
            .prefix("haconfd-prebuilt-")
            .tempdir()
            .unwrap();
        let bin = ctx.path().join("haconfd");
        let mut strip = Command::new("objcopy");
        strip.arg("--strip-debug").arg(haconfd_bin()).arg(&bin);
        if output_text(
            &mut strip,
            Duration::from_secs(120),
            "objcopy --strip-debug",
        )
        .is_err()
        {
            std::fs::copy(haconfd_bin(), &bin).unwrap();
        }
        let prebuilt = format!(
            "haconfd-local/prebuilt:{}",
            digest(&[
                debian.as_bytes(),
                &read_bytes("docker/local/prebuilt.Dockerfile"),
                &std::fs::read(&bin).unwrap(),
            ])
        );
        timed("prebuilt", &prebuilt, &mut || {
            build(
                &[
                    "-f",
                    root()
                        .join("docker/local/prebuilt.Dockerfile")
                        .to_str()
                        .unwrap(),
                    "--build-arg",
                    &base_arg,
                    "-t",
                    &prebuilt,
                    ctx.path().to_str().unwrap(),
                ],
                &prebuilt,
            )
        });

        let mut templates: Vec<(String, Vec<u8>)> = std::fs::read_dir(root().join("templates"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        templates.sort();
        let mut parts: Vec<&[u8]> = vec![
            prebuilt.as_bytes(),
            haproxy.as_bytes(),
            b"docker/Dockerfile",
        ];
        let dockerfile = read_bytes("docker/Dockerfile");
        parts.push(&dockerfile);
        for (n, b) in &templates {
            parts.push(n.as_bytes());
            parts.push(b);
        }
        let haconfd = format!("haconfd-local/haconfd:{}", digest(&parts));
        timed("haconfd", &haconfd, &mut || {
            build(
                &[
                    "-f",
                    root().join("docker/Dockerfile").to_str().unwrap(),
                    "--build-arg",
                    &format!("BUILD_BASE={prebuilt}"),
                    "--build-arg",
                    "PREBUILT=/usr/local/lib/haconfd/haconfd",
                    "--build-arg",
                    &format!("RUNTIME_BASE={haproxy}"),
                    "-t",
                    &haconfd,
                    root().to_str().unwrap(),
                ],
                &haconfd,
            )
        });
        for (repo, keep) in [
            ("haconfd-local/prebuilt", &prebuilt),
            ("haconfd-local/haconfd", &haconfd),
        ] {
            remove_old_tags(repo, keep);
        }
        Images {
            debian,
            haproxy,
            etcd,
            keepalived,
            patroni,
            prebuilt,
            haconfd,
            build_seconds: seconds,
        }
    })
}

/// Removes the tags of `repo` other than `keep` that are more than a day old and that no
/// container uses (`docker rmi` without -f refuses those).
fn remove_old_tags(repo: &str, keep: &str) {
    let t = Duration::from_secs(60);
    let Ok(list) = docker_try(
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.CreatedAt}}",
            repo,
        ],
        t,
    ) else {
        return;
    };
    for line in list.lines() {
        let Some((tag, _)) = line.split_once(' ') else {
            continue;
        };
        if tag == keep {
            continue;
        }
        let created = docker_try(&["image", "inspect", "--format", "{{.Created}}", tag], t)
            .unwrap_or_default();
        let age_ok = Command::new("date")
            .args(["-d", created.trim(), "+%s"])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|then| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                now.saturating_sub(then) > 24 * 3600
            });
        if age_ok {
            let _ = docker_try(&["rmi", tag], t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Containers and networks
// ---------------------------------------------------------------------------------------------

/// A network removed on drop (after the containers of the test, which drop first when declared
/// later).
pub struct Network {
    pub name: String,
}

impl Network {
    pub fn create(what: &str) -> Network {
        let name = unique(what);
        docker(&["network", "create", "--label", "io.haconfd.test=1", &name]);
        Network { name }
    }

    /// The network's subnet, e.g. `172.20.0.0/16`.
    pub fn subnet(&self) -> String {
        docker(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
            &self.name,
        ])
        .trim()
        .to_string()
    }

    /// The IPv4 subnet: (network address, netmask, prefix length).
    fn ipv4(&self) -> (u32, u32, u32) {
        let subnet = self.subnet();
        let (net, bits) = subnet.split_once('/').unwrap();
        let net: std::net::Ipv4Addr = net.parse().unwrap();
        let bits: u32 = bits.parse().unwrap();
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        (u32::from(net) & mask, mask, bits)
    }

    /// Whether `ip` is in the network's IPv4 subnet.
    pub fn contains(&self, ip: &str) -> bool {
        let (net, mask, _) = self.ipv4();
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| (u32::from(a) & mask) == net)
    }

    /// The subnet's highest host address and its prefix length, e.g. (`172.20.255.254`, 16):
    /// Docker hands out addresses from the bottom of the subnet, so no container of a test gets
    /// this one, and the test can use it for an address of its own (a VIP).
    pub fn last_host(&self) -> (std::net::Ipv4Addr, u32) {
        let (net, mask, bits) = self.ipv4();
        assert!(bits <= 30, "{}: no room for a spare address", self.name);
        ((net | !mask).wrapping_sub(1).into(), bits)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker_try(&["network", "rm", &self.name], Duration::from_secs(60));
    }
}

/// A container removed (with its anonymous volumes) on drop, unless it is someone else's
/// ([`Container::existing`], e.g. one of a compose project).
pub struct Container {
    pub name: String,
    owned: bool,
}

impl Container {
    /// `docker create --name <unique> ARGS...` (ARGS include the image and command); start it
    /// with [`Container::start`] after connecting more networks.
    pub fn create(what: &str, args: &[&str]) -> Container {
        let name = unique(what);
        let mut full = vec!["create", "--name", &name, "--label", "io.haconfd.test=1"];
        full.extend_from_slice(args);
        docker(&full);
        Container { name, owned: true }
    }

    /// A handle on a container this guard does not remove.
    pub fn existing(name: &str) -> Container {
        Container {
            name: name.to_string(),
            owned: false,
        }
    }

    /// [`Container::create`], then start.
    pub fn run(what: &str, args: &[&str]) -> Container {
        let c = Container::create(what, args);
        c.start();
        c
    }

    pub fn start(&self) {
        docker(&["start", &self.name]);
    }

    pub fn stop(&self, grace_secs: u32) {
        docker_try(
            &["stop", "-t", &grace_secs.to_string(), &self.name],
            Duration::from_secs(u64::from(grace_secs) + 60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILL to the container's processes (`docker kill`): no process of it gets to say goodbye.
    pub fn kill(&self) {
        kill_all(&[self]);
    }

    /// `docker exec` with a time limit; stdout, or the error with stderr.
    pub fn exec_try(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut full = vec!["exec", &self.name];
        full.extend_from_slice(args);
        docker_try(&full, timeout)
    }

    pub fn exec(&self, args: &[&str]) -> String {
        self.exec_try(args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "--format", format, &self.name])
            .trim()
            .to_string()
    }

    /// The container's IPv4 address on `network`.
    pub fn ip(&self, network: &Network) -> String {
        self.inspect(&format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            network.name
        ))
    }

    /// Its main process's PID as the host sees it.
    pub fn host_pid(&self) -> i32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    pub fn is_running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// The last `n` lines of its log (stdout and stderr).
    pub fn logs(&self, n: usize) -> String {
        let mut cmd = Command::new("docker");
        cmd.args(["logs", "--tail", &n.to_string(), &self.name]);
        match run_with_timeout(&mut cmd, Duration::from_secs(30)) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs {}: {e})", self.name),
        }
    }

    pub fn connect(&self, network: &Network, alias: Option<&str>) {
        let mut args = vec!["network", "connect"];
        if let Some(a) = alias {
            args.extend(["--alias", a]);
        }
        args.extend([network.name.as_str(), self.name.as_str()]);
        docker(&args);
    }

    pub fn disconnect(&self, network: &Network) {
        docker(&["network", "disconnect", &network.name, &self.name]);
    }
}

/// `docker kill` of several containers in one command, as a host that loses power loses all its
/// processes at once.
pub fn kill_all(containers: &[&Container]) {
    let mut args = vec!["kill"];
    args.extend(containers.iter().map(|c| c.name.as_str()));
    docker(&args);
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = docker_try(&["rm", "-f", "-v", &self.name], Duration::from_secs(60));
    }
}

// ---------------------------------------------------------------------------------------------
// docker-compose
// ---------------------------------------------------------------------------------------------

/// A docker-compose project (docker/compose.yml), brought down with its volumes on drop.
pub struct Compose {
    pub project: String,
    pub file: PathBuf,
    pub env: Vec<(String, String)>,
    down: bool,
}

impl Compose {
    pub fn new(file: &Path, env: &[(&str, String)]) -> Compose {
        Compose {
            project: unique("compose"),
            file: file.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            down: false,
        }
    }

    /// `docker-compose -p <project> -f <file> ARGS` with the project's environment.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // No ANSI colours in logs.
            .env("COMPOSE_INTERACTIVE_NO_CLI", "1");
        output_text(
            &mut cmd,
            timeout,
            &format!("docker-compose -p {} {}", self.project, args.join(" ")),
        )
    }

    /// The container name of a service's first replica.
    pub fn container(&self, service: &str) -> String {
        self.run(&["ps", "-q", service], Duration::from_secs(60))
            .ok()
            .and_then(|id| id.lines().next().map(str::to_string))
            .map(|id| {
                docker(&["inspect", "--format", "{{.Name}}", &id])
                    .trim()
                    .trim_start_matches('/')
                    .to_string()
            })
            .unwrap_or_else(|| {
                panic!(
                    "compose project {}: no container for {service}",
                    self.project
                )
            })
    }

    pub fn logs(&self, services: &[&str], tail: usize) -> String {
        let mut args = vec!["logs", "--no-color", "--tail"];
        let n = tail.to_string();
        args.push(&n);
        args.extend_from_slice(services);
        self.run(&args, Duration::from_secs(60))
            .unwrap_or_else(|e| e)
    }

    /// `down -v`: containers, the network and the named volumes go.
    pub fn down(&mut self) -> Result<String, String> {
        self.down = true;
        self.run(
            &["down", "-v", "--remove-orphans", "-t", "10"],
            Duration::from_secs(300),
        )
    }

    /// What of the project is still there: containers, networks, volumes (by compose's label).
    pub fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let t = Duration::from_secs(60);
        let mut v = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-a", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
        ] {
            for id in docker_try(&args, t).unwrap_or_default().lines() {
                v.push(format!("{kind} {id}"));
            }
        }
        v
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.down();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to containers from the host
// ---------------------------------------------------------------------------------------------

/// A GET on `addr` (a container's address); (status, body).
pub fn http_get_at(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// haconfd's /status as JSON, if it answers.
pub fn status_at(addr: SocketAddr) -> Option<serde_json::Value> {
    let (code, body) = http_get_at(addr, "/status", Duration::from_secs(2))?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// One sample of a Prometheus metric (name with labels, e.g.
/// `haconfd_passes_total{result="error"}`) from /metrics; 0 when absent.
pub fn metric_at(addr: SocketAddr, series: &str) -> Option<f64> {
    let (code, body) = http_get_at(addr, "/metrics", Duration::from_secs(2))?;
    if code != 200 {
        return None;
    }
    Some(
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0),
    )
}

/// `etcdctl ARGS` inside an etcd container (v3 API, its own client URL).
pub fn etcdctl(etcd: &Container, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["etcdctl", "--command-timeout=5s"];
    full.extend_from_slice(args);
    etcd.exec_try(&full, Duration::from_secs(30))
}

/// A Patroni member key's value for a member that is not really there (the sidecar tests only
/// need haconfd to render, check and reload; HAProxy's checks against it fail, which is fine).
pub fn fake_member(host: &str, role: &str) -> String {
    serde_json::json!({
        "conn_url": format!("postgres://{host}:5432/postgres"),
        "api_url": format!("http://{host}:8008/patroni"),
        "state": "running",
        "role": role,
        "version": "3.0.2",
        "xlog_location": 50331968,
        "timeline": 1
    })
    .to_string()
}

/// Runs SQL through libpq's psql on the host against `host:port` (the demo's superuser),
/// returning the unaligned, tuples-only output. Bounded by `timeout` (connect and run).
pub fn psql(
    host: &str,
    port: u16,
    password: &str,
    sql: &str,
    timeout: Duration,
) -> Result<String, String> {
    let psql = find_bin("psql").ok_or("psql not found (postgresql-client)")?;
    let mut cmd = Command::new(psql);
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "postgresql://postgres@{host}:{port}/postgres?connect_timeout={}",
            timeout.as_secs().max(1)
        ))
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env_remove("PGSERVICE");
    output_text(&mut cmd, timeout + Duration::from_secs(2), "psql").map(|s| s.trim().to_string())
}

/// Polls `f` every `every` until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline - Instant::now()));
    }
}
