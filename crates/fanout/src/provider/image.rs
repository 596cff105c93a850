//! Images in a message: a URL the provider fetches, inline data, or a file
//! read and encoded when the request is sent (so a batch of a million image
//! rows holds paths, not pictures).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{ErrorKind, ProviderError, Request};

/// An image a user message shows the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Image {
    /// An `http(s)://` URL, fetched by the provider.
    Url(String),
    /// The picture itself: its media type (`image/png`) and base64 data.
    Data {
        /// `image/png`, `image/jpeg`, `image/gif` or `image/webp`.
        media_type: String,
        /// The bytes, base64-encoded.
        base64: String,
    },
    /// A file, read and encoded when the request is sent.
    File(PathBuf),
}

/// The larger of the two vendors' per-image limits (Anthropic: 5 MB, OpenAI: 20 MB).
const MAX_IMAGE_BYTES: u64 = 20 * 1024 * 1024;

impl Image {
    /// What a row's field names: a data URI (`data:image/png;base64,...`), a
    /// URL (`https://...`), or else a file path.
    pub fn from_reference(reference: &str) -> Result<Self, String> {
        let reference = reference.trim();
        if let Some(rest) = reference.strip_prefix("data:") {
            let (media_type, data) = rest.split_once(";base64,").ok_or_else(|| {
                "a data URI must be base64 (data:image/png;base64,...)".to_owned()
            })?;
            return Ok(Self::Data { media_type: media_type.to_owned(), base64: data.to_owned() });
        }
        if reference.starts_with("https://") || reference.starts_with("http://") {
            return Ok(Self::Url(reference.to_owned()));
        }
        if reference.is_empty() {
            return Err("the image reference is empty".into());
        }
        Ok(Self::File(PathBuf::from(reference)))
    }

    /// As a URL: the URL itself, or a data URI (OpenAI takes either).
    pub fn as_url(&self) -> Result<String, ProviderError> {
        Ok(match &*self.loaded()? {
            Self::Url(url) => url.clone(),
            Self::Data { media_type, base64 } => format!("data:{media_type};base64,{base64}"),
            Self::File(_) => unreachable!("a loaded image is not a file"),
        })
    }

    /// A file read into data; anything else as it is.
    pub fn loaded(&self) -> Result<Cow<'_, Self>, ProviderError> {
        match self {
            Self::File(path) => read_file(path).map(Cow::Owned),
            other => Ok(Cow::Borrowed(other)),
        }
    }
}

fn unreadable(path: &Path, why: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::BadRequest, format!("image {}: {why}", path.display()))
}

/// The file as image data, its type from its first bytes.
fn read_file(path: &Path) -> Result<Image, ProviderError> {
    let size = std::fs::metadata(path).map_err(|e| unreadable(path, e))?.len();
    if size > MAX_IMAGE_BYTES {
        return Err(unreadable(
            path,
            format!("{size} bytes, more than the 20 MB a provider takes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| unreadable(path, e))?;
    let media_type =
        media_type(&bytes).ok_or_else(|| unreadable(path, "not a PNG, JPEG, GIF or WebP image"))?;
    let base64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(Image::Data { media_type: media_type.to_owned(), base64 })
}

/// The image type the file's signature says, of those both vendors take.
fn media_type(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xFF, 0xD8, 0xFF, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("image/webp"),
        _ => None,
    }
}

/// The request with its image files read, off the runtime's threads; the
/// request itself when it has none. A file that cannot be read fails the
/// call as a bad request naming the file, which is not retried. Providers
/// call it as they send; a cache calls it to key answers by the pictures.
pub async fn read_image_files(request: &Request) -> Result<Cow<'_, Request>, ProviderError> {
    let has_files =
        request.messages.iter().flat_map(|m| &m.images).any(|i| matches!(i, Image::File(_)));
    if !has_files {
        return Ok(Cow::Borrowed(request));
    }
    let mut loaded = request.clone();
    let read = tokio::task::spawn_blocking(move || {
        for image in loaded.messages.iter_mut().flat_map(|m| &mut m.images) {
            if let Image::File(path) = image {
                *image = read_file(path)?;
            }
        }
        Ok(loaded)
    });
    match read.await {
        Ok(result) => result.map(Cow::Owned),
        Err(error) => {
            Err(ProviderError::new(ErrorKind::BadRequest, format!("reading images: {error}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest PNG: a 1x1 transparent pixel.
    pub(crate) const PIXEL_PNG: &[u8] = &[
        0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F,
        0x15, 0xC4, 0x89,
    ];

    #[test]
    fn references_are_urls_data_or_files() {
        assert_eq!(
            Image::from_reference("https://x/a.png"),
            Ok(Image::Url("https://x/a.png".into()))
        );
        assert_eq!(
            Image::from_reference("data:image/png;base64,AAAA"),
            Ok(Image::Data { media_type: "image/png".into(), base64: "AAAA".into() })
        );
        assert_eq!(Image::from_reference(" a.png "), Ok(Image::File("a.png".into())));
        assert!(Image::from_reference("data:image/png,raw").is_err());
        assert!(Image::from_reference("").is_err());
    }

    #[test]
    fn files_are_read_with_their_type_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("pixel.png");
        std::fs::write(&png, PIXEL_PNG).unwrap();
        let url = Image::File(png).as_url().unwrap();
        assert!(url.starts_with("data:image/png;base64,iVBORw0KGgo"), "{url}");
        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not an image").unwrap();
        let error = Image::File(text).as_url().unwrap_err();
        assert!(error.message().contains("notes.png: not a PNG, JPEG, GIF or WebP"), "{error}");
        let missing = Image::File(dir.path().join("gone.jpg")).as_url().unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::BadRequest);
        assert!(missing.message().contains("gone.jpg"), "{missing}");
    }
}
