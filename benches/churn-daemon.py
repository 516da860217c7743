"""Cluster churn: `haconfd run` with `etcd.discover` against a real etcd (started here on free
loopback ports, stopped by PID) where one cluster stays and short-lived clusters with new names
are created (a leader and two members in one transaction) and deleted (their whole prefix) at
R a second for D seconds. Every build runs at the same time, each on a namespace of its own in
the same etcd, so the figures are paired. Each template renders every cluster's members into a
plain file (no consumer). Prints, per build, at the start of the churn, at each quarter and at
the end: VmRSS, the clusters /status lists, the mean pass time over a window, the rendered file's
size; then the time SIGTERM takes.

usage: python3 benches/churn-daemon.py RUN[,RUN...] R D
  RUN   a haconfd release binary, optionally followed by #TOML: text added to its config
        (\\n for a newline), e.g. 'target/release/haconfd#[guard]\\ngone_after = "10s"'
  e.g.  python3 benches/churn-daemon.py old/haconfd,target/release/haconfd 20 300
"""
import base64, http.client, json, os, signal, socket, subprocess, sys, tempfile, threading, time

TEMPLATE = """{% for c in clusters %}{{ c.scope }}{% if c.group is number %}/{{ c.group }}{% endif %}:{% for m in c.members %} {{ m.name }}={{ m.address }}{% endfor %}
{% endfor %}"""


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def b64(s): return base64.b64encode(s.encode()).decode()


def prefix_end(p):
    return p[:-1] + chr(ord(p[-1]) + 1)


class Kv:
    def __init__(self, port): self.port = port; self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, path, body):
        self.c.request("POST", path, json.dumps(body))
        r = self.c.getresponse(); data = r.read(); assert r.status == 200, (r.status, data)

    def put(self, k, v): self.call("/v3/kv/put", {"key": b64(k), "value": b64(v)})

    def txn(self, puts): self.call("/v3/kv/txn", {"success": [{"requestPut": {"key": b64(k), "value": b64(v)}} for k, v in puts]})

    def delete_prefix(self, p): self.call("/v3/kv/deleterange", {"key": b64(p), "range_end": b64(prefix_end(p))})


def member(i, role):
    return json.dumps({"conn_url": f"postgres://127.0.0.{2 + i % 200}:{5432 + i % 1000}/postgres",
        "api_url": f"http://127.0.0.{2 + i % 200}:{8008 + i % 1000}/patroni",
        "state": "running", "role": role, "version": "3.0.2", "xlog_location": 1000, "timeline": 1})


