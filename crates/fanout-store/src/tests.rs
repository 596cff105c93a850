use super::*;

fn record(index: u64, status: &str) -> Record {
    Record {
        index,
        task_id: format!("row-{index}"),
        status: status.into(),
        answer: (status == "succeeded").then(|| format!("answer {index}")),
        input_tokens: 10,
        output_tokens: 5,
        attempts: 1,
        finished_at: now(),
        ..Record::default()
    }
}

fn fingerprint(input: &str) -> Fingerprint {
    Fingerprint(
        [("input".to_string(), input.to_string()), ("prompt".to_string(), "p".to_string())].into(),
    )
}

#[test]
fn jobs_records_and_resume_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/fanout.db");
    let mut store = Store::open(&path).unwrap();
    let settings = serde_json::json!({"prompt": "Grade {{ essay }}"});
    let job = store.create_job("essays", "essays.jsonl", &fingerprint("a"), &settings).unwrap();
    assert!(
        store.create_job("essays", "x", &fingerprint("a"), &settings).is_err(),
        "names are unique"
    );
    store
        .record(job.id, &[record(0, "succeeded"), record(2, "failed"), record(5, "succeeded")])
        .unwrap();
    // A retried failure replaces its record.
    store.record(job.id, &[record(2, "succeeded")]).unwrap();
    store.record(job.id, &[record(7, "failed")]).unwrap();

    let reopened = Store::open(&path).unwrap();
    let job = reopened.job("essays").unwrap().unwrap();
    assert_eq!(job.settings, settings);
    let done = reopened.finished(job.id, true).unwrap();
    assert_eq!(
        (done.len(), done.contains(2), done.contains(7), done.contains(3)),
        (4, true, true, false)
    );
    assert_eq!(
        reopened.finished(job.id, false).unwrap().len(),
        3,
        "failed ones are retried on request"
    );
    assert_eq!(reopened.record_at(job.id, 2).unwrap().unwrap().answer.as_deref(), Some("answer 2"));
    let mut order = Vec::new();
    reopened
        .each_record(job.id, |r| {
            order.push(r.index);
            Ok::<_, StoreError>(())
        })
        .unwrap();
    assert_eq!(order, [0, 2, 5, 7]);
    let summary = &reopened.jobs().unwrap()[0];
    assert_eq!(
        (summary.counts["succeeded"], summary.counts["failed"], summary.input_tokens),
        (3, 1, 40)
    );
    assert!(reopened.remove_job("essays").unwrap());
    assert!(reopened.jobs().unwrap().is_empty());
    assert!(!reopened.remove_job("essays").unwrap());
}

#[test]
fn fingerprints_name_what_changed() {
    let a = fingerprint("a");
    let mut b = fingerprint("b");
    b.0.insert("system".into(), "s".into());
    assert_eq!(a.differences(&b), ["input", "system"]);
    assert!(a.differences(&a.clone()).is_empty());
}

#[test]
fn cache_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    assert_eq!(store.cache_get("k").unwrap(), None);
    store.cache_put("k", "{\"text\":\"hi\"}").unwrap();
    assert_eq!(store.cache_get("k").unwrap().as_deref(), Some("{\"text\":\"hi\"}"));
}

#[test]
fn finished_set_is_a_bitset() {
    let mut finished = Finished::default();
    for i in [0, 63, 64, 1_000_000, 64] {
        finished.insert(i);
    }
    assert_eq!(finished.len(), 4);
    assert!(
        finished.contains(1_000_000)
            && !finished.contains(999_999)
            && !finished.contains(5_000_000)
    );
}

/// A store made before `cached_input_tokens` and `last_run` existed gains
/// them on open, keeps its records, and then stores both.
#[test]
fn an_older_store_gains_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, input TEXT NOT NULL,
                fingerprint TEXT NOT NULL, settings TEXT NOT NULL, total INTEGER,
                created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
             CREATE TABLE tasks (job_id INTEGER NOT NULL, idx INTEGER NOT NULL, task_id TEXT NOT NULL,
                status TEXT NOT NULL, answer TEXT, error_kind TEXT, error_message TEXT,
                error_status INTEGER, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                latency_ms REAL, attempts INTEGER NOT NULL, finish_reason TEXT, model TEXT,
                request_id TEXT, finished_at INTEGER NOT NULL, PRIMARY KEY (job_id, idx)) WITHOUT ROWID;
             INSERT INTO jobs VALUES (1, 'old', 'in.jsonl', '{}', '{}', 2, 0, 0);
             INSERT INTO tasks VALUES (1, 0, 'a', 'succeeded', 'hi', NULL, NULL, NULL, 7, 3, 1.0, 1,
                'stop', 'm', NULL, 0);",
        )
        .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    let job = store.job("old").unwrap().unwrap();
    assert_eq!(job.last_run, None);
    let old = store.record_at(job.id, 0).unwrap().unwrap();
    assert_eq!((old.input_tokens, old.cached_input_tokens, old.usage_estimated), (7, 0, false));
    let cached = Record { cached_input_tokens: 6, ..record(1, "succeeded") };
    store.record(job.id, &[cached]).unwrap();
    let totals = serde_json::json!({"calls": 2, "retries": 1});
    store.set_last_run(job.id, &totals).unwrap();
    let summary = store.summary(store.job("old").unwrap().unwrap()).unwrap();
    assert_eq!((summary.input_tokens, summary.cached_input_tokens), (17, 6));
    assert_eq!(summary.job.last_run, Some(totals));
}

