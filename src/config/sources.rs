//! The sources file (`leadgate.toml`): one `[[source]]` table per sender, each with its kind,
//! its mapping into Leadsin fields and its limits. Loaded and checked once at start-up; every
//! error names the file, the line and the key.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use indexmap::IndexMap;
use reqwest::Url;
use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;

use crate::mapping::{ExtraId, MappingRules, Target};

/// A configuration error located in the sources file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SourcesError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// What a source accepts and how it proves who sent it.
pub enum SourceKind {
    /// Website forms: urlencoded, multipart or JSON, from browsers; no credential.
    Form,
    /// Partner systems: `Authorization: Bearer <key>` with one of these keys.
    Partner { api_keys: Vec<SecretString> },
    /// Google Ads lead forms: JSON whose `google_key` must equal this key.
    Google { google_key: SecretString },
    /// A form tool's webhook (Typeform, Unbounce, Elementor, Webflow, Jotform).
    Webhook(Webhook),
    /// Meta (Facebook/Instagram) Lead Ads webhooks; the leads are read from the Graph API.
    Facebook(Box<MetaSource>),
}

/// A form tool whose webhook format leadgate knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Typeform,
    Unbounce,
    Elementor,
    Webflow,
    Jotform,
}

impl Preset {
    /// Every preset, by the name the sources file gives it.
    pub const ALL: [(&'static str, Preset); 5] = [
        ("typeform", Preset::Typeform),
        ("unbounce", Preset::Unbounce),
        ("elementor", Preset::Elementor),
        ("webflow", Preset::Webflow),
        ("jotform", Preset::Jotform),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .unwrap_or("webhook")
    }

    /// Whether the tool signs its requests with a scheme of its own (an HMAC over the body).
    pub fn signs(self) -> bool {
        matches!(self, Preset::Typeform | Preset::Webflow)
    }
}

/// How a webhook source checks its sender.
pub enum WebhookAuth {
    /// The preset's own HMAC signature, keyed with this secret.
    Signature(SecretString),
    /// A shared key the sender puts in the URL (`?key=…`) or an `X-Leadgate-Key` header.
    Key(SecretString),
    /// No check: anyone who knows the URL can post (chosen explicitly with `auth = "none"`).
    None,
}

/// A webhook source: which tool, and how its requests are checked.
pub struct Webhook {
    pub preset: Preset,
    pub auth: WebhookAuth,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match self.auth {
            WebhookAuth::Signature(_) => "signature <redacted>",
            WebhookAuth::Key(_) => "key <redacted>",
            WebhookAuth::None => "none",
        };
        write!(f, "Webhook {{ preset: {:?}, auth: {auth} }}", self.preset)
    }
}

impl SourceKind {
    /// Senders that treat anything but a plain `200` as failure (ad platforms, some form
    /// tools) get exactly that.
    pub fn wants_plain_200(&self) -> bool {
        match self {
            SourceKind::Form | SourceKind::Partner { .. } => false,
            SourceKind::Google { .. } | SourceKind::Webhook(_) | SourceKind::Facebook(_) => true,
        }
    }

    /// Senders that cannot fix their data (ad platforms, form tools): their leads are mapped
    /// leniently and never refused for what they carry.
    pub fn is_platform(&self) -> bool {
        match self {
            SourceKind::Form | SourceKind::Partner { .. } => false,
            SourceKind::Google { .. } | SourceKind::Webhook(_) => true,
            SourceKind::Facebook(_) => true,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::Form => "form",
            SourceKind::Partner { .. } => "partner",
            SourceKind::Google { .. } => "google",
            SourceKind::Webhook(_) => "webhook",
            SourceKind::Facebook(_) => "facebook",
        }
    }
}

impl fmt::Debug for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKind::Form => f.write_str("Form"),
            SourceKind::Partner { api_keys } => {
                write!(f, "Partner {{ api_keys: <{} redacted> }}", api_keys.len())
            }
            SourceKind::Google { .. } => f.write_str("Google { google_key: <redacted> }"),
            SourceKind::Webhook(hook) => hook.fmt(f),
            SourceKind::Facebook(meta) => meta.fmt(f),
        }
    }
}

// ---- Meta (Facebook/Instagram) Lead Ads: `kind = "facebook"` --------------------------------

/// The settings of a `kind = "facebook"` source. Secrets come from `${VAR}` references.
pub struct MetaSource {
    /// The Meta app's secret: the HMAC key of `X-Hub-Signature-256`.
    pub app_secret: SecretString,
    /// What Meta's subscription handshake must present; an empty token never verifies.
    pub verify_token: SecretString,
    /// Page id → that page's access token, used to read its leads from the Graph API.
    pub page_tokens: Vec<(String, SecretString)>,
    /// Forms whose leads are listed periodically, so leads without a notification arrive too.
    pub backfill_forms: Vec<BackfillForm>,
    /// How often each backfill form is listed.
    pub backfill_every: Duration,
}

/// A form listed by the backfill, with the page whose token reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillForm {
    pub page_id: String,
    pub form_id: String,
}

impl MetaSource {
    /// The access token configured for a page.
    pub fn page_token(&self, page_id: &str) -> Option<&SecretString> {
        self.page_tokens
            .iter()
            .find(|(page, _)| page == page_id)
            .map(|(_, token)| token)
    }
}

