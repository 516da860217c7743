//! Several clusters through [`Engine::pass`] with plain files (no consumer to reload): each
//! cluster judged on its own, per-cluster files, sections kept.

use super::*;
use crate::config::RawConfig;
use std::path::Path;
use std::time::Duration;

const ALL: &str = "{% for c in clusters %}{{ c.scope }} configured={{ c.configured }} \
    leader={{ c.leader_name | default(value=\"none\") }} members={% for m in c.members %}{{ m.name }},{% endfor %}\n{% endfor %}";
const ONE: &str = "{{ scope }} port={{ settings.port }} leader={{ leader_name }}\n";

fn member(port: u16, role: &str) -> Vec<u8> {
    format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","role":"{role}","state":"running"}}"#,
        port + 1000
    )
    .into_bytes()
}

struct Rig {
    dir: tempfile::TempDir,
    engine: Engine,
    snap: Snapshot,
}

impl Rig {
    fn new(extra: &str) -> Rig {
        Rig::with("discover = true", extra)
    }

    fn with(etcd: &str, extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("all.tera"), ALL).unwrap();
        std::fs::write(dir.path().join("one.tera"), ONE).unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        let text = format!(
            r#"
[etcd]
{etcd}
[clusters.a]
port = 5000
[clusters.b]
port = 5010
[[template]]
name = "all"
src = "all.tera"
dest = "all.txt"
[[template]]
name = "leaders"
src = "all.tera"
dest = "leaders.txt"
require_leader = true
[[template]]
name = "one"
src = "one.tera"
dest = "conf.d/{{scope}}.txt"
{extra}
"#
        );
        let settings = RawConfig::parse(&text, Path::new("t.toml"))
            .unwrap()
            .resolve(dir.path())
            .unwrap();
        let engine = Engine::new(Arc::new(settings)).unwrap();
        Rig {
            dir,
            engine,
            snap: Snapshot::new(),
        }
    }

    fn put(&mut self, key: &str, value: &[u8]) {
        self.snap.put(format!("/service/{key}"), value.to_vec());
    }

    fn delete(&mut self, key: &str) {
        self.snap.delete(&format!("/service/{key}"));
    }

    fn cluster(&mut self, scope: &str, port: u16, leader: Option<&str>) {
        for (i, name) in ["pg1", "pg2"].iter().enumerate() {
            // The leader's member key says primary: the fast path confirms it by that.
            let role = if leader == Some(*name) {
                "primary"
            } else {
                "replica"
            };
            self.put(
                &format!("{scope}/members/{name}"),
                &member(port + i as u16, role),
            );
        }
        if let Some(l) = leader {
            self.put(&format!("{scope}/leader"), l.as_bytes());
        }
    }

    /// Deletes every key [`Rig::cluster`] writes for `scope`.
    fn remove_cluster(&mut self, scope: &str) {
        for k in ["leader", "members/pg1", "members/pg2"] {
            self.delete(&format!("{scope}/{k}"));
        }
    }

    /// A pass on the shared snapshot, with its whole report.
    async fn report(&mut self) -> PassReport {
        let snap = Arc::new(self.snap.clone());
        self.engine.pass_shared(snap, false).await
    }

    async fn pass(&mut self) -> Result<PassOutcome, PassError> {
        let snap = self.snap.clone();
        self.engine.pass(&snap, false).await
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(rel)).ok()
    }
}

#[tokio::test]
async fn an_emptied_cluster_keeps_its_section_while_another_updates_in_the_same_pass() {
    let mut rig = Rig::new("");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg1 members=pg1,pg2,\n"
    );
    // a's store empties while b gains a member: b's change goes in, a's section stays.
    rig.remove_cluster("a");
    rig.put("b/members/pg3", &member(6434, "replica"));
    let err = rig.pass().await.unwrap_err();
    assert!(matches!(err, PassError::Guard(_)), "{err}");
    assert!(err.to_string().contains("\"a\""), "{err}");
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg1 members=pg1,pg2,pg3,\n"
    );
    assert_eq!(
        rig.read("conf.d/a.txt").unwrap(),
        "a port=5000 leader=pg1\n"
    );
    assert!(rig
        .engine
        .last_stats()
        .outcome
        .written
        .contains(&"all".to_owned()));
}

#[tokio::test]
async fn a_leaderless_cluster_keeps_its_last_leader_in_require_leader_files_only() {
    let mut rig = Rig::new("");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.pass().await.unwrap();
    rig.delete("a/leader");
    rig.put("b/leader", b"pg2");
    rig.put("b/members/pg1", &member(6432, "replica"));
    rig.put("b/members/pg2", &member(6433, "primary"));
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("leaders.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg2 members=pg1,pg2,\n",
        "a keeps its last leader, b follows its new one"
    );
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader= members=pg1,pg2,\nb configured=true leader=pg2 members=pg1,pg2,\n",
        "a template without require_leader shows what etcd shows"
    );
    assert_eq!(rig.engine.last_stats().leaderless, ["a"]);
}

