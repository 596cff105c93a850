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
