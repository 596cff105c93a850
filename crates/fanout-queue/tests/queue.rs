//! A job's queue against a real `redis-server`: what producers and workers
//! rely on, each step checked in Redis itself.

use std::time::Duration;

use fanout_queue::server;
use fanout_queue::{Answer, FORMAT, JobMeta, JobQueue, QueuedTask};

fn meta(fingerprint: &str) -> JobMeta {
    JobMeta { format: FORMAT, fingerprint: fingerprint.into(), settings: "{}".into() }
}

fn rows(range: std::ops::Range<u64>) -> Vec<QueuedTask> {
    range
        .map(|index| QueuedTask {
            entry: String::new(),
            index,
            id: format!("row-{index}"),
            request: format!("{{\"prompt\":\"{index}\"}}"),
        })
        .collect()
}

fn indices(tasks: &[QueuedTask]) -> Vec<u64> {
    tasks.iter().map(|task| task.index).collect()
}

/// The producer's mark moves with the rows it counts, a producer coming back
/// finds it, and a different job of the same name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enqueued_mark_moves_with_its_rows() {
    let Some(redis) = server::for_test() else { return };
    let queue = JobQueue::connect(&redis.url(), "marks").await.unwrap();
    assert_eq!(queue.announce(&meta("a")).await.unwrap(), 0);
    queue.enqueue(&rows(0..3), 5).await.unwrap();
    let again = JobQueue::connect(&redis.url(), "marks").await.unwrap();
    assert_eq!(again.announce(&meta("a")).await.unwrap(), 5, "found again where it stopped");
    let refused = again.announce(&meta("b")).await.unwrap_err().to_string();
    assert!(refused.contains("different job named `marks`"), "{refused}");
    assert_eq!(queue.jobs().await.unwrap(), ["marks"]);
    let taken = queue.take("w", 10, Duration::from_millis(10)).await.unwrap();
    assert_eq!(indices(&taken), [0, 1, 2]);
    assert_eq!(taken[1].id, "row-1");
    assert_eq!(taken[1].request, "{\"prompt\":\"1\"}");
}

/// A row taken by a worker that stops answering is taken over once idle
/// for the claim time; a worker that says it is still at work keeps its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_silent_worker_are_claimed_and_a_living_ones_are_not() {
    let Some(redis) = server::for_test() else { return };
    let queue = JobQueue::connect(&redis.url(), "claims").await.unwrap();
    queue.announce(&meta("a")).await.unwrap();
    queue.enqueue(&rows(0..4), 4).await.unwrap();
    let dead = queue.take("dead", 2, Duration::from_millis(10)).await.unwrap();
    let alive = queue.take("alive", 2, Duration::from_millis(10)).await.unwrap();
    assert_eq!((indices(&dead), indices(&alive)), (vec![0, 1], vec![2, 3]));
    let idle = Duration::from_millis(300);
    assert!(queue.claim("other", idle, 10).await.unwrap().is_empty(), "nobody is idle yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let entries: Vec<String> = alive.iter().map(|t| t.entry.clone()).collect();
    queue.touch("alive", &entries).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let claimed = queue.claim("other", idle, 10).await.unwrap();
    assert_eq!(indices(&claimed), [0, 1], "only the silent worker's rows");
    assert_eq!(claimed[0].request, dead[0].request, "taken over whole");
}

/// An answer adds the result and removes the row at once (answers given
/// together, all in one transaction); the producer
/// reads results, is given again those it did not acknowledge (as after a
/// crash), and acknowledged ones leave Redis. A row answered twice (a slow
/// worker after a takeover) gives two results: the producer keeps one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_replace_rows_and_stay_until_acknowledged() {
    let Some(redis) = server::for_test() else { return };
    let queue = JobQueue::connect(&redis.url(), "answers").await.unwrap();
    queue.announce(&meta("a")).await.unwrap();
    queue.enqueue(&rows(0..2), 2).await.unwrap();
    queue.finish_enqueuing().await.unwrap();
    let taken = queue.take("w", 2, Duration::from_millis(10)).await.unwrap();
    assert!(!queue.is_drained().await.unwrap(), "rows still out");
    let answer = |task: &QueuedTask, record: &str| Answer {
        entry: task.entry.clone(),
        index: task.index,
        record: record.into(),
    };
    queue.answer(&[answer(&taken[0], "zero"), answer(&taken[1], "one")]).await.unwrap();
    queue.answer(&[answer(&taken[1], "one again")]).await.unwrap();
    assert!(queue.is_drained().await.unwrap(), "every row answered");
    let wait = Duration::from_millis(10);
    let first = queue.results(None, 10, wait).await.unwrap();
    let records: Vec<(u64, &str)> = first.iter().map(|r| (r.index, r.record.as_str())).collect();
    assert_eq!(records, [(0, "zero"), (1, "one"), (1, "one again")]);
    assert!(queue.results(None, 10, wait).await.unwrap().is_empty(), "each given once");
    queue.acknowledge(&[first[0].entry.clone()]).await.unwrap();
    let again = queue.results(Some("0"), 10, wait).await.unwrap();
    assert_eq!(again.iter().map(|r| r.index).collect::<Vec<_>>(), [1, 1], "the unacknowledged");
    // Read again page by page, past the last one read.
    let page = queue.results(Some("0"), 1, wait).await.unwrap();
    assert_eq!(page[0].entry, again[0].entry);
    let next = queue.results(Some(&page[0].entry), 1, wait).await.unwrap();
    assert_eq!(next[0].entry, again[1].entry);
    assert!(queue.results(Some(&next[0].entry), 1, wait).await.unwrap().is_empty());
    queue.remove().await.unwrap();
    assert!(queue.meta().await.unwrap().is_none());
    assert!(queue.is_drained().await.unwrap(), "a removed job needs no work");
    assert!(queue.jobs().await.unwrap().is_empty());
}
