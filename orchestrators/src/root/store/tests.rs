//! The same store tests against both backends (the embedded redb file and a real etcd started per test,
//! skipped with a reason when no etcd is installed), then what only one backend does: etcd's fence, its
//! per-transaction op limit, an unreachable endpoint, and the embedded store refusing a fence.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use super::*;
use crate::testing::etcd::Etcd;

/// A store of each kind over a temp dir, with whatever keeps it alive.
struct Backends {
    _dir: tempfile::TempDir,
    _etcd: Option<Etcd>,
}

fn embedded() -> (Store, Backends) {
    let dir = tempfile::tempdir().unwrap();
    (Store::open(dir.path()).unwrap(), Backends { _dir: dir, _etcd: None })
}

/// A store on a fresh etcd (None when there is no etcd binary), and that etcd's config.
fn on_etcd() -> Option<(Store, EtcdConfig, Backends)> {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path())?;
    let cfg = EtcdConfig { prefix: "/test/root".into(), ..EtcdConfig::new(vec![etcd.endpoint.clone()]) };
    let store = Store::open_etcd(&cfg).unwrap();
    Some((store, cfg, Backends { _dir: dir, _etcd: Some(etcd) }))
}

/// Runs a test body (`fn(&Store)`) once on each backend.
macro_rules! on_both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn embedded() {
                let (s, _keep) = super::embedded();
                super::$body(&s);
            }
            #[test]
            fn etcd() {
                if let Some((s, _, _keep)) = super::on_etcd() {
                    super::$body(&s);
                }
            }
        }
    };
}

fn n(v: Option<Value>) -> Option<i64> {
    v.map(|v| v["n"].as_i64().unwrap())
}

