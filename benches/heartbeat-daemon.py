"""End-to-end heartbeat CPU: `haconfd run` against a real etcd (started here on free loopback
ports, stopped by PID) holding N Patroni members; R member keys a second are rewritten with a new
xlog_location for D seconds; prints the daemon's CPU (utime + stime) per event. Several builds run
in turns, in the same etcd, for paired figures.

usage: python3 benches/heartbeat-daemon.py BIN=REPO[,BIN=REPO...] N R D ROUNDS
  BIN   a haconfd release binary; REPO the checkout whose templates/ it renders
  e.g.  python3 benches/heartbeat-daemon.py target/release/haconfd=. 3000 200 15 2
"""
import base64, http.client, json, os, socket, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def b64(s): return base64.b64encode(s.encode()).decode()

class Kv:
    def __init__(self, port): self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    def put(self, k, v):
        self.c.request("POST", "/v3/kv/put", json.dumps({"key": b64(k), "value": b64(v)}))
        r = self.c.getresponse(); r.read(); assert r.status == 200, r.status

def member(i, xlog):
    return json.dumps({"conn_url": f"postgres://127.0.0.{1 + i // 250}:{5432 + i % 250}/postgres",
        "api_url": f"http://127.0.0.{1 + i // 250}:{8008 + i % 250}/patroni",
        "state": "running" if i == 0 else "streaming", "role": "master" if i == 0 else "replica",
        "version": "3.0.2", "xlog_location": xlog, "timeline": 1})

def main():
    bins = [b.split("=")[0] for b in sys.argv[1].split(",")]
    repos = {b: os.path.abspath(r) for b, r in (x.split("=") for x in sys.argv[1].split(","))}
    n, rate, dur, rounds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    tmp = tempfile.mkdtemp(prefix="hb-")
    cport, pport = free_port(), free_port()
    etcd = subprocess.Popen(["etcd", "--data-dir", f"{tmp}/etcd", "--listen-client-urls", f"http://127.0.0.1:{cport}",
        "--advertise-client-urls", f"http://127.0.0.1:{cport}", "--listen-peer-urls", f"http://127.0.0.1:{pport}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}", "--initial-cluster", f"default=http://127.0.0.1:{pport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kv = None
        for _ in range(100):
            try: kv = Kv(cport); kv.put("/probe", "x"); break
            except Exception: time.sleep(0.1)
        for i in range(n): kv.put(f"/service/hb/members/m{i:04d}", member(i, 1000))
        kv.put("/service/hb/leader", "m0000")
        results = {b: [] for b in bins}
        for r in range(rounds):
            for b in bins:
                d = tempfile.mkdtemp(dir=tmp)
                repo = repos[b]
                cfg = f"""[etcd]
endpoints = ["http://127.0.0.1:{cport}"]
scope = "hb"
[daemon]
min_interval = "500ms"
[vars]
bind_address = "127.0.0.1"
primary_port = 15000
replica_port = 15001
stats_port = 15002
stats_socket = "{d}/admin.sock"
[[template]]
name = "haproxy"
src = "{repo}/templates/haproxy.cfg.tera"
dest = "{d}/haproxy.cfg"
reload = {{ command = ["true"] }}
[[template]]
name = "pgbouncer"
src = "{repo}/templates/pgbouncer.ini.tera"
dest = "{d}/pgbouncer.ini"
require_leader = true
reload = {{ command = ["true"] }}
vars = {{ listen_addr = "127.0.0.1", listen_port = 16432, auth_type = "trust", unix_socket_dir = "{d}", pidfile = "{d}/pgb.pid", logfile = "{d}/pgb.log" }}
"""
                open(f"{d}/c.toml", "w").write(cfg)
                p = subprocess.Popen([b, "-c", f"{d}/c.toml", "run"], stdout=subprocess.DEVNULL, stderr=open(f"{d}/log", "w"))
                for _ in range(300):
                    if os.path.exists(f"{d}/pgbouncer.ini"): break
                    time.sleep(0.1)
                time.sleep(1.0)
                c0, t0, sent = cpu(p.pid), time.time(), 0
                while time.time() - t0 < dur:
                    due = int((time.time() - t0) * rate)
                    while sent < due:
                        i = 1 + sent % (n - 1)
                        kv.put(f"/service/hb/members/m{i:04d}", member(i, 2000 + sent)); sent += 1
                    time.sleep(0.002)
                time.sleep(0.5)
                c1 = cpu(p.pid)
                p.terminate(); p.wait(10)
                per = (c1 - c0) / sent * 1000
                results[b].append(per)
                print(f"round {r} {b}: {sent} events in {dur}s, cpu {c1-c0:.2f}s = {per:.3f} ms/event = {100*(c1-c0)/dur:.1f}% of a core", flush=True)
        for b, v in results.items():
            v.sort(); print(f"{b}: median {v[len(v)//2]:.3f} ms/event over {len(v)} rounds")
    finally:
        etcd.terminate(); etcd.wait(10)

main()
