//! Images in user messages, on both APIs: the bodies (snapshots), files read
//! when the call is sent, and a file that cannot be read.

use fanout::{Anthropic, ErrorKind, Image, OpenAi, Provider, Request};
use serde_json::json;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A 1x1 PNG's first bytes: enough for its type to be known.
const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D];

fn with_images(images: Vec<Image>) -> Request {
    let mut request = Request::user("What do these show?").with_max_tokens(50);
    request.messages[0].images = images;
    request
}

fn two_images() -> Request {
    with_images(vec![
        Image::Url("https://example.com/cat.jpg".into()),
        Image::Data { media_type: "image/png".into(), base64: "iVBORw0KGgo=".into() },
    ])
}

#[test]
fn image_bodies_for_both_apis() {
    let openai = OpenAi::builder("gpt-4o-mini").build().unwrap();
    insta::assert_json_snapshot!("openai_image_body", openai.body(&two_images()));
    let anthropic = Anthropic::builder("claude-test").build().unwrap();
    insta::assert_json_snapshot!("anthropic_image_body", anthropic.body(&two_images()));
}

#[tokio::test]
async fn a_file_is_read_when_sent_and_a_missing_one_fails_naming_it() {
    let server = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pixel.png");
    std::fs::write(&file, PNG).unwrap();
    let openai = OpenAi::builder("gpt-test")
        .base_url(format!("{}/v1", server.uri()))
        .api_key("sk-test")
        .build()
        .unwrap();
    let data_uri = "data:image/png;base64,iVBORw0KGgoAAAAN";
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(body_partial_json(json!({"messages": [{"content": [
            {"type": "text", "text": "What do these show?"},
            {"type": "image_url", "image_url": {"url": data_uri}}]}]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "choices": [{"message": {"content": "A pixel."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 90, "completion_tokens": 3}})))
        .expect(1)
        .mount(&server)
        .await;
    let answer = openai.complete(&with_images(vec![Image::File(file)])).await.unwrap();
    assert_eq!(answer.text, "A pixel.");

    let missing = with_images(vec![Image::File(dir.path().join("gone.png"))]);
    let error = openai.complete(&missing).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest, "not retried");
    assert!(error.message().contains("gone.png"), "{error}");
}
