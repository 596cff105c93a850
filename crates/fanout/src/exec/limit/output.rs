//! How many output tokens to reserve for a request that sets no `max_tokens`.
//!
//! Without a learned figure the reservation assumes a long answer
//! ([`DEFAULT_OUTPUT_ESTIMATE`](crate::tokens::DEFAULT_OUTPUT_ESTIMATE)); against
//! a server whose token budget is charged with the tokens really produced, that
//! paced runs of short answers several times below the budget. Once answers
//! have come back, the allowance is the longest of the recent ones: still an
//! upper bound for a workload of similar answers, and a longer answer is
//! charged in full afterwards (the TPM bucket takes the difference, the
//! provider's headers correct the reported budget).

use std::collections::VecDeque;
use std::sync::Mutex;

/// How many recent answers the allowance covers.
const WINDOW: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct OutputAllowance {
    recent: Mutex<VecDeque<u64>>,
}

impl OutputAllowance {
    /// The longest recent answer, in tokens; `None` before any.
    pub(crate) fn tokens(&self) -> Option<u64> {
        self.recent.lock().unwrap().iter().copied().max()
    }

    /// An answer to a request without `max_tokens` used `output_tokens`.
    pub(crate) fn record(&self, output_tokens: u64) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back(output_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_is_the_longest_recent_answer() {
        let allowance = OutputAllowance::default();
        assert_eq!(allowance.tokens(), None);
        allowance.record(20);
        allowance.record(90);
        allowance.record(30);
        assert_eq!(allowance.tokens(), Some(90));
        // A long answer ages out of the window.
        for _ in 0..WINDOW - 1 {
            allowance.record(25);
        }
        assert_eq!(allowance.tokens(), Some(30));
        allowance.record(25);
        assert_eq!(allowance.tokens(), Some(25));
    }
}
