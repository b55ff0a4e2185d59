//! Website forms: posted by a browser as the form's `action`, or by JavaScript with `fetch`.
//! Verification is the browser's `Origin`: a page on an origin the source does not allow may
//! not post (same-origin pages always may). Requests without `Origin` (old browsers, curl,
//! server-side posts) are accepted: the origin check protects against other sites' pages, not
//! against scripts, which the rate limits handle.

use super::{Content, Submission, Unverified, Verified, body, body_limits};
use crate::config::Source;
use crate::error::IngestError;

pub fn verify(source: &Source, submission: &Submission<Unverified>) -> Result<(), IngestError> {
    match submission.header("origin") {
        None => Ok(()),
        Some(origin) if is_allowed(source, origin, submission.own_origin.as_deref()) => Ok(()),
        Some(origin) => Err(IngestError::OriginNotAllowed(origin.to_owned())),
    }
}

/// Whether a page at `origin` may post to `source`: allow-listed, or on the gateway's own
/// origin (the demo page, a form served by the same host).
pub fn is_allowed(source: &Source, origin: &str, own_origin: Option<&str>) -> bool {
    source.allows_origin(origin) || is_own_origin(origin, own_origin)
}

/// Whether `origin` is the gateway's own: the same scheme, host and port (a default port
/// written or not). A page served over `http` is not the gateway's `https` origin, nor is
/// another port on the same host.
pub fn is_own_origin(origin: &str, own_origin: Option<&str>) -> bool {
    let tuple = |text: &str| {
        reqwest::Url::parse(text)
            .ok()
            .map(|url| url.origin())
            .filter(|origin| origin.is_tuple())
    };
    match (tuple(origin), own_origin.and_then(tuple)) {
        (Some(origin), Some(own)) => origin == own,
        _ => false,
    }
}

pub async fn parse(
    source: &Source,
    submission: Submission<Verified>,
) -> Result<Content, IngestError> {
    let decoded = body::decode(
        submission.content_type(),
        submission.body.clone(),
        &body_limits(source),
    )
    .await
    .map_err(IngestError::from)?;
    match decoded {
        body::Decoded::Fields(fields) => Ok(Content::Fields(fields)),
        body::Decoded::Json(value) => Ok(Content::Fields(
            body::json_to_fields(&value, &body_limits(source)).map_err(IngestError::from)?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> std::sync::Arc<Source> {
        let text = "[[source]]\nid = \"w\"\nkind = \"form\"\nallowed_origins = [\"https://www.example.com\"]\n";
        let sources = crate::config::Sources::parse("t.toml", text, |_| None).unwrap();
        sources.get("w").unwrap().clone()
    }

    #[test]
    fn allow_listed_and_own_origins_may_post() {
        let source = source();
        assert!(is_allowed(&source, "https://www.example.com", None));
        assert!(is_allowed(
            &source,
            "http://127.0.0.1:8080",
            Some("http://127.0.0.1:8080")
        ));
        assert!(is_allowed(
            &source,
            "https://Leads.example.com",
            Some("https://leads.example.com")
        ));
        assert!(is_allowed(
            &source,
            "https://leads.example.com:443",
            Some("https://leads.example.com")
        ));
    }

    #[test]
    fn other_origins_schemes_and_ports_may_not() {
        let source = source();
        assert!(!is_allowed(
            &source,
            "https://evil.example",
            Some("http://127.0.0.1:8080")
        ));
        assert!(!is_allowed(
            &source,
            "http://127.0.0.1:9999",
            Some("http://127.0.0.1:8080")
        ));
        assert!(
            !is_allowed(
                &source,
                "http://leads.example.com",
                Some("https://leads.example.com")
            ),
            "the same host over another scheme is another origin"
        );
        assert!(!is_allowed(
            &source,
            "https://leads.example.com:8443",
            Some("https://leads.example.com")
        ));
        assert!(!is_allowed(&source, "null", Some("http://127.0.0.1:8080")));
        assert!(!is_allowed(&source, "http://127.0.0.1:8080", None));
    }
}
