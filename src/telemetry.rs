//! Logging set-up and the masks that keep personal data out of logs.

use tracing_subscriber::EnvFilter;

/// Log output format, chosen with `--log-format` or `LEADGATE_LOG_FORMAT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber once; later calls (tests) are ignored. The level comes from
/// `RUST_LOG` (default `info`). Lines are written to stdout by a background thread, so a
/// request never waits on the terminal or a pipe; it blocks rather than drop lines when that
/// thread falls behind. Keep the returned guard alive: dropping it flushes what is pending.
pub fn init(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.ok().map(|()| guard)
}

/// For tests: logs go through the test harness's capture, written synchronously.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// `ana.lopez@example.com` → `a***@example.com`. Anything without an `@` is fully masked.
pub fn mask_email(email: &str) -> String {
    match email.trim().rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() => {
            let first = local.chars().next().unwrap_or('*');
            format!("{first}***@{domain}")
        }
        _ => "***".to_owned(),
    }
}

/// `+442079460018` → `+44******18`: keeps a leading `+`, the first two and the last two digits.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() < 6 {
        return "***".to_owned();
    }
    let plus = if phone.trim_start().starts_with('+') {
        "+"
    } else {
        ""
    };
    let head: String = digits[..2].iter().collect();
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("{plus}{head}{}{tail}", "*".repeat(digits.len() - 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_mask_keeps_first_letter_and_domain() {
        assert_eq!(mask_email("ana.lopez@example.com"), "a***@example.com");
        assert_eq!(mask_email("not-an-email"), "***");
        assert_eq!(mask_email("@example.com"), "***");
    }

    #[test]
    fn phone_mask_hides_the_middle_digits() {
        assert_eq!(mask_phone("+442079460018"), "+44********18");
        assert_eq!(mask_phone("0207 946 0018"), "02*******18");
        assert_eq!(mask_phone("12345"), "***");
    }
}