def cluster_puts(ns, scope, base):
    return [(f"{ns}/{scope}/members/{scope}-a", member(base, "master")),
            (f"{ns}/{scope}/members/{scope}-b", member(base + 1, "replica")),
            (f"{ns}/{scope}/members/{scope}-c", member(base + 2, "replica")),
            (f"{ns}/{scope}/leader", f"{scope}-a")]


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def status(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/status"); r = c.getresponse(); return json.loads(r.read())


def main():
    bins = sys.argv[1].split(",")
    rate, dur = float(sys.argv[2]), float(sys.argv[3])
    tmp = tempfile.mkdtemp(prefix="churn-")
    cport, pport = free_port(), free_port()
    etcd = subprocess.Popen(["etcd", "--data-dir", f"{tmp}/etcd", "--listen-client-urls", f"http://127.0.0.1:{cport}",
        "--advertise-client-urls", f"http://127.0.0.1:{cport}", "--listen-peer-urls", f"http://127.0.0.1:{pport}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}", "--initial-cluster", f"default=http://127.0.0.1:{pport}",
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000", "--quota-backend-bytes", "4294967296"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = []
    try:
        kv = None
        for _ in range(100):
            try: kv = Kv(cport); kv.put("/probe", "x"); break
            except Exception: time.sleep(0.1)
        runs = []
        for n, spec in enumerate(bins):
            b, _, extra = spec.partition("#")
            extra = extra.replace("\\n", "\n")
            d = tempfile.mkdtemp(dir=tmp)
            ns = f"/churn{n}"
            kv.txn(cluster_puts(ns, "keep", 0))
            http_port = free_port()
            open(f"{d}/all.tera", "w").write(TEMPLATE)
            open(f"{d}/haconfd.toml", "w").write(f"""[etcd]
endpoints = ["http://127.0.0.1:{cport}"]
namespace = "{ns}"
discover = true
[daemon]
min_interval = "100ms"
[http]
listen = "127.0.0.1:{http_port}"
[failover]
enabled = false
{extra}
[[template]]
name = "all"
src = "{d}/all.tera"
dest = "{d}/all.txt"
""")
            log = open(f"{d}/haconfd.log", "w")
            p = subprocess.Popen([b, "-c", f"{d}/haconfd.toml", "run"], stdout=log, stderr=subprocess.STDOUT)
            procs.append(p)
            runs.append({"bin": spec, "ns": ns, "dir": d, "http": http_port, "proc": p, "samples": []})
        time.sleep(3)
        stop = threading.Event()

        def churn(run):
            k = Kv(cport); i = 0; live = []
            t0 = time.monotonic()
            while not stop.is_set() and time.monotonic() - t0 < dur:
                scope = f"t{i:06d}"
                k.txn(cluster_puts(run["ns"], scope, 3 * i))
                live.append(scope); i += 1
                if len(live) > max(1, int(rate * 2)):  # each lives about 2 s
                    k.delete_prefix(f"{run['ns']}/{live.pop(0)}/")
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            for s in live: k.delete_prefix(f"{run['ns']}/{s}/")
            run["created"] = i

        def sample(run):
            while not stop.is_set():
                try:
                    st = status(run["http"])
                    run["samples"].append((time.monotonic(), rss_mb(run["proc"].pid), len(st.get("clusters", [])),
                                           st.get("last_pass_seconds", 0.0), st.get("passes", 0),
                                           os.path.getsize(f"{run['dir']}/all.txt")))
                except Exception as e:
                    run["samples"].append((time.monotonic(), rss_mb(run["proc"].pid), -1, 0.0, 0, 0))
                stop.wait(2)

        start = time.monotonic()
        threads = [threading.Thread(target=churn, args=(r,)) for r in runs] + [threading.Thread(target=sample, args=(r,)) for r in runs]
        for t in threads: t.start()
        for t in threads[:len(runs)]: t.join()
        time.sleep(5)
        stop.set()
        for t in threads: t.join()
        window = 30.0
        for r in runs:
            s = r["samples"]
            first = [x for x in s if x[0] - start <= window]
            last = [x for x in s if x[0] >= s[-1][0] - window]
            def summary(xs):
                return {"rss_mb": round(max(x[1] for x in xs), 1), "clusters": max(x[2] for x in xs),
                        "pass_ms": round(1000 * sum(x[3] for x in xs) / len(xs), 1), "file_kb": round(max(x[5] for x in xs) / 1024, 1)}
            t0 = time.monotonic(); r["proc"].send_signal(signal.SIGTERM)
            try: r["proc"].wait(timeout=60); term = round(time.monotonic() - t0, 2)
            except subprocess.TimeoutExpired: r["proc"].kill(); r["proc"].wait(); term = ">60"
            quarters = {}
            for q in (1, 2, 3):
                at = start + q * dur / 4
                near = [x for x in s if abs(x[0] - at) <= window / 2]
                if near: quarters[f"q{q}"] = summary(near)
            res = {"bench": "churn", "bin": r["bin"], "created": r.get("created"), "rate": rate, "seconds": dur,
                   "start": summary(first), **quarters, "end": summary(last), "peak_rss_mb": round(max(x[1] for x in s), 1),
                   "peak_clusters": max(x[2] for x in s), "sigterm_s": term}
            print(json.dumps(res), flush=True)
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
        etcd.terminate(); etcd.wait()


if __name__ == "__main__":
    main()
