//! The command line: `check-config` and `serve --sandbox` as a new user runs them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::app::{
    GatewayEnv, GatewayProcess, client, default_sources, free_port, start_sim,
};

fn leadgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_leadgate"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// Writes `contents` as the sources file `name` in `dir` and runs `check-config` on it.
fn check_config(
    dir: &std::path::Path,
    name: &str,
    contents: &str,
) -> (PathBuf, std::process::Output) {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    let output = leadgate()
        .arg("check-config")
        .env("LEADGATE_SOURCES", &path)
        .output()
        .unwrap();
    (path, output)
}

#[test]
fn check_config_prints_each_source_with_its_url_and_mapping() {
    let output = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("[website] kind=form url=http://127.0.0.1:8080/in/website"),
        "{stdout}"
    );
    assert!(stdout.contains("budget -> Extra 1111111"), "{stdout}");
    assert!(stdout.contains("name -> FullName"), "{stdout}");
}

#[test]
fn check_config_warns_of_platform_sources_that_would_drop_invalid_values() {
    let dir = tempfile::tempdir().unwrap();
    let (_, output) = check_config(
        dir.path(),
        "leadgate.toml",
        r#"
[[source]]
id = "site"
kind = "form"

[[source]]
id = "google-bare"
kind = "google"
google_key = "google-key-0123456789"

[[source]]
id = "google-noted"
kind = "google"
google_key = "google-key-0123456789"
unmapped_extra = "4444444"
"#,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let section = |id: &str| {
        let start = stdout.find(&format!("[{id}]")).unwrap();
        let rest = &stdout[start + 1..];
        rest[..rest.find("\n[").unwrap_or(rest.len())].to_owned()
    };
    let warning = "WARNING: no unmapped_extra";
    assert!(section("google-bare").contains(warning), "{stdout}");
    assert!(!section("google-noted").contains(warning), "{stdout}");
    // A form can be told its data is bad; nothing of it is repaired.
    assert!(!section("site").contains(warning), "{stdout}");
}

#[test]
fn check_config_names_file_line_and_key_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (path, output) = check_config(
        dir.path(),
        "bad.toml",
        "[[source]]\nid = \"web\"\nkind = \"form\"\n\n[source.fields]\nemail = \"Email.office\"\n",
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:6:", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("fields.email"), "{stderr}");
}

#[test]
fn check_config_names_the_line_of_a_duplicate_source_id_s_second_definition() {
    let dir = tempfile::tempdir().unwrap();
    let (path, output) = check_config(
        dir.path(),
        "dup.toml",
        "[[source]]\nid = \"web\"\nkind = \"form\"\n\n[[source]]\nid = \"web\"\nkind = \"form\"\n",
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:6: source id \"web\" is defined twice (first at line 2)",
            path.display()
        )),
        "{stderr}"
    );
}

/// A sources file without any `[[source]]` would run a gateway that refuses every lead:
/// `check-config` says so and fails, and so does `serve` (its ingest role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_file_without_sources_fails_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (path, output) = check_config(dir.path(), "empty.toml", "# every [[source]] was removed\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:1: no sources defined", path.display())),
        "{stderr}"
    );

    let mut serve = leadgate()
        .arg("serve")
        .env("LEADGATE_SOURCES", &path)
        .env("LEADGATE_LISTEN", free_port().to_string())
        .env("LEADGATE_DATA_DIR", dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while serve.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("serve kept running without any source");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("no sources defined"), "{stderr}");
    assert!(stderr.contains("--no-ingest"), "{stderr}");

    // Delivering only needs no source.
    let sim = start_sim(Vec::new()).await;
    let env = GatewayEnv::new(dir.path(), &sim, "# no sources\n");
    let forwarder = GatewayProcess::start(&env, &["--no-ingest"]).await;
    let readyz = client()
        .get(format!("{}/readyz", forwarder.base))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);
}

/// `leadgate check-config | head -1`: a closed output pipe ends it quietly, not with a panic.
#[test]
fn check_config_ends_quietly_when_its_output_pipe_is_closed() {
    let mut child = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_config_refuses_a_plain_http_upstream() {
    let output = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .env("LEADGATE_ONPIPELINE_URL", "http://api.onpipeline.com")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("https://"));
}

