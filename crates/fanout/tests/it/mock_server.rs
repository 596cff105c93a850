//! The executor driving the real HTTP providers against `fanout-mock` on
//! 127.0.0.1: real sockets, real 429s, real faults. These run in real time, so
//! they are kept to a few seconds each.

use std::time::Duration;

use fanout::{Anthropic, OpenAi};
use fanout::{Executor, Request, Status};
use fanout_mock::{Config, Limit, MockServer};

use crate::{ms, prompts};

fn openai(server: &MockServer) -> OpenAi {
    OpenAi::builder("mock-1").base_url(server.openai_base_url()).api_key("sk-mock").build().unwrap()
}

/// A server limited to 50 requests a second (burst 5) and an executor told
/// nothing about it: only the first wave, sent before any answer stated the
/// limit, can draw 429s; they pause every task, the limit is learned from the
/// answers' headers and paced to, and every task succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_ends_with_every_task_succeeded() {
    let config = Config { rpm: Some(Limit { per_minute: 3000, burst: 5 }), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let executor = Executor::builder(openai(&server)).concurrency(64).max_attempts(20).build();
    let report = executor.run(prompts(150)).await;
    let stats = server.stats();
    assert_eq!(report.totals.succeeded, 150, "{:?} {stats:?}", report.totals);
    assert!(stats.count(429) < 64, "no storm after the first wave: {stats:?}");
    assert_eq!(stats.count(200), 150);
    assert_eq!(report.totals.rate_limited, stats.count(429));
}

/// 500s, truncated JSON and 10-second hangs: every task is accounted for and
/// succeeds, and the run is bounded by the attempt timeout, not by the hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_end_with_every_task_accounted_for() {
    let config = Config {
        latency: ms(20),
        error_rate: 0.1,
        malformed_rate: 0.05,
        hang_rate: 0.05,
        hang: Duration::from_secs(10),
        seed: 7,
        ..Config::default()
    };
    let server = MockServer::start(config).await.unwrap();
    let executor = Executor::builder(openai(&server))
        .concurrency(50)
        .attempt_timeout(Some(ms(500)))
        .max_attempts(10)
        .build();
    let report = executor.run(prompts(300)).await;
    let stats = server.stats();
    assert_eq!(report.results.len(), 300);
    assert_eq!(report.totals.succeeded, 300, "{:?} {stats:?}", report.totals);
    assert!(stats.count(500) > 0 && report.totals.retries > 0, "{stats:?}");
    assert!(report.totals.wall < Duration::from_secs(8), "{:?}", report.totals.wall);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_choices_through_both_apis() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let streaming =
        OpenAi::builder("mock-1").base_url(server.openai_base_url()).stream(true).build().unwrap();
    let requests = prompts(20).into_iter().map(|r| Request { n: Some(2), ..r });
    let report = Executor::new(streaming).run(requests).await;
    assert_eq!(report.totals.succeeded, 20);
    let first = report.results[0].outcome.success().unwrap();
    assert!(first.response.text.ends_with("to: p0"), "{}", first.response.text);
    assert_eq!(first.response.other_choices.len(), 1);
    assert!(first.response.usage.output_tokens > 0);

    for stream in [false, true] {
        let anthropic = Anthropic::builder("claude-mock")
            .base_url(server.anthropic_base_url())
            .stream(stream)
            .build()
            .unwrap();
        let report = Executor::new(anthropic).run(prompts(20)).await;
        assert_eq!(report.totals.succeeded, 20, "stream: {stream}");
        assert!(report.results[3].outcome.text().unwrap().ends_with("to: p3"));
    }
    assert_eq!(server.stats().streamed, 40);
}

/// One client per provider, keeping its connections alive: 400 calls at
/// concurrency 16 use at most 16 connections, plus one for each hedge (a
/// cancelled loser's connection is closed mid-answer, so it cannot be reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_kept_alive() {
    let server = MockServer::start(Config { latency: ms(5), ..Config::default() }).await.unwrap();
    let report = Executor::builder(openai(&server)).concurrency(16).build().run(prompts(400)).await;
    assert_eq!(report.totals.succeeded, 400);
    let stats = server.stats();
    let allowed = 16 + report.totals.hedges;
    assert!(stats.connections <= allowed, "{} connections for 400 calls", stats.connections);
    assert!(stats.max_in_flight <= 16);
}

/// The mock also lists its model and refuses bodies that are not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_listing_and_bad_json_answers() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let anthropic =
        Anthropic::builder("claude-mock").base_url(server.anthropic_base_url()).build().unwrap();
    // Building a provider also installs the TLS crypto provider the bare client below needs.
    let report = Executor::new(anthropic).run(prompts(3)).await;
    assert!(report.results.iter().all(|r| r.outcome.status() == Status::Succeeded));
    let client = reqwest::Client::new();
    let models = client.get(format!("{}/models", server.openai_base_url())).send().await.unwrap();
    assert!(models.text().await.unwrap().contains("\"mock-1\""));
    let bad = client
        .post(format!("{}/chat/completions", server.openai_base_url()))
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// Streams that stall mid-answer and connections reset mid-answer: the stalled
/// ones are hedged (or cut when silent past the attempt timeout), the reset ones
/// retried, and every task succeeds long before a stall would have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_reset_streams_end_with_every_task_succeeded() {
    let config = Config {
        latency: ms(20),
        stall_rate: 0.05,
        reset_rate: 0.05,
        hang: Duration::from_secs(30),
        seed: 11,
        ..Config::default()
    };
    let server = MockServer::start(config).await.unwrap();
    let provider = OpenAi::builder("mock-1")
        .base_url(server.openai_base_url())
        .api_key("sk-mock")
        .stream(true)
        .build()
        .unwrap();
    let executor = Executor::builder(provider)
        .concurrency(16)
        .attempt_timeout(Some(Duration::from_secs(2)))
        .build();
    let started = std::time::Instant::now();
    let report = executor.run(prompts(300)).await;
    assert_eq!(report.totals.succeeded, 300, "{:?}", report.totals);
    assert!(
        report.totals.retries + report.totals.hedges > 0,
        "faults were met: {:?}",
        report.totals
    );
    assert!(started.elapsed() < Duration::from_secs(30), "no stall was waited out");
}