/// Two writers appending to one job (two proxies) from their own threads and
/// connections: every record gets its own index, none is overwritten.
#[test]
fn appends_from_two_writers_never_share_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanout.db");
    let job = Store::open(&path)
        .unwrap()
        .create_job("proxy", "(proxy)", &fingerprint("a"), &serde_json::json!({}))
        .unwrap();
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut store = Store::open(&path).unwrap();
                let mut firsts = Vec::new();
                for _ in 0..50 {
                    // Every record says index 0: append ignores it.
                    let records = [record(0, "succeeded"), record(0, "failed")];
                    firsts.push(store.append(job.id, &records, &[]).unwrap());
                }
                firsts
            })
        })
        .collect();
    let mut firsts: Vec<u64> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    firsts.sort_unstable();
    assert_eq!(firsts, (0..100).map(|i| i * 2).collect::<Vec<_>>());
    let store = Store::open(&path).unwrap();
    assert_eq!(store.finished(job.id, true).unwrap().len(), 200);
}

/// A commit stores records with their call history and the run's events
/// together; events come back oldest first, and go with their job.
#[test]
fn run_events_and_call_history_are_stored_with_the_records() {
    let mut store = Store::open(Path::new(":memory:")).unwrap();
    let settings = serde_json::json!({});
    let job = store.create_job("history", "in.jsonl", &fingerprint("a"), &settings).unwrap();
    let event = |at_ms, kind: &str, value, detail: Option<&str>| RunEvent {
        at_ms,
        kind: kind.into(),
        value,
        detail: detail.map(str::to_owned),
    };
    let with_calls = Record { calls: Some("[[1,2]]".into()), ..record(0, "succeeded") };
    let pause = event(2_000, "pause", 1_500.0, Some("429: slow down"));
    let limit = event(1_000, "limit", 8.0, None);
    store
        .commit(job.id, std::slice::from_ref(&with_calls), &[pause.clone(), limit.clone()])
        .unwrap();
    assert_eq!(store.record_at(job.id, 0).unwrap(), Some(with_calls));
    let mut events = Vec::new();
    store
        .each_event::<StoreError>(job.id, |e| {
            events.push(e);
            Ok(())
        })
        .unwrap();
    assert_eq!(events, [limit, pause]);
    assert!(store.remove_job("history").unwrap());
    let left: i64 =
        store.conn.query_row("SELECT count(*) FROM run_events", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0);
}

/// A job priced call by call sums its records' own costs, and counts the
/// calls that used tokens without a known price apart.
#[test]
fn costs_of_their_own_are_summed_and_the_unpriced_counted() {
    let mut store = Store::open(Path::new(":memory:")).unwrap();
    let job = store.create_job("p", "(proxy)", &fingerprint("a"), &serde_json::json!({})).unwrap();
    let priced = |index, cost| Record { cost: Some(cost), ..record(index, "succeeded") };
    let free = Record { input_tokens: 0, output_tokens: 0, ..record(3, "failed") };
    store.record(job.id, &[priced(0, 0.25), priced(1, 0.5), record(2, "succeeded"), free]).unwrap();
    assert_eq!(store.record_at(job.id, 1).unwrap().unwrap().cost, Some(0.5));
    let summary = store.summary(store.job("p").unwrap().unwrap()).unwrap();
    assert_eq!((summary.priced_cost, summary.unpriced), (Some(0.75), 1));
    let other =
        store.create_job("b", "in.jsonl", &fingerprint("a"), &serde_json::json!({})).unwrap();
    store.record(other.id, &[record(0, "succeeded")]).unwrap();
    let summary = store.summary(store.job("b").unwrap().unwrap()).unwrap();
    assert_eq!(summary.priced_cost, None, "a job with one price keeps none per record");
}