impl fmt::Debug for MetaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Facebook")
            .field("app_secret", &"<redacted>")
            .field("verify_token", &"<redacted>")
            .field(
                "page_tokens",
                &self
                    .page_tokens
                    .iter()
                    .map(|(page, _)| format!("{page}: <redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("backfill_forms", &self.backfill_forms)
            .field("backfill_every", &self.backfill_every)
            .finish()
    }
}

/// How often backfill forms are listed when `backfill_every` is not set.
const DEFAULT_BACKFILL_EVERY: Duration = Duration::from_secs(10 * 60);

/// The `kind = "facebook"` keys of a raw source, with the span of each one present (for
/// "only facebook sources take …" errors).
fn meta_keys(raw: &RawSource) -> Option<(Range<usize>, &'static str)> {
    let span = |v: &S| v.span();
    raw.app_secret
        .as_ref()
        .map(|v| (span(v), "app_secret"))
        .or_else(|| raw.verify_token.as_ref().map(|v| (span(v), "verify_token")))
        .or_else(|| {
            raw.page_tokens
                .values()
                .next()
                .map(|v| (span(v), "page_tokens"))
        })
        .or_else(|| {
            raw.backfill_forms
                .first()
                .map(|v| (span(v), "backfill_forms"))
        })
        .or_else(|| {
            raw.backfill_every
                .as_ref()
                .map(|v| (span(v), "backfill_every"))
        })
}

/// Meta's ids (pages, forms, leads) are decimal digits.
fn is_meta_id(text: &str) -> bool {
    !text.is_empty() && text.len() <= 32 && text.bytes().all(|b| b.is_ascii_digit())
}

fn build_meta(ctx: &Ctx<'_>, raw: &RawSource, id: &str) -> Result<MetaSource, SourcesError> {
    let at = |span: Range<usize>, key: &str, message: String| {
        ctx.error(span, format!("source {id:?}, key {key}: {message}"))
    };
    if let Some(key) = raw.api_keys.first() {
        return Err(at(
            key.span(),
            "api_keys",
            "only partner sources take api_keys".into(),
        ));
    }
    let context = |key: &str| format!("source {id:?}, key {key}");
    let app_secret = match &raw.app_secret {
        None => {
            return Err(at(
                raw.kind.span(),
                "app_secret",
                "a facebook source needs the Meta app's secret (it checks X-Hub-Signature-256)"
                    .into(),
            ));
        }
        Some(value) => {
            let secret = ctx.expand(value, &context("app_secret"))?;
            if secret.trim().is_empty() {
                return Err(at(value.span(), "app_secret", "must not be empty".into()));
            }
            SecretString::from(secret)
        }
    };
    let verify_token = match &raw.verify_token {
        None => {
            return Err(at(
                raw.kind.span(),
                "verify_token",
                "a facebook source needs the verify token typed into Meta's webhook settings"
                    .into(),
            ));
        }
        // An empty token is allowed but never verifies (see sources::facebook::handshake).
        Some(value) => SecretString::from(ctx.expand(value, &context("verify_token"))?),
    };
    let mut page_tokens = Vec::new();
    for (page, value) in &raw.page_tokens {
        let key = format!("page_tokens.{page}");
        if !is_meta_id(page) {
            return Err(at(
                value.span(),
                &key,
                "a page id is the page's numeric id, e.g. \"112233445566778\"".into(),
            ));
        }
        let token = ctx.expand(value, &context(&key))?;
        if token.trim().is_empty() {
            return Err(at(value.span(), &key, "the page token is empty".into()));
        }
        page_tokens.push((page.clone(), SecretString::from(token.trim().to_owned())));
    }
    let mut backfill_forms = Vec::new();
    for value in &raw.backfill_forms {
        let text = value.get_ref().trim();
        let (page_id, form_id) = match text.split_once(':') {
            Some((page, form)) => (page.trim().to_owned(), form.trim().to_owned()),
            None if page_tokens.len() == 1 => (page_tokens[0].0.clone(), text.to_owned()),
            None => {
                return Err(at(
                    value.span(),
                    "backfill_forms",
                    "with several page_tokens, write \"<page_id>:<form_id>\" so the backfill knows \
                     which page's token reads the form"
                        .into(),
                ));
            }
        };
        if !is_meta_id(&form_id) || !is_meta_id(&page_id) {
            return Err(at(
                value.span(),
                "backfill_forms",
                format!("{text:?} is not a form id (digits) or \"<page_id>:<form_id>\""),
            ));
        }
        if !page_tokens.iter().any(|(page, _)| *page == page_id) {
            return Err(at(
                value.span(),
                "backfill_forms",
                format!("page {page_id} has no token in page_tokens"),
            ));
        }
        backfill_forms.push(BackfillForm { page_id, form_id });
    }
    let backfill_every = match &raw.backfill_every {
        None => DEFAULT_BACKFILL_EVERY,
        Some(value) => humantime::parse_duration(value.get_ref().trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                at(
                    value.span(),
                    "backfill_every",
                    format!("{:?} is not a duration like \"10m\"", value.get_ref()),
                )
            })?,
    };
    Ok(MetaSource {
        app_secret,
        verify_token,
        page_tokens,
        backfill_forms,
        backfill_every,
    })
}

// ---- end of Meta ------------------------------------------------------------------------------

/// An allowed browser origin: `scheme://host[:port]`, or `*` for any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Any,
    Exact(String),
}

impl Origin {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Origin::Any);
        }
        let url = Url::parse(text)
            .map_err(|_| format!("{text:?} is not an origin like https://www.example.com"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("{text:?} is not an http(s) origin"));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(format!(
                "{text:?} has a path; an origin is only scheme://host[:port]"
            ));
        }
        Ok(Origin::Exact(url.origin().ascii_serialization()))
    }

    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origin::Any => true,
            Origin::Exact(allowed) => allowed.eq_ignore_ascii_case(origin),
        }
    }
}

/// Per-source abuse limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests per client IP; `None` = off.
    pub per_ip: Option<Quota>,
    /// Requests for the whole source; `None` = off.
    pub total: Option<Quota>,
    /// Largest accepted body in bytes.
    pub max_body: usize,
    /// Most name/value pairs one body may carry (urlencoded pairs, multipart parts, flat JSON
    /// values), within `max_body`.
    pub max_fields: usize,
}

/// One configured source.
#[derive(Debug)]
pub struct Source {
    pub id: String,
    pub kind: SourceKind,
    pub allowed_origins: Vec<Origin>,
    pub thank_you_url: Option<Url>,
    pub mapping: MappingRules,
    pub limits: Limits,
    /// Forward a platform's test leads (Google's "Send test data") instead of only logging them.
    pub forward_test_leads: bool,
}

impl Source {
    /// Whether a platform's test leads are forwarded to Onpipeline (otherwise only logged).
    pub fn forwards_test_leads(&self) -> bool {
        self.forward_test_leads
    }

    /// Whether a browser page at `origin` may post to this source.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o.allows(origin))
    }
}

/// Every configured source, by id. Cloning shares the sources (the forwarder and the HTTP side
/// hold the same ones).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    list: Vec<Arc<Source>>,
    by_id: HashMap<String, Arc<Source>>,
}

