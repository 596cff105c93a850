//! The pattern's own view, drawn from the shape its command kept with the
//! job (`crate::outcome`): a vote's answer distribution per question and
//! where early stopping cut, a step graph (workflow, sections, perspectives)
//! with each step's status and time, a map-reduce's collapse tree. Inline
//! SVG like the other charts; the names in it are the user's, so escaped.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::{Value, json};

use super::chart;
use crate::history::StoredCall;

/// Steps drawn one by one up to this many; more are listed, not drawn.
const MOST_STEPS_DRAWN: usize = 60;
/// A collapse tree drawn node by node up to this many nodes; beyond, one
/// bar per level.
const MOST_NODES_DRAWN: usize = 400;

/// When each step's calls ran, from the records of the steps' task ids.
#[derive(Debug, Default)]
pub struct StepTimes {
    /// Task id → (first call sent, last call ended), in ms since the epoch.
    spans: HashMap<String, Option<(i64, i64)>>,
}

impl StepTimes {
    /// Times wanted for the steps of `outcome`, if it has any.
    pub fn of(outcome: Option<&Value>) -> Self {
        let ids = steps(outcome).iter().filter_map(|s| s["id"].as_str().map(str::to_owned));
        Self { spans: ids.map(|id| (id, None)).collect() }
    }

    /// Adds a record's calls, when its task is a step.
    pub fn add(&mut self, task_id: &str, calls: &[StoredCall]) {
        let Some(span) = self.spans.get_mut(task_id) else { return };
        for call in calls {
            let (sent, ended) = (call.sent_ms, call.sent_ms + i64::from(call.elapsed_ms));
            *span = Some(span.map_or((sent, ended), |(s, e)| (s.min(sent), e.max(ended))));
        }
    }

    fn of_step(&self, id: &str) -> Option<(i64, i64)> {
        self.spans.get(id).copied().flatten()
    }
}

fn steps(outcome: Option<&Value>) -> &[Value] {
    match outcome {
        Some(outcome) if outcome["kind"] == "steps" => {
            outcome["steps"].as_array().map_or(&[], Vec::as_slice)
        }
        _ => &[],
    }
}

/// The view of the pattern for the report's template: `kind` and what its
/// section shows; `null` for a job without a pattern shape (a batch).
pub fn view(outcome: Option<&Value>, times: &StepTimes) -> Value {
    match outcome.and_then(|o| o["kind"].as_str()) {
        Some("vote") => votes(outcome.unwrap_or(&Value::Null)),
        Some("steps") => step_graph(steps(outcome), times),
        Some("collapse") => collapse_tree(outcome.unwrap_or(&Value::Null)),
        _ => Value::Null,
    }
}

/// Each question's answers as bars (the most voted is the longest), the
/// winner marked, and how many samples were drawn of those asked.
fn votes(outcome: &Value) -> Value {
    let questions = outcome["questions"].as_array().map_or(&[][..], Vec::as_slice);
    let shown: Vec<Value> = questions
        .iter()
        .map(|question| {
            let answers = question["answers"].as_array().map_or(&[][..], Vec::as_slice);
            let cast: u64 = answers.iter().filter_map(|a| a["votes"].as_u64()).sum();
            let most = answers.iter().filter_map(|a| a["votes"].as_u64()).max().unwrap_or(1).max(1);
            let bars: Vec<Value> = answers
                .iter()
                .map(|answer| {
                    let votes = answer["votes"].as_u64().unwrap_or(0);
                    json!({
                        "answer": answer["answer"],
                        "votes": votes,
                        "share": format!("{:.0}%", votes as f64 * 100.0 / cast.max(1) as f64),
                        "width": format!("{:.1}", votes as f64 * 100.0 / most as f64),
                        "winner": question["winner"].is_string() && question["winner"] == answer["answer"],
                    })
                })
                .collect();
            let (asked, drawn) = (question["asked"].as_u64(), question["drawn"].as_u64());
            json!({
                "question": question["question"],
                "bars": bars,
                "more_answers": question["more_answers"],
                "consensus": question["consensus"],
                "asked": asked,
                "drawn": drawn,
                "failed": question["failed"],
                "stopped_early": question["stopped_early"],
                "saved": match (asked, drawn) {
                    (Some(asked), Some(drawn)) if drawn < asked => asked - drawn,
                    _ => 0,
                },
            })
        })
        .collect();
    json!({"kind": "vote", "questions": shown, "more_questions": outcome["more_questions"]})
}

