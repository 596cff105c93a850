//! The shared limiter's scripts against a real `redis-server`, under
//! reservations from many connections at once (as many processes make them).
//! Reservations are read as the schedule they return (server time), so the
//! tests check the limits exactly without waiting them out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::{Rate, SharedLimits, StatedLimits};
use fanout_queue::server::{self, LocalRedis};
use fanout_queue::{LimitsConfig, Notices, RedisLimits};
use futures_util::future::join_all;

fn quiet() -> Notices {
    Arc::new(|_: &str| {})
}

async fn limiters(redis: &LocalRedis, config: &LimitsConfig, n: usize) -> Vec<Arc<RedisLimits>> {
    let mut all = Vec::new();
    for _ in 0..n {
        let limits = RedisLimits::connect(&redis.url(), config.clone(), quiet()).await.unwrap();
        all.push(Arc::new(limits));
    }
    all
}

/// Every reservation's start (server µs) and cost, all limiters at once.
async fn schedule(limiters: &[Arc<RedisLimits>], costs: &[u64]) -> (u64, Vec<(u64, u64)>) {
    let reservations = costs.iter().enumerate().map(|(i, cost)| {
        let limits = Arc::clone(&limiters[i % limiters.len()]);
        let cost = *cost;
        async move {
            let (reserved, wait, now) = limits.reserve(cost).await.unwrap();
            assert!(reserved);
            (now, now + wait, cost)
        }
    });
    let done = join_all(reservations).await;
    let first = done.iter().map(|(now, _, _)| *now).min().unwrap();
    let mut starts: Vec<(u64, u64)> = done.into_iter().map(|(_, at, cost)| (at, cost)).collect();
    starts.sort();
    (first, starts)
}

/// 200 requests reserved at once from 8 connections at 600 RPM with no burst
/// start at least 100 ms apart, one after the other, with none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_are_spaced_by_the_rate() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("spacing");
    config.rpm = Some(Rate::per_minute(600).with_burst(1));
    let limiters = limiters(&redis, &config, 8).await;
    let (first, starts) = schedule(&limiters, &[1; 200]).await;
    assert_eq!(starts.len(), 200);
    for pair in starts.windows(2) {
        // A microsecond of rounding at most.
        assert!(pair[1].0 - pair[0].0 >= 99_999, "{} and {} are too close", pair[0].0, pair[1].0);
    }
    let span = starts[199].0 - first;
    assert!((19_800_000..=19_999_999 + 200_000).contains(&span), "199 gaps of 100 ms: {span} µs");
}

/// Token-weighted reservations of uneven sizes never put more than the burst
/// plus the refill into any window of time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reservations_fit_the_budget_in_every_window() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("tokens");
    // 1 token per millisecond, 2,000 at once.
    config.tpm = Some(Rate::per_minute(60_000).with_burst(2_000));
    let limiters = limiters(&redis, &config, 4).await;
    let mut rng = fastrand::Rng::with_seed(7);
    let costs: Vec<u64> = (0..120).map(|_| rng.u64(1..=600)).collect();
    let (first, starts) = schedule(&limiters, &costs).await;
    let mut windows = 0;
    for (i, (from, _)) in starts.iter().enumerate() {
        let mut spent = 0;
        for (at, cost) in &starts[i..] {
            spent += cost;
            let allowed = 2_000 + (at - from) / 1_000 + 1;
            assert!(spent <= allowed, "{spent} tokens between {from} and {at}, {allowed} allowed");
            windows += 1;
        }
    }
    assert!(windows > 7_000);
    // And the budget is used, not just respected: the last start is about
    // when the tokens beyond the burst have refilled.
    let total: u64 = costs.iter().sum();
    let last = starts.last().unwrap().0 - first;
    let refill = total.saturating_sub(2_000) * 1_000;
    assert!(last <= refill + 200_000, "{last} µs for {total} tokens");
}

/// A usage report corrects the budget: tokens used beyond the reservation
/// are charged, and unused ones given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_charges_and_refunds_the_token_budget() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("settle");
    config.tpm = Some(Rate::per_minute(60_000).with_burst(1_000));
    let limits = &limiters(&redis, &config, 1).await[0];
    let (_, wait, start) = limits.reserve(1_000).await.unwrap();
    assert_eq!(wait, 0, "the burst is there at first");
    // Used 400 of the 1,000: 600 come back, and 500 fit at once.
    limits.settle_now(1_000, 400).await.unwrap();
    let (_, wait, _) = limits.reserve(500).await.unwrap();
    assert_eq!(wait, 0, "refunded tokens are usable at once");
    // Used 900 more than reserved: the next call waits for them. The bucket is
    // empty again at start + 0.9 s + 0.9 s; 100 more fit 1 s (the burst) before.
    limits.settle_now(100, 1_000).await.unwrap();
    let (_, wait, now) = limits.reserve(100).await.unwrap();
    let due = (now + wait) - start;
    assert!(
        due.abs_diff(900_000) <= 2,
        "charged tokens are waited for: due {due} µs after the start"
    );
}