/// The README's run command, as a newcomer uses it: the demo form's lead reaches the
/// in-process simulator and shows at /sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sandbox_delivers_the_demo_form_to_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = leadgate()
        .args(["serve", "--sandbox"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LEADGATE_LISTEN", listen.to_string())
        .env("LEADGATE_DATA_DIR", dir.path().join("data"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = client();
    let base = format!("http://{listen}");
    let ready =
        crate::helpers::eventually(Duration::from_secs(30), "the sandbox to start", || async {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        })
        .await;
    assert_eq!(ready["delivery"]["state"], "running", "{ready}");

    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("action=\"/in/website\""), "{page}");

    let response = http
        .post(format!("{base}/in/website"))
        .header("origin", &base)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=Sandra+Box&email=sandra%40example.com&phone=020+7946+0018&budget=10k-50k")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let inbox =
        crate::helpers::eventually(Duration::from_secs(20), "the lead at /sandbox", || async {
            let page = http
                .get(format!("{base}/sandbox"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            page.contains("Sandra").then_some(page)
        })
        .await;
    assert!(inbox.contains("1111111"), "the Extra ID is shown: {inbox}");
    // The simulator logs each lead it creates, with the contacts masked.
    let log = crate::helpers::eventually(
        Duration::from_secs(10),
        "the simulator's log line",
        || async {
            let log = std::fs::read_to_string(dir.path().join("log")).ok()?;
            log.contains("Simulated Onpipeline created a lead")
                .then_some(log)
        },
    )
    .await;
    assert!(log.contains("SANDBOX MODE"), "{log}");
    assert!(
        !log.contains("sandra@example.com"),
        "emails are masked in logs:\n{log}"
    );
    assert!(
        log.contains("s***@example.com"),
        "the masked email is logged:\n{log}"
    );
    for clear in ["2079460018", "020 7946 0018", "020+7946+0018"] {
        assert!(
            !log.contains(clear),
            "phone numbers are masked in logs ({clear} found):\n{log}"
        );
    }
    assert!(
        log.contains("+44********18"),
        "the masked phone is logged:\n{log}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `leadgate sim` as a standalone server: its CA file lets a client verify it, and it takes a
/// lead with the token given on the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_command_serves_leadsin_over_https_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let ca = dir.path().join("ca.pem");
    let mut child = leadgate()
        .arg("sim")
        .args(["--listen", &listen.to_string()])
        .args(["--token", "cli-token-1:leadsin", "--ca-out"])
        .arg(&ca)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pem = crate::helpers::eventually(Duration::from_secs(20), "the CA file", || async {
        std::fs::read(&ca).ok().filter(|pem| !pem.is_empty())
    })
    .await;
    let tls = leadgate::tls::client_config(&[&pem]).unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let url = format!("https://{listen}/Leadsin");
    let answer: Value = crate::helpers::eventually(Duration::from_secs(20), "a 201", || async {
        let response = http
            .post(&url)
            .header("authorization", "cli-token-1")
            .json(&serde_json::json!({"FirstName": "Cli", "LastName": "Sim"}))
            .send()
            .await
            .ok()?;
        (response.status() == 201).then_some(response.json().await.ok()?)
    })
    .await;
    assert_eq!(answer["Header"]["Endpoint"], "Leadsin", "{answer}");
    assert!(
        answer["Data"]["LeadID"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let refused = http
        .post(&url)
        .header("authorization", "someone-else")
        .json(&serde_json::json!({"FirstName": "Cli", "LastName": "Sim"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Without a token and without `--sandbox`, `serve` starts, accepts leads into the queue, says
/// at start-up that delivery is held (and why), and `/readyz` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_token_logs_that_delivery_is_held_and_readyz_says_so() {
    use crate::helpers::app::{GatewayEnv, GatewayProcess, default_sources, start_sim};
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.unset("LEADGATE_ONPIPELINE_TOKEN");
    let gateway = GatewayProcess::start(&env, &[]).await;
    let log = crate::helpers::eventually(Duration::from_secs(10), "the start-up log", || async {
        let log = gateway.log();
        log.contains("leadgate is listening").then_some(log)
    })
    .await;
    let held = log
        .lines()
        .find(|line| line.contains("Delivery is held"))
        .unwrap_or_else(|| panic!("a start-up line says delivery is held:\n{log}"));
    assert!(held.contains("WARN"), "{held}");
    assert!(
        held.contains("LEADGATE_ONPIPELINE_TOKEN"),
        "the line says how to fix it: {held}"
    );

    let http = client();
    let readyz: Value = gateway.readyz().await.unwrap();
    assert_eq!(readyz["status"], "degraded", "{readyz}");
    assert_eq!(readyz["delivery"]["state"], "held", "{readyz}");
    assert!(
        readyz["delivery"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no Onpipeline token")),
        "{readyz}"
    );
    let response = http
        .post(format!("{}/in/website", gateway.base))
        .json(&serde_json::json!({"name": "Held Lead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "leads are still accepted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sim.requests().is_empty(), "nothing is delivered while held");
}

/// `--log-format json`: every line is one JSON object; lines about a lead carry its `source`
/// and `lead_id` as fields, and emails and phone numbers appear only masked. In the sandbox
/// the simulator runs in the process, so its line about the created lead (which names the
/// lead's contact details) is in the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_source_and_lead_id_and_mask_emails_and_phones() {
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    let gateway = GatewayProcess::start(&env, &["--sandbox", "--log-format", "json"]).await;
    let response = client()
        .post(format!("{}/in/website", gateway.base))
        .json(&serde_json::json!({
            "name": "Jana Json", "email": "jana.json@example.com", "phone": "+44 20 7946 0018"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = crate::helpers::eventually(Duration::from_secs(20), "the delivery", || async {
        let log = gateway.log();
        log.contains("Lead delivered.").then_some(log)
    })
    .await;

    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
    };
    let queued = find("Lead queued.");
    assert_eq!(queued["source"], "website", "{queued}");
    assert_eq!(queued["lead_id"], id.as_str(), "{queued}");
    // The forwarder's lines carry them through their span.
    let delivered = find("Lead delivered.");
    assert_eq!(delivered["span"]["source"], "website", "{delivered}");
    assert_eq!(delivered["span"]["lead_id"], id.as_str(), "{delivered}");
    let created = find("Simulated Onpipeline created a lead");
    assert_eq!(created["email"], "j***@example.com", "{created}");
    assert_eq!(created["phone"], "+44********18", "{created}");
    assert!(!log.contains("jana.json@example.com"), "{log}");
    assert!(!log.contains("2079460018"), "{log}");
}

#[test]
fn check_config_fails_naming_a_token_file_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let output = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .env("LEADGATE_ONPIPELINE_TOKEN_FILE", &missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot read LEADGATE_ONPIPELINE_TOKEN_FILE {}",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("No such file"), "{stderr}");

    // An empty file is no token either.
    std::fs::write(&missing, "\n").unwrap();
    let output = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .env("LEADGATE_ONPIPELINE_TOKEN_FILE", &missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");

    // A readable one is named in the summary.
    std::fs::write(&missing, "a-token-0123456789\n").unwrap();
    let output = leadgate()
        .arg("check-config")
        .env(
            "LEADGATE_SOURCES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/leadgate.toml"),
        )
        .env("LEADGATE_ONPIPELINE_TOKEN_FILE", &missing)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("(token from {})", missing.display())),
        "{stdout}"
    );
}

/// A second `serve` started by mistake on a taken port, with the same data directory: it exits
/// non-zero at once naming the address, before it opens the queue — it leases nothing of what
/// the first instance holds (delivery held there) and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_taken_port_exits_before_touching_the_queue() {
    use crate::helpers::app::{ADMIN_TOKEN, TOKEN};
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.unset("LEADGATE_ONPIPELINE_TOKEN")
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let first = GatewayProcess::start(&env, &[]).await;
    let http = client();
    for i in 0..3 {
        let response = http
            .post(format!("{}/in/website", first.base))
            .json(&serde_json::json!({"name": format!("Waiting Lead{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }

    let taken = first.base.trim_start_matches("http://").to_owned();
    let mut second = leadgate()
        .arg("serve")
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("LEADGATE_LISTEN", &taken)
        .env("LEADGATE_ONPIPELINE_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while second.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            second.kill().unwrap();
            panic!("the second serve kept running on a taken port");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = second.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on {taken} (LEADGATE_LISTEN)")),
        "{log}"
    );
    assert!(log.contains("in use"), "the cause is given: {log}");
    for started_first in ["Queue opened", "Forwarder started"] {
        assert!(
            !log.contains(started_first),
            "it got as far as {started_first:?}:\n{log}"
        );
    }

    let stats: Value = http
        .get(format!("{}/admin/stats", first.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["ready"], 3, "{stats}");
    assert_eq!(stats["leased"], 0, "{stats}");
    assert!(sim.requests().is_empty(), "nothing was sent");
}

#[test]
fn check_config_names_a_duplicate_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, output) = check_config(
        dir.path(),
        "s.toml",
        "[[source]]\nid = \"web\"\nkind = \"form\"\n\n[source.fields]\nemail = \"Email.work\"\nemail = \"Email.home\"\n",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:7: duplicate key email", path.display())),
        "{stderr}"
    );
}
