//! Load driver for `bench/agents.py`: agents in parallel branches through the
//! real OpenAI provider, each model turn asking for a tool that takes
//! `--tool-ms`; or (`--single`) the same number of model calls as plain
//! tasks. Prints one JSON line: wall time, calls, and CPU per call.
//!
//! ```text
//! cargo run --release -p fanout --example agents_load -- \
//!     --base-url http://127.0.0.1:8080/v1 --branches 100 --turns 5 --tool-ms 50 --concurrency 50 [--single]
//! ```
//! The mock server must be started with `--tool-turns` one less than `--turns`.

use std::time::{Duration, Instant};

use fanout::{
    Agent, Branch, BranchOutcome, Ending, Executor, FnTool, OpenAi, Request, Task, ToolSpec,
    Toolbox,
};

struct Args {
    base_url: String,
    branches: usize,
    turns: u32,
    tool: Duration,
    concurrency: usize,
    single: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        base_url: String::new(),
        branches: 100,
        turns: 5,
        tool: Duration::from_millis(50),
        concurrency: 50,
        single: false,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        if flag == "--single" {
            args.single = true;
            continue;
        }
        let value = words.next().ok_or(format!("{flag} needs a value"))?;
        let number =
            |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--base-url" => args.base_url = value,
            "--branches" => args.branches = number(&value)? as usize,
            "--turns" => args.turns = number(&value)? as u32,
            "--tool-ms" => args.tool = Duration::from_millis(number(&value)?),
            "--concurrency" => args.concurrency = number(&value)? as usize,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.base_url.is_empty() {
        return Err("--base-url is required".into());
    }
    Ok(args)
}

/// This process's CPU time so far (user and system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("agents_load: {e}");
        std::process::exit(2)
    });
    let provider = OpenAi::builder("mock-1").base_url(&args.base_url).build().expect("a provider");
    let executor = Executor::builder(provider).concurrency(args.concurrency).build();
    let (cpu, start) = (cpu_time(), Instant::now());
    let (calls, finished) = if args.single {
        let n = args.branches * args.turns as usize;
        let tasks = (0..n).map(|i| Task::new(Request::user(format!("question {i}"))));
        let report = executor.run(tasks).await;
        (report.totals.calls, report.totals.succeeded)
    } else {
        let latency = args.tool;
        let schema =
            serde_json::json!({"type": "object", "properties": {"word": {"type": "string"}}});
        let lookup =
            FnTool::new(ToolSpec::new("lookup", "Looks a word up.", schema), move |_| async move {
                tokio::time::sleep(latency).await;
                Ok("an entry".to_owned())
            });
        let agent = Agent::new(Toolbox::new().with(lookup)).max_turns(args.turns);
        let branches = (0..args.branches).map(|i| {
            let agent = agent.clone();
            Branch::new(format!("agent-{i}"), move |calls| async move {
                agent.run(&calls, Request::user(format!("look up word=w{i}"))).await
            })
        });
        let report = executor.branches(branches).await;
        let answered = report
            .results
            .iter()
            .filter(|r| matches!(&r.outcome, BranchOutcome::Finished(run) if run.ending == Ending::Answered))
            .count();
        (report.calls.calls, answered)
    };
    let wall = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    let line = serde_json::json!({
        "wall_s": wall.as_secs_f64(),
        "calls": calls,
        "finished": finished,
        "cpu_s": cpu.as_secs_f64(),
        "cpu_us_per_call": cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
    });
    println!("{line}");
}
