//! `--schema`: answers as parsed objects, repairs, CSV columns, bad schemas.

use crate::{Home, lines, stderr};

const GRADE: &str = r#"{"type": "object",
    "properties": {"grade": {"type": "integer", "minimum": 1}, "comment": {"type": "string"}},
    "required": ["grade", "comment"], "additionalProperties": false}"#;

fn batch(home: &Home, schema: &str, extra: &[&str]) -> std::process::Output {
    let rows = home.write("essays.jsonl", "{\"essay\":\"The sea\"}\n{\"essay\":\"Robots\"}\n");
    let schema = home.write("grade.json", schema);
    home.fanout()
        .args(["--provider", "mock", "--json", "batch"])
        .arg(&rows)
        .args(["--prompt", "Grade: {{ essay }}", "--schema"])
        .arg(&schema)
        .args(extra)
        .output()
        .unwrap()
}

fn totals(output: &std::process::Output) -> serde_json::Value {
    let said = stderr(output);
    serde_json::from_str(said.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

#[test]
fn answers_follow_the_schema_and_come_out_parsed() {
    let home = Home::new();
    let output = batch(&home, GRADE, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = lines(&output.stdout);
    assert_eq!(rows[0]["output"], serde_json::json!({"grade": 1, "comment": "mock"}));

    let csv = batch(&home, GRADE, &["--output-format", "csv", "--job", "csv"]);
    let mut reader = csv::Reader::from_reader(&csv.stdout[..]);
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    // One column per top-level field, in the schema's order.
    assert_eq!(header[10..], ["grade", "comment"]);
    let first = reader.records().next().unwrap().unwrap();
    assert_eq!((&first[10], &first[11]), ("1", "mock"));
}

#[test]
fn an_answer_that_stays_invalid_fails_its_row_after_the_repairs() {
    let home = Home::new();
    // The mock's string, "mock", never matches the pattern.
    let digits = GRADE.replace(
        r#""comment": {"type": "string"}"#,
        r#""comment": {"type": "string", "pattern": "^[0-9]+$"}"#,
    );
    let output = batch(&home, &digits, &["--schema-repairs", "1", "--job", "stays"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let rows = lines(&output.stdout);
    let message = rows[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("does not match the JSON Schema: at /comment"), "{message}");
    assert_eq!(rows[0]["error"]["kind"], "invalid_output");
    let totals = totals(&output);
    assert_eq!((totals["repairs"].as_u64(), totals["calls"].as_u64()), (Some(2), Some(4)));
    // Both refused answers were paid for: the row, the totals and the job count them.
    let paid = rows[0]["usage"]["output_tokens"].as_u64().unwrap();
    assert!(paid > 0, "{}", rows[0]);
    assert_eq!(totals["usage"]["output_tokens"].as_u64(), Some(2 * paid), "{totals}");
    let shown = home.fanout().args(["jobs", "show", "stays"]).output().unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["output_tokens"].as_u64(), Some(2 * paid), "{shown}");
}

#[test]
fn a_bad_schema_is_refused_before_any_call() {
    let home = Home::new();
    let output = batch(&home, r#"{"type": 12}"#, &[]);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains("grade.json is not a valid JSON Schema"), "{said}");
    assert!(output.stdout.is_empty());
    let output = batch(&home, "{not json", &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("grade.json is not JSON"), "{}", stderr(&output));
}

#[test]
fn ask_takes_a_schema_too() {
    let home = Home::new();
    let schema = home.write("grade.json", GRADE);
    let output = home
        .fanout()
        .args(["--provider", "mock", "ask", "Grade it.", "--system", "Be fair.", "--schema"])
        .arg(&schema)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer, serde_json::json!({"grade": 1, "comment": "mock"}));
}
