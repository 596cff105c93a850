//! `fanout ask`: one question, one answer.

use std::process::ExitCode;

use anyhow::Result;
use fanout::{Request, Usage};

use crate::Refusal;
use crate::connect;
use crate::exit::Ending;
use crate::output;
use crate::recorded::{self, Recording};
use crate::settings::{Flags, Settings};

#[derive(Debug, clap::Args)]
pub struct AskArgs {
    prompt: String,
    #[arg(long)]
    system: Option<String>,
    /// JSON Schema file the answer must follow (validated, and repaired)
    #[arg(long, value_name = "FILE")]
    schema: Option<std::path::PathBuf>,
    /// An image to show with the question: a path, a URL or a data URI; repeatable
    #[arg(long = "image", value_name = "IMAGE")]
    images: Vec<String>,
}

/// Prints the answer (or, with `--json`, the result in batch's schema); any
/// failure goes to stderr, and the exit code says how it ended.
pub async fn command(flags: &Flags, args: AskArgs) -> Result<ExitCode> {
    let settings = Settings::resolve(flags).map_err(Refusal)?;
    let provider = connect::provider(&settings, flags.quiet).await.map_err(Refusal)?;
    let response_format =
        args.schema.as_deref().map(crate::schema::read).transpose().map_err(Refusal)?;
    let mut request = Request::user(args.prompt);
    request.response_format = response_format;
    for image in &args.images {
        let image = fanout::Image::from_reference(image)
            .map_err(|e| Refusal(anyhow::anyhow!("--image {image}: {e}")))?;
        request.messages[0].images.push(image);
    }
    if let Some(system) = args.system {
        request = request.with_system(system);
    }
    request.temperature = settings.temperature;
    request.max_tokens = settings.max_tokens;
    connect::check_budget_fits(&settings, &*provider, &request).map_err(Refusal)?;
    let recording = Recording::start(flags, &settings, "ask", "-")?;
    let provider = recorded::provider(recording.as_ref(), provider);
    let builder = connect::executor(&settings, provider, Usage::default());
    let report = recorded::attach(recording.as_ref(), None, builder).build().run([request]).await;
    drop(recording);
    let result = &report.results[0];
    if flags.json {
        println!("{}", output::result_line(result));
    } else if let Some(text) = result.outcome.text() {
        println!("{text}");
    }
    if let Some(message) = result.outcome.describe() {
        eprintln!("fanout: {message}");
    }
    let mut ending = Ending::default();
    ending.add(&result.outcome);
    Ok(ending.exit().into())
}
