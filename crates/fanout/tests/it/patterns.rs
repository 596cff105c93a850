use std::collections::BTreeMap;
use std::time::Duration;

use fanout::pattern::extract::Extractor;
use fanout::pattern::map_reduce::{Document, MapReduceOptions, chunk, map_reduce};
use fanout::pattern::perspectives::{self, builtin, perspectives};
use fanout::pattern::sections::{Section, sections};
use fanout::pattern::vote::{EarlyStop, Rule, VoteOptions, distinct, most_consistent, vote};
use fanout::pattern::workflow::{ToolSets, Workflow};
use fanout::{Behavior, Executor, MockProvider, ProviderError, Request, Response, Usage};

use crate::ms;

/// A mock whose sample `i` answers `answers[i]` after `10 * (i + 1)` ms, so samples arrive in order.
fn voters(answers: &'static [&'static str]) -> MockProvider {
    MockProvider::new().with_rule(move |call| {
        let i = call.request.sample_index as usize;
        let answer = answers.get(i).copied().unwrap_or("none");
        Some(Behavior::reply(answer).after(ms(10 * (i as u64 + 1))))
    })
}

fn executor(mock: MockProvider) -> Executor {
    Executor::builder(mock).concurrency(16).probe(false).build()
}

#[tokio::test(start_paused = true)]
async fn majority_vote_with_extraction() {
    let answers =
        &["The answer is 42.", "I get 41", "42", "no idea", "It's 42!", "41", "7", "so, 42", "41"];
    let mock = voters(answers);
    let options = VoteOptions::new(9, Extractor::LastNumber);
    let result = vote(&executor(mock.clone()), &Request::user("6 x 7?"), &options).await;
    // 4 of 8 votes is the plurality, not a majority.
    assert_eq!((result.winner.as_deref(), result.consensus), (None, false));
    assert_eq!(result.plurality.as_deref(), Some("42"));
    assert!(result.tie.is_empty() && !result.stopped_early);
    let counts: Vec<(&str, usize)> =
        result.distribution.iter().map(|c| (c.answer.as_str(), c.votes)).collect();
    assert_eq!(counts, [("42", 4), ("41", 3), ("7", 1)]);
    assert!((result.agreement - 0.5).abs() < 1e-9, "4 of 8 answered");
    assert_eq!(result.samples.len(), 9);
    assert_eq!(result.samples[3].answer, None);
    assert_eq!((result.calls, mock.calls()), (9, 9));
    let mut plurality = VoteOptions::new(9, Extractor::LastNumber);
    plurality.rule = Rule::Plurality;
    let result = vote(&executor(voters(answers)), &Request::user("6 x 7?"), &plurality).await;
    assert_eq!((result.winner.as_deref(), result.consensus), (Some("42"), true));
}

/// An answer cut off at max_tokens is not a vote ("To add 12 and 30, we can
/// use the concept of" has no answer yet), unless asked for.
#[tokio::test(start_paused = true)]
async fn truncated_answers_do_not_vote() {
    let cut = || {
        MockProvider::new().with_rule(|call| {
            let (text, finish) = if call.number <= 2 {
                ("To add 12 and 30, we can use the concept of", "length")
            } else {
                ("12 + 30 = 42", "stop")
            };
            let usage = Usage::new(5, 10);
            let response = Response::new(text, usage).with_finish_reason(finish);
            Some(Behavior::respond(response))
        })
    };
    let options = VoteOptions::new(5, Extractor::LastNumber);
    let result = vote(&executor(cut()), &Request::user("12 + 30?"), &options).await;
    assert_eq!((result.winner.as_deref(), result.consensus), (Some("42"), true));
    let truncated = result.samples.iter().filter(|s| s.truncated).count();
    assert_eq!(truncated, 2);
    assert!(result.samples.iter().filter(|s| s.truncated).all(|s| s.answer.is_none()));
    assert_eq!(result.distribution.len(), 1, "only whole answers voted");

    let mut counting = options.clone();
    counting.count_truncated = true;
    let result = vote(&executor(cut()), &Request::user("12 + 30?"), &counting).await;
    let counts: Vec<(&str, usize)> =
        result.distribution.iter().map(|c| (c.answer.as_str(), c.votes)).collect();
    assert_eq!(counts, [("42", 3), ("30", 2)]);
}

