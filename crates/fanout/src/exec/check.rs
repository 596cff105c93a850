//! What an answer must be before it counts: JSON that follows the request's
//! schema (`ResponseFormat::JsonSchema`), and, when asked, not cut off at
//! `max_tokens`.
//!
//! A failed check is not a failed task at once: an answer that breaks the
//! schema is sent back to the model with the validation errors (a repair), and
//! a truncated one is asked again with a larger `max_tokens`, each through the
//! same call path as any attempt (limits, budget, hedging). Only when those run
//! out does the task fail, naming the check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::provider::{Message, Request, Response, ResponseFormat, Role};

/// How answers are checked (an executor's setting).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CheckPolicy {
    /// Answers sent back with their validation errors, per task, before it fails.
    pub repairs: u32,
    /// Whether an answer cut off at `max_tokens` is asked again, with
    /// `max_tokens` times this factor.
    pub retry_truncated: Option<f64>,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        Self { repairs: 2, retry_truncated: None }
    }
}

/// What a check found.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    Accept,
    /// Cut off at `max_tokens`, and truncated answers are retried.
    Truncated,
    /// Cut off at `max_tokens` where a schema needs the whole answer, and
    /// truncated answers are not retried: the task fails saying so.
    CutOff,
    /// Not JSON, or not the schema's: the errors, for the model and the user.
    Invalid(String),
    /// The request's schema is not a JSON Schema at all: no answer can pass.
    BadSchema(String),
}

/// Checks answers, compiling each distinct schema once for the executor.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    pub policy: CheckPolicy,
    compiled: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// The most validation errors quoted back; the rest are counted.
const QUOTED_ERRORS: usize = 5;

impl Checker {
    pub(crate) fn new(policy: CheckPolicy) -> Self {
        Self { policy, compiled: Mutex::default() }
    }

    pub(crate) fn check(&self, request: &Request, response: &Response) -> Verdict {
        // Without a max_tokens to raise, asking again would pay for the same cut.
        if self.policy.retry_truncated.is_some()
            && request.max_tokens.is_some()
            && response.is_truncated()
        {
            return Verdict::Truncated;
        }
        let text = &response.text;
        let Some(ResponseFormat::JsonSchema { schema, .. }) = &request.response_format else {
            return Verdict::Accept;
        };
        let validator = match self.validator(schema) {
            Ok(validator) => validator,
            Err(error) => return Verdict::BadSchema(error),
        };
        // A repair asks for the same room: a cut-off answer would be cut again.
        if response.is_truncated() {
            return Verdict::CutOff;
        }
        let value = match parse_json(text) {
            Ok(value) => value,
            Err(error) => return Verdict::Invalid(error),
        };
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| match e.instance_path().as_str() {
                "" => e.to_string(),
                path => format!("at {path}: {e}"),
            })
            .collect();
        if errors.is_empty() {
            return Verdict::Accept;
        }
        let mut said = errors.iter().take(QUOTED_ERRORS).cloned().collect::<Vec<_>>().join("; ");
        if errors.len() > QUOTED_ERRORS {
            said.push_str(&format!("; and {} more", errors.len() - QUOTED_ERRORS));
        }
        Verdict::Invalid(said)
    }

    fn validator(&self, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        let key = schema.to_string();
        let mut compiled = self.compiled.lock().expect("never poisoned");
        if let Some(validator) = compiled.get(&key) {
            return Ok(Arc::clone(validator));
        }
        let validator = Arc::new(compile(schema)?);
        compiled.insert(key, Arc::clone(&validator));
        Ok(validator)
    }
}

/// The schema compiled, or why it is not a JSON Schema.
// Drafts 4 to 2020-12, per the schema's `$schema` (2020-12 without one).
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::meta::validate(schema).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
    jsonschema::validator_for(schema).map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// An answer's JSON: the whole text, or what a Markdown code fence holds
