//! The pattern commands, on the in-process mock provider.

use crate::{Home, lines, stderr};

fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn vote_consensus_early_stop_judge_and_rows() {
    let home = Home::new();
    let fanout = || {
        let mut command = home.fanout();
        command.args(["--provider", "mock"]);
        command
    };
    let output = fanout()
        .args([
            "--json",
            "vote",
            "What is 6 x 7?",
            "-n",
            "9",
            "--early-stop",
            "--stop-rule",
            "certain",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["winner"], "mock answer what is 6 x 7");
    assert_eq!(
        (result["calls"].as_u64(), result["stopped_early"].as_bool()),
        (Some(5), Some(true))
    );

    let output =
        fanout().args(["vote", "Pick", "-n", "3", "--extract", "choice"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "no answer can be extracted: no consensus");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "no consensus\n");

    let output = fanout()
        .args(["--json", "vote", "Name a color", "-n", "3", "--distinct", "--max-samples", "4"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "the mock gives one answer only");
    assert_eq!(json(&output)["options"].as_array().unwrap().len(), 1);

    home.write(
        "questions.jsonl",
        "{\"id\":\"q1\",\"q\":\"2+2\"}\n{\"id\":\"q2\",\"q\":\"3+3\"}\n{\"id\":\"q3\"}\n",
    );
    let output = fanout()
        .args(["vote", "{{ q }}", "-n", "3", "--input", "questions.jsonl", "--id", "id"])
        .output()
        .unwrap();
    let rows = lines(&output.stdout);
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[1]["id"].as_str(), rows[1]["winner"].as_str()),
        (Some("q2"), Some("mock answer 3 3"))
    );
    assert!(rows[2]["error"].as_str().unwrap().contains("the template uses `q`"));
    let bad = fanout().args(["vote", "x", "--extract", "vibes"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("unknown extractor"));
}

#[test]
fn sections_perspectives_and_map_reduce() {
    let home = Home::new();
    let fanout = || {
        let mut command = home.fanout();
        command.args(["--provider", "mock", "--json"]);
        command
    };
    let output = fanout()
        .args([
            "sections",
            "--section",
            "history=History of Rome",
            "--section",
            "art=Art of Rome",
            "--synthesize",
            "One page.",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["parts"][1]["name"], "art");
    assert!(result["synthesis"]["text"].as_str().unwrap().contains("## art (id: s2)"));

    home.write("plan.md", "Open a bakery in Lyon.");
    home.write("people.toml", "[[persona]]\nname = \"baker\"\nprompt = \"You are a baker.\"\n");
    let output = fanout()
        .args(["perspectives", "plan.md", "--persona", "skeptic", "--personas-file", "people.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    let names: Vec<&str> =
        result["parts"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["skeptic", "baker"]);
    assert!(result["synthesis"]["text"].as_str().unwrap().contains("## baker (id: s2)"));
    let unknown =
        fanout().args(["perspectives", "plan.md", "--persona", "wizard"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("unknown persona `wizard`"));

    std::fs::create_dir_all(home.path("docs")).unwrap();
    home.write("docs/a.txt", "alpha ".repeat(50));
    home.write("docs/b.txt", "beta ".repeat(50));
    home.write("notes.jsonl", "{\"text\":\"gamma notes\"}\n");
    let output = fanout()
        .args([
            "map-reduce",
            "docs",
            "docs/*.txt",
            "notes.jsonl",
            "--field",
            "text",
            "--map",
            "Notes.",
            "--reduce",
            "Summary.",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    let sources: Vec<&str> =
        result["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(sources, ["a.txt#1", "b.txt#1", "notes.jsonl:1#1"], "each file once");
}

#[test]
fn workflow_runs_and_refuses_invalid_files() {
    let home = Home::new();
    let research = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/research.toml");
    let output = home
        .fanout()
        .args(["--provider", "mock", "run", research, "--var", "topic=the bicycle"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.starts_with("mock answer: Write a one-page briefing on the bicycle"),
        "{report}"
    );
    home.write("cycle.toml", "[[step]]\nname = \"a\"\nprompt = \"{{ steps.b }}\"\n[[step]]\nname = \"b\"\nprompt = \"{{ steps.a }}\"\n");
    let output = home.fanout().args(["--provider", "mock", "run", "cycle.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("cycle: a -> b -> a"), "{}", stderr(&output));
}

/// Every run is a job: a vote's samples and an ask's call are recorded with
/// their history, listed by `jobs list`, reported by `fanout report`, and
/// resumed from their answers.
#[test]
fn every_run_is_a_recorded_job() {
    let home = Home::new();
    let fanout = || {
        let mut command = home.fanout();
        command.args(["--provider", "mock"]);
        command
    };
    let output = fanout().args(["vote", "What is 6 x 7?", "-n", "4"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(said.contains("4 calls recorded as job `vote-"), "{said}");
    let output = fanout().args(["-q", "ask", "hello"]).output().unwrap();
    assert!(output.status.success() && stderr(&output).is_empty(), "{}", stderr(&output));

    let listed = fanout().args(["--json", "jobs", "list"]).output().unwrap();
    let jobs = json(&listed);
    let jobs = jobs.as_array().unwrap();
    let of = |command: &str| jobs.iter().find(|j| j["command"] == command).unwrap().clone();
    let (vote, ask) = (of("vote"), of("ask"));
    assert_eq!((vote["finished"].as_u64(), vote["total"].as_u64()), (Some(4), Some(4)));
    assert_eq!(vote["by_status"]["succeeded"], 4);
    assert!(vote["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(ask["finished"], 1);
    let name = vote["name"].as_str().unwrap();

    let report = home.path("vote.html");
    let output = fanout().args(["report", name, "-o"]).arg(&report).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("4 calls: 0 retries"), "the samples' history: {html}");
    assert_eq!(html.matches("class=\"call ok\"").count(), 4);

    // Resumed, the vote is answered from the job: no sample is drawn again.
    let output = fanout().args(["jobs", "resume", name]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("4 answers kept"), "{}", stderr(&output));
    assert!(stderr(&output).contains("0 calls recorded"), "{}", stderr(&output));
    let shown = json(&fanout().args(["--json", "jobs", "show", name]).output().unwrap());
    assert_eq!(shown["finished"], 4, "{shown}");
}

/// A pattern job's report shows the pattern: a vote's answers with the
/// winner and where early stopping cut, the step graph of sections with each
/// step's time, a map-reduce's collapse tree.
#[test]
fn pattern_reports_show_votes_steps_and_the_collapse_tree() {
    let home = Home::new();
    let fanout = || {
        let mut command = home.fanout();
        command.args(["--provider", "mock", "-q"]);
        command
    };
    let report_of = |command: &str| {
        let listed = json(&fanout().args(["--json", "jobs", "list"]).output().unwrap());
        let job = listed.as_array().unwrap().iter().find(|j| j["command"] == command).cloned();
        let name = job.unwrap()["name"].as_str().unwrap().to_owned();
        let output = fanout().args(["report", &name, "-o", "-"]).output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };

    let vote = fanout().args(["vote", "What is 6 x 7?", "-n", "9", "--early-stop"]).output();
    assert!(vote.unwrap().status.success());
    let html = report_of("vote");
    assert!(html.contains("<h2>Votes</h2>"), "{html}");
    assert_eq!(html.matches("class=\"answer-row winner\"").count(), 1, "one answer, the winner");
    assert!(html.contains("stopped early:"), "the mock always agrees, so the vote stops early");
    assert!(html.contains("of 9 samples drawn"));

    let sections = fanout()
        .args(["sections", "--section", "a=Alpha", "--section", "b=Beta", "--synthesize", "Join."])
        .output()
        .unwrap();
    assert!(sections.status.success(), "{}", stderr(&sections));
    let html = report_of("sections");
    assert_eq!(html.matches("class=\"step-row done\"").count(), 3, "{html}");
    assert_eq!(html.matches("<line class=\"need\"").count(), 2, "the synthesis needs both");
    assert!(!html.contains("<td></td></tr>"), "every step has its time");

    home.write(
        "talk.toml",
        "[[step]]\nname = \"outline\"\nprompt = \"Outline\"\n[[step]]\nname = \"facts\"\nprompt = \"Facts\"\n\
         [[step]]\nname = \"draft\"\nprompt = \"{{ steps.outline }} {{ steps.facts }}\"\n",
    );
    let workflow = fanout().args(["run", "talk.toml"]).output().unwrap();
    assert!(workflow.status.success(), "{}", stderr(&workflow));
    let html = report_of("run");
    assert_eq!(html.matches("class=\"step-row done\"").count(), 3, "{html}");
    assert_eq!(html.matches("<line class=\"need\"").count(), 2, "draft needs both");
    assert!(html.contains("<td>draft</td><td>outline, facts</td>"), "{html}");
    assert!(!html.contains("<td></td></tr>") && !html.contains("no call"), "each step's time");

    std::fs::create_dir_all(home.path("docs")).unwrap();
    for name in ["a", "b", "c"] {
        home.write(&format!("docs/{name}.txt"), format!("{name} words here. ").repeat(40));
    }
    let args =
        ["map-reduce", "docs", "--map", "Notes.", "--reduce", "Sum.", "--chunk-tokens", "60"];
    let output = fanout().args(args).args(["--reduce-tokens", "400"]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let html = report_of("map-reduce");
    assert!(html.contains("class=\"chart collapse\""), "{html}");
    assert!(html.contains("chunks mapped"));
    assert!(html.matches("<circle").count() > 3, "chunks, summaries and the answer");
}

/// A pattern job resumes where it makes sense: a workflow whose last step
/// failed (its template could not be rendered) and was mended reruns only
/// that step, the others answered from the job; a resumed map-reduce asks
/// nothing its finished calls answered; nothing is paid or recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_pattern_job_asks_only_what_it_has_no_answer_for() {
    let server = fanout_mock::MockServer::start(fanout_mock::Config::default()).await.unwrap();
    let home = Home::new();
    let fanout = || {
        let mut command = home.fanout();
        command.args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"]);
        command
    };
    let steps = |report: &str| {
        format!(
            "[[step]]\nname = \"outline\"\nprompt = \"Outline\"\n[[step]]\nname = \"draft\"\n\
             prompt = \"Draft {{{{ steps.outline }}}}\"\n[[step]]\nname = \"report\"\nprompt = \"{report}\"\n"
        )
    };
    home.write("talk.toml", steps("Report {{ steps.draft | int }}"));
    let first = crate::run({
        let mut command = fanout();
        command.args(["run", "talk.toml"]);
        command
    })
    .await;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert_eq!(server.stats().requests, 2, "outline and draft");
    let listed = json(
        &crate::run({
            let mut command = fanout();
            command.args(["--json", "jobs", "list"]);
            command
        })
        .await,
    );
    let name = listed[0]["name"].as_str().unwrap().to_owned();

    // Mended: the report step no longer breaks; resumed from another folder.
    home.write("talk.toml", steps("Report {{ steps.draft }}"));
    let mut resume = fanout();
    resume.current_dir("/").args(["jobs", "resume", &name]);
    let resumed = crate::run(resume).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(server.stats().requests, 3, "only the report step was asked");
    let shown = json(
        &crate::run({
            let mut command = fanout();
            command.args(["--json", "jobs", "show", &name]);
            command
        })
        .await,
    );
    assert_eq!(shown["finished"], 3, "one record per call: {shown}");
    assert_eq!(shown["by_status"]["succeeded"], 3);

    std::fs::create_dir_all(home.path("docs")).unwrap();
    home.write("docs/a.txt", "alpha beta gamma. ".repeat(60));
    let map_reduce = |command: &mut std::process::Command| {
        command.args(["map-reduce", "docs", "--map", "Notes.", "--reduce", "Sum."]);
        command.args(["--chunk-tokens", "60", "--reduce-tokens", "300"]);
    };
    let mut first = fanout();
    map_reduce(&mut first);
    let first = crate::run(first).await;
    assert!(first.status.success(), "{}", stderr(&first));
    let asked = server.stats().requests;
    let listed = json(
        &crate::run({
            let mut command = fanout();
            command.args(["--json", "jobs", "list"]);
            command
        })
        .await,
    );
    let job = listed.as_array().unwrap().iter().find(|j| j["command"] == "map-reduce").unwrap();
    let name = job["name"].as_str().unwrap().to_owned();
    let resumed = crate::run({
        let mut command = fanout();
        command.args(["jobs", "resume", &name]);
        command
    })
    .await;
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(server.stats().requests, asked, "every call was answered from the job");
    assert_eq!(resumed.stdout, first.stdout, "the same answer");
}
