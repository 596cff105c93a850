//! The spending limit: calls reserve their most before they start, the
//! reported usage corrects it, and once the next call could exceed the limit
//! no call starts; never more spent than the limit plus what was in flight.

use fanout::{
    Behavior, Executor, MockProvider, NotRun, Outcome, Price, Request, Response, SpendLimit, Usage,
};

use crate::{ms, prompts};

/// Every answer uses 100 input and 50 output tokens (a 100 ms call).
fn fixed_usage() -> MockProvider {
    MockProvider::new()
        .with_latency(ms(100))
        .with_rule(|_| Some(Behavior::respond(Response::new("answer", Usage::new(100, 50)))))
}

/// "p0".. estimate at 5 prompt tokens: each call reserves 5 + `max_tokens`.
fn requests(n: usize, max_tokens: u32) -> impl Iterator<Item = Request> {
    prompts(n).into_iter().map(move |r| r.with_max_tokens(max_tokens))
}

#[tokio::test(start_paused = true)]
async fn a_money_limit_stops_new_calls_and_is_not_exceeded() {
    // $1 and $1 per million tokens either way: 150 tokens cost $0.00015 a
    // call, so $0.01 pays for 66 calls.
    let price = Price::new(1.0, 1.0);
    let executor = Executor::builder(fixed_usage())
        .concurrency(10)
        .price(price)
        .spend_limit(SpendLimit::cost(0.01, price))
        .build();
    // Each call reserves 150 tokens, what it uses: the limit is never exceeded.
    let report = executor.run(requests(200, 145)).await;
    let totals = &report.totals;
    let spent = totals.cost.unwrap();
    assert!(spent <= 0.01, "spent ${spent}");
    assert_eq!(totals.succeeded, 66, "{totals:?}");
    let budget_spent =
        report.results.iter().filter(|r| r.outcome == Outcome::NotRun(NotRun::BudgetSpent)).count();
    assert_eq!(totals.succeeded + budget_spent, 200, "every other task ends as budget spent");
    assert_eq!(totals.calls as usize, totals.succeeded, "no call was sent past the limit");
}

#[tokio::test(start_paused = true)]
async fn a_token_limit_counts_earlier_spending_and_usage_corrects_reservations() {
    // 100 reserved per call (5 prompt + 95 output), 150 used: after 2,000
    // tokens spent before, 3,000 more allow 20 calls at most.
    let limit = SpendLimit::tokens(5_000).already_spent(Usage::new(1_500, 500));
    let executor = Executor::builder(fixed_usage()).concurrency(4).spend_limit(limit).build();
    let report = executor.run(requests(100, 95)).await;
    let used = report.totals.usage.total();
    // Answers use 50 more than they reserved: the overshoot is bounded by
    // the calls in flight.
    assert!(used <= 3_000 + 4 * 50, "at most the calls in flight over: {used}");
    assert!(report.totals.succeeded >= 16, "{:?}", report.totals);
    // A run on the same executor finds the limit spent.
    let again = executor.run(requests(3, 95)).await;
    assert_eq!(again.totals.calls, 0);
    assert_eq!(again.totals.not_run, 3);
}

#[tokio::test(start_paused = true)]
async fn answers_cheaper_than_their_reservation_leave_room_for_more_calls() {
    let cheap = MockProvider::new()
        .with_latency(ms(100))
        .with_rule(|_| Some(Behavior::respond(Response::new("ok", Usage::new(5, 5)))));
    // 1,000 reserved a call (5 + 995): 4 in flight at once reserve 4,000 of
    // the 4,500, but each spends 10, so all 100 calls fit.
    let requests = prompts(100).into_iter().map(|r| r.with_max_tokens(995));
    let executor =
        Executor::builder(cheap).concurrency(8).spend_limit(SpendLimit::tokens(4_500)).build();
    let report = executor.run(requests).await;
    assert_eq!(report.totals.succeeded, 100, "{:?}", report.totals);
    assert_eq!(report.totals.usage.total(), 1_000);
}

/// A call that fails with a retryable error gives its reservation back before
/// it waits to retry: otherwise the tasks waiting for budget room would hold
/// every slot and its retry would never get one (the run would hang).
#[tokio::test(start_paused = true)]
async fn a_failed_call_waiting_to_retry_holds_no_budget() {
    let mock = MockProvider::new()
        .with_latency(ms(100))
        .with_rule(|_| Some(Behavior::respond(Response::new("answer", Usage::new(5, 95)))));
    mock.script("p0", [Behavior::server_error()]);
    // 100 reserved and used a call: 250 allows two at once, two in all.
    let executor = Executor::builder(mock)
        .concurrency(2)
        .hedge(None)
        .spend_limit(SpendLimit::tokens(250))
        .build();
    let run = executor.run(requests(5, 95));
    let report = tokio::time::timeout(std::time::Duration::from_secs(3600), run)
        .await
        .expect("the run ends");
    assert_eq!(report.totals.tasks, 5);
    assert!(report.totals.usage.total() <= 250, "{:?}", report.totals);
    assert_eq!(report.totals.succeeded, 2, "{:?}", report.totals);
}

/// A repair the limit cannot pay for fails its task with what it paid for
/// the refused answer, said as the budget (not a cancellation).
#[tokio::test(start_paused = true)]
async fn a_repair_the_limit_cannot_pay_for_fails_with_what_was_paid() {
    let mock = MockProvider::new()
        .with_rule(|_| Some(Behavior::respond(Response::new("not json", Usage::new(10, 5)))));
    let mut request = Request::user("p0").with_max_tokens(95);
    request.response_format = Some(fanout::ResponseFormat::JsonSchema {
        name: "grade".into(),
        schema: serde_json::json!({"type": "object"}),
    });
    // The first call reserves 100 and spends 15; the repair, a longer prompt
    // with the same 95 of output, does not fit in the 95 left.
    let executor = Executor::builder(mock).spend_limit(SpendLimit::tokens(110)).build();
    let report = executor.run([request]).await;
    let Outcome::Failed { error, usage, .. } = &report.results[0].outcome else {
        panic!("{:?}", report.results[0].outcome)
    };
    assert!(error.message().ends_with("asking again would pass the spending limit"), "{error}");
    assert_eq!((*usage, report.totals.usage), (Usage::new(10, 5), Usage::new(10, 5)));
    assert_eq!(report.totals.calls, 1);
}
