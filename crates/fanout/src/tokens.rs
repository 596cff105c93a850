//! Token estimates for limits that must be charged before the provider answers.
//!
//! The estimate is deliberately simple (about four characters a token, plus a
//! few tokens of framing per message): the executor reserves it against the TPM
//! budget before a call and corrects it with the usage the provider reports.

use crate::provider::Request;

/// Output tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_OUTPUT_ESTIMATE: u32 = 256;

/// Framing tokens per message (role markers, separators).
const TOKENS_PER_MESSAGE: u64 = 4;

/// Roughly how many tokens `text` is.
pub fn estimate_text(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// Roughly how many tokens the request's messages are.
pub fn estimate_prompt(request: &Request) -> u64 {
    request.messages.iter().map(|m| estimate_text(&m.content) + TOKENS_PER_MESSAGE).sum()
}

/// The most a request can consume: its prompt plus its maximum output. This is
/// what the TPM limiter reserves before the call.
pub fn estimate_request(request: &Request) -> u64 {
    estimate_prompt(request) + u64::from(request.max_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_count_prompt_framing_and_max_output() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("abcd"), 1);
        assert_eq!(estimate_text("abcde"), 2);
        let request = Request::user("x".repeat(400)).with_max_tokens(50);
        assert_eq!(estimate_prompt(&request), 100 + TOKENS_PER_MESSAGE);
        assert_eq!(estimate_request(&request), 154);
        let unbounded = Request::user("");
        assert_eq!(estimate_request(&unbounded), 4 + u64::from(DEFAULT_OUTPUT_ESTIMATE));
    }
}