#[tokio::test]
async fn per_cluster_files_come_with_a_configured_cluster_and_go_only_through_the_guard() {
    let mut rig = Rig::new("");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("zz", 7432, Some("pg1"));
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("conf.d/a.txt").unwrap(),
        "a port=5000 leader=pg1\n"
    );
    assert_eq!(
        rig.read("conf.d/zz.txt"),
        None,
        "an unconfigured cluster gets no file"
    );
    assert!(rig.read("all.txt").unwrap().contains("zz configured=false"));
    // b appears: its file comes in the next pass.
    rig.cluster("b", 6432, Some("pg2"));
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("conf.d/b.txt").unwrap(),
        "b port=5010 leader=pg2\n"
    );
    // b's keys all go: refused, its file and section stay.
    rig.remove_cluster("b");
    assert!(rig.pass().await.is_err());
    assert_eq!(
        rig.read("conf.d/b.txt").unwrap(),
        "b port=5010 leader=pg2\n"
    );
    assert!(rig
        .read("all.txt")
        .unwrap()
        .contains("b configured=true leader=pg2"));
}

#[tokio::test]
async fn a_gone_cluster_accepted_by_the_guard_loses_its_file_and_section() {
    let mut rig = Rig::new("[guard]\nforce = true\n");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.pass().await.unwrap();
    assert!(rig.read("conf.d/b.txt").is_some());
    rig.remove_cluster("b");
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("conf.d/b.txt"),
        None,
        "the gone cluster's file is removed"
    );
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\n"
    );
    assert_eq!(
        rig.read("conf.d/a.txt").unwrap(),
        "a port=5000 leader=pg1\n"
    );
}

#[tokio::test]
async fn a_listed_cluster_not_in_the_store_yet_fails_no_pass_and_comes_when_it_appears() {
    let mut rig = Rig::with("scopes = [\"a\", \"b\"]", "");
    rig.cluster("a", 5432, Some("pg1"));
    let report = rig.report().await;
    report.result.unwrap();
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\n"
    );
    let b = report.clusters.iter().find(|r| r.id.scope == "b").unwrap();
    assert!(b.refused.as_deref().unwrap().contains("no valid member"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("conf.d/b.txt").unwrap(),
        "b port=5010 leader=pg1\n"
    );
}

#[tokio::test]
async fn no_cluster_at_all_under_the_namespace_writes_no_empty_file() {
    let mut rig = Rig::new("");
    // An emptied store or a wrong namespace: nothing found.
    let err = rig.pass().await.unwrap_err();
    assert!(err.to_string().contains("etcd shows no cluster"), "{err}");
    assert_eq!(rig.read("all.txt"), None);
    // Only a bootstrapping cluster (a leader key, no member yet): still nothing to render.
    rig.put("a/leader", b"pg1");
    assert!(rig.pass().await.is_err());
    assert_eq!(rig.read("all.txt"), None);
    rig.cluster("a", 5432, Some("pg1"));
    rig.pass().await.unwrap();
    assert!(rig
        .read("all.txt")
        .unwrap()
        .starts_with("a configured=true"));
}

#[tokio::test]
async fn after_a_restart_a_remembered_cluster_whose_keys_are_gone_keeps_its_section() {
    let mut rig = Rig::new("[guard]\nstate_file = \"members.json\"\n");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.pass().await.unwrap();
    let both = rig.read("all.txt").unwrap();
    // haconfd restarts (a new engine, the guard's memory from its file) while b's keys are
    // gone and a changes.
    let settings = Arc::clone(rig.engine.settings());
    rig.engine = Engine::new(settings).unwrap();
    rig.remove_cluster("b");
    rig.put("a/leader", b"pg2");
    let err = rig.pass().await.unwrap_err();
    assert!(err.to_string().contains("\"b\""), "{err}");
    assert_eq!(
        rig.read("all.txt").unwrap(),
        both,
        "b's section was dropped"
    );
    assert_eq!(
        rig.read("conf.d/a.txt").unwrap(),
        "a port=5000 leader=pg2\n",
        "a's own file follows a"
    );
}

