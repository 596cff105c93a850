//! The core that sections, perspectives and workflow waves share: each item
//! is one model call, or an agent when it has tools, all side by side as
//! branches of one run, so every call shares the executor's limits.

use crate::agent::{Agent, Transcript};
use crate::exec::branch::{Branch, BranchOutcome};
use crate::{Executor, Failure, Outcome, Request};

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

enum Worked {
    Call(Box<Outcome>),
    Agent(crate::agent::AgentRun),
}

/// Asks every item at once; the answers come back in the items' order.
pub(crate) async fn ask_all(executor: &Executor, asks: Vec<Ask>) -> Vec<Answer> {
    let branches = asks.into_iter().map(|ask| {
        Branch::new(ask.id, move |calls| async move {
            match ask.agent {
                None => Worked::Call(Box::new(calls.complete(ask.request).await)),
                Some(agent) => Worked::Agent(agent.run(&calls, ask.request).await),
            }
        })
    });
    let report = executor.branches(branches).await;
    report
        .results
        .into_iter()
        .map(|result| {
            let id = result.id.to_string();
            let cut = |outcome: Outcome| Answer {
                id: id.clone(),
                text: None,
                error: outcome.failure(),
                transcript: None,
            };
            match result.outcome {
                BranchOutcome::Finished(Worked::Call(outcome)) => Answer {
                    text: outcome.text().map(str::to_owned),
                    error: outcome.failure(),
                    transcript: None,
                    id,
                },
                BranchOutcome::Finished(Worked::Agent(run)) => Answer {
                    text: run.answer().map(str::to_owned),
                    error: run.failure(),
                    transcript: Some(run.transcript),
                    id,
                },
                BranchOutcome::TimedOut(timeout) => cut(Outcome::TimedOut { timeout, attempts: 0 }),
                BranchOutcome::Cancelled => cut(Outcome::Cancelled { attempts: 0 }),
                BranchOutcome::Panicked(message) => Answer {
                    text: None,
                    error: Some(Failure::Pattern(format!("it panicked: {message}"))),
                    transcript: None,
                    id,
                },
            }
        })
        .collect()
}
