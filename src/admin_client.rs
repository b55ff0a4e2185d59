//! `leadgate admin …`: the admin API from the command line, against a running instance
//! (`--url`, default `LEADGATE_ADMIN_URL` or `http://127.0.0.1:8080`), with the token from
//! `LEADGATE_ADMIN_TOKEN`. Prints the JSON answer; exits non-zero on an error answer, and on a
//! replay that left any dead letter unreplayed.

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// What to ask.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum AdminCommand {
    /// Queue counts and the delivery state.
    Stats,
    /// One lead: received, each attempt, the outcome.
    Lead { id: String },
    /// Dead letters, newest first, with their reasons.
    Dead {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Map dead letters again with the current rules and queue them again.
    Replay {
        /// Lead ids to replay (or --all).
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete a dead letter for good.
    Delete { id: String },
    /// Pause delivery in every process on the queue until `resume`.
    Pause,
    /// Resume delivery at once, in every process on the queue.
    Resume,
}

pub async fn run(
    url: &str,
    token: Option<&SecretString>,
    command: AdminCommand,
) -> anyhow::Result<()> {
    let token = token.context("set LEADGATE_ADMIN_TOKEN to the running instance's admin token")?;
    let base = url.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::tls::client_config(&[])?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let replay = matches!(command, AdminCommand::Replay { .. });
    let (method, path, body) = match command {
        AdminCommand::Stats => (reqwest::Method::GET, "/admin/stats".to_owned(), None),
        AdminCommand::Lead { id } => (reqwest::Method::GET, format!("/admin/leads/{id}"), None),
        AdminCommand::Dead { limit } => (
            reqwest::Method::GET,
            format!("/admin/dead?limit={limit}"),
            None,
        ),
        AdminCommand::Replay { ids, all } => {
            let body = if all {
                json!({"all": true})
            } else {
                json!({"ids": ids})
            };
            (
                reqwest::Method::POST,
                "/admin/dead/replay".to_owned(),
                Some(body),
            )
        }
        AdminCommand::Delete { id } => (reqwest::Method::DELETE, format!("/admin/dead/{id}"), None),
        AdminCommand::Pause => (reqwest::Method::POST, "/admin/pause".to_owned(), None),
        AdminCommand::Resume => (reqwest::Method::POST, "/admin/resume".to_owned(), None),
    };
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token.expose_secret());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let json = serde_json::from_str::<Value>(&text).ok();
    let shown = json
        .as_ref()
        .map(|v| serde_json::to_string_pretty(v).unwrap_or_default())
        .unwrap_or(text);
    if !shown.is_empty() {
        print_stdout(&format!("{shown}\n"))?;
    }
    if !status.is_success() {
        bail!("the admin API answered {status}");
    }
    if replay {
        replay_failures(json.as_ref())?;
    }
    Ok(())
}

/// A replay answer's `failed` list as an error naming each id and why.
fn replay_failures(answer: Option<&Value>) -> anyhow::Result<()> {
    let failed = answer
        .and_then(|a| a.get("failed"))
        .and_then(Value::as_array)
        .context("the replay answer has no `failed` list")?;
    if failed.is_empty() {
        return Ok(());
    }
    let replayed = answer
        .and_then(|a| a.get("replayed"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let each: Vec<String> = failed
        .iter()
        .map(|f| {
            format!(
                "{}: {}",
                f.get("id").and_then(Value::as_str).unwrap_or("?"),
                f.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            )
        })
        .collect();
    bail!(
        "{} of {} dead letters were not replayed: {}",
        failed.len(),
        failed.len() + replayed,
        each.join("; ")
    )
}

/// Writes to stdout. A reader that went away (`leadgate admin dead | head -c1`) ends the
/// output quietly, where `print!` would panic; the exit status still tells the command's
/// outcome.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_with_any_failure_is_an_error_naming_each_id() {
        let answer = json!({
            "replayed": ["01AAA"],
            "failed": [{"id": "01BBB", "error": "no such dead letter"}],
        });
        let err = replay_failures(Some(&answer)).unwrap_err().to_string();
        assert_eq!(
            err,
            "1 of 2 dead letters were not replayed: 01BBB: no such dead letter"
        );
        assert!(replay_failures(Some(&json!({"replayed": ["01AAA"], "failed": []}))).is_ok());
    }
}