/// The steps as a graph: a column per depth (a step sits right of every
/// step it needs), each box coloured by how the step ended and labelled with
/// its time, an edge from each need.
fn step_graph(steps: &[Value], times: &StepTimes) -> Value {
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap_or("")).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let needs: Vec<Vec<usize>> = steps
        .iter()
        .map(|s| {
            let listed = s["needs"].as_array().map_or(&[][..], Vec::as_slice);
            listed.iter().filter_map(|n| index.get(n.as_str()?).copied()).collect()
        })
        .collect();
    // Depth: the longest chain of needs below a step (the plan has no cycle;
    // the bound keeps a corrupted one from looping).
    let mut depth = vec![0usize; steps.len()];
    for _ in 0..steps.len() {
        for (i, needed) in needs.iter().enumerate() {
            depth[i] = needed.iter().map(|&j| depth[j] + 1).max().unwrap_or(0).min(steps.len());
        }
    }
    let listed: Vec<Value> = steps
        .iter()
        .map(|s| {
            let time = s["id"].as_str().and_then(|id| times.of_step(id));
            json!({
                "name": s["name"],
                "needs": s["needs"],
                "status": if s["error"].is_string() { "failed" } else { "done" },
                "error": s["error"],
                "time": time.map(|(from, to)| chart::duration((to - from) as f64)),
            })
        })
        .collect();
    let svg = (steps.len() <= MOST_STEPS_DRAWN).then(|| draw_steps(&listed, &needs, &depth));
    json!({"kind": "steps", "steps": listed, "graph": svg})
}

fn draw_steps(steps: &[Value], needs: &[Vec<usize>], depth: &[usize]) -> String {
    const BOX_W: f64 = 150.0;
    const BOX_H: f64 = 40.0;
    const GAP_X: f64 = 60.0;
    const GAP_Y: f64 = 16.0;
    let mut row_in_column: HashMap<usize, usize> = HashMap::new();
    let places: Vec<(f64, f64)> = depth
        .iter()
        .map(|&column| {
            let row = row_in_column.entry(column).or_default();
            let place = (column as f64 * (BOX_W + GAP_X), *row as f64 * (BOX_H + GAP_Y));
            *row += 1;
            place
        })
        .collect();
    let width = (depth.iter().max().copied().unwrap_or(0) + 1) as f64 * (BOX_W + GAP_X) - GAP_X;
    let rows = row_in_column.values().max().copied().unwrap_or(1);
    let height = rows as f64 * (BOX_H + GAP_Y) - GAP_Y;
    let mut body = String::new();
    for (i, needed) in needs.iter().enumerate() {
        for &j in needed {
            let ((x1, y1), (x2, y2)) = (places[j], places[i]);
            let _ = write!(
                body,
                r#"<line class="need" x1="{:.1}" y1="{:.1}" x2="{x2:.1}" y2="{:.1}"/>"#,
                x1 + BOX_W,
                y1 + BOX_H / 2.0,
                y2 + BOX_H / 2.0,
            );
        }
    }
    for (step, &(x, y)) in steps.iter().zip(&places) {
        let name = step["name"].as_str().unwrap_or("");
        let time = step["time"].as_str().unwrap_or("no call");
        let status = step["status"].as_str().unwrap_or("done");
        let title = match step["error"].as_str() {
            Some(error) => format!("{}: {}", escape(name), escape(error)),
            None => format!("{}: {time}", escape(name)),
        };
        let _ = write!(
            body,
            r#"<g class="step {status}"><title>{title}</title><rect x="{x:.1}" y="{y:.1}" width="{BOX_W}" height="{BOX_H}" rx="4"/><text x="{:.1}" y="{:.1}">{}</text><text class="muted" x="{:.1}" y="{:.1}">{status} · {time}</text></g>"#,
            x + 8.0,
            y + 16.0,
            escape(&truncate(name, 22)),
            x + 8.0,
            y + 32.0,
        );
    }
    format!(
        r#"<svg class="steps" role="img" aria-label="step graph" viewBox="-2 -2 {:.0} {:.0}" width="{:.0}">{body}</svg>"#,
        width + 4.0,
        height + 4.0,
        (width + 4.0).min(1000.0),
    )
}