impl Sources {
    pub fn get(&self, id: &str) -> Option<&Arc<Source>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Source>> {
        self.list.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Refuses a sources file without any `[[source]]`: a gateway that takes leads needs
    /// somewhere to take them (`leadgate check-config`, and `serve` unless `--no-ingest`).
    pub fn require_some(&self, file: &Path) -> Result<(), SourcesError> {
        if self.is_empty() {
            return Err(SourcesError {
                file: file.display().to_string(),
                line: 1,
                message: "no sources defined: add a [[source]] table with an id and a kind \
                          (see the README's sources-file table)"
                    .to_owned(),
            });
        }
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the sources file {}: {e} (set LEADGATE_SOURCES to its path)",
                path.display()
            )
        })?;
        Ok(Self::parse(&path.display().to_string(), &text, |name| {
            std::env::var(name).ok()
        })?)
    }

    /// Parses the file's text; `env` resolves `${VAR}` references.
    pub fn parse(
        file: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourcesError> {
        let ctx = Ctx {
            file,
            text,
            env: &env,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| ctx.line_of(s.start)).unwrap_or(0);
            ctx.error_at_line(line, syntax_message(&e, text))
        })?;
        let mut sources = Sources::default();
        // Each id with the line of its first definition.
        let mut seen = HashMap::new();
        for raw in raw.source {
            let id_span = raw.id.span();
            let line = ctx.line_of(id_span.start);
            let source = Arc::new(build(&ctx, raw)?);
            if let Some(first) = seen.insert(source.id.clone(), line) {
                return Err(ctx.error(
                    id_span,
                    format!(
                        "source id {:?} is defined twice (first at line {first})",
                        source.id
                    ),
                ));
            }
            sources.by_id.insert(source.id.clone(), source.clone());
            sources.list.push(source);
        }
        Ok(sources)
    }
}

// ---- raw file shape -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    source: Vec<RawSource>,
}

type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    id: S,
    kind: S,
    #[serde(default)]
    allowed_origins: Vec<S>,
    thank_you_url: Option<S>,
    phone_region: Option<S>,
    last_name_fallback: Option<S>,
    unmapped_extra: Option<S>,
    #[serde(default)]
    fields: IndexMap<String, S>,
    #[serde(default)]
    extra: IndexMap<String, S>,
    #[serde(default)]
    constants: IndexMap<String, S>,
    #[serde(default)]
    api_keys: Vec<S>,
    google_key: Option<S>,
    forward_test_leads: Option<Spanned<bool>>,
    preset: Option<S>,
    secret: Option<S>,
    auth: Option<S>,
    #[serde(default)]
    limits: RawLimits,
    // kind = "facebook"
    app_secret: Option<S>,
    verify_token: Option<S>,
    #[serde(default)]
    page_tokens: IndexMap<String, S>,
    #[serde(default)]
    backfill_forms: Vec<S>,
    backfill_every: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_ip: Option<S>,
    total: Option<S>,
    max_body: Option<S>,
    max_fields: Option<Spanned<i64>>,
}

