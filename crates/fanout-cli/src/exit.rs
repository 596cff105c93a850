//! The exit code, decided once from how the tasks ended (as ripgrep decides its
//! own in one place), the same way for every command.

use std::process::ExitCode;

use fanout::{Failure, NotRun, Outcome, Timeout};

/// What the process tells its caller. Documented in the README.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Every task succeeded.
    Success = 0,
    /// An error outside the tasks (the store, the output).
    Error = 1,
    /// Bad usage, settings or input, before any call.
    Refused = 2,
    /// Some tasks failed (or a vote found no consensus).
    SomeFailed = 3,
    /// Stopped before every task finished (interrupt, deadline, spending limit).
    Unfinished = 4,
    /// The job cannot succeed (bad key, unknown model, no quota).
    CannotSucceed = 5,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// How the tasks of a command ended, counted for the exit code and the
/// closing messages.
#[derive(Debug, Default)]
pub struct Ending {
    pub failed: u64,
    pub unfinished: u64,
    /// Why the job cannot succeed, when an answer said so.
    pub cannot_succeed: Option<String>,
    /// Whether the spending limit (`--budget`, `--max-total-tokens`) stopped tasks.
    pub budget_spent: bool,
}

impl Ending {
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Succeeded(_) => {}
            Outcome::Failed { error, .. } => {
                self.failed += 1;
                if error.kind().is_fatal_for_job() {
                    self.cannot_succeed.get_or_insert_with(|| error.to_string());
                }
            }
            Outcome::TimedOut { timeout: Timeout::Task, .. } => self.failed += 1,
            Outcome::NotRun(NotRun::CircuitOpen(cause)) => {
                self.unfinished += 1;
                self.cannot_succeed.get_or_insert_with(|| cause.to_string());
            }
            Outcome::NotRun(NotRun::BudgetSpent) => {
                self.unfinished += 1;
                self.budget_spent = true;
            }
            Outcome::TimedOut { timeout: Timeout::Deadline, .. }
            | Outcome::Cancelled { .. }
            | Outcome::NotRun(NotRun::Deadline | NotRun::Cancelled) => self.unfinished += 1,
        }
    }

    /// A pattern's step without an answer: its task's outcome, or a failure of
    /// the pattern's own (which counts as failed).
    pub fn add_failure(&mut self, failure: &Failure) {
        match failure.outcome() {
            Some(outcome) => self.add(outcome),
            None => self.failed += 1,
        }
    }

    /// The worst of what happened: the job cannot succeed, then unfinished,
    /// then failed.
    pub fn exit(&self) -> Exit {
        if self.cannot_succeed.is_some() {
            Exit::CannotSucceed
        } else if self.unfinished > 0 {
            Exit::Unfinished
        } else if self.failed > 0 {
            Exit::SomeFailed
        } else {
            Exit::Success
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::ProviderError;

    fn exit_of(outcomes: &[Outcome]) -> Exit {
        let mut ending = Ending::default();
        outcomes.iter().for_each(|o| ending.add(o));
        ending.exit()
    }

    #[test]
    fn one_exit_code_per_outcome() {
        let failed = |status| Outcome::failed(ProviderError::from_status(status, "x"), 1);
        let deadline = Outcome::TimedOut { timeout: Timeout::Deadline, attempts: 1 };
        let task_timeout = Outcome::TimedOut { timeout: Timeout::Task, attempts: 1 };
        assert_eq!(exit_of(&[]), Exit::Success);
        assert_eq!(exit_of(&[failed(500)]), Exit::SomeFailed);
        assert_eq!(exit_of(std::slice::from_ref(&task_timeout)), Exit::SomeFailed);
        assert_eq!(exit_of(std::slice::from_ref(&deadline)), Exit::Unfinished);
        assert_eq!(exit_of(&[Outcome::NotRun(NotRun::Cancelled)]), Exit::Unfinished);
        assert_eq!(exit_of(&[Outcome::NotRun(NotRun::BudgetSpent)]), Exit::Unfinished);
        assert_eq!(exit_of(&[failed(401)]), Exit::CannotSucceed);
        assert_eq!(exit_of(&[failed(500), deadline, failed(401)]), Exit::CannotSucceed);
        let mut ending = Ending::default();
        ending.add_failure(&Failure::Pattern("the judge named no response".into()));
        assert_eq!(ending.exit(), Exit::SomeFailed);
        ending.add_failure(&task_timeout.failure().unwrap());
        assert_eq!(ending.failed, 2);
    }
}
