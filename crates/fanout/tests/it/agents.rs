//! Branches and agents, under paused time: every model call of every branch
//! shares the executor's limits; an agent runs a turn's tools at once, bounds
//! them, tells the model about their faults, and keeps its transcript when cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fanout::{
    Agent, Behavior, Branch, BranchOutcome, Ending, Executor, FnTool, MockProvider, Outcome,
    Request, Response, Role, Timeout, ToolCall, ToolSpec, Toolbox, Usage,
};
use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::json;
use tokio::time::Instant;

use crate::{calls_fit_the_rate, ms, paused_runtime, secs, tokens_fit_the_budget};

fn word_schema() -> serde_json::Value {
    json!({"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]})
}

/// A glossary tool that takes `latency` to look a word up.
fn lookup(latency: std::time::Duration) -> FnTool {
    FnTool::new(
        ToolSpec::new("lookup", "Looks a word up.", word_schema()),
        move |args| async move {
            tokio::time::sleep(latency).await;
            let word = args.get("word").and_then(|w| w.as_str()).ok_or("no word")?.to_owned();
            Ok(format!("{word}: a glossary entry"))
        },
    )
}

fn tool_call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() }
}

/// A model that, offered tools, first calls `calls` (all in one turn), and
/// once it has their results answers with them.
fn tool_model(calls: Vec<ToolCall>) -> MockProvider {
    MockProvider::new().with_latency(ms(100)).with_rule(move |call| {
        let request = call.request;
        if request.tools.is_empty() {
            return None;
        }
        let answered = request.messages.last().is_some_and(|m| m.role == Role::Tool);
        let response = if answered {
            let results: Vec<&str> = request
                .messages
                .iter()
                .filter(|m| m.role == Role::Tool)
                .map(|m| m.content.as_str())
                .collect();
            Response::new(format!("answer from: {}", results.join(" | ")), Usage::new(50, 10))
        } else {
            Response::new("", Usage::new(30, 5)).with_tool_calls(calls.clone())
        };
        Some(Behavior::respond(response.with_finish_reason("stop")))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// However many branches make however many calls, together they never
    /// exceed the executor's concurrency cap, its RPM or its TPM.
    #[test]
    fn branches_share_one_concurrency_cap_rpm_and_tpm(
        branches in 1usize..10,
        calls_per_branch in 1usize..8,
        rpm in 60u64..600,
        tpm in 2_000u64..20_000,
        concurrency in 1usize..6,
        latency in 0u64..300,
    ) {
        paused_runtime().block_on(async {
            // Every call uses its whole allowance (the prompt and 50 output
            // tokens), and says so.
            let mock = MockProvider::new().with_latency(ms(latency)).with_call_log().with_rule(|call| {
                let input_tokens = fanout::tokens::estimate_prompt(call.request);
                let used = Usage::new(input_tokens, 50);
                Some(Behavior::respond(Response::new("ok", used)))
            });
            let executor =
                Executor::builder(mock.clone()).concurrency(concurrency).rpm(rpm).tpm(tpm).build();
            let work = (0..branches).map(|b| {
                Branch::new(format!("agent-{b}"), move |calls| async move {
                    let mut answered = 0;
                    for turn in 0..calls_per_branch {
                        let request = Request::user(format!("b{b} turn {turn}")).with_max_tokens(50);
                        let outcome = calls.complete(request).await;
                        answered += usize::from(outcome.is_success());
                    }
                    answered
                })
            });
            let report = executor.branches(work).await;
            prop_assert!(report.results.iter().all(|r| r.outcome == BranchOutcome::Finished(calls_per_branch)));
            prop_assert_eq!(report.calls.tasks, branches * calls_per_branch);
            prop_assert!(mock.max_in_flight() <= concurrency as u64);
            let log = mock.call_log();
            let times: Vec<Instant> = log.iter().map(|c| c.at).collect();
            if let Err(excess) = calls_fit_the_rate(&times, rpm) {
                prop_assert!(false, "{}", excess);
            }
            let tokens: Vec<(Instant, f64)> = log.iter().map(|c| (c.at, c.estimated_tokens as f64)).collect();
            if let Err(excess) = tokens_fit_the_budget(&tokens, tpm) {
                prop_assert!(false, "{}", excess);
            }
            Ok(())
        })?;
    }
}

/// Ten agents making thirty calls each against a 100 RPM key: 300 calls at
/// 100 a minute, whoever makes them (the first 2 at once, the burst).
#[tokio::test(start_paused = true)]
async fn ten_agents_keep_to_one_rpm_together() {
    let mock = MockProvider::new().with_latency(ms(200)).with_call_log();
    let executor = Executor::builder(mock.clone()).rpm(100).build();
    let branches = (0..10).map(|b| {
        Branch::new(format!("agent-{b}"), move |calls| async move {
            for turn in 0..30 {
                calls.complete(Request::user(format!("{b}.{turn}"))).await;
            }
        })
    });
    let start = Instant::now();
    let report = executor.branches(branches).await;
    assert_eq!(report.calls.succeeded, 300);
    let times: Vec<Instant> = mock.call_log().iter().map(|c| c.at).collect();
    calls_fit_the_rate(&times, 100).unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed >= secs(178), "300 calls at 100 a minute, after a burst of 2: {elapsed:?}");
}

/// The model asks for three lookups in one turn: they run at once (1 s, not
/// 3 s), their results go back in order, and the transcript has both turns.
#[tokio::test(start_paused = true)]
async fn a_turns_tool_calls_run_at_once() {
    let calls = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, w)| tool_call(&format!("c{i}"), "lookup", &json!({"word": w}).to_string()))
        .collect();
    let executor = Executor::builder(tool_model(calls)).probe(false).hedge(None).build();
    let agent = Agent::new(Toolbox::new().with(lookup(secs(1))));
    let start = Instant::now();
    let report = executor
        .branches([Branch::new("research", move |calls| async move {
            agent.run(&calls, Request::user("define a, b, c")).await
        })])
        .await;
    assert_eq!(
        start.elapsed(),
        ms(100) + secs(1) + ms(100),
        "model, the three tools at once, model"
    );
    let run = report.results[0].outcome.value().unwrap();
    assert_eq!(run.ending, Ending::Answered);
    assert_eq!(
        run.answer(),
        Some("answer from: a: a glossary entry | b: a glossary entry | c: a glossary entry")
    );
    assert_eq!(run.transcript.turns.len(), 2);
    assert_eq!(run.transcript.turns[0].tools.len(), 3);
    assert_eq!(run.transcript.usage, Usage::new(80, 15), "usage of both turns");
    assert_eq!(report.calls.calls, 2);
}