/// (models without native structured output often fence it); the error says
/// why it is not JSON.
pub fn parse_json(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.trim_end().strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(unfenced.trim()).map_err(|e| format!("the answer is not JSON: {e}"))
}

/// The request again, with the invalid answer and what is wrong with it, so
/// the model can correct itself.
pub(crate) fn repair(request: &Request, answer: &str, errors: &str) -> Request {
    let mut again = request.clone();
    again.messages.push(Message::new(Role::Assistant, answer));
    again.messages.push(Message::new(
        Role::User,
        format!(
            "That answer does not match the required JSON Schema: {errors}. \
             Reply with the corrected JSON only."
        ),
    ));
    again
}

/// The request again with room for a longer answer.
pub(crate) fn with_more_room(request: &Request, factor: f64) -> Request {
    let mut again = request.clone();
    if let Some(max) = again.max_tokens {
        again.max_tokens = Some(((f64::from(max) * factor).ceil() as u32).max(max));
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema_request() -> Request {
        let mut request = Request::user("Grade it");
        request.response_format = Some(ResponseFormat::JsonSchema {
            name: "grade".into(),
            schema: json!({"type": "object", "properties": {"grade": {"type": "integer"}},
                           "required": ["grade"], "additionalProperties": false}),
        });
        request
    }

    fn answer(text: &str, finish: &str) -> Response {
        Response::new(text, crate::Usage::default()).with_finish_reason(finish)
    }

    #[test]
    fn answers_are_checked_against_the_schema() {
        let checker = Checker::default();
        let request = schema_request();
        let check = |text: &str| checker.check(&request, &answer(text, "stop"));
        assert_eq!(check(r#"{"grade": 7}"#), Verdict::Accept);
        assert_eq!(check("```json\n{\"grade\": 7}\n```"), Verdict::Accept);
        let Verdict::Invalid(errors) = check(r#"{"grade": "7"}"#) else {
            panic!("a string is no integer");
        };
        assert!(errors.contains("at /grade") && errors.contains("integer"), "{errors}");
        let Verdict::Invalid(errors) = check("Seven.") else { panic!("not JSON") };
        assert!(errors.starts_with("the answer is not JSON"), "{errors}");
        let cut = answer("anything", "length");
        assert_eq!(checker.check(&Request::user("x"), &cut), Verdict::Accept, "not asked to retry");
    }

    #[test]
    fn a_bad_schema_is_said_and_truncation_is_retried_only_when_asked() {
        let mut request = schema_request();
        request.response_format =
            Some(ResponseFormat::JsonSchema { name: "x".into(), schema: json!({"type": 12}) });
        let checker = Checker::default();
        assert!(matches!(checker.check(&request, &answer("{}", "stop")), Verdict::BadSchema(_)));
        let retrying = Checker::new(CheckPolicy { repairs: 0, retry_truncated: Some(2.0) });
        for cut in ["length", "max_tokens"] {
            let verdict =
                retrying.check(&Request::user("x").with_max_tokens(10), &answer("cut", cut));
            assert_eq!(verdict, Verdict::Truncated, "{cut}");
        }
        // No max_tokens to raise: asking again would be cut the same way.
        assert_eq!(retrying.check(&Request::user("x"), &answer("cut", "length")), Verdict::Accept);
        // A schema needs the whole answer: a cut one fails, unrepaired.
        let cut = answer("{\"grade\": ", "length");
        assert_eq!(Checker::default().check(&schema_request(), &cut), Verdict::CutOff);
        let longer = with_more_room(&Request::user("x").with_max_tokens(100), 2.0);
        assert_eq!(longer.max_tokens, Some(200));
    }

    #[test]
    fn a_repair_quotes_the_answer_and_its_errors() {
        let again = repair(&schema_request(), "{\"grade\": \"7\"}", "at /grade: not an integer");
        assert_eq!(again.messages.len(), 3);
        assert_eq!(again.messages[1].role, Role::Assistant);
        assert!(again.messages[2].content.contains("at /grade: not an integer"));
    }
}