/// An admission abandoned while it waits for its turn gives its reservation
/// back: the next call takes the turn it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_admission_gives_its_turn_back() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("cancel");
    config.rpm = Some(Rate::per_minute(60).with_burst(1));
    let limits = Arc::new(limiters(&redis, &config, 1).await.remove(0));
    drop(limits.admit(1).await);
    let key = "fanout:limits:cancel:requests";
    let first = redis_get(&redis, key).await;
    let waiting = tokio::spawn({
        let limits = Arc::clone(&limits);
        async move { drop(limits.admit(1).await) }
    });
    let reserved = until(async || redis_get(&redis, key).await > first).await;
    assert!(reserved, "the second admission reserved its turn");
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    let given_back = until(async || redis_get(&redis, key).await <= first + 1).await;
    assert!(given_back, "the abandoned turn came back");
    let (_, wait, now) = limits.reserve(1).await.unwrap();
    assert!((now + wait).abs_diff(first) <= 1, "the next call takes the turn the first left");
}

/// A 429 met elsewhere while a call waits for its turn holds that call back
/// until the pause ends (its turn kept), not only the calls that come after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_set_while_a_call_waits_for_its_turn_holds_it_back() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("pause-during-wait");
    config.rpm = Some(Rate::per_minute(600).with_burst(1));
    let limiters = limiters(&redis, &config, 2).await;
    drop(limiters[0].admit(1).await);
    let key = "fanout:limits:pause-during-wait:requests";
    let first = redis_get(&redis, key).await;
    let started = std::time::Instant::now();
    let waiting = tokio::spawn({
        let limits = Arc::clone(&limiters[0]);
        async move { drop(limits.admit(1).await) }
    });
    assert!(until(async || redis_get(&redis, key).await > first).await, "its turn is reserved");
    limiters[1].pause_now(Duration::from_millis(600)).await.unwrap();
    waiting.await.unwrap();
    // Its turn was about 100 ms away; the pause ends 600 ms after it was set.
    assert!(started.elapsed() >= Duration::from_millis(550), "went at {:?}", started.elapsed());
}

/// 600 requests a minute, 10 at once, as a provider's headers state them.
fn stated_600() -> StatedLimits {
    StatedLimits { requests: Some(Rate::per_minute(600).with_burst(10)), tokens: None }
}

/// Waits until the limits one process learned are in Redis for the others.
async fn stated_in_redis(redis: &LocalRedis, scope: &str) {
    let key = format!("fanout:limits:{scope}:stated");
    let written = until(async || {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("EXISTS").arg(&key).query_async::<u64>(&mut connection).await.unwrap() == 1
    })
    .await;
    assert!(written, "the stated limits reached Redis");
}

/// Limits one process read in the provider's headers hold every process that
/// was given none: a limiter that never learned them reserves at the stated
/// rate, with a tenth of the stated burst left to the network. One given its
/// own RPM keeps to that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_one_process_learns_hold_every_process() {
    let Some(redis) = server::for_test() else { return };
    let config = LimitsConfig::new("learned");
    let limiters = limiters(&redis, &config, 3).await;
    limiters[0].learn(stated_600());
    stated_in_redis(&redis, "learned").await;
    let (first, starts) = schedule(&limiters[1..], &[1; 30]).await;
    let at_once = starts.iter().filter(|(at, _)| *at - first < 50_000).count();
    assert_eq!(at_once, 9, "the stated burst less a tenth: {starts:?}");
    for pair in starts[9..].windows(2) {
        assert!(pair[1].0 - pair[0].0 >= 99_999, "{} and {} are too close", pair[0].0, pair[1].0);
    }
    assert!(starts[29].0 - first <= 2_100_000, "21 turns of 100 ms after the burst");
    // Given its own limit, a process keeps to it, not to the stated one.
    let mut own = LimitsConfig::new("learned");
    own.rpm = Some(Rate::per_minute(60).with_burst(1));
    let own = RedisLimits::connect(&redis.url(), own, quiet()).await.unwrap();
    let (_, wait, now) = own.reserve(1).await.unwrap();
    let (_, next_wait, next_now) = own.reserve(1).await.unwrap();
    let (start, next_start) = (now + wait, next_now + next_wait);
    assert!(next_start - start >= 999_999, "a second apart: {start} {next_start}");
}