/// Every fault of a tool call is said to the model, which goes on: an unknown
/// tool, arguments that are not JSON or break the tool's own checks, a tool
/// that hangs past its timeout, one that panics, and one whose output is huge.
#[tokio::test(start_paused = true)]
async fn tool_faults_are_told_to_the_model() {
    let calls = vec![
        tool_call("c0", "no_such_tool", "{}"),
        tool_call("c1", "lookup", "{\"word\": "),
        tool_call("c2", "lookup", "{\"letter\": \"a\"}"),
        tool_call("c3", "hang", "{}"),
        tool_call("c4", "panic", "{}"),
        tool_call("c5", "huge", "{}"),
    ];
    let spec = |name: &str| ToolSpec::new(name, "", json!({"type": "object"}));
    let tools = Toolbox::new()
        .with(lookup(ms(10)))
        .with(FnTool::new(spec("hang"), |_| std::future::pending()))
        .with(FnTool::new(spec("panic"), |_| async { panic!("tool bug") }))
        .with(FnTool::new(spec("huge"), |_| async { Ok("x".repeat(100_000)) }))
        .timeout(secs(5))
        .max_output(1_000);
    let executor = Executor::builder(tool_model(calls)).probe(false).hedge(None).build();
    let agent = Agent::new(tools);
    let report = executor
        .branches([Branch::new("faults", move |calls| async move {
            agent.run(&calls, Request::user("try them all")).await
        })])
        .await;
    let run = report.results[0].outcome.value().unwrap();
    assert_eq!(run.ending, Ending::Answered, "the model got every fault back and answered");
    let tools = &run.transcript.turns[0].tools;
    let said: Vec<(bool, bool)> = tools.iter().map(|t| (t.is_error, t.truncated)).collect();
    assert_eq!(
        said,
        [(true, false), (true, false), (true, false), (true, false), (true, false), (false, true)]
    );
    assert!(
        tools[0]
            .output
            .contains("there is no tool `no_such_tool`; the tools are: hang, huge, lookup, panic")
    );
    assert!(
        tools[1].output.contains("bad arguments for `lookup`: the arguments are not valid JSON")
    );
    assert_eq!(tools[2].output, "no word", "the tool's own error");
    assert!(tools[3].output.contains("did not answer within 5.0s"), "{}", tools[3].output);
    assert!(tools[4].output.contains("panicked: tool bug"));
    assert!(
        tools[5].output.len() < 1_100
            && tools[5].output.ends_with("[cut: 100000 bytes in all, the first 1000 shown]")
    );
    assert!(
        run.answer().unwrap().contains("error: there is no tool"),
        "errors reach the model marked as such"
    );
}