fn put_get_list_delete(s: &Store) {
    s.update(|tx| {
        tx.put(APPLICATIONS, "b", &json!({"n": 2}))?;
        tx.put(APPLICATIONS, "a", &json!({"n": 1}))?;
        tx.put(SERVICES, "a", &json!({"n": 9}))
    })
    .unwrap();
    assert_eq!(n(s.get(APPLICATIONS, "a").unwrap()), Some(1));
    assert_eq!(n(s.get(SERVICES, "a").unwrap()), Some(9), "tables are apart");
    assert_eq!(n(s.get(USERS, "a").unwrap()), None);
    let all: Vec<Value> = s.list(APPLICATIONS).unwrap();
    assert_eq!(all.iter().map(|v| v["n"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2], "by key");
    // a key with a slash (instance keys have one) and a table that was never written
    s.update(|tx| tx.put(APPLICATIONS, "c/1", &json!({"n": 3}))).unwrap();
    assert_eq!(n(s.get(APPLICATIONS, "c/1").unwrap()), Some(3));
    assert!(s.list::<Value>("never_written").unwrap().is_empty());
    assert_eq!(n(s.get("never_written", "x").unwrap()), None);
    s.update(|tx| {
        tx.delete(APPLICATIONS, "a")?;
        tx.delete(APPLICATIONS, "missing")
    })
    .unwrap();
    assert_eq!(n(s.get(APPLICATIONS, "a").unwrap()), None);
    assert_eq!(s.list::<Value>(APPLICATIONS).unwrap().len(), 2);
    // a value that is not the type asked for names the table and key
    let e = s.get::<u32>(APPLICATIONS, "b").unwrap_err();
    assert!(format!("{e:#}").contains("applications/b"), "{e:#}");
}
on_both!(put_get_list_delete_, put_get_list_delete);

fn an_aborted_transaction_stores_nothing(s: &Store) {
    s.update(|tx| tx.put(APPLICATIONS, "kept", &json!({"n": 1}))).unwrap();
    let r: Result<()> = s.update(|tx| {
        tx.put(APPLICATIONS, "a2", &json!({"n": 2}))?;
        tx.delete(APPLICATIONS, "kept")?;
        anyhow::bail!("boom")
    });
    assert!(r.is_err());
    {
        let tx = s.write().unwrap();
        tx.put(APPLICATIONS, "a3", &json!({"n": 3})).unwrap();
        // dropped without commit
    }
    assert_eq!(n(s.get(APPLICATIONS, "kept").unwrap()), Some(1));
    assert_eq!(n(s.get(APPLICATIONS, "a2").unwrap()), None);
    assert_eq!(n(s.get(APPLICATIONS, "a3").unwrap()), None);
    // the writer slot was given back: the next transaction goes through
    s.update(|tx| tx.put(APPLICATIONS, "a4", &json!({"n": 4}))).unwrap();
    assert_eq!(s.list::<Value>(APPLICATIONS).unwrap().len(), 2);
}
on_both!(an_aborted_transaction_stores_nothing_, an_aborted_transaction_stores_nothing);

fn a_transaction_reads_its_own_writes(s: &Store) {
    s.update(|tx| {
        tx.put(SERVICES, "old", &json!({"n": 1}))?;
        tx.put(SERVICES, "gone", &json!({"n": 2}))
    })
    .unwrap();
    let tx = s.write().unwrap();
    tx.put(SERVICES, "new", &json!({"n": 3})).unwrap();
    tx.put(SERVICES, "old", &json!({"n": 10})).unwrap();
    tx.delete(SERVICES, "gone").unwrap();
    assert_eq!(n(tx.get(SERVICES, "new").unwrap()), Some(3));
    assert_eq!(n(tx.get(SERVICES, "old").unwrap()), Some(10));
    assert_eq!(n(tx.get(SERVICES, "gone").unwrap()), None);
    let listed: Vec<Value> = tx.list(SERVICES).unwrap();
    assert_eq!(listed.iter().map(|v| v["n"].as_i64().unwrap()).collect::<Vec<_>>(), [3, 10]);
    assert!(tx.list::<Value>(APPLICATIONS).unwrap().is_empty(), "other tables keep out of it");
    // outside the transaction nothing shows until it commits
    assert_eq!(n(s.get(SERVICES, "new").unwrap()), None);
    assert_eq!(n(s.get(SERVICES, "gone").unwrap()), Some(2));
    tx.commit().unwrap();
    assert_eq!(n(s.get(SERVICES, "new").unwrap()), Some(3));
    assert_eq!(n(s.get(SERVICES, "old").unwrap()), Some(10));
    assert_eq!(n(s.get(SERVICES, "gone").unwrap()), None);
}
on_both!(a_transaction_reads_its_own_writes_, a_transaction_reads_its_own_writes);

/// Transactions from several threads run one at a time: none loses another's increment.
fn writers_take_turns(s: &Store) {
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..10 {
                    s.update(|tx| {
                        let v = tx.get::<u64>(META, "counter")?.unwrap_or(0);
                        tx.put(META, "counter", &(v + 1))
                    })
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(s.get::<u64>(META, "counter").unwrap(), Some(40));
}
on_both!(writers_take_turns_, writers_take_turns);

/// The overlay address plan's document kept under one key of the store.
fn a_persisted_document_lives_under_one_key(s: &Store) {
    use crate::persisted::Persisted;
    {
        let p: Persisted<Vec<u32>> = Persisted::open_in(Box::new(s.document(NET, NET_STATE))).unwrap();
        assert!(p.lock().is_empty());
        p.mutate(|v| -> Result<()> {
            v.push(7);
            Ok(())
        })
        .unwrap();
        assert!(p.mutate(|v| -> Result<()> { anyhow::bail!("refused {v:?}") }).is_err());
    }
    let p: Persisted<Vec<u32>> = Persisted::open_in(Box::new(s.document(NET, NET_STATE))).unwrap();
    assert_eq!(*p.lock(), vec![7]);
    assert_eq!(s.get::<Vec<u32>>(NET, NET_STATE).unwrap(), Some(vec![7]));
}
on_both!(a_persisted_document_lives_under_one_key_, a_persisted_document_lives_under_one_key);

fn put_new_refuses_a_key_that_is_there(s: &Store) {
    s.update(|tx| tx.put_new(META, "made", &json!({"n": 1}))).unwrap();
    let e = s
        .update(|tx| {
            tx.put(META, "beside", &json!({"n": 2}))?;
            tx.put_new(META, "made", &json!({"n": 3}))
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("meta/made"), "{e:#}");
    assert_eq!(n(s.get(META, "made").unwrap()), Some(1), "kept");
    assert_eq!(n(s.get(META, "beside").unwrap()), None, "nothing of the transaction stored");
    // deleted and made new in one transaction: a plain delete, then a put of a key that was there
    s.update(|tx| {
        tx.delete(META, "made")?;
        tx.put(META, "made", &json!({"n": 4}))
    })
    .unwrap();
    assert_eq!(n(s.get(META, "made").unwrap()), Some(4));
}
on_both!(put_new_refuses_a_key_that_is_there_, put_new_refuses_a_key_that_is_there);

/// Two processes (two connections, two writer slots) making one key: both read it absent, the first
/// commit wins, the second fails whole, with or without a fence.
#[test]
fn of_two_writers_making_one_key_the_first_commit_wins() {
    let Some((a, cfg, _keep)) = on_etcd() else { return };
    let b = Store::open_etcd(&cfg).unwrap();
    let (ta, tb) = (a.write().unwrap(), b.write().unwrap());
    assert!(ta.get::<Value>(META, "ca").unwrap().is_none() && tb.get::<Value>(META, "ca").unwrap().is_none());
    ta.put_new(META, "ca", &json!({"n": 1})).unwrap();
    tb.put_new(META, "ca", &json!({"n": 2})).unwrap();
    tb.put(META, "b-only", &json!({"n": 2})).unwrap();
    ta.commit().unwrap();
    let e = tb.commit().unwrap_err();
    assert!(format!("{e:#}").contains("meta/ca") && format!("{e:#}").contains("another writer"), "{e:#}");
    assert_eq!(n(a.get(META, "ca").unwrap()), Some(1));
    assert_eq!(n(a.get(META, "b-only").unwrap()), None);
    // under a fence that still holds, the failure is the taken key, not leadership
    let rev = make_key(&cfg.endpoints[0], "/test/leader");
    b.set_fence(Some(Fence { key: "/test/leader".into(), create_revision: rev })).unwrap();
    let e = b.update(|tx| tx.put_new(META, "ca", &json!({"n": 3}))).unwrap_err();
    assert!(format!("{e:#}").contains("another writer"), "{e:#}");
    b.update(|tx| tx.put_new(META, "fresh", &json!({"n": 5}))).unwrap();
    assert_eq!(n(a.get(META, "fresh").unwrap()), Some(5));
}

#[test]
fn the_embedded_store_survives_reopening_and_makes_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.update(|tx| tx.put(APPLICATIONS, "a1", &json!({"n": 1}))).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(n(s.get(APPLICATIONS, "a1").unwrap()), Some(1));
    assert_eq!(s.location(), Location::Embedded(dir.path().join("root.redb")));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    assert_eq!(mode(&dir.path().join("root.redb")), 0o600);
    let id = new_id();
    assert_eq!(id.len(), 24);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
}

/// Tables written before the backends (redb tables of `&str` keys and JSON bytes) read as they were.
#[test]
fn the_embedded_store_reads_files_of_the_earlier_layout() {
    let dir = tempfile::tempdir().unwrap();
    {
        const OLD: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("services");
        let db = redb::Database::create(dir.path().join("root.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(OLD).unwrap().insert("s1", br#"{"n":5}"#.as_slice()).unwrap();
        tx.commit().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(n(s.get(SERVICES, "s1").unwrap()), Some(5));
}

#[test]
fn the_embedded_store_cannot_be_fenced() {
    let (s, _keep) = embedded();
    let e = s.set_fence(Some(Fence { key: "/leader".into(), create_revision: 1 })).unwrap_err();
    assert!(e.to_string().contains("fencing needs the etcd store"), "{e}");
    s.set_fence(None).unwrap();
}

/// Runs `f` with a plain etcd client (for what the store does not do: the election key of a fence).
fn with_client<R>(endpoint: &str, f: impl AsyncFnOnce(&mut etcd_client::Client) -> R) -> R {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([endpoint], None).await.unwrap();
        f(&mut c).await
    })
}

/// (Re)creates `key` and says its create revision.
fn make_key(endpoint: &str, key: &str) -> i64 {
    with_client(endpoint, async |c| {
        c.delete(key, None).await.unwrap();
        c.put(key, "me", None).await.unwrap();
        c.get(key, None).await.unwrap().kvs()[0].create_revision()
    })
}

#[test]
fn a_fenced_commit_fails_once_the_fence_key_changed_and_stores_nothing() {
    let Some((s, cfg, _keep)) = on_etcd() else { return };
    let ep = &cfg.endpoints[0];
    let rev = make_key(ep, "/test/leader");
    s.set_fence(Some(Fence { key: "/test/leader".into(), create_revision: rev })).unwrap();
    s.update(|tx| tx.put(APPLICATIONS, "while-leader", &json!({"n": 1}))).unwrap();
    // another leader made the key again: its create revision moved on
    let rev2 = make_key(ep, "/test/leader");
    assert!(rev2 > rev);
    let e = s
        .update(|tx| {
            tx.put(APPLICATIONS, "after", &json!({"n": 2}))?;
            tx.delete(APPLICATIONS, "while-leader")
        })
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("not the leader any more") && msg.contains("/test/leader"), "{msg}");
    assert!(msg.contains(&format!("create revision {rev2}")), "{msg}");
    assert_eq!(n(s.get(APPLICATIONS, "after").unwrap()), None);
    assert_eq!(n(s.get(APPLICATIONS, "while-leader").unwrap()), Some(1));
    // the key gone altogether
    with_client(ep, async |c| c.delete("/test/leader", None).await.unwrap());
    let e = s.update(|tx| tx.put(APPLICATIONS, "after", &json!({"n": 2}))).unwrap_err();
    assert!(format!("{e:#}").contains("is gone"), "{e:#}");
    assert_eq!(n(s.get(APPLICATIONS, "after").unwrap()), None);
    // a store fenced from its config on the current key commits; lifting the fence commits too
    let rev3 = make_key(ep, "/test/leader");
    let fenced = Store::open_etcd(&EtcdConfig {
        fence: Some(Fence { key: "/test/leader".into(), create_revision: rev3 }),
        ..cfg
    })
    .unwrap();
    fenced.update(|tx| tx.put(APPLICATIONS, "new-leader", &json!({"n": 3}))).unwrap();
    assert_eq!(n(s.get(APPLICATIONS, "new-leader").unwrap()), Some(3));
    s.set_fence(None).unwrap();
    s.update(|tx| tx.put(APPLICATIONS, "unfenced", &json!({"n": 4}))).unwrap();
}

#[test]
fn a_transaction_over_the_op_limit_fails_naming_it_and_lists_span_pages() {
    let Some((s, cfg, _keep)) = on_etcd() else { return };
    let e = s
        .update(|tx| {
            for i in 0..=etcd::DEFAULT_MAX_TXN_OPS {
                tx.put(CLUSTERS, &format!("c{i:03}"), &i)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("--max-txn-ops"), "{e:#}");
    assert!(s.list::<u64>(CLUSTERS).unwrap().is_empty(), "nothing stored");
    // 500 keys in transactions under the limit, listed back in order across pages
    for chunk in (0..500u64).collect::<Vec<_>>().chunks(100) {
        s.update(|tx| chunk.iter().try_for_each(|i| tx.put(CLUSTERS, &format!("c{i:03}"), i))).unwrap();
    }
    assert_eq!(s.list::<u64>(CLUSTERS).unwrap(), (0..500).collect::<Vec<_>>());
    // the keys sit under the prefix, by table
    let keys = with_client(&cfg.endpoints[0], async |c| {
        let r = c.get("/test/root/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await;
        r.unwrap().kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect::<Vec<_>>()
    });
    assert_eq!(keys.len(), 500);
    assert_eq!(keys[0], "/test/root/clusters/c000");
}

#[test]
fn an_unreachable_etcd_fails_within_seconds_naming_the_endpoint() {
    // a port nobody listens on (refused), and a listener that never answers (silent)
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for endpoint in [format!("http://127.0.0.1:{refused}"), format!("http://{}", silent.local_addr().unwrap())] {
        let cfg = EtcdConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            ..EtcdConfig::new(vec![endpoint.clone()])
        };
        let t = Instant::now();
        let e = Store::open_etcd(&cfg).err().expect("no etcd there");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert!(format!("{e:#}").contains(&endpoint), "{e:#}");
    }
}

/// A store whose etcd went away mid-life errs within its request timeout instead of hanging.
#[test]
fn a_store_whose_etcd_stopped_errs_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = Etcd::start(dir.path()) else { return };
    let cfg = EtcdConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::new(vec![etcd.endpoint.clone()])
    };
    let s = Store::open_etcd(&cfg).unwrap();
    s.update(|tx| tx.put(META, "k", &1)).unwrap();
    drop(etcd);
    let t = Instant::now();
    let e = s.update(|tx| tx.put(META, "k", &2)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(format!("{e:#}").contains(&cfg.endpoints[0]), "{e:#}");
    assert!(s.get::<u64>(META, "k").is_err());
}

/// With one endpoint dead and one alive, the store works through the live one.
#[test]
fn a_dead_endpoint_beside_a_live_one_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = Etcd::start(dir.path()) else { return };
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = EtcdConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::new(vec![format!("http://127.0.0.1:{dead}"), etcd.endpoint.clone()])
    };
    let s = Store::open_etcd(&cfg).unwrap();
    for i in 0..20u64 {
        s.update(|tx| tx.put(META, "k", &i)).unwrap();
        assert_eq!(s.get::<u64>(META, "k").unwrap(), Some(i));
    }
}