/// The TOML parser's message, with the key named when it only says `duplicate key`: the key
/// is read from the error's span, as written in the file (`email`, `"e mail"`; of a dotted
/// key, the part repeated).
fn syntax_message(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim_end();
    let key = e
        .span()
        .and_then(|span| text.get(span))
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.len() <= 100 && !key.contains('\n'));
    match key {
        Some(key) if message == "duplicate key" => format!("duplicate key {key}"),
        _ => message.to_owned(),
    }
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, span: Range<usize>, message: String) -> SourcesError {
        let line = if span == (0..0) {
            0
        } else {
            self.line_of(span.start)
        };
        self.error_at_line(line, message)
    }

    fn error_at_line(&self, line: usize, message: String) -> SourcesError {
        SourcesError {
            file: self.file.to_owned(),
            line,
            message,
        }
    }

    /// `${VAR}` anywhere in the value is replaced from the environment; an unset variable is an
    /// error, so a secret never silently becomes an empty string.
    fn expand(&self, value: &S, key: &str) -> Result<String, SourcesError> {
        let text = value.get_ref();
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| {
                self.error(
                    value.span(),
                    format!("{key}: unterminated ${{ in its value"),
                )
            })?;
            let name = &after[..end];
            let resolved = (self.env)(name).ok_or_else(|| {
                self.error(
                    value.span(),
                    format!("{key}: environment variable {name} is not set"),
                )
            })?;
            out.push_str(&resolved);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn build(ctx: &Ctx<'_>, raw: RawSource) -> Result<Source, SourcesError> {
    let id = raw.id.get_ref().clone();
    let at = |span: Range<usize>, key: &str, message: String| {
        ctx.error(span, format!("source {id:?}, key {key}: {message}"))
    };
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(at(
            raw.id.span(),
            "id",
            "use lowercase letters, digits, - and _ (it becomes the URL /in/<id>)".into(),
        ));
    }

    if raw.kind.get_ref() != "facebook"
        && let Some((span, key)) = meta_keys(&raw)
    {
        return Err(at(span, key, "only facebook sources take this key".into()));
    }
    let kind = match raw.kind.get_ref().as_str() {
        "facebook" => SourceKind::Facebook(Box::new(build_meta(ctx, &raw, &id)?)),
        "form" => {
            if let Some(key) = raw.api_keys.first() {
                return Err(at(
                    key.span(),
                    "api_keys",
                    "only partner sources take api_keys".into(),
                ));
            }
            SourceKind::Form
        }
        "partner" => {
            if raw.api_keys.is_empty() {
                return Err(at(
                    raw.kind.span(),
                    "api_keys",
                    "a partner source needs at least one key".into(),
                ));
            }
            let mut keys = Vec::new();
            for key in &raw.api_keys {
                let value = ctx.expand(key, &format!("source {id:?}, key api_keys"))?;
                if value.len() < 16 {
                    return Err(at(
                        key.span(),
                        "api_keys",
                        "a key must be at least 16 characters".into(),
                    ));
                }
                keys.push(SecretString::from(value));
            }
            SourceKind::Partner { api_keys: keys }
        }
        "google" => google_kind(ctx, &raw, &id)?,
        "webhook" => webhook_kind(ctx, &raw, &id)?,
        other => {
            return Err(at(
                raw.kind.span(),
                "kind",
                format!(
                    "unknown kind {other:?}; expected form, partner, facebook, google or webhook"
                ),
            ));
        }
    };
    refuse_keys_of_other_kinds(ctx, &raw, &id, &kind)?;

    let mut allowed_origins = Vec::new();
    for origin in &raw.allowed_origins {
        allowed_origins.push(
            Origin::parse(origin.get_ref()).map_err(|m| at(origin.span(), "allowed_origins", m))?,
        );
    }

    let thank_you_url = match &raw.thank_you_url {
        None => None,
        Some(url) => {
            let parsed = Url::parse(url.get_ref())
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    at(
                        url.span(),
                        "thank_you_url",
                        format!("{:?} is not an http(s) URL", url.get_ref()),
                    )
                })?;
            Some(parsed)
        }
    };

    let phone_region = match &raw.phone_region {
        None => None,
        Some(region) => Some(
            region
                .get_ref()
                .to_ascii_uppercase()
                .parse::<crate::lead::PhoneRegion>()
                .ok()
                .filter(|r| {
                    rlibphonenumber::PHONE_NUMBER_UTIL
                        .get_country_code_for_region(*r)
                        .is_some()
                })
                .ok_or_else(|| {
                    at(
                        region.span(),
                        "phone_region",
                        format!(
                            "{:?} is not a two-letter region code like GB",
                            region.get_ref()
                        ),
                    )
                })?,
        ),
    };

    let control = raw
        .fields
        .iter()
        .chain(raw.extra.iter())
        .find(|(incoming, _)| incoming.starts_with('_'));
    if let Some((incoming, value)) = control {
        return Err(at(
            value.span(),
            incoming,
            "names starting with _ are control fields (_next, _charset_) and are never forwarded"
                .into(),
        ));
    }
    let mut fields = Vec::new();
    for (incoming, target) in &raw.fields {
        let parsed = target
            .get_ref()
            .parse::<Target>()
            .map_err(|m| at(target.span(), &format!("fields.{incoming}"), m))?;
        fields.push((incoming.clone(), parsed));
    }
    let extra_id = |value: &S, key: &str| {
        value
            .get_ref()
            .parse::<ExtraId>()
            .map_err(|m| at(value.span(), key, m))
    };
    let mut extra = Vec::new();
    for (incoming, id_value) in &raw.extra {
        if raw.fields.contains_key(incoming) {
            return Err(at(
                id_value.span(),
                &format!("extra.{incoming}"),
                "this field is already mapped in [source.fields]".into(),
            ));
        }
        extra.push((
            incoming.clone(),
            extra_id(id_value, &format!("extra.{incoming}"))?,
        ));
    }
    let mut constants = Vec::new();
    for (id_text, value) in &raw.constants {
        let id = id_text
            .parse::<ExtraId>()
            .map_err(|m| at(value.span(), "constants", m))?;
        if extra.iter().any(|(_, e)| *e == id) {
            return Err(at(
                value.span(),
                &format!("constants.{id_text}"),
                "this custom field ID also receives a mapped field in [source.extra]".into(),
            ));
        }
        constants.push((id, value.get_ref().clone()));
    }
    let unmapped_extra = match &raw.unmapped_extra {
        None => None,
        Some(value) => Some(extra_id(value, "unmapped_extra")?),
    };

    let fields = match &kind {
        SourceKind::Form | SourceKind::Partner { .. } if fields.is_empty() => default_fields(),
        SourceKind::Form | SourceKind::Partner { .. } => fields,
        SourceKind::Google { .. } => with_defaults(fields, &extra, google_default_fields()),
        SourceKind::Webhook(hook) => {
            with_defaults(fields, &extra, webhook_default_fields(hook.preset))
        }
        SourceKind::Facebook(_) => {
            with_defaults(fields, &extra, crate::sources::facebook::default_fields())
        }
    };
    let mapping = MappingRules {
        fields,
        extra,
        constants,
        unmapped_extra,
        phone_region,
        last_name_fallback: raw
            .last_name_fallback
            .as_ref()
            .map(|v| v.get_ref().clone())
            .unwrap_or_else(|| "-".to_owned()),
    };

    // Fields: a browser form or a partner with more than 200 is a mistake or an attack, and
    // can be told so. A platform cannot fix its form and some never retry (Elementor), so
    // platforms get room for any real form: Elementor's advanced format alone sends about six
    // keys per form field plus sixteen of metadata.
    let (default_per_ip, default_total, default_body, default_fields) = match kind {
        SourceKind::Form => ("20/minute", "200/second", 1024 * 1024, 200),
        SourceKind::Partner { .. } => ("off", "100/second", 256 * 1024, 200),
        // Platforms post from a few shared addresses: a per-IP limit would drop their retries.
        SourceKind::Google { .. } | SourceKind::Webhook(_) => {
            ("off", "100/second", 1024 * 1024, PLATFORM_MAX_FIELDS)
        }
        // Meta posts from many addresses and in bursts, and a refused notification is retried
        // for 36 hours; the signature is the protection. A batch holds up to 1000 changes.
        SourceKind::Facebook(_) => ("off", "off", 1024 * 1024, PLATFORM_MAX_FIELDS),
    };
    let quota =
        |value: &Option<S>, default: &str, key: &str| -> Result<Option<Quota>, SourcesError> {
            match value {
                None => Ok(parse_rate(default).expect("default rates parse")),
                Some(v) => parse_rate(v.get_ref()).map_err(|m| at(v.span(), key, m)),
            }
        };
    let limits = Limits {
        per_ip: quota(&raw.limits.per_ip, default_per_ip, "limits.per_ip")?,
        total: quota(&raw.limits.total, default_total, "limits.total")?,
        max_body: match &raw.limits.max_body {
            None => default_body,
            Some(v) => parse_size(v.get_ref()).map_err(|m| at(v.span(), "limits.max_body", m))?,
        },
        max_fields: match &raw.limits.max_fields {
            None => default_fields,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=MAX_FIELDS_CEILING).contains(n))
                .ok_or_else(|| {
                    at(
                        v.span(),
                        "limits.max_fields",
                        format!("must be a whole number from 1 to {MAX_FIELDS_CEILING}"),
                    )
                })?,
        },
    };

    Ok(Source {
        id,
        kind,
        allowed_origins,
        thank_you_url,
        mapping,
        limits,
        forward_test_leads: raw
            .forward_test_leads
            .as_ref()
            .is_some_and(|v| *v.get_ref()),
    })
}

