use fanout::{Provider, Request};
use fanout_local::{LocalModel, LocalOptions};
use std::time::Instant;
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let t = Instant::now();
    let model = LocalModel::load(path.as_ref(), LocalOptions::default())?;
    println!("load {:?}", t.elapsed());
    for p in ["What is the capital of France?", "List three colors."] {
        let t = Instant::now();
        let r = model.complete(&Request::user(p).with_temperature(0.0).with_max_tokens(40)).await?;
        println!("{p} -> {:?} {:?} {:?}", r.text, r.usage, t.elapsed());
    }
    let ids = model.prompt_tokens(&Request::user("Hello world 12345 don't"))?;
    println!("{ids:?}");
    Ok(())
}