/// A model that calls tools forever stops at the turn limit, with every turn
/// kept; the last turn is asked for an answer and its tool calls are not run
/// (their results could never reach the model).
#[tokio::test(start_paused = true)]
async fn the_turn_limit_stops_a_loop() {
    // The tool choice of every turn, in order; this model calls tools regardless.
    let choices = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&choices);
    let forever = MockProvider::new().with_rule(move |call| {
        seen.lock().unwrap().push(call.request.tool_choice.clone());
        let call = tool_call("c", "lookup", "{\"word\": \"again\"}");
        Some(Behavior::respond(Response::new("", Usage::default()).with_tool_calls(vec![call])))
    });
    let executor = Executor::builder(forever.clone()).probe(false).hedge(None).build();
    let agent = Agent::new(Toolbox::new().with(lookup(ms(1)))).max_turns(4);
    let report = executor
        .branches([Branch::new("loop", move |calls| async move {
            agent.run(&calls, Request::user("go")).await
        })])
        .await;
    let run = report.results[0].outcome.value().unwrap();
    assert_eq!(
        (run.ending.clone(), run.transcript.turns.len(), run.answer()),
        (Ending::TurnLimit, 4, None)
    );
    assert_eq!(forever.calls(), 4);
    let last_is_asked_to_answer = [None, None, None, Some(fanout::ToolChoice::None)];
    assert_eq!(*choices.lock().unwrap(), last_is_asked_to_answer);
    assert!(run.transcript.turns[3].tools.is_empty(), "the last turn's calls are not run");
}

