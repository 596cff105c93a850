//! An agent: a model that may call tools, in a loop, inside a branch.
//!
//! [`Agent::run`] asks the model; when the answer calls tools it runs them
//! (all of a turn's calls at once, each bounded by the [`Toolbox`]'s time and
//! size limits), gives the results back and asks again, until the model
//! answers in text, the turn limit or the token budget is reached, a call
//! fails, or the branch is cut. Every model call goes through the branch's
//! [`Calls`], so agents running side by side share one set of limits. The
//! [`Transcript`] of every turn (the model's text, its tool calls, their
//! results and the usage) comes back whatever the ending, so a cut-off agent
//! still shows what it found.

pub mod files;
pub mod mcp;
pub mod tool;

use serde::Serialize;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::exec::branch::Calls;
use crate::provider::{Message, Request, ToolCall, ToolChoice, Usage};
use crate::task::{Failure, Outcome};
pub use tool::{FnTool, Tool, ToolRun, Toolbox};

/// Turns an agent may take when none is set.
pub const DEFAULT_MAX_TURNS: u32 = 10;

/// Tools and the limits of the loop that uses them.
#[derive(Clone, Debug)]
pub struct Agent {
    tools: Toolbox,
    max_turns: u32,
    max_total_tokens: Option<u64>,
}

impl Agent {
    /// An agent with these tools, at most [`DEFAULT_MAX_TURNS`] turns and no token budget.
    pub fn new(tools: Toolbox) -> Self {
        Self { tools, max_turns: DEFAULT_MAX_TURNS, max_total_tokens: None }
    }

    /// Its tools.
    pub fn tools(&self) -> &Toolbox {
        &self.tools
    }

    /// The most model calls one run may make (default 10); the last is asked
    /// for an answer (`tool_choice: none`).
    #[must_use]
    pub fn max_turns(mut self, turns: u32) -> Self {
        self.max_turns = turns.max(1);
        self
    }

    /// Stops once the turns so far used this many tokens, input and output together.
    #[must_use]
    pub fn max_total_tokens(mut self, tokens: impl Into<Option<u64>>) -> Self {
        self.max_total_tokens = tokens.into();
        self
    }

    /// Works on `request` (the conversation so far, the task last, with the
    /// settings every turn uses: model, temperature, `max_tokens`...) until an
    /// answer or a limit; never fails, the ending is in the result.
    pub async fn run(&self, calls: &Calls, mut request: Request) -> AgentRun {
        request.tools = self.tools.specs();
        let mut transcript = Transcript::default();
        for turn in 1..=self.max_turns {
            if let Some(budget) = self.max_total_tokens
                && transcript.usage.total() >= budget
            {
                return transcript.ended(Ending::TokenBudget);
            }
            // The last turn asks for an answer: tool results it asked for
            // could never reach the model.
            let mut asked = request.clone();
            if turn == self.max_turns && !asked.tools.is_empty() {
                asked.tool_choice = Some(ToolChoice::None);
            }
            let outcome = calls.complete(asked).await;
            let Outcome::Succeeded(success) = outcome else {
                let failure = outcome.failure().expect("not a success");
                return transcript.ended(Ending::CallFailed(failure));
            };
            let response = success.response;
            transcript.usage += response.usage;
            if response.tool_calls.is_empty() || turn == self.max_turns {
                let answered = response.tool_calls.is_empty();
                transcript.turns.push(Turn {
                    text: response.text.clone(),
                    usage: response.usage,
                    tools: Vec::new(),
                });
                if !answered {
                    return transcript.ended(Ending::TurnLimit);
                }
                transcript.answer = Some(response.text);
                return transcript.ended(Ending::Answered);
            }
            let (runs, cut) = self.run_tools(calls, &response.tool_calls).await;
            if cut {
                transcript.turns.push(Turn {
                    text: response.text,
                    usage: response.usage,
                    tools: runs,
                });
                let reason = calls.cut_reason().failure().expect("a cut is not a success");
                return transcript.ended(Ending::Cut(reason));
            }
            request.messages.push(Message::assistant_tool_calls(
                response.text.clone(),
                response.tool_calls.clone(),
            ));
            for run in &runs {
                let content = if run.is_error {
                    format!("error: {}", run.output)
                } else {
                    run.output.clone()
                };
                request.messages.push(Message::tool_result(run.call.id.clone(), content));
            }
            transcript.turns.push(Turn { text: response.text, usage: response.usage, tools: runs });
        }
        transcript.ended(Ending::TurnLimit)
    }

    /// Runs a turn's tool calls at once, until they are done or the branch is
    /// cut; returns the runs that finished, in the calls' order, and whether
    /// it was cut. No tool call outlives the branch.
    async fn run_tools(&self, calls: &Calls, asked: &[ToolCall]) -> (Vec<ToolRun>, bool) {
        let mut running: FuturesUnordered<_> = asked
            .iter()
            .enumerate()
            .map(|(i, call)| async move { (i, self.tools.run(call).await) })
            .collect();
        let mut finished: Vec<Option<ToolRun>> = (0..asked.len()).map(|_| None).collect();
        let cut = loop {
            tokio::select! {
                next = running.next() => match next {
                    Some((i, run)) => finished[i] = Some(run),
                    None => break false,
                },
                () = calls.cut() => break true,
            }
        };
        (finished.into_iter().flatten().collect(), cut)
    }
}

/// What an agent did, turn by turn, and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Transcript {
    /// The final answer, when the model gave one.
    pub answer: Option<String>,
    /// Every model turn, oldest first.
    pub turns: Vec<Turn>,
    /// Tokens of every turn together.
    pub usage: Usage,
}

/// One model turn: what it said, and the tools it called with their results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Turn {
    /// The model's text (beside tool calls, often empty).
    pub text: String,
    /// The turn's tokens.
    pub usage: Usage,
    /// The tool calls of the turn and what they gave back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolRun>,
}

/// An agent's run: its transcript and why it ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentRun {
    /// Every turn, and the answer if there is one.
    pub transcript: Transcript,
    /// Why the loop stopped.
    pub ending: Ending,
}

impl AgentRun {
    /// The final answer, when the model gave one.
    pub fn answer(&self) -> Option<&str> {
        self.transcript.answer.as_deref()
    }

    /// Why there is no answer, as a [`Failure`]; `None` when there is one.
    pub fn failure(&self) -> Option<Failure> {
        match &self.ending {
            Ending::Answered => None,
            Ending::CallFailed(failure) | Ending::Cut(failure) => Some(failure.clone()),
            Ending::TurnLimit => Some(Failure::Pattern(format!(
                "the agent took its {} turns without a final answer",
                self.transcript.turns.len()
            ))),
            Ending::TokenBudget => Some(Failure::Pattern(
                "the agent used up its token budget without a final answer".into(),
            )),
        }
    }
}

/// Why an agent's loop stopped.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "ending", content = "error")]
pub enum Ending {
    /// The model answered in text.
    Answered,
    /// The turn limit was reached with tools still being called.
    TurnLimit,
    /// The token budget was used up.
    TokenBudget,
    /// A model call ended without an answer (an error, the deadline, a cancellation).
    CallFailed(Failure),
    /// The branch was cut while its tools ran (its timeout, the deadline, a cancellation).
    Cut(Failure),
}

impl Transcript {
    fn ended(self, ending: Ending) -> AgentRun {
        AgentRun { transcript: self, ending }
    }
}
