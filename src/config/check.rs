//! `leadgate check-config`: shows what the gateway would run with, or why it would not start.

use std::fmt::Write as _;

use secrecy::ExposeSecret;

use super::{Settings, SourceKind, Sources};
use crate::mapping::Target;

pub fn run(settings: &Settings) -> anyhow::Result<()> {
    let sources = settings.load_sources()?;
    sources.require_some(&settings.sources)?;
    // A token file that cannot be read would hold delivery from the start.
    if let Some(token) = settings.token_source() {
        token.load()?;
    }
    crate::admin_client::print_stdout(&describe(settings, &sources))
}

/// A readable summary of the settings and every source (no secrets).
pub fn describe(settings: &Settings, sources: &Sources) -> String {
    let mut out = String::new();
    let base = format!("http://{}", settings.listen);
    let _ = writeln!(out, "sources file: {}", settings.sources.display());
    let _ = writeln!(
        out,
        "queue: {}",
        match &settings.redis_url {
            Some(url) => format!(
                "redis ({})",
                crate::queue::redis::seed_urls(url.expose_secret())
                    .iter()
                    .map(|node| redact_url(node))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("embedded ({})", settings.data_dir.display()),
        }
    );
    let _ = writeln!(
        out,
        "upstream: {} ({})",
        settings
            .onpipeline_endpoint()
            .map(|u| u.to_string())
            .unwrap_or_default(),
        match settings.token_source() {
            Some(super::TokenSource::Inline(_)) => "token set".to_owned(),
            Some(super::TokenSource::File(path)) => format!("token from {}", path.display()),
            None => "NO TOKEN: delivery will be held".to_owned(),
        }
    );
    if let Some(ip) = settings.egress_ip {
        let _ = writeln!(out, "egress IP: {ip}");
    }
    for source in sources.iter() {
        let _ = writeln!(
            out,
            "\n[{}] kind={} url={base}/in/{}",
            source.id,
            source.kind.name(),
            source.id
        );
        if let SourceKind::Partner { api_keys } = &source.kind {
            let _ = writeln!(out, "  api keys: {} configured", api_keys.len());
        }
        if let SourceKind::Webhook(hook) = &source.kind {
            use super::sources::WebhookAuth;
            let auth = match hook.auth {
                WebhookAuth::Signature(_) => "its own signature, with secret".to_owned(),
                WebhookAuth::Key(_) => format!(
                    "shared key: paste {base}/in/{}?key=<secret> (or send X-Leadgate-Key)",
                    source.id
                ),
                WebhookAuth::None => "NONE: anyone who knows the URL can post".to_owned(),
            };
            let _ = writeln!(out, "  preset: {}; checked by {auth}", hook.preset.name());
        }
        if let SourceKind::Facebook(meta) = &source.kind {
            let pages: Vec<&str> = meta.page_tokens.iter().map(|(p, _)| p.as_str()).collect();
            let _ = writeln!(
                out,
                "  Meta: app secret set; verify token {}; page tokens for: {}",
                if meta.verify_token.expose_secret().is_empty() {
                    "EMPTY (the handshake never verifies)"
                } else {
                    "set"
                },
                if pages.is_empty() {
                    "none (leads will be parked)".to_owned()
                } else {
                    pages.join(", ")
                }
            );
            for form in &meta.backfill_forms {
                let _ = writeln!(
                    out,
                    "  backfill: form {} of page {} every {}",
                    form.form_id,
                    form.page_id,
                    humantime::format_duration(meta.backfill_every)
                );
            }
        }
        if !source.allowed_origins.is_empty() {
            let origins: Vec<String> = source
                .allowed_origins
                .iter()
                .map(|o| match o {
                    super::Origin::Any => "*".to_owned(),
                    super::Origin::Exact(o) => o.clone(),
                })
                .collect();
            let _ = writeln!(out, "  allowed origins: {}", origins.join(", "));
        }
        if let Some(url) = &source.thank_you_url {
            let _ = writeln!(out, "  thank-you URL: {url}");
        }
        let m = &source.mapping;
        for (incoming, target) in &m.fields {
            let _ = writeln!(out, "  {incoming} -> {}", target_name(target));
        }
        for (incoming, id) in &m.extra {
            let _ = writeln!(out, "  {incoming} -> Extra {id}");
        }
        for (id, value) in &m.constants {
            let _ = writeln!(out, "  Extra {id} = {value:?}");
        }
        match &m.unmapped_extra {
            Some(id) => {
                let _ = writeln!(out, "  other fields -> Extra {id} as \"key: value\" lines");
            }
            None => {
                let _ = writeln!(out, "  other fields: dropped");
                if source.kind.is_platform() {
                    // Leadsin has no free-text field: the note is the only place for them.
                    let _ = writeln!(
                        out,
                        "  WARNING: no unmapped_extra, so a lead's invalid values (an invalid \
                         email) are dropped, not forwarded; set unmapped_extra to keep them"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "  phone region: {}; missing name part: {}",
            m.phone_region
                .map(|r| format!("{r:?}"))
                .unwrap_or_else(|| "none (international numbers only)".into()),
            if m.last_name_fallback.is_empty() {
                "rejected".to_owned()
            } else {
                format!("{:?}", m.last_name_fallback)
            }
        );
        let rate = |q: &Option<governor::Quota>| match q {
            Some(q) => format!(
                "burst {} then 1 per {:?}",
                q.burst_size(),
                q.replenish_interval()
            ),
            None => "off".to_owned(),
        };
        let _ = writeln!(
            out,
            "  limits: per IP {}; total {}; max body {} bytes; max fields {}",
            rate(&source.limits.per_ip),
            rate(&source.limits.total),
            source.limits.max_body,
            source.limits.max_fields
        );
    }
    out
}

fn target_name(target: &Target) -> String {
    match target {
        Target::Email(kind) => format!("Email ({kind:?})")
            .to_lowercase()
            .replace("email", "Email"),
        Target::Phone(kind) => format!("Phone ({kind:?})")
            .to_lowercase()
            .replace("phone", "Phone"),
        other => format!("{other:?}"),
    }
}

/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparseable URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_password_of_a_cluster_seed_list_is_printed() {
        let settings = Settings::from_vars([
            (
                "LEADGATE_REDIS_URL".to_owned(),
                "redis://:first-secret@10.0.0.1,redis://:second-secret@10.0.0.2".to_owned(),
            ),
            ("LEADGATE_REDIS_CLUSTER".to_owned(), "true".to_owned()),
        ])
        .unwrap();
        let text = describe(&settings, &Sources::default());
        assert!(
            !text.contains("first-secret") && !text.contains("second-secret"),
            "{text}"
        );
        assert!(text.contains("10.0.0.2"), "{text}");
    }

    #[test]
    fn a_redis_password_is_not_printed() {
        assert_eq!(
            redact_url("redis://app:hunter2@10.0.0.5:6379/0"),
            "redis://app:***@10.0.0.5:6379/0"
        );
    }
}