/// The run's deadline cuts a hung tool: the agent returns its transcript so
/// far (ending `Cut`), and the other branch's answer is kept.
#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_a_tool_and_keeps_the_transcript() {
    let spec = ToolSpec::new("hang", "Never answers.", json!({"type": "object"}));
    let tools =
        Toolbox::new().with(FnTool::new(spec, |_| std::future::pending())).timeout(secs(3600));
    let executor = Executor::builder(tool_model(vec![tool_call("c", "hang", "{}")]))
        .probe(false)
        .hedge(None)
        .deadline(secs(10))
        .build();
    let stuck = Agent::new(tools);
    let start = Instant::now();
    let report = executor
        .branches([
            Branch::new("stuck", move |calls| async move {
                Some(stuck.run(&calls, Request::user("wait")).await)
            }),
            Branch::new("quick", |calls| async move {
                assert!(calls.complete(Request::user("quick")).await.is_success());
                None
            }),
        ])
        .await;
    assert_eq!(start.elapsed(), secs(10), "the cut branch returned at once");
    let stuck = report.results[0].outcome.value().unwrap().as_ref().unwrap();
    match &stuck.ending {
        Ending::Cut(failure) => assert!(
            matches!(failure.outcome(), Some(Outcome::TimedOut { timeout: Timeout::Deadline, .. })),
            "{failure:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(stuck.transcript.turns.len(), 1, "the turn that called the tool is kept");
    assert_eq!(report.results[1].outcome, BranchOutcome::Finished(None));
    assert_eq!(report.calls.succeeded, 2);
}

/// A model call cut by the deadline ends the agent with that outcome; a
/// branch that ignores the cut is dropped after the grace and reported as cut.
#[tokio::test(start_paused = true)]
async fn cut_branches_end_with_the_reason() {
    let mock = MockProvider::new().with_rule(|_| Some(Behavior::hang()));
    let executor = Executor::builder(mock).probe(false).hedge(None).deadline(secs(5)).build();
    let agent = Agent::new(Toolbox::new().with(lookup(ms(1))));
    let report = executor
        .branches([
            Branch::new("agent", move |calls| async move {
                Some(agent.run(&calls, Request::user("q")).await)
            }),
            Branch::new("stubborn", |_calls| async move {
                tokio::time::sleep(secs(3600)).await;
                None
            }),
        ])
        .await;
    let run = report.results[0].outcome.value().unwrap().as_ref().unwrap();
    match &run.ending {
        Ending::CallFailed(failure) => assert!(
            matches!(failure.outcome(), Some(Outcome::TimedOut { timeout: Timeout::Deadline, .. })),
            "{failure:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(report.results[1].outcome, BranchOutcome::TimedOut(Timeout::Deadline));
}

/// The task timeout bounds each branch; a panicking branch fails alone; the
/// stream yields branches as they finish.
#[tokio::test(start_paused = true)]
async fn branch_timeouts_panics_and_streaming() {
    let executor = Executor::builder(MockProvider::new().with_latency(ms(100)))
        .probe(false)
        .task_timeout(secs(2))
        .build();
    let finished = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&finished);
    let branches: Vec<Branch<u64>> = vec![
        Branch::new("slow", |_| async {
            tokio::time::sleep(secs(60)).await;
            1
        }),
        Branch::new("panics", |_| async { panic!("branch bug") }),
        Branch::new("fast", move |calls| async move {
            calls.complete(Request::user("fast")).await;
            counted.fetch_add(1, Ordering::SeqCst)
        }),
    ];
    let mut stream = executor.stream_branches(branches);
    let mut order = Vec::new();
    while let Some(result) = stream.next().await {
        order.push((result.id.to_string(), result.outcome));
    }
    assert_eq!(
        order,
        [
            ("panics".to_string(), BranchOutcome::Panicked("branch bug".into())),
            ("fast".to_string(), BranchOutcome::Finished(0)),
            ("slow".to_string(), BranchOutcome::TimedOut(Timeout::Task)),
        ]
    );
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert_eq!(stream.totals().await.calls, 1);
}

/// Cancelling the executor's token ends the branches the same way: calls in
/// flight end as cancelled, and a branch that ignores it is reported cancelled.
#[tokio::test(start_paused = true)]
async fn cancellation_reaches_every_branch() {
    let cancel = fanout::CancellationToken::new();
    let mock = MockProvider::new().with_rule(|_| Some(Behavior::hang()));
    let executor =
        Executor::builder(mock).probe(false).hedge(None).cancel_token(cancel.clone()).build();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(secs(1)).await;
        cancel.cancel();
    });
    let start = Instant::now();
    let report = executor
        .branches([
            Branch::new(
                "call",
                |calls| async move { Some(calls.complete(Request::user("q")).await) },
            ),
            Branch::new("stubborn", |_calls| async move {
                tokio::time::sleep(secs(3600)).await;
                None
            }),
        ])
        .await;
    stopper.await.unwrap();
    assert_eq!(start.elapsed(), secs(1) + fanout::BRANCH_GRACE, "the stubborn one had its grace");
    assert_eq!(
        report.results[0].outcome,
        BranchOutcome::Finished(Some(Outcome::Cancelled { attempts: 1 }))
    );
    assert_eq!(report.results[1].outcome, BranchOutcome::Cancelled);
    assert_eq!(report.calls.cancelled, 1);
}

/// A typed tool: its schema is derived from the Rust type, and arguments that
/// do not fit it are told to the model without calling the tool.
#[tokio::test(start_paused = true)]
async fn typed_tools_derive_their_schema_and_check_arguments() {
    /// Repeats a word.
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Repeat {
        /// The word.
        word: String,
        /// How many times.
        times: u32,
    }
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let tool = FnTool::typed("repeat", "Repeats a word.", move |args: Repeat| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok(vec![args.word; args.times as usize].join(" ")) }
    });
    let tools = Toolbox::new().with(tool);
    let spec = &tools.specs()[0];
    assert_eq!(spec.parameters["type"], "object");
    assert_eq!(spec.parameters["properties"]["word"]["type"], "string");
    assert_eq!(spec.parameters["properties"]["times"]["type"], "integer");
    assert_eq!(spec.parameters["required"], json!(["word", "times"]));
    assert!(spec.parameters.get("$schema").is_none(), "the schema itself, not a document");
    let ok = tools.run(&tool_call("a", "repeat", "{\"word\": \"go\", \"times\": 3}")).await;
    assert_eq!((ok.output.as_str(), ok.is_error), ("go go go", false));
    let bad = tools.run(&tool_call("b", "repeat", "{\"word\": \"go\", \"times\": \"many\"}")).await;
    assert!(
        bad.is_error && bad.output.starts_with("the arguments do not fit the schema"),
        "{}",
        bad.output
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the bad call never reached the tool");
}