/// Early stopping ends the vote once the leader cannot be overtaken. In fixed
/// waves of 3, the second wave's unneeded sample is cancelled in flight.
#[tokio::test(start_paused = true)]
async fn early_stop_saves_calls() {
    let all_a = &["A", "A", "A", "A", "A", "A", "A", "A", "A"];
    let mock = voters(all_a);
    let mut options = VoteOptions::new(9, Extractor::Choice);
    options.early_stop = Some(EarlyStop::Certain);
    options.wave = Some(3);
    let result = vote(&executor(mock.clone()), &Request::user("q"), &options).await;
    assert_eq!(result.winner.as_deref(), Some("A"));
    // After 5 of 9 agree, 4 remaining cannot overtake.
    assert_eq!(result.samples.len(), 5);
    assert_eq!((result.calls, mock.calls()), (6, 6));
    assert!(result.stopped_early);

    // Adaptive waves launch exactly the 5 that could decide it.
    options.wave = None;
    let mock = voters(all_a);
    let result = vote(&executor(mock.clone()), &Request::user("q"), &options).await;
    assert_eq!((result.samples.len(), result.calls, mock.calls()), (5, 5, 5));

    // The Beta rule at 0.95 stops at 4 agreeing votes (P = 1 - 0.5^5).
    let mock = voters(all_a);
    options.early_stop = Some(EarlyStop::Beta(0.95));
    let result = vote(&executor(mock.clone()), &Request::user("q"), &options).await;
    assert_eq!((result.samples.len(), mock.calls()), (4, 4));

    // A split vote keeps sampling: 4 launched, 2-2, then more until decided.
    let mock = voters(&["A", "B", "A", "B", "A", "A", "A", "A", "A"]);
    let result = vote(&executor(mock.clone()), &Request::user("q"), &options).await;
    assert_eq!(result.winner.as_deref(), Some("A"));
    assert!(result.calls > 4 && result.calls < 9, "{}", result.calls);
}

#[tokio::test(start_paused = true)]
async fn ties_are_broken_by_first_appearance_and_reported() {
    let mut options = VoteOptions::new(4, Extractor::Choice);
    options.rule = Rule::Plurality;
    let result =
        vote(&executor(voters(&["B", "A", "A", "B"])), &Request::user("q"), &options).await;
    assert_eq!(result.winner.as_deref(), Some("B"), "B appeared first");
    assert_eq!(result.tie, ["B", "A"]);
    // Under the majority rule, a tie is no consensus; the plurality says who led.
    let result = vote(
        &executor(voters(&["B", "A", "A", "B"])),
        &Request::user("q"),
        &VoteOptions::new(4, Extractor::Choice),
    )
    .await;
    assert_eq!((result.winner, result.plurality.as_deref()), (None, Some("B")));
}

#[tokio::test(start_paused = true)]
async fn threshold_without_agreement_is_no_consensus_and_weights_count() {
    let mut options = VoteOptions::new(4, Extractor::Choice);
    options.rule = Rule::AtLeast(3);
    let result =
        vote(&executor(voters(&["A", "B", "C", "A"])), &Request::user("q"), &options).await;
    assert_eq!((result.winner, result.consensus), (None, false));

    let mut options = VoteOptions::new(3, Extractor::Choice);
    options.weights = vec![3.0, 1.0, 1.0];
    let result = vote(&executor(voters(&["A", "B", "B"])), &Request::user("q"), &options).await;
    assert_eq!(result.winner.as_deref(), Some("A"));
    assert!((result.agreement - 0.6).abs() < 1e-9);
}

#[tokio::test(start_paused = true)]
async fn samples_are_distinct_requests() {
    let mock = MockProvider::new().with_call_log();
    let executor = executor(mock.clone());
    vote(
        &executor,
        &Request::user("q").with_temperature(0.0),
        &VoteOptions::new(3, Extractor::Normalized),
    )
    .await;
    // Each sample has its own index (and seed): a cache never returns one answer N times.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let mock = MockProvider::new().with_rule(move |call| {
        let r = call.request;
        sink.lock().unwrap().push((r.sample_index, r.seed, r.temperature));
        None
    });
    vote(
        &Executor::new(mock),
        &Request::user("q").with_temperature(0.0),
        &VoteOptions::new(3, Extractor::Normalized),
    )
    .await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(seen, [(0, Some(0), Some(0.7)), (1, Some(1), Some(0.7)), (2, Some(2), Some(0.7))]);
}

#[tokio::test(start_paused = true)]
async fn universal_self_consistency_picks_the_judged_answer() {
    let mock = MockProvider::new().with_rule(|call| {
        let r = call.request;
        if r.prompt().contains("most consistent") {
            assert!(r.prompt().contains("Response 3:\nLyon"), "{}", r.prompt());
            return Some(Behavior::reply(
                "Responses 1 and 2 agree. The most consistent response is Response 2.",
            ));
        }
        Some(Behavior::reply(["Paris", "Paris, France", "Lyon"][r.sample_index as usize]))
    });
    let result =
        most_consistent(&Executor::new(mock), &Request::user("Capital of France?"), 3, 0.7).await;
    assert_eq!((result.chosen, result.text.as_deref()), (Some(1), Some("Paris, France")));
    assert_eq!(result.error, None);
}