/// When a source has no `[source.fields]` table, these common form names map by themselves.
pub fn default_fields() -> Vec<(String, Target)> {
    use crate::lead::{EmailType, PhoneType};
    [
        ("first_name", Target::FirstName),
        ("last_name", Target::LastName),
        ("name", Target::FullName),
        ("email", Target::Email(EmailType::Work)),
        ("phone", Target::Phone(PhoneType::Work)),
        ("company", Target::OrgName),
        ("street", Target::AddressLine1),
        ("address", Target::AddressLine1),
        ("address2", Target::AddressLine2),
        ("zip", Target::Postcode),
        ("postcode", Target::Postcode),
        ("city", Target::City),
        ("state", Target::Region),
        ("region", Target::Region),
        ("country", Target::Country),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_owned(), t))
    .collect()
}

/// The default `limits.max_fields` of platform sources (`google`, `webhook`, `facebook`).
pub const PLATFORM_MAX_FIELDS: usize = 2_000;

/// The largest `limits.max_fields` accepted: far beyond any real form, and still a body that
/// is decoded and mapped in milliseconds. `max_body` bounds the body's size in any case.
pub const MAX_FIELDS_CEILING: usize = 10_000;

/// Shared keys leadgate asks a marketer to type into a platform (Google's key, a webhook's
/// URL key) are the only credential of a public URL: short ones are refused.
const MIN_SHARED_KEY: usize = 16;

fn google_kind(ctx: &Ctx<'_>, raw: &RawSource, id: &str) -> Result<SourceKind, SourcesError> {
    let at = |span: Range<usize>, message: String| {
        ctx.error(span, format!("source {id:?}, key google_key: {message}"))
    };
    let Some(key) = &raw.google_key else {
        return Err(at(
            raw.kind.span(),
            "a google source needs google_key, the key typed next to the webhook URL in the \
             lead form (Google sends an empty key when none is set, so one is required)"
                .into(),
        ));
    };
    let value = ctx.expand(key, &format!("source {id:?}, key google_key"))?;
    if value.chars().count() < MIN_SHARED_KEY {
        return Err(at(
            key.span(),
            format!("the key must be at least {MIN_SHARED_KEY} characters"),
        ));
    }
    Ok(SourceKind::Google {
        google_key: SecretString::from(value),
    })
}

fn webhook_kind(ctx: &Ctx<'_>, raw: &RawSource, id: &str) -> Result<SourceKind, SourcesError> {
    let at = |span: Range<usize>, key: &str, message: String| {
        ctx.error(span, format!("source {id:?}, key {key}: {message}"))
    };
    let names = || {
        Preset::ALL
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(preset_value) = &raw.preset else {
        return Err(at(
            raw.kind.span(),
            "preset",
            format!("a webhook source needs a preset: one of {}", names()),
        ));
    };
    let preset = Preset::ALL
        .iter()
        .find(|(n, _)| *n == preset_value.get_ref())
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            at(
                preset_value.span(),
                "preset",
                format!(
                    "unknown preset {:?}; expected one of {}",
                    preset_value.get_ref(),
                    names()
                ),
            )
        })?;
    let default_auth = if preset.signs() { "signature" } else { "key" };
    let (auth_name, auth_span) = match &raw.auth {
        Some(auth) => (auth.get_ref().as_str(), auth.span()),
        None => (default_auth, raw.kind.span()),
    };
    let secret = match &raw.secret {
        None => None,
        Some(secret) => Some((
            ctx.expand(secret, &format!("source {id:?}, key secret"))?,
            secret.span(),
        )),
    };
    let need_secret = |what: &str| {
        at(
            auth_span.clone(),
            "secret",
            format!(
                "{what}; set secret = \"${{VAR}}\", or auth = \"none\" to accept unauthenticated \
                 posts (anyone who learns the URL can then send leads)"
            ),
        )
    };
    let auth = match auth_name {
        "signature" if !preset.signs() => {
            return Err(at(
                auth_span,
                "auth",
                format!(
                    "{} does not sign its requests; use auth = \"key\" (the default for it)",
                    preset.name()
                ),
            ));
        }
        "signature" => match secret {
            Some((value, span)) if value.is_empty() => {
                return Err(at(span, "secret", "the signing secret is empty".into()));
            }
            Some((value, _)) => WebhookAuth::Signature(SecretString::from(value)),
            None => {
                return Err(need_secret(&format!(
                    "{} requests are checked with the signing secret set in {}",
                    preset.name(),
                    preset.name()
                )));
            }
        },
        "key" => match secret {
            Some((value, span)) if value.chars().count() < MIN_SHARED_KEY => {
                return Err(at(
                    span,
                    "secret",
                    format!("the shared key must be at least {MIN_SHARED_KEY} characters"),
                ));
            }
            Some((value, _)) => WebhookAuth::Key(SecretString::from(value)),
            None => {
                return Err(need_secret(
                    "the sender must present a shared key (?key=… in the URL or an X-Leadgate-Key header)",
                ));
            }
        },
        "none" => {
            if let Some((_, span)) = secret {
                return Err(at(
                    span,
                    "secret",
                    "auth = \"none\" takes no secret; remove one of them".into(),
                ));
            }
            WebhookAuth::None
        }
        other => {
            return Err(at(
                auth_span,
                "auth",
                format!("unknown auth {other:?}; expected signature, key or none"),
            ));
        }
    };
    Ok(SourceKind::Webhook(Webhook { preset, auth }))
}