/// The token budget stops an agent once its turns used that many tokens.
#[tokio::test(start_paused = true)]
async fn the_token_budget_stops_an_agent() {
    // Every turn calls the tool again and uses 35 tokens (30 in, 5 out).
    let again = MockProvider::new().with_rule(|_| {
        let call = tool_call("c", "lookup", "{\"word\": \"x\"}");
        let usage = Usage::new(30, 5);
        Some(Behavior::respond(Response::new("", usage).with_tool_calls(vec![call])))
    });
    let executor = Executor::builder(again.clone()).probe(false).hedge(None).build();
    let agent = Agent::new(Toolbox::new().with(lookup(ms(1)))).max_total_tokens(100);
    let report = executor
        .branches([Branch::new("frugal", move |calls| async move {
            agent.run(&calls, Request::user("go")).await
        })])
        .await;
    let run = report.results[0].outcome.value().unwrap();
    assert_eq!(run.ending, Ending::TokenBudget);
    assert_eq!(
        run.transcript.turns.len(),
        3,
        "35, 70, 105 tokens: the budget is spent after three"
    );
    assert_eq!(run.transcript.usage.total(), 105);
    assert_eq!(again.calls(), 3);
    assert!(run.failure().unwrap().to_string().contains("token budget"));
}

/// Two tool sets offering the same name are refused, not silently swapped.
#[test]
fn tool_sets_may_not_share_a_name() {
    let mut tools = Toolbox::new();
    let first: Vec<Arc<dyn fanout::Tool>> = vec![Arc::new(lookup(ms(1)))];
    tools.add_set("glossary", &first).unwrap();
    let error = tools.add_set("other", &first).unwrap_err();
    assert!(error.contains("the tool `lookup` of `other`"), "{error}");
}

/// Once the run is drained, a branch's next call does not start (the calls
/// in flight finish), and it still counts in the totals.
#[tokio::test(start_paused = true)]
async fn a_drained_run_starts_no_new_call() {
    let drain = fanout::CancellationToken::new();
    let mock = MockProvider::new().with_latency(secs(1));
    let executor =
        Executor::builder(mock.clone()).probe(false).hedge(None).drain_token(drain.clone()).build();
    let drainer = tokio::spawn(async move {
        tokio::time::sleep(ms(500)).await;
        drain.cancel();
    });
    let report = executor
        .branches([Branch::new("chain", |calls| async move {
            let first = calls.complete(Request::user("one")).await;
            let second = calls.complete(Request::user("two")).await;
            (first.is_success(), second)
        })])
        .await;
    drainer.await.unwrap();
    let (first_answered, second) = report.results[0].outcome.value().unwrap().clone();
    assert!(first_answered, "the call in flight finished");
    assert_eq!(second, Outcome::NotRun(fanout::NotRun::Cancelled));
    assert_eq!((mock.calls(), report.calls.tasks, report.calls.not_run), (1, 2, 1));
}

/// Calls of one branch that fail together retry apart: each call draws its
/// own jitter (a proxy's lane is one branch making every client's calls).
#[tokio::test(start_paused = true)]
async fn calls_of_one_branch_retry_with_their_own_jitter() {
    let mock = MockProvider::new();
    for prompt in ["a", "b", "c"] {
        mock.script(prompt, [fanout::Behavior::server_error()]);
    }
    let recorder = crate::Recorder::default();
    let executor = recorder.attach(Executor::builder(mock).hedge(None)).build();
    let report = executor
        .branches([Branch::new("lane", |calls| async move {
            let ask = |p: &str| calls.complete(Request::user(p));
            futures_util::join!(ask("a"), ask("b"), ask("c"))
        })])
        .await;
    let (a, b, c) = report.results[0].outcome.value().unwrap();
    assert!(a.is_success() && b.is_success() && c.is_success());
    let delays: Vec<_> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            fanout::Event::Retrying { delay, .. } => Some(delay),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 3);
    assert!(delays[0] != delays[1] || delays[1] != delays[2], "in step: {delays:?}");
}
