//! Converting between the executor's results and the store's records.

use std::time::Duration;

use fanout::{
    ErrorKind, Outcome, ProviderError, Response, Success, TaskId, TaskResult, Timeout, Usage,
};
use fanout_store::Record;

/// The record of a result that ends its task for good; `None` for tasks that
/// did not finish (cancelled, not run, cut by the deadline), which a resume runs.
pub fn to_record(result: &TaskResult) -> Option<Record> {
    let mut record = Record {
        index: result.index as u64,
        task_id: result.id.to_string(),
        attempts: result.outcome.attempts(),
        finished_at: fanout_store::now(),
        calls: crate::history::encode(&result.calls),
        ..Record::default()
    };
    match &result.outcome {
        Outcome::Succeeded(success) => {
            let response = &success.response;
            record.status = "succeeded".into();
            record.answer = Some(response.text.clone());
            set_usage(&mut record, response.usage);
            record.usage_estimated = response.usage_estimated;
            record.latency_ms = Some(success.latency.as_secs_f64() * 1000.0);
            record.finish_reason = response.finish_reason.clone();
            record.model = response.model.clone();
            record.request_id = response.request_id.clone();
        }
        Outcome::Failed { error, usage, .. } => {
            record.status = "failed".into();
            // Refused answers were paid for: the job's spending counts them.
            set_usage(&mut record, *usage);
            record.error_kind = Some(kind_name(error.kind()));
            record.error_message = Some(error.message().to_owned());
            record.error_status = error.status();
            record.request_id = error.request_id().map(str::to_owned);
        }
        Outcome::TimedOut { timeout: Timeout::Task, .. } => record.status = "timed_out".into(),
        Outcome::TimedOut { timeout: Timeout::Deadline, .. }
        | Outcome::Cancelled { .. }
        | Outcome::NotRun(_) => {
            return None;
        }
    }
    Some(record)
}

fn set_usage(record: &mut Record, usage: Usage) {
    record.input_tokens = usage.input_tokens;
    record.output_tokens = usage.output_tokens;
    record.cached_input_tokens = usage.cached_input_tokens;
}

fn usage_of(record: &Record) -> Usage {
    Usage {
        cached_input_tokens: record.cached_input_tokens,
        ..Usage::new(record.input_tokens, record.output_tokens)
    }
}

pub fn kind_name(kind: ErrorKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The input fields a record kept (`--keep`).
pub fn kept_of(record: &Record) -> Option<crate::output::Kept> {
    serde_json::from_str(record.kept.as_deref()?).ok()
}

/// The result a record stands for, with its task's place and id.
pub fn to_result(record: Record) -> TaskResult {
    let (index, id) = (record.index as usize, TaskId::from(record.task_id.clone()));
    TaskResult::new(index, id, to_outcome(record))
}

/// The outcome a record stands for (a result restored on resume).
pub fn to_outcome(record: Record) -> Outcome {
    match record.status.as_str() {
        "succeeded" => {
            let usage = usage_of(&record);
            let mut response = Response::new(record.answer.unwrap_or_default(), usage);
            response.usage_estimated = record.usage_estimated;
            response.finish_reason = record.finish_reason;
            response.model = record.model;
            response.request_id = record.request_id;
            let latency = Duration::from_secs_f64(record.latency_ms.unwrap_or(0.0) / 1000.0);
            Outcome::Succeeded(Success::new(response, latency, record.attempts))
        }
        "timed_out" => Outcome::TimedOut { timeout: Timeout::Task, attempts: record.attempts },
        _ => {
            let usage = usage_of(&record);
            let kind = record
                .error_kind
                .and_then(|k| serde_json::from_value(serde_json::Value::String(k)).ok())
                .unwrap_or(ErrorKind::Server);
            let mut error = ProviderError::new(kind, record.error_message.unwrap_or_default());
            if let Some(status) = record.error_status {
                error = error.with_status(status);
            }
            if let Some(id) = record.request_id {
                error = error.with_request_id(id);
            }
            Outcome::Failed { error, attempts: record.attempts, usage }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::NotRun;

    #[test]
    fn finished_results_round_trip_and_unfinished_are_not_recorded() {
        let mut response = Response::new("7/10", Usage::new(30, 4)).with_finish_reason("stop");
        response.usage_estimated = true;
        let success = Outcome::Succeeded(Success::new(response, Duration::from_millis(250), 2));
        let error = ProviderError::from_status(400, "context too long").with_request_id("req_9");
        let failure = Outcome::Failed { error, attempts: 1, usage: Usage::new(12, 40) };
        for outcome in [success, failure, Outcome::TimedOut { timeout: Timeout::Task, attempts: 3 }]
        {
            let result = TaskResult::new(4, TaskId::from("row"), outcome.clone());
            let record = to_record(&result).unwrap();
            assert_eq!(to_outcome(record), outcome);
        }
        for unfinished in [Outcome::Cancelled { attempts: 1 }, Outcome::NotRun(NotRun::Deadline)] {
            assert!(to_record(&TaskResult::new(0, TaskId::from("x"), unfinished)).is_none());
        }
    }
}