/// Keys that belong to another kind are mistakes (a `secret` on a form would protect nothing).
fn refuse_keys_of_other_kinds(
    ctx: &Ctx<'_>,
    raw: &RawSource,
    id: &str,
    kind: &SourceKind,
) -> Result<(), SourcesError> {
    let checks: [(&str, Option<Range<usize>>, &str); 6] = [
        (
            "api_keys",
            raw.api_keys.first().map(|k| k.span()),
            "partner",
        ),
        (
            "google_key",
            raw.google_key.as_ref().map(|k| k.span()),
            "google",
        ),
        (
            "forward_test_leads",
            raw.forward_test_leads.as_ref().map(|k| k.span()),
            "google",
        ),
        ("preset", raw.preset.as_ref().map(|k| k.span()), "webhook"),
        ("secret", raw.secret.as_ref().map(|k| k.span()), "webhook"),
        ("auth", raw.auth.as_ref().map(|k| k.span()), "webhook"),
    ];
    for (key, span, owner) in checks {
        match span {
            Some(span) if kind.name() != owner => {
                return Err(ctx.error(
                    span,
                    format!("source {id:?}, key {key}: only {owner} sources take {key}"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A platform's default mappings under the configured ones: a default applies to an incoming
/// name that neither `[source.fields]` nor `[source.extra]` mentions.
fn with_defaults(
    configured: Vec<(String, Target)>,
    extra: &[(String, ExtraId)],
    defaults: Vec<(String, Target)>,
) -> Vec<(String, Target)> {
    let mentioned = |name: &str| {
        configured.iter().any(|(n, _)| n == name) || extra.iter().any(|(n, _)| n == name)
    };
    let kept: Vec<_> = defaults
        .into_iter()
        .filter(|(name, _)| !mentioned(name))
        .collect();
    configured.into_iter().chain(kept).collect()
}

fn targets(pairs: &[(&str, &str)]) -> Vec<(String, Target)> {
    pairs
        .iter()
        .map(|(name, target)| {
            let target = target
                .parse()
                .unwrap_or_else(|e| panic!("default mapping {name} -> {target}: {e}"));
            ((*name).to_owned(), target)
        })
        .collect()
}

/// Google's standard `column_id`s mapped to Leadsin fields. `JOB_TITLE`, government ids and
/// qualifying questions have no standard Leadsin field: map them in `[source.extra]`.
pub fn google_default_fields() -> Vec<(String, Target)> {
    targets(&[
        ("FULL_NAME", "FullName"),
        ("FIRST_NAME", "FirstName"),
        ("LAST_NAME", "LastName"),
        ("EMAIL", "Email.work"),
        ("WORK_EMAIL", "Email.work"),
        ("PHONE_NUMBER", "Phone.mobile"),
        ("WORK_PHONE", "Phone.work"),
        ("COMPANY_NAME", "OrgName"),
        ("STREET_ADDRESS", "AddressLine1"),
        ("POSTAL_CODE", "Postcode"),
        ("CITY", "City"),
        ("REGION", "Region"),
        ("COUNTRY", "Country"),
    ])
}

/// Each webhook preset's default mappings, by the names its parser gives fields.
pub fn webhook_default_fields(preset: Preset) -> Vec<(String, Target)> {
    // The common form names (`name`, `email`, `phone`, `company`, …) apply to every preset.
    let mut fields = default_fields();
    let own: &[(&str, &str)] = match preset {
        // Typeform: answer refs; an unmapped email or phone answer is read as `email`/`phone`.
        Preset::Typeform => &[("full_name", "FullName"), ("phone_number", "Phone.work")],
        Preset::Unbounce => &[
            ("full_name", "FullName"),
            ("phone_number", "Phone.work"),
            ("company_name", "OrgName"),
            ("zip_code", "Postcode"),
            ("postal_code", "Postcode"),
        ],
        // Elementor's simple format uses labels; the default form's field ids are `name`,
        // `email`, `message`.
        Preset::Elementor => &[
            ("Name", "FullName"),
            ("First Name", "FirstName"),
            ("Last Name", "LastName"),
            ("Email", "Email.work"),
            ("Phone", "Phone.work"),
            ("Company", "OrgName"),
        ],
        Preset::Webflow => &[
            ("Name", "FullName"),
            ("First Name", "FirstName"),
            ("Last Name", "LastName"),
            ("Email", "Email.work"),
            ("Email Address", "Email.work"),
            ("Phone", "Phone.work"),
            ("Phone Number", "Phone.work"),
            ("Company", "OrgName"),
        ],
        // Jotform: unique names; compound answers become `<name>.<part>`.
        Preset::Jotform => &[
            ("name.first", "FirstName"),
            ("name.last", "LastName"),
            ("fullName.first", "FirstName"),
            ("fullName.last", "LastName"),
            ("phoneNumber", "Phone.work"),
            ("companyName", "OrgName"),
            ("address.addr_line1", "AddressLine1"),
            ("address.addr_line2", "AddressLine2"),
            ("address.city", "City"),
            ("address.state", "Region"),
            ("address.postal", "Postcode"),
            ("address.country", "Country"),
        ],
    };
    fields.extend(targets(own));
    fields
}

/// `"20/minute"`, `"200/second"`, `"1000/hour"`, or `"off"`.
pub fn parse_rate(text: &str) -> Result<Option<Quota>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let err = || format!("{text:?} is not a rate like \"20/minute\" or \"off\"");
    let (count, unit) = text.split_once('/').ok_or_else(err)?;
    let count: NonZeroU32 = count.trim().parse().map_err(|_| err())?;
    let quota = match unit.trim() {
        "second" | "s" => Quota::per_second(count),
        "minute" | "m" | "min" => Quota::per_minute(count),
        "hour" | "h" => Quota::per_hour(count),
        _ => return Err(err()),
    };
    Ok(Some(quota))
}

/// `"64KiB"`, `"1MiB"`, `"65536"`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"64KiB\""))?;
    let bytes = usize::try_from(size.as_u64()).map_err(|_| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("max_body must be positive".to_owned());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const EXAMPLE: &str = r#"
[[source]]
id = "website"
kind = "form"
allowed_origins = ["https://www.example.com"]
thank_you_url = "https://www.example.com/thanks"
phone_region = "GB"
last_name_fallback = "-"
unmapped_extra = "4444444"

[source.fields]
first_name = "FirstName"
name = "FullName"
email = "Email.work"
phone = "Phone.mobile"

[source.extra]
budget = "1111111"
utm_campaign = "2222222"

[source.constants]
"3333333" = "Website form"

[source.limits]
per_ip = "off"
max_body = "64KiB"

[[source]]
id = "acme"
kind = "partner"
api_keys = ["${ACME_KEY}"]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "ACME_KEY").then(|| "acme-secret-key-0123456789".to_owned())
    }

    fn parse(text: &str) -> Result<Sources, SourcesError> {
        Sources::parse("leadgate.toml", text, env)
    }

    #[test]
    fn the_documented_example_loads() {
        let sources = parse(EXAMPLE).unwrap();
        let website = sources.get("website").unwrap();
        assert!(matches!(website.kind, SourceKind::Form));
        assert_eq!(website.mapping.fields.len(), 4);
        assert_eq!(
            website.mapping.fields[3].1,
            Target::Phone(crate::lead::PhoneType::Mobile)
        );
        assert_eq!(website.mapping.extra[1].0, "utm_campaign");
        assert_eq!(website.mapping.constants[0].1, "Website form");
        assert_eq!(
            website.mapping.unmapped_extra.as_ref().unwrap().as_str(),
            "4444444"
        );
        assert!(website.limits.per_ip.is_none());
        assert_eq!(website.limits.max_body, 64 * 1024);
        assert!(website.allows_origin("https://www.example.com"));
        assert!(!website.allows_origin("https://evil.example"));
        let SourceKind::Partner { api_keys } = &sources.get("acme").unwrap().kind else {
            panic!("acme is a partner");
        };
        assert_eq!(api_keys[0].expose_secret(), "acme-secret-key-0123456789");
    }

    #[test]
    fn platforms_take_far_more_fields_than_forms_and_the_limit_can_be_set() {
        let text = "[[source]]\nid = \"w\"\nkind = \"form\"\n\
                    [[source]]\nid = \"e\"\nkind = \"webhook\"\npreset = \"elementor\"\n\
                    auth = \"none\"\n\
                    [[source]]\nid = \"big\"\nkind = \"form\"\n[source.limits]\n\
                    max_fields = 5000\n";
        let sources = parse(text).unwrap();
        assert_eq!(sources.get("w").unwrap().limits.max_fields, 200);
        assert_eq!(
            sources.get("e").unwrap().limits.max_fields,
            PLATFORM_MAX_FIELDS
        );
        assert_eq!(sources.get("big").unwrap().limits.max_fields, 5000);
        for bad in ["0", "-1", "10001"] {
            let text = format!(
                "[[source]]\nid = \"w\"\nkind = \"form\"\n[source.limits]\nmax_fields = {bad}\n"
            );
            let err = parse(&text).err().unwrap().to_string();
            assert!(err.starts_with("leadgate.toml:5:"), "{bad}: {err}");
            assert!(err.contains("limits.max_fields"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_unknown_key_names_the_line() {
        let text = "[[source]]\nid = \"w\"\nkind = \"form\"\ncolour = \"blue\"\n";
        let err = parse(text).err().unwrap().to_string();
        assert!(err.starts_with("leadgate.toml:4:"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn a_duplicate_key_is_named_with_its_line() {
        let head = "[[source]]\nid = \"w\"\nkind = \"form\"\n\n[source.fields]\n";
        for (fields, expected) in [
            (
                "email = \"Email.work\"\nemail = \"Email.home\"\n",
                "leadgate.toml:7: duplicate key email",
            ),
            (
                "\"e mail\" = \"Email.work\"\n'e mail' = \"Email.home\"\n",
                "leadgate.toml:7: duplicate key 'e mail'",
            ),
        ] {
            let err = parse(&format!("{head}{fields}")).err().unwrap().to_string();
            assert_eq!(err, expected);
        }
        let err = parse("[[source]]\nid = \"w\"\nid = \"v\"\n")
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, "leadgate.toml:3: duplicate key id");
    }

    #[test]
    fn a_bad_leadsin_field_names_line_and_key() {
        let text =
            "[[source]]\nid = \"w\"\nkind = \"form\"\n[source.fields]\nemail = \"Email.office\"\n";
        let err = parse(text).err().unwrap().to_string();
        assert!(err.starts_with("leadgate.toml:5:"), "{err}");
        assert!(err.contains("fields.email"), "{err}");
    }

    #[test]
    fn an_unset_environment_variable_is_an_error_not_an_empty_key() {
        let text = "[[source]]\nid = \"p\"\nkind = \"partner\"\napi_keys = [\"${NOPE}\"]\n";
        let err = parse(text).err().unwrap().to_string();
        assert!(err.contains("NOPE is not set"), "{err}");
        assert!(err.starts_with("leadgate.toml:4:"), "{err}");
    }

    #[test]
    fn duplicate_ids_and_bad_regions_are_refused() {
        let dup =
            "[[source]]\nid = \"a\"\nkind = \"form\"\n[[source]]\nid = \"a\"\nkind = \"form\"\n";
        let err = parse(dup).err().unwrap();
        assert_eq!(err.line, 5, "the second definition's id: {err}");
        let text = err.to_string();
        assert!(text.starts_with("leadgate.toml:5:"), "{text}");
        assert!(text.contains("defined twice (first at line 2)"), "{text}");
        let region = "[[source]]\nid = \"a\"\nkind = \"form\"\nphone_region = \"XX\"\n";
        assert!(
            parse(region)
                .err()
                .unwrap()
                .to_string()
                .contains("phone_region")
        );
    }

    #[test]
    fn rates_and_sizes_parse() {
        assert!(parse_rate("off").unwrap().is_none());
        assert!(parse_rate("20/minute").unwrap().is_some());
        assert!(parse_rate("20/fortnight").is_err());
        assert!(parse_rate("0/second").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn a_google_source_needs_a_long_enough_key_and_keeps_its_defaults_under_the_tables() {
        let missing = "[[source]]\nid = \"g\"\nkind = \"google\"\n";
        let err = parse(missing).err().unwrap().to_string();
        assert!(err.contains("google_key"), "{err}");
        let short = "[[source]]\nid = \"g\"\nkind = \"google\"\ngoogle_key = \"123\"\n";
        let err = parse(short).err().unwrap().to_string();
        assert!(err.starts_with("leadgate.toml:4:"), "{err}");
        let text = "[[source]]\nid = \"g\"\nkind = \"google\"\ngoogle_key = \"${ACME_KEY}\"\n\
                    forward_test_leads = true\n[source.fields]\nEMAIL = \"Email.home\"\n\
                    [source.extra]\nCITY = \"1\"\n";
        let sources = parse(text).unwrap();
        let google = sources.get("g").unwrap();
        assert!(google.forwards_test_leads());
        assert!(google.kind.wants_plain_200());
        let fields = &google.mapping.fields;
        let target = |name: &str| {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            target("EMAIL"),
            [Target::Email(crate::lead::EmailType::Home)]
        );
        assert_eq!(target("FULL_NAME"), [Target::FullName]);
        assert!(
            target("CITY").is_empty(),
            "an extra mapping replaces the default"
        );
        assert!(google.limits.per_ip.is_none());
    }

    #[test]
    fn keys_of_another_kind_are_refused_with_their_line() {
        let text = "[[source]]\nid = \"w\"\nkind = \"form\"\nsecret = \"x\"\n";
        let err = parse(text).err().unwrap().to_string();
        assert!(err.starts_with("leadgate.toml:4:"), "{err}");
        assert!(err.contains("only webhook sources take secret"), "{err}");
        let text = "[[source]]\nid = \"w\"\nkind = \"webhook\"\npreset = \"jotform\"\n\
                    auth = \"none\"\nforward_test_leads = true\n";
        let err = parse(text).err().unwrap().to_string();
        assert!(
            err.contains("only google sources take forward_test_leads"),
            "{err}"
        );
    }

    #[test]
    fn webhook_presets_and_auth_are_checked() {
        let unknown = "[[source]]\nid = \"w\"\nkind = \"webhook\"\npreset = \"wufoo\"\n";
        let err = parse(unknown).err().unwrap().to_string();
        assert!(
            err.contains("typeform, unbounce, elementor, webflow, jotform"),
            "{err}"
        );
        let unsigned = "[[source]]\nid = \"w\"\nkind = \"webhook\"\npreset = \"typeform\"\n";
        let err = parse(unsigned).err().unwrap().to_string();
        assert!(err.contains("signing secret"), "{err}");
        let short = "[[source]]\nid = \"w\"\nkind = \"webhook\"\npreset = \"unbounce\"\n\
                     secret = \"short\"\n";
        let err = parse(short).err().unwrap().to_string();
        assert!(err.contains("at least 16"), "{err}");
        let by_key = "[[source]]\nid = \"w\"\nkind = \"webhook\"\npreset = \"webflow\"\n\
                      auth = \"key\"\nsecret = \"${ACME_KEY}\"\n";
        let sources = parse(by_key).unwrap();
        let SourceKind::Webhook(hook) = &sources.get("w").unwrap().kind else {
            panic!("a webhook");
        };
        assert_eq!(hook.preset, Preset::Webflow);
        assert!(matches!(hook.auth, WebhookAuth::Key(_)));
        assert!(!format!("{hook:?}").contains("acme-secret"));
    }

    #[test]
    fn every_default_mapping_names_a_leadsin_field() {
        assert!(!google_default_fields().is_empty());
        for (_, preset) in Preset::ALL {
            assert!(webhook_default_fields(preset).len() > default_fields().len());
        }
    }
    const META: &str = r#"
[[source]]
id = "fb"
kind = "facebook"
app_secret = "${FB_SECRET}"
verify_token = "verify-me"
page_tokens = { "112233445566778" = "${FB_PAGE}" }
backfill_forms = ["998877665544"]
backfill_every = "15m"
unmapped_extra = "4444444"

[source.extra]
leadgen_id = "7000001"
"你想要什么产品" = "7000002"
"#;

    fn meta_env(name: &str) -> Option<String> {
        match name {
            "FB_SECRET" => Some("app-secret".to_owned()),
            "FB_PAGE" => Some("page-token".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn a_facebook_source_loads_with_secrets_from_the_environment() {
        let sources = Sources::parse("leadgate.toml", META, meta_env).unwrap();
        let fb = sources.get("fb").unwrap();
        let SourceKind::Facebook(meta) = &fb.kind else {
            panic!("fb is a facebook source");
        };
        assert!(fb.kind.wants_plain_200());
        assert_eq!(meta.app_secret.expose_secret(), "app-secret");
        assert_eq!(
            meta.page_token("112233445566778").unwrap().expose_secret(),
            "page-token"
        );
        assert_eq!(
            meta.backfill_forms,
            [BackfillForm {
                page_id: "112233445566778".into(),
                form_id: "998877665544".into()
            }]
        );
        assert_eq!(meta.backfill_every, Duration::from_secs(900));
        assert_eq!(fb.mapping.extra[1].0, "你想要什么产品");
        // Meta's defaults apply; Debug never shows a secret.
        assert!(fb.mapping.fields.iter().any(|(n, _)| n == "full_name"));
        let debug = format!("{:?}", fb.kind);
        assert!(
            !debug.contains("page-token") && !debug.contains("app-secret"),
            "{debug}"
        );
        assert!(fb.limits.per_ip.is_none() && fb.limits.total.is_none());
    }

    #[test]
    fn facebook_mistakes_name_the_line_and_key() {
        let cases = [
            (
                "[[source]]\nid = \"w\"\nkind = \"form\"\napp_secret = \"x\"\n",
                "leadgate.toml:4:",
                "only facebook sources",
            ),
            (
                "[[source]]\nid = \"f\"\nkind = \"facebook\"\nverify_token = \"v\"\n",
                "leadgate.toml:3:",
                "app_secret",
            ),
            (
                "[[source]]\nid = \"f\"\nkind = \"facebook\"\napp_secret = \"s\"\nverify_token = \"v\"\npage_tokens = { \"my-page\" = \"t\" }\n",
                "leadgate.toml:6:",
                "page_tokens.my-page",
            ),
            (
                "[[source]]\nid = \"f\"\nkind = \"facebook\"\napp_secret = \"s\"\nverify_token = \"v\"\npage_tokens = { \"1\" = \"${NOPE}\" }\n",
                "leadgate.toml:6:",
                "NOPE is not set",
            ),
            (
                "[[source]]\nid = \"f\"\nkind = \"facebook\"\napp_secret = \"s\"\nverify_token = \"v\"\npage_tokens = { \"1\" = \"a\", \"2\" = \"b\" }\nbackfill_forms = [\"9\"]\n",
                "leadgate.toml:7:",
                "<page_id>:<form_id>",
            ),
            (
                "[[source]]\nid = \"f\"\nkind = \"facebook\"\napp_secret = \"s\"\nverify_token = \"v\"\nbackfill_every = \"often\"\n",
                "leadgate.toml:6:",
                "backfill_every",
            ),
        ];
        for (text, at, says) in cases {
            let err = parse(text).err().unwrap().to_string();
            assert!(err.starts_with(at), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn origins_are_normalised_and_must_not_have_paths() {
        assert_eq!(
            Origin::parse("https://Example.com:443").unwrap(),
            Origin::Exact("https://example.com".into())
        );
        assert!(Origin::parse("https://example.com/form").is_err());
    }
}