/// The collapse tree: the chunks at the bottom, each round of collapsing
/// above them, the answer on top; each node linked to the summaries it was
/// made from. Large trees become one bar per level.
fn collapse_tree(outcome: &Value) -> Value {
    let levels = outcome["levels"].as_array().map_or(&[][..], Vec::as_slice);
    let counts: Vec<usize> =
        levels.iter().map(|l| l["nodes"].as_u64().unwrap_or(0) as usize).collect();
    let answered = outcome["answered"].as_bool().unwrap_or(false);
    let listed: Vec<Value> = counts
        .iter()
        .enumerate()
        .map(|(level, &nodes)| {
            let what = if level == 0 { "chunks mapped" } else { "summaries" };
            json!({"level": level, "nodes": nodes, "what": what})
        })
        .collect();
    let total: usize = counts.iter().sum();
    let svg = (total > 0 && total <= MOST_NODES_DRAWN).then(|| draw_tree(levels, answered));
    json!({
        "kind": "collapse",
        "levels": listed,
        "answered": answered,
        "failures": outcome["failures"],
        "tree": svg,
    })
}

fn draw_tree(levels: &[Value], answered: bool) -> String {
    const WIDTH: f64 = 800.0;
    const ROW: f64 = 50.0;
    let rows = levels.len() + 1;
    let height = rows as f64 * ROW;
    // x of node i of a level with n nodes: spread evenly.
    let x_of = |i: usize, n: usize| (i as f64 + 0.5) / n.max(1) as f64 * WIDTH;
    // The bottom row is level 0; the answer is the top row.
    let y_of = |level: usize| height - ROW / 2.0 - level as f64 * ROW;
    let counts: Vec<usize> =
        levels.iter().map(|l| l["nodes"].as_u64().unwrap_or(0) as usize).collect();
    let mut body = String::new();
    for (level, info) in levels.iter().enumerate().skip(1) {
        let fan_in = info["fan_in"].as_array().map_or(&[][..], Vec::as_slice);
        let mut child = 0;
        for (node, children) in fan_in.iter().enumerate() {
            for _ in 0..children.as_u64().unwrap_or(0) {
                let _ = write!(
                    body,
                    r#"<line class="need" x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/>"#,
                    x_of(child, counts[level - 1]),
                    y_of(level - 1),
                    x_of(node, counts[level]),
                    y_of(level),
                );
                child += 1;
            }
        }
    }
    // The answer stands on every node of the last level.
    let top = levels.len();
    if let Some(&last) = counts.last() {
        for node in 0..last {
            let _ = write!(
                body,
                r#"<line class="need" x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/>"#,
                x_of(node, last),
                y_of(top - 1),
                WIDTH / 2.0,
                y_of(top),
            );
        }
    }
    for (level, &n) in counts.iter().enumerate() {
        let r = (WIDTH / n.max(1) as f64 / 3.0).clamp(1.5, 8.0);
        for node in 0..n {
            let _ = write!(
                body,
                r#"<circle class="node level-{level}" cx="{:.1}" cy="{:.1}" r="{r:.1}"/>"#,
                x_of(node, n),
                y_of(level),
            );
        }
    }
    let class = if answered { "node answer" } else { "node answer failed" };
    let _ = write!(
        body,
        r#"<circle class="{class}" cx="{:.1}" cy="{:.1}" r="9"><title>the answer</title></circle>"#,
        WIDTH / 2.0,
        y_of(top),
    );
    format!(
        r#"<svg class="chart collapse" role="img" aria-label="collapse tree" viewBox="0 0 {WIDTH} {height}" width="100%">{body}</svg>"#
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn truncate(text: &str, most: usize) -> String {
    if text.chars().count() <= most {
        return text.to_owned();
    }
    let kept: String = text.chars().take(most - 1).collect();
    format!("{kept}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_shows_each_answer_with_its_share_and_the_winner() {
        let outcome = json!({"kind": "vote", "more_questions": 0, "questions": [{
            "question": "6 x 7?", "answers": [{"answer": "42", "votes": 3}, {"answer": "41", "votes": 1}],
            "winner": "42", "consensus": true, "asked": 8, "drawn": 4, "failed": 0, "stopped_early": true}]});
        let view = view(Some(&outcome), &StepTimes::default());
        let question = &view["questions"][0];
        assert_eq!(question["bars"][0]["share"], "75%");
        assert_eq!(question["bars"][0]["width"], "100.0");
        assert_eq!(question["bars"][0]["winner"], true);
        assert_eq!(question["bars"][1]["winner"], false);
        assert_eq!(question["saved"], 4, "early stopping saved four samples");
    }

    #[test]
    fn steps_sit_right_of_what_they_need_with_their_times() {
        let outcome = json!({"kind": "steps", "steps": [
            {"name": "a", "id": "a", "needs": [], "error": null},
            {"name": "b <i>", "id": "b <i>", "needs": [], "error": "server error"},
            {"name": "c", "id": "c", "needs": ["a", "b <i>"], "error": null}]});
        let mut times = StepTimes::of(Some(&outcome));
        let call = |sent_ms, elapsed_ms| StoredCall {
            sent_ms,
            elapsed_ms,
            role: crate::history::Role::First,
            end: "ok".into(),
            status: None,
            first_token_ms: None,
            input_tokens: 0,
            output_tokens: 0,
        };
        times.add("a", &[call(1_000, 500), call(1_600, 400)]);
        times.add("unrelated", &[call(0, 99_999)]);
        let view = view(Some(&outcome), &times);
        assert_eq!(view["steps"][0]["time"], "1.00 s");
        assert_eq!(view["steps"][1]["status"], "failed");
        assert!(view["steps"][2]["time"].is_null(), "no call recorded for c");
        let svg = view["graph"].as_str().unwrap();
        assert_eq!(svg.matches("<line class=\"need\"").count(), 2);
        assert_eq!(svg.matches("<g class=\"step").count(), 3);
        assert!(svg.contains("b &lt;i&gt;") && !svg.contains("<i>"), "names are escaped");
        // c is in the second column: x = 150 + 60.
        assert!(svg.contains(r#"<rect x="210.0" y="0.0""#), "{svg}");
    }

    #[test]
    fn the_collapse_tree_links_each_summary_to_what_it_was_made_from() {
        let outcome = json!({"kind": "collapse", "answered": true, "failures": [], "levels": [
            {"nodes": 5}, {"nodes": 2, "fan_in": [3, 2]}]});
        let view = view(Some(&outcome), &StepTimes::default());
        let svg = view["tree"].as_str().unwrap();
        assert_eq!(svg.matches("<circle").count(), 5 + 2 + 1);
        assert_eq!(
            svg.matches("<line").count(),
            5 + 2,
            "each chunk to its summary, each summary to the answer"
        );
        assert_eq!(view["levels"][0]["what"], "chunks mapped");
        let big = json!({"kind": "collapse", "answered": true, "levels": [{"nodes": 5000}]});
        assert!(view_of(&big)["tree"].is_null(), "a large tree is one bar per level");
    }

    fn view_of(outcome: &Value) -> Value {
        view(Some(outcome), &StepTimes::default())
    }
}