#[tokio::test(start_paused = true)]
async fn distinct_options_drop_near_duplicates_and_top_up() {
    let mock = MockProvider::new().with_rule(|call| {
        let options = [
            "Solar power rises",
            "solar power rises!",
            "Wind farms expand",
            "Rises, solar power",
            "Tidal energy surges",
        ];
        Some(Behavior::reply(options[call.request.sample_index as usize % 5]))
    });
    let result = distinct(&Executor::new(mock), &Request::user("Headlines"), 3, 10, 0.8, 0.9).await;
    assert_eq!(result.options, ["Solar power rises", "Wind farms expand", "Tidal energy surges"]);
    assert_eq!((result.duplicates.len(), result.calls, result.exhausted), (2, 5, false));
}

/// A failed section reaches the synthesizer as missing, with its reason.
#[tokio::test(start_paused = true)]
async fn sections_pass_failures_to_the_synthesizer() {
    let mock = MockProvider::new();
    mock.script("Economy of Rome", [Behavior::fail(ProviderError::from_status(400, "too long"))]);
    let parts = vec![
        Section::new("history", "History of Rome"),
        Section::new("economy", "Economy of Rome"),
        Section::new("art", "Art of Rome"),
    ];
    let result = sections(&Executor::new(mock), parts, Some("Write one page on Rome.")).await;
    let ids: Vec<_> =
        result.parts.iter().map(|p| (p.name.as_str(), p.id.as_str(), p.text.is_some())).collect();
    assert_eq!(ids, [("history", "s1", true), ("economy", "s2", false), ("art", "s3", true)]);
    assert!(result.parts[1].error.as_ref().unwrap().to_string().contains("too long"));
    // The mock echoes its prompt: the synthesizer saw every part, in order, the missing one marked.
    let synthesis = result.synthesis.unwrap().text.unwrap();
    let history = synthesis.find("## history (id: s1)").unwrap();
    let economy = synthesis.find("## economy (id: s2)\n[MISSING: this part has no result (bad request (HTTP 400): too long)").unwrap();
    let art = synthesis.find("## art (id: s3)\nmock answer: Art of Rome").unwrap();
    assert!(history < economy && economy < art);
}

/// Forced to collapse twice, the tree keeps every chunk's id up to the answer.
#[tokio::test(start_paused = true)]
async fn map_reduce_collapses_levels_and_keeps_every_source() {
    let label = regex::Regex::new(r"\[([^\]]+)\]").unwrap();
    let mock = MockProvider::new().with_reply(move |request| {
        let prompt = request.prompt();
        if let Some(source) = prompt.split("\n\nSource ").nth(1) {
            return format!("notes on {}", source.split(':').next().unwrap());
        }
        let ids: Vec<&str> =
            label.captures_iter(prompt).map(|c| c.get(1).unwrap().as_str()).collect();
        format!("combined [{}] {}", ids.join(", "), "padding ".repeat(10))
    });
    let documents: Vec<Document> = (1..=4)
        .map(|d| Document {
            id: format!("doc{d}"),
            text: (0..120).map(|w| format!("w{w}")).collect::<Vec<_>>().join(" "),
        })
        .collect();
    let options = MapReduceOptions {
        chunk_tokens: 60,
        overlap_tokens: 5,
        reduce_tokens: 60,
        ..MapReduceOptions::new("Take notes.", "Summarize.")
    };
    let chunks: Vec<String> =
        documents.iter().flat_map(|d| chunk(d, 60, 5)).map(|c| c.id).collect();
    assert!(chunks.len() >= 12, "{chunks:?}");
    let result = map_reduce(&Executor::new(mock), &documents, &options).await;
    assert!(
        result.levels.len() >= 3,
        "map + at least two collapse levels: {}",
        result.levels.len()
    );
    let mut sources = result.sources.clone();
    sources.sort();
    let mut expected = chunks.clone();
    expected.sort();
    assert_eq!(sources, expected, "every chunk id reached the top");
    let answer = result.answer.unwrap();
    assert!(
        chunks.iter().all(|c| answer.contains(c.as_str())),
        "the answer can cite every chunk: {answer}"
    );
    assert!(result.failures.is_empty());
}