/// Calls reserved while no limit was known were counted by the provider too:
/// the first reservation at a limit is charged for them, but never for more
/// than a full bucket, however many there were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reserved_before_a_limit_was_known_are_charged_to_it() {
    let Some(redis) = server::for_test() else { return };
    let few = limiters(&redis, &LimitsConfig::new("unmetered"), 2).await;
    for _ in 0..5 {
        assert_eq!(few[1].reserve(1).await.unwrap().1, 0, "no limit: no wait");
    }
    few[0].learn(stated_600());
    stated_in_redis(&redis, "unmetered").await;
    // 9 at once, 5 of them already spent.
    let (first, starts) = schedule(&few, &[1; 6]).await;
    let at_once = starts.iter().filter(|(at, _)| *at - first < 50_000).count();
    assert_eq!(at_once, 4, "{starts:?}");

    let many = limiters(&redis, &LimitsConfig::new("unmetered-many"), 2).await;
    for _ in 0..50 {
        many[1].reserve(1).await.unwrap();
    }
    many[0].learn(stated_600());
    stated_in_redis(&redis, "unmetered-many").await;
    let (_, wait, _) = many[1].reserve(1).await.unwrap();
    assert!((99_000..=100_000).contains(&wait), "a full bucket, not 50 turns: {wait} µs");
}

/// With no limit known, a process admits one call at a time until the
/// provider first answers it, so processes starting together at their full
/// concurrency do not overrun a limit no answer has stated yet; once it has
/// answered, calls go at once. A first answer slower than two seconds holds
/// the others back no longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_its_first_answer_a_process_with_no_known_limit_admits_one_call_at_a_time() {
    let Some(redis) = server::for_test() else { return };
    let admit = |limits: &Arc<RedisLimits>| {
        let limits = Arc::clone(limits);
        tokio::spawn(async move { limits.admit(10).await })
    };
    let limits = Arc::new(limiters(&redis, &LimitsConfig::new("probe"), 1).await.remove(0));
    let first = limits.admit(10).await;
    let second = admit(&limits);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "a second call waits for the first");
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap();
    // The first answer came (it stated no limit): everything goes at once.
    limits.settle(10, 10);
    let held: Vec<_> = join_all((0..20).map(|_| limits.admit(10))).await;
    assert_eq!(held.len(), 20);
    drop((second, held));

    // No answer yet, one call out: the next goes once two seconds have passed.
    let slow = Arc::new(limiters(&redis, &LimitsConfig::new("slow-probe"), 1).await.remove(0));
    let started = std::time::Instant::now();
    let _first = slow.admit(10).await;
    drop(tokio::time::timeout(Duration::from_secs(5), admit(&slow)).await.unwrap().unwrap());
    assert!(started.elapsed() >= Duration::from_millis(1_990), "{:?}", started.elapsed());
}

/// Whether `condition` came true within two seconds, asked every 5 ms.
async fn until(condition: impl AsyncFn() -> bool) -> bool {
    for _ in 0..400 {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// A pause any process sets holds every reservation back until it ends,
/// reserving nothing meanwhile; a shorter one does not cut it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_every_process_back() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("pause");
    config.rpm = Some(Rate::per_minute(60).with_burst(1));
    let limiters = limiters(&redis, &config, 2).await;
    limiters[0].pause_now(Duration::from_secs(20)).await.unwrap();
    limiters[0].pause_now(Duration::from_secs(1)).await.unwrap();
    let (reserved, wait, _) = limiters[1].reserve(1).await.unwrap();
    assert!(!reserved, "nothing is reserved during a pause");
    assert!((19_000_000..=20_000_000).contains(&wait), "the longer pause stays: {wait} µs");
    // Nothing was spent: the burst is still there once the pause is over.
    redis_command(&redis, &["DEL", "fanout:limits:pause:pause"]).await;
    let (reserved, wait, _) = limiters[1].reserve(1).await.unwrap();
    assert!(reserved && wait == 0);
}

/// The global cap holds across processes; a slot comes back when its lease
/// is dropped, and a dead process's lease is taken back once it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_slots_are_capped_across_processes_and_expire_with_their_holder() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("slots");
    config.max_in_flight = Some(3);
    let limiters = limiters(&redis, &config, 2).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(limiters[i % 2].try_acquire().await.unwrap().expect("a free slot"));
    }
    for limits in &limiters {
        assert!(limits.try_acquire().await.unwrap().is_none(), "the cap is 3 in all");
    }
    drop(held.pop());
    let mut freed = None;
    for _ in 0..200 {
        freed = limiters[1].try_acquire().await.unwrap();
        if freed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(freed.is_some(), "a dropped lease gives its slot back");
    drop((held, freed));
    // A process that died holding every slot: expired leases are taken back,
    // live ones are not.
    let leases = "fanout:limits:slots:leases";
    redis_command(&redis, &["DEL", leases]).await;
    redis_command(&redis, &["ZADD", leases, "1", "dead:0", "2", "dead:1"]).await;
    redis_command(&redis, &["ZADD", leases, "99999999999999999", "alive:0"]).await;
    let taken = limiters[0].try_acquire().await.unwrap();
    assert!(taken.is_some(), "an expired lease's slot is free again");
    let next = limiters[0].try_acquire().await.unwrap();
    assert!(next.is_some());
    assert!(limiters[0].try_acquire().await.unwrap().is_none(), "the live lease keeps its slot");
}