#[tokio::test]
async fn citus_groups_render_under_one_cluster() {
    let mut rig = Rig::new("");
    for g in ["0", "1", "2"] {
        rig.cluster(
            &format!("a/{g}"),
            5432,
            Some(if g == "1" { "pg2" } else { "pg1" }),
        );
    }
    rig.pass().await.unwrap();
    assert_eq!(
        rig.read("all.txt").unwrap(),
        "a configured=true leader=pg1 members=pg1,pg2,\n",
        "the coordinator is the cluster's own leader and members"
    );
    let ctx = rig
        .engine
        .contexts(&rig.snap.clone(), Some("all"))
        .unwrap()
        .remove(0)
        .1;
    let groups: Vec<(u64, String)> = ctx["clusters"][0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"].as_u64().unwrap(),
                g["leader_name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [(0, "pg1".into()), (1, "pg2".into()), (2, "pg1".into())]
    );
    assert_eq!(ctx["clusters"][0]["citus"], true);
}

#[tokio::test]
async fn a_discovered_cluster_whose_keys_are_gone_is_forgotten_after_gone_after_while_another_has_a_leader(
) {
    let mut rig = Rig::new("[guard]\ngone_after = \"0s\"\nstate_file = \"members.json\"\n");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("b", 6432, Some("pg1"));
    rig.cluster("c", 7432, Some("pg1"));
    rig.cluster("cit/0", 8432, Some("pg1"));
    rig.cluster("cit/1", 8532, Some("pg1"));
    rig.pass().await.unwrap();
    let all = rig.read("all.txt").unwrap();
    assert!(all.contains("c configured=false"), "{all}");
    assert!(rig.read("members.json").unwrap().contains("\"c\""));
    // c's keys and Citus group 1's all go (a deleted cluster, a removed worker group).
    rig.remove_cluster("c");
    rig.remove_cluster("cit/1");
    let report = rig.report().await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    let ids: Vec<String> = report.clusters.iter().map(|r| r.id.to_string()).collect();
    assert!(
        !ids.iter().any(|i| i == "c" || i.ends_with("/1")),
        "still followed: {ids:?}"
    );
    assert_eq!(report.next(), Next::AwaitChange);
    let all = rig.read("all.txt").unwrap();
    assert!(!all.contains("c configured"), "c's section stayed:\n{all}");
    let state = rig.read("members.json").unwrap();
    assert!(!state.contains("\"c\""), "the state file keeps c: {state}");
    assert!(
        !state.contains("\"group\": 1") && !state.contains("\"group\":1"),
        "{state}"
    );
    assert!(state.contains("\"a\""), "{state}");
}

#[tokio::test]
async fn a_gone_discovered_cluster_waits_for_gone_after_and_an_emptied_store_forgets_nothing() {
    let mut rig = Rig::new("[guard]\ngone_after = \"60s\"\n");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("c", 7432, Some("pg1"));
    rig.pass().await.unwrap();
    rig.remove_cluster("c");
    let report = rig.report().await;
    assert_eq!(report.stats.forgetting, 1);
    assert_eq!(
        report.next(),
        Next::Retry,
        "a pass must come when its time is up"
    );
    assert!(rig.read("all.txt").unwrap().contains("c configured=false"));

    // Every cluster gone at once (an emptied store, a wrong namespace): with no cluster
    // showing a leader, nothing is forgotten, whatever the time.
    let mut rig = Rig::new("[guard]\ngone_after = \"0s\"\n");
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("c", 7432, Some("pg1"));
    rig.pass().await.unwrap();
    let both = rig.read("all.txt").unwrap();
    for s in ["a", "c"] {
        rig.remove_cluster(s);
    }
    assert!(rig.pass().await.is_err());
    assert!(rig.pass().await.is_err());
    assert_eq!(rig.read("all.txt").unwrap(), both);
}

#[tokio::test]
async fn a_forgotten_cluster_takes_its_failure_counters_out_of_status_and_metrics() {
    let mut rig = Rig::new("[guard]\ngone_after = \"50ms\"\n");
    let (mut status, metrics) = (
        crate::status::Status::default(),
        crate::metrics::Metrics::new(),
    );
    let record = |status: &mut crate::status::Status, report: &PassReport| {
        status.record_pass(report, Duration::ZERO);
        metrics.record(report);
    };
    rig.cluster("a", 5432, Some("pg1"));
    rig.cluster("c", 7432, Some("pg1"));
    let report = rig.report().await;
    record(&mut status, &report);
    rig.remove_cluster("c");
    // Gone, not yet forgotten: the guard refuses the emptied section, counted under the cluster.
    let report = rig.report().await;
    assert!(
        report.stats.failed.iter().any(|(s, _)| s == "cluster c"),
        "{:?}",
        report.stats.failed
    );
    record(&mut status, &report);
    assert!(status.targets.contains_key("cluster c"));
    tokio::time::sleep(Duration::from_millis(80)).await;
    let report = rig.report().await;
    assert!(report.clusters.iter().all(|r| r.id.scope != "c"));
    record(&mut status, &report);
    let names: Vec<&String> = status.targets.keys().collect();
    assert!(
        !status.targets.contains_key("cluster c"),
        "status keeps {names:?}"
    );
    let text = metrics.encode(&status);
    assert!(!text.contains("cluster c"), "metrics keep c:\n{text}");
    assert!(status.targets.contains_key("all"), "{names:?}");
}
