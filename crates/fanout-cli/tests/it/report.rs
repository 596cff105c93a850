//! `fanout report`: one self-contained HTML file for a job, batch or proxy.

use fanout_mock::{Config, Limit, MockServer};

use crate::{Home, run, stderr};

/// A batch where a third of the calls fail (no retries) reports its counts,
/// its two charts, the latency quantiles and the failed rows with their
/// errors; a row's own text is escaped; nothing is loaded from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_failures_is_reported_in_one_file() {
    let server =
        MockServer::start(Config { error_rate: 0.3, seed: 11, ..Config::default() }).await.unwrap();
    let home = Home::new();
    let rows: String = (0..40).map(|i| format!("{{\"id\":\"r{i}\",\"q\":\"q{i}\"}}\n")).collect();
    let path = home.write("rows.jsonl", rows);
    let mut batch = home.fanout();
    batch
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"])
        .args(["--retries", "0", "--no-hedge", "batch"])
        .arg(&path)
        .args([
            "--prompt",
            "Say {{ q }} <script>alert(1)</script>",
            "--id",
            "id",
            "--job",
            "graded",
        ]);
    let output = run(batch).await;
    assert_eq!(output.status.code(), Some(3), "some rows failed: {}", stderr(&output));
    let failed = server.stats().count(500);
    assert!(failed > 0, "{:?}", server.stats());

    let report = home.path("graded.html");
    let mut command = home.fanout();
    command.args(["report", "graded", "-o"]).arg(&report);
    let output = run(command).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("<svg class=\"chart").count(), 4, "timeline, load, over time, latency");
    assert!(html.contains("p50 latency") && html.contains("p99 latency"), "{html}");
    let listed = html.matches("<td class=\"error\">server (HTTP 500)").count() as u64;
    assert_eq!(listed, failed.min(20), "the failed rows, with their errors");
    assert!(html.contains(&format!("failed<b>{failed}</b>")), "{html}");
    assert!(!html.contains("<script>alert"), "the user's text is escaped");
    assert!(html.contains("&lt;script&gt;alert(1)"), "the settings are shown: {html}");
    for external in ["src=", "href=", "<link", "@import", "url("] {
        assert!(!html.contains(external), "self-contained: {external} in the report");
    }
    let mut to_stdout = home.fanout();
    to_stdout.args(["report", "graded", "-o", "-"]);
    let printed = run(to_stdout).await;
    assert!(printed.status.success() && printed.stdout == html.as_bytes(), "-o - prints it");

    // As a browser renders it: no console message, and the parts are there.
    let Some(dom) = rendered(&home, &report).await else { return };
    let part =
        |id: &str| dom.split(&format!("id=\"{id}\"")).nth(1).unwrap_or_else(|| panic!("no #{id}"));
    assert!(part("over-time").trim_start().starts_with("><svg"), "a chart of time");
    assert!(part("latency").contains("class=\"quantile\""), "quantile lines");
    let failed_rows = part("failed").split("</table>").next().unwrap().matches("<tr>").count();
    assert_eq!(failed_rows as u64, failed.min(20) + 1, "the failed rows and the header");
}

/// The report's DOM as headless Chromium rendered it, once it said nothing on
/// its console; `None` without a browser (outside CI).
async fn rendered(home: &Home, report: &std::path::Path) -> Option<String> {
    let chromium = chromium()?;
    let profile = home.path("chromium-profile");
    let mut browser = std::process::Command::new(chromium);
    browser
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", report.display()));
    let rendered = run(browser).await;
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    let said = stderr(&rendered);
    let console: Vec<&str> = said.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "the page said: {console:?}");
    Some(String::from_utf8_lossy(&rendered.stdout).into_owned())
}

/// A job with retries, hedges, 429s and the pauses they caused, and rows that
/// failed: the timeline has its lanes, its coloured calls and a band per
/// pause, the load chart its limit line, and the failed rows are listed — in
/// the file and in the DOM Chromium renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_shows_retries_hedges_pauses_and_failures() {
    let config = Config {
        latency: std::time::Duration::from_millis(40),
        error_rate: 0.3,
        hang_rate: 0.1,
        hang: std::time::Duration::from_secs(2),
        rpm: Some(Limit { per_minute: 3_000, burst: 8 }),
        // Limits told in headers are paced to, so the 429s this test needs
        // would come by chance: without headers they come for sure.
        rate_limit_headers: false,
        seed: 5,
        ..Config::default()
    };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let path = home.write("rows.jsonl", crate::rows(60));
    let mut batch = home.fanout();
    batch
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"])
        .args(["--retries", "1", "--hedge-after", "0.3", "--hedge-budget", "0.5", "-c", "8"])
        .args(["batch"])
        .arg(&path)
        .args(["--prompt", "Grade {{ essay }}", "--id", "id", "--job", "eventful"]);
    let output = run(batch).await;
    assert_eq!(output.status.code(), Some(3), "some rows failed: {}", stderr(&output));
    let stats = server.stats();
    assert!(stats.count(429) > 0 && stats.count(500) > 0, "{stats:?}");

    let report = home.path("eventful.html");
    let mut command = home.fanout();
    command.args(["report", "eventful", "-o"]).arg(&report);
    let output = run(command).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let html = std::fs::read_to_string(&report).unwrap();
    for drawn in ["call ok", "call retry", "call hedge", "call limited", "call failed"] {
        assert!(html.contains(&format!("class=\"{drawn}\"")), "a {drawn} bar: {html}");
    }
    assert!(html.contains("class=\"pause\""), "a pause band");
    assert!(html.contains("class=\"limit\""), "the concurrency limit line");
    assert!(html.contains("<tr class=\"pause-row\">"), "the pauses listed");

    let Some(dom) = rendered(&home, &report).await else { return };
    let part =
        |id: &str| dom.split(&format!("id=\"{id}\"")).nth(1).unwrap_or_else(|| panic!("no #{id}"));
    let timeline = part("timeline").split("id=\"load\"").next().unwrap();
    assert!(timeline.matches("<g class=\"lane\">").count() >= 2, "lanes: {timeline}");
    assert!(timeline.contains("class=\"pause\""), "the pause band is drawn");
    assert!(part("load").contains("class=\"limit\""), "the limit line is drawn");
    let failed = part("failed").split("</table>").next().unwrap();
    assert!(failed.matches("<tr>").count() > 1, "the failed rows: {failed}");
}

/// Headless Chromium (`.ci/run` installs Debian's `chromium`; or
/// `FANOUT_CHROMIUM`). CI must have it; a developer without it is told and
/// the browser's part of the test does not run.
fn chromium() -> Option<std::path::PathBuf> {
    let browser = std::env::var_os("FANOUT_CHROMIUM").unwrap_or_else(|| "chromium".into());
    let found = std::process::Command::new(&browser).arg("--version").output();
    if found.is_ok_and(|o| o.status.success()) {
        return Some(browser.into());
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI must install chromium (apt-get install chromium)");
    }
    eprintln!("no chromium: the report is not rendered in a browser (apt-get install chromium)");
    None
}

/// A job that is not there is named, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_job_is_named() {
    let home = Home::new();
    let mut command = home.fanout();
    command.args(["report", "nowhere", "-o"]).arg(home.path("nowhere.html"));
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no job `nowhere`"), "{}", stderr(&output));
    assert!(!home.path("nowhere.html").exists());
}
