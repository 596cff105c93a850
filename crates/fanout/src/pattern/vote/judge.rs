//! Universal self-consistency for free text: a judge call picks the answer
//! most consistent with the others.

use serde::Serialize;

use super::{Sample, sample_request};
use crate::{Executor, Failure, Request, Task};

/// Universal self-consistency: which of N free-text answers the judge found most consistent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Consistent {
    /// Index into `samples` of the chosen answer.
    pub chosen: Option<usize>,
    /// The chosen answer's text; `None` when nothing was chosen.
    pub text: Option<String>,
    /// Every sample, in index order; none of them has an extracted `answer`.
    pub samples: Vec<Sample>,
    /// The judge's reply, when it gave one.
    pub judge: Option<String>,
    /// Why no answer was chosen: no sample succeeded, the judge failed or named none.
    pub error: Option<Failure>,
}

/// Samples `n` answers, then asks a judge for the most consistent one.
pub async fn most_consistent(
    executor: &Executor,
    request: &Request,
    n: usize,
    temperature: f32,
) -> Consistent {
    let tasks =
        (0..n).map(|i| Task::with_id(i.to_string(), sample_request(request, i, temperature)));
    let report = executor.run(tasks).await;
    let samples: Vec<Sample> = report
        .results
        .iter()
        .map(|r| Sample {
            index: r.index,
            text: r.outcome.text().map(str::to_owned),
            answer: None,
            truncated: r.outcome.success().is_some_and(|s| s.response.is_truncated()),
            error: r.outcome.failure(),
        })
        .collect();
    let answered: Vec<&Sample> = samples.iter().filter(|s| s.text.is_some()).collect();
    if answered.is_empty() {
        return Consistent {
            chosen: None,
            text: None,
            samples,
            judge: None,
            error: Some(Failure::Pattern("no sample succeeded".into())),
        };
    }
    let mut prompt = format!(
        "I generated {} responses to the question below. Evaluate them and select the most consistent one: the \
         response whose content agrees most with the others.\n\nQuestion: {}\n\n",
        answered.len(),
        request.prompt()
    );
    for (number, sample) in answered.iter().enumerate() {
        prompt.push_str(&format!(
            "Response {}:\n{}\n\n",
            number + 1,
            sample.text.as_deref().unwrap_or("")
        ));
    }
    prompt.push_str(
        "Finish with: \"The most consistent response is Response X\", X being its number.",
    );
    let judged =
        executor.run([Request { model: request.model.clone(), ..Request::user(prompt) }]).await;
    let judge = judged.results[0].outcome.text().map(str::to_owned);
    let pick = judge.as_deref().and_then(|text| {
        let number = regex::Regex::new(r"(?i)response\s*#?\s*(\d+)").expect("valid");
        let found = number.captures_iter(text).last()?;
        let k: usize = found[1].parse().ok()?;
        answered.get(k.checked_sub(1)?).map(|s| s.index)
    });
    let error = match (&judge, pick) {
        (None, _) => judged.results[0].outcome.failure(),
        (Some(_), None) => Some(Failure::Pattern("the judge named no response".into())),
        _ => None,
    };
    let text =
        pick.and_then(|i| samples.iter().find(|s| s.index == i)).and_then(|s| s.text.clone());
    Consistent { chosen: pick, text, samples, judge, error }
}