/// Unreachable at the start: a clear error naming where, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_an_error_at_once() {
    let Some(redis) = server::for_test() else { return };
    let (url, port) = (redis.url(), redis.port());
    redis.kill();
    let error = RedisLimits::connect(&url, LimitsConfig::new("gone"), quiet()).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("cannot reach Redis at redis://127.0.0.1:{port}/0")),
        "{message}"
    );
    assert!(message.contains("connection refused"), "{message}");
    // A password in the address never shows.
    let secret = format!("redis://:hunter2@127.0.0.1:{port}/0");
    let error =
        RedisLimits::connect(&secret, LimitsConfig::new("gone"), quiet()).await.unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
}

/// Lost mid-run: admission waits (no call starts), says so once, and goes
/// on when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_waits_for_a_lost_redis_and_goes_on_when_it_is_back() {
    let Some(redis) = server::for_test() else { return };
    let port = redis.port();
    let said = Arc::new(Mutex::new(Vec::<String>::new()));
    let heard = Arc::clone(&said);
    let notices: Notices = Arc::new(move |notice: &str| heard.lock().unwrap().push(notice.into()));
    let mut config = LimitsConfig::new("outage");
    config.rpm = Some(Rate::per_minute(6_000));
    let limits = Arc::new(RedisLimits::connect(&redis.url(), config, notices).await.unwrap());
    drop(limits.admit(1).await);
    redis.kill();
    let admitting = tokio::spawn({
        let limits = Arc::clone(&limits);
        async move { drop(limits.admit(1).await) }
    });
    // Until the outage is said, the admission has not gone through.
    for _ in 0..500 {
        if !said.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!admitting.is_finished(), "a call was admitted without Redis");
    let back = LocalRedis::start_on(port).expect("redis-server again");
    tokio::time::timeout(Duration::from_secs(20), admitting).await.unwrap().unwrap();
    let said = said.lock().unwrap().clone();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[0].contains("out of reach") && said[0].contains("no new calls"), "{said:?}");
    assert!(said[1].contains("is back"), "{said:?}");
    drop(back);
}

async fn redis_get(redis: &LocalRedis, key: &str) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<String> =
        redis::cmd("GET").arg(key).query_async(&mut connection).await.unwrap();
    value.map_or(0, |v| v.parse().unwrap())
}

async fn redis_command(redis: &LocalRedis, args: &[&str]) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query_async::<redis::Value>(&mut connection).await.unwrap();
}

/// A process that closes its limits before it exits has given back the places
/// of its last calls: the others need not wait for their leases to run out.
#[test]
fn closing_gives_back_the_last_places_before_the_process_exits() {
    let Some(redis) = server::for_test() else { return };
    let mut config = LimitsConfig::new("close");
    config.max_in_flight = Some(1);
    // The exiting process: a runtime of its own, gone once its work is done,
    // as a `fanout batch` process's is.
    let exiting = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    exiting.block_on(async {
        let limits = RedisLimits::connect(&redis.url(), config.clone(), quiet()).await.unwrap();
        drop(limits.admit(1).await);
        limits.close().await;
    });
    drop(exiting);
    let other = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    other.block_on(async {
        let limits = RedisLimits::connect(&redis.url(), config, quiet()).await.unwrap();
        assert!(limits.try_acquire().await.unwrap().is_some(), "the slot was given back");
    });
}