#[tokio::test(start_paused = true)]
async fn personas_review_with_their_own_system_prompts() {
    let mock = MockProvider::new().with_reply(|r| {
        format!("{} says: {}", r.messages[0].content.split('.').next().unwrap(), r.prompt())
    });
    let skeptic = builtin("skeptic").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("p.toml");
    std::fs::write(
        &toml,
        "[[persona]]\nname = \"lawyer\"\nprompt = \"You are a lawyer. Check the contracts.\"\n",
    )
    .unwrap();
    let json = dir.path().join("p.json");
    std::fs::write(&json, r#"[{"name": "cfo", "prompt": "You are the CFO. Watch the money."}]"#)
        .unwrap();
    let mut personas = vec![skeptic];
    personas.extend(perspectives::load(&toml).unwrap());
    personas.extend(perspectives::load(&json).unwrap());
    let result =
        perspectives(&Executor::new(mock), "Open a shop in Lyon", &personas, None, None).await;
    let texts: Vec<_> =
        result.parts.iter().map(|p| (p.name.as_str(), p.text.clone().unwrap())).collect();
    assert_eq!(texts[1], ("lawyer", "You are a lawyer says: Open a shop in Lyon".into()));
    assert_eq!(texts[2].0, "cfo");
    assert!(texts[0].1.starts_with("You are a rigorous skeptic"));
    assert!(builtin("nobody").is_none());
    std::fs::write(&toml, "nothing = 1").unwrap();
    assert!(perspectives::load(&toml).is_err());
}

const RESEARCH: &str = include_str!("../../../../examples/research.toml");

#[tokio::test(start_paused = true)]
async fn workflow_runs_parallel_steps_then_the_report() {
    let mock = MockProvider::new().with_latency(Duration::from_millis(100)).with_call_log();
    let vars = BTreeMap::from([("topic".to_string(), "the bicycle".to_string())]);
    let plan = Workflow::parse(RESEARCH).unwrap().plan(&vars).unwrap();
    let start = tokio::time::Instant::now();
    let result = plan.run(&Executor::new(mock.clone()), &ToolSets::default()).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(200),
        "three research steps at once, then the report"
    );
    assert_eq!(result.outputs, ["report"]);
    let report = result.steps.last().unwrap().text.clone().unwrap();
    assert!(report.contains("the bicycle") && report.contains("mock answer: "), "{report}");
    assert_eq!(mock.calls(), 4);
}

#[test]
fn workflow_is_validated_before_any_call() {
    let check = |text: &str| {
        Workflow::parse(text)
            .and_then(|w| w.plan(&BTreeMap::new()).map(|_| ()).map_err(|e| e.join("\n")))
    };
    let error = check("[[step]]\nname = \"a\"\nprompt = \"{{ topic }}\"\n").unwrap_err();
    assert!(error.contains("uses the variable `topic`, which is not set"), "{error}");
    let error = check("[[step]]\nname = \"a\"\nprompt = \"{{ steps.b }}\"\n").unwrap_err();
    assert!(error.contains("there is no step `b`"), "{error}");
    let error = check("[[step]]\nname = \"a\"\nprompt = \"x\"\nneeds = [\"ghost\"]\n").unwrap_err();
    assert!(error.contains("needs `ghost`, but there is no such step"), "{error}");
    let cycle = "[[step]]\nname = \"a\"\nprompt = \"{{ steps.b }}\"\n[[step]]\nname = \"b\"\nprompt = \"{{ steps.a }}\"\n";
    assert!(
        check(cycle).unwrap_err().contains("cycle: a -> b -> a"),
        "{}",
        check(cycle).unwrap_err()
    );
    let error = check("[[step]]\nname = \"a\"\nprompt = \"{% if %}\"\n").unwrap_err();
    assert!(error.contains("step `a`: the prompt template is not valid"), "{error}");
    let error =
        check("[[step]]\nname = \"a\"\nprompt = \"x\"\n[[step]]\nname = \"a\"\nprompt = \"y\"\n")
            .unwrap_err();
    assert!(error.contains("two steps are named `a`"), "{error}");
    assert!(check("").unwrap_err().contains("no [[step]]"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_skips_its_dependents() {
    let mock = MockProvider::new();
    mock.script("gather", [Behavior::fail(ProviderError::from_status(400, "nope"))]);
    let text = "[[step]]\nname = \"gather\"\nprompt = \"gather\"\n[[step]]\nname = \"write\"\nprompt = \"{{ steps.gather }}\"\n";
    let result = Workflow::parse(text)
        .unwrap()
        .plan(&BTreeMap::new())
        .unwrap()
        .run(&Executor::new(mock.clone()), &ToolSets::default())
        .await;
    assert_eq!(
        result.steps[1].error.as_ref().map(ToString::to_string).as_deref(),
        Some("skipped: it needs gather, which failed")
    );
    assert_eq!(mock.calls(), 1);
}