/// The agent loop end to end on both wires, whole and streamed: the mock
/// calls the tool with the argument written in the prompt, the tool's result
/// goes back, and the mock's answer quotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_loop_runs_end_to_end_on_both_apis() {
    use fanout::{Agent, Branch, Ending, FnTool, Provider, ToolSpec, Toolbox};
    let server = MockServer::start(Config::default()).await.unwrap();
    let schema = serde_json::json!({"type": "object", "properties": {"word": {"type": "string"}}});
    let lookup =
        FnTool::new(ToolSpec::new("lookup", "Looks a word up.", schema), |args| async move {
            Ok(format!("{}: one input to many", args["word"].as_str().unwrap_or("?")))
        });
    let tools = Toolbox::new().with(lookup);
    for stream in [false, true] {
        let providers: [Box<dyn Provider>; 2] = [
            Box::new(
                OpenAi::builder("mock-1")
                    .base_url(server.openai_base_url())
                    .stream(stream)
                    .build()
                    .unwrap(),
            ),
            Box::new(
                Anthropic::builder("claude-mock")
                    .base_url(server.anthropic_base_url())
                    .stream(stream)
                    .build()
                    .unwrap(),
            ),
        ];
        for provider in providers {
            let name = format!("{} (stream: {stream})", provider.name());
            let executor = Executor::builder_for(std::sync::Arc::from(provider)).build();
            let agent = Agent::new(tools.clone());
            let report = executor
                .branches([Branch::new("define", move |calls| async move {
                    agent.run(&calls, Request::user("define word=fan-out")).await
                })])
                .await;
            let run = report.results[0].outcome.value().unwrap();
            assert_eq!(run.ending, Ending::Answered, "{name}: {run:?}");
            let turn = &run.transcript.turns[0];
            assert_eq!(turn.tools.len(), 1, "{name}");
            assert_eq!(turn.tools[0].call.parsed_arguments().unwrap()["word"], "fan-out", "{name}");
            let answer = run.answer().unwrap();
            assert!(
                answer.ends_with("| from tools: fan-out: one input to many"),
                "{name}: {answer}"
            );
            assert!(run.transcript.usage.output_tokens > 0, "{name}");
        }
    }
}

/// A streamed body whose answer is passed on through a [`fanout::Relay`].
fn relayed_request() -> (Request, fanout::Relayed) {
    let (relay, relayed) = fanout::Relay::new();
    let body = serde_json::json!({"model": "mock-1", "stream": true,
        "messages": [{"role": "user", "content": "Tell me about the sea"}]});
    let request =
        Request { body: Some(body.to_string()), relay: Some(relay), ..Request::user("sea") };
    (request, relayed)
}

/// Everything a relay passed on, as text.
async fn relayed_text(mut relayed: fanout::Relayed) -> String {
    let mut text = Vec::new();
    while let Some(bytes) = relayed.next().await {
        text.extend_from_slice(&bytes);
    }
    String::from_utf8(text).unwrap()
}

/// Once a streamed answer's bytes are passed on, the call is committed to
/// it: a stream that stalls past the hedging threshold is not hedged (the
/// reader would get two answers), and what was passed on is the whole
/// answer, the same bytes the call kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_that_stalls_is_not_hedged() {
    let config = Config { stall_rate: 1.0, hang: ms(1_500), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let hedge = fanout::HedgePolicy::after(ms(100)).with_budget(1.0);
    let executor = Executor::builder(openai(&server)).probe(false).hedge(Some(hedge)).build();
    let (request, relayed) = relayed_request();
    let (report, text) = tokio::join!(executor.run([request]), relayed_text(relayed));
    let outcome = &report.results[0].outcome;
    let raw = outcome.success().and_then(|s| s.response.raw.clone());
    assert_eq!(raw.as_deref(), Some(text.as_str()), "{outcome:?}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!((report.totals.hedges, server.stats().requests), (0, 1));
}

/// Until a byte has come, a relayed call is hedged like any: the hedge whose
/// bytes arrive first is the one passed on, and the straggler is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_call_is_hedged_until_its_first_bytes() {
    let config =
        Config { hang_rate: 0.5, hang: Duration::from_secs(5), seed: 3, ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let hedge = fanout::HedgePolicy::after(ms(200)).with_budget(1.0);
    let executor = Executor::builder(openai(&server)).probe(false).hedge(Some(hedge)).build();
    let mut hedged = 0;
    for _ in 0..6 {
        let (request, relayed) = relayed_request();
        let (report, text) = tokio::join!(executor.run([request]), relayed_text(relayed));
        let outcome = &report.results[0].outcome;
        let raw = outcome.success().and_then(|s| s.response.raw.clone());
        assert_eq!(raw.as_deref(), Some(text.as_str()), "one answer, passed on whole: {outcome:?}");
        hedged += report.totals.hedges_won;
    }
    assert!(hedged > 0, "some first call hung and its hedge answered");
}
