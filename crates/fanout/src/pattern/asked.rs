//! The core that sections, perspectives and workflow waves share: each item
//! is one model call, or an agent when it has tools, all side by side on one
//! executor, so every call shares its limits.

use crate::agent::{Agent, Transcript};
use crate::exec::branch::{Branch, BranchOutcome};
use crate::{Executor, Failure, Outcome, Request, Task};

/// One item to ask: its id, its request, and the agent that works on it
/// when it may use tools.
pub(crate) struct Ask {
    pub id: String,
    pub request: Request,
    pub agent: Option<Agent>,
}

/// What came back for an item; exactly one of `text` and `error` is set.
pub(crate) struct Answer {
    pub id: String,
    pub text: Option<String>,
    pub error: Option<Failure>,
    /// An agent's turns, tool calls and results.
    pub transcript: Option<Transcript>,
}

/// Asks every item at once; the answers come back in the items' order.
/// Plain calls run as tasks (the task timeout bounds each call from its
/// launch, as in a batch); agents as branches of their own, alongside, on
/// the same executor and so the same limits.
pub(crate) async fn ask_all(executor: &Executor, asks: Vec<Ask>) -> Vec<Answer> {
    let order: std::collections::HashMap<String, usize> =
        asks.iter().enumerate().map(|(i, a)| (a.id.clone(), i)).collect();
    let (agents, calls): (Vec<Ask>, Vec<Ask>) = asks.into_iter().partition(|a| a.agent.is_some());
    let tasks = calls.into_iter().map(|ask| Task::with_id(ask.id, ask.request));
    let branches = agents.into_iter().map(|ask| {
        let agent = ask.agent.expect("partitioned on agents");
        Branch::new(ask.id, move |calls| async move { agent.run(&calls, ask.request).await })
    });
    let (report, worked) = tokio::join!(executor.run(tasks), executor.branches(branches));
    let mut answers: Vec<Answer> = report
        .results
        .into_iter()
        .map(|result| Answer {
            id: result.id.to_string(),
            text: result.outcome.text().map(str::to_owned),
            error: result.outcome.failure(),
            transcript: None,
        })
        .chain(worked.results.into_iter().map(|result| {
            let id = result.id.to_string();
            let cut = |outcome: Outcome| Answer {
                id: id.clone(),
                text: None,
                error: outcome.failure(),
                transcript: None,
            };
            match result.outcome {
                BranchOutcome::Finished(run) => Answer {
                    text: run.answer().map(str::to_owned),
                    error: run.failure(),
                    transcript: Some(run.transcript),
                    id,
                },
                BranchOutcome::TimedOut(timeout) => cut(Outcome::TimedOut { timeout, attempts: 0 }),
                BranchOutcome::Cancelled => cut(Outcome::Cancelled { attempts: 0 }),
                BranchOutcome::Panicked(message) => Answer {
                    error: Some(Failure::Pattern(format!("it panicked: {message}"))),
                    ..cut(Outcome::Cancelled { attempts: 0 })
                },
            }
        }))
        .collect();
    answers.sort_by_key(|a| order.get(&a.id).copied());
    answers
}
