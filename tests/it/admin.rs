//! The admin API, its command-line client, and `/metrics`.

use std::process::Command;
use std::time::Duration;

use leadgate::sim::Fault;
use serde_json::{Value, json};

use crate::helpers::app::{TestApp, default_sources};
use crate::helpers::eventually;

const ADMIN: &str = "admin-token-0123456789";

async fn app_with_admin() -> TestApp {
    TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_ADMIN_TOKEN", ADMIN);
    })
    .await
}

async fn admin_get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

async fn admin_post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .get(app.url("/admin/stats"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LEADGATE_ADMIN_TOKEN")
    );
}

#[tokio::test]
async fn the_admin_api_wants_its_bearer_token() {
    let app = app_with_admin().await;
    let none = app.http.get(app.url("/admin/stats")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let wrong = app
        .http
        .get(app.url("/admin/stats"))
        .bearer_auth("admin-token-0123456780")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let paused = app
        .http
        .post(app.url("/admin/pause"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 401);
    assert_eq!(
        app.gateway().delivery(),
        leadgate::forwarder::DeliveryStatus::Running
    );
    let right = admin_get(&app, "/admin/stats").await;
    assert_eq!(right.status(), 200);
}

#[tokio::test]
async fn an_operator_pause_holds_delivery_until_resume() {
    let app = app_with_admin().await;
    let paused: Value = admin_post(&app, "/admin/pause", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(paused["delivery"]["state"], "paused");
    assert_eq!(paused["delivery"]["by_operator"], true);
    for i in 0..3 {
        let response = app
            .post_json("website", &json!({"name": format!("Held Lead{i}")}))
            .await;
        assert_eq!(response.status(), 202, "leads are still accepted");
    }
    let stats: Value = eventually(Duration::from_secs(5), "stats", || async {
        let stats: Value = admin_get(&app, "/admin/stats").await.json().await.ok()?;
        (stats["ready"] == 3).then_some(stats)
    })
    .await;
    assert_eq!(stats["delivery"]["state"], "paused");
    let readyz: Value = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readyz["status"], "degraded");
    // An operator's pause is not probed away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.sim.requests().is_empty());

    let resumed: Value = admin_post(&app, "/admin/resume", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resumed["delivery"]["state"], "running");
    app.received(3).await;
}

#[tokio::test]
async fn resume_ends_a_pause_caused_by_onpipeline() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_ADMIN_TOKEN", ADMIN)
            .set("LEADGATE_PAUSE_PROBE_MAX", "1h");
    })
    .await;
    app.sim.push_faults([Fault::status(401)]);
    app.post_json("website", &json!({"name": "Quick Resume"}))
        .await;
    eventually(Duration::from_secs(10), "the pause", || async {
        matches!(
            app.gateway().delivery(),
            leadgate::forwarder::DeliveryStatus::Paused { .. }
        )
        .then_some(())
    })
    .await;
    let resumed: Value = admin_post(&app, "/admin/resume", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resumed["delivery"]["state"], "running");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Quick");
}

#[tokio::test]
async fn a_dead_letter_can_be_listed_read_and_deleted() {
    let app = app_with_admin().await;
    app.sim.push_faults([Fault::Status {
        status: 406,
        retry_after: None,
        message: Some("Not acceptable - bad data".into()),
    }]);
    let response = app
        .post_json(
            "website",
            &json!({"name": "Dead Letter", "email": "dead@example.com"}),
        )
        .await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dead: Value = eventually(Duration::from_secs(10), "the dead letter", || async {
        let body: Value = admin_get(&app, "/admin/dead").await.json().await.ok()?;
        (body["dead"].as_array()?.len() == 1).then_some(body)
    })
    .await;
    let letter = &dead["dead"][0];
    assert_eq!(letter["id"], id);
    assert!(letter["reason"].as_str().unwrap().contains("bad data"));
    assert_eq!(letter["history"][0]["status"], 406);
    assert!(
        !dead.to_string().contains("dead@example.com"),
        "the list carries no personal data"
    );

    let record: Value = admin_get(&app, &format!("/admin/leads/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["state"], "dead");
    assert!(record["dead_reason"].as_str().unwrap().contains("bad data"));

    let deleted = app
        .http
        .delete(app.url(&format!("/admin/dead/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let again = app
        .http
        .delete(app.url(&format!("/admin/dead/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let stats: Value = admin_get(&app, "/admin/stats").await.json().await.unwrap();
    assert_eq!(stats["dead"], 0);
}

/// Posts `names` while Onpipeline refuses each with 406; returns their ids once all are dead.
async fn dead_letters(app: &TestApp, names: &[&str]) -> Vec<String> {
    app.sim.push_faults(names.iter().map(|_| Fault::Status {
        status: 406,
        retry_after: None,
        message: Some("Not acceptable - bad data".into()),
    }));
    let mut ids = Vec::new();
    for name in names {
        let response = app.post_json("website", &json!({"name": name})).await;
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    eventually(Duration::from_secs(10), "the dead letters", || async {
        (app.stats().await.dead == names.len() as u64).then_some(())
    })
    .await;
    ids
}

#[tokio::test]
async fn replay_all_sends_every_dead_letter_again_once() {
    let app = app_with_admin().await;
    let mut ids = dead_letters(&app, &["Dead One", "Dead Two", "Dead Three"]).await;
    let answer: Value = admin_post(&app, "/admin/dead/replay", json!({"all": true}))
        .await
        .json()
        .await
        .unwrap();
    let mut replayed: Vec<String> = answer["replayed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    replayed.sort();
    ids.sort();
    assert_eq!(replayed, ids, "{answer}");
    assert_eq!(answer["failed"], json!([]), "{answer}");
    let leads = app.received(3).await;
    let mut names: Vec<&str> = leads
        .iter()
        .map(|l| l.payload["LastName"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["One", "Three", "Two"]);
    let stats: Value = eventually(Duration::from_secs(5), "the deliveries", || async {
        let stats: Value = admin_get(&app, "/admin/stats").await.json().await.ok()?;
        (stats["delivered"] == 3).then_some(stats)
    })
    .await;
    assert_eq!(stats["dead"], 0, "{stats}");
    // Nothing is left to replay.
    let again: Value = admin_post(&app, "/admin/dead/replay", json!({"all": true}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["replayed"], json!([]), "{again}");
}

#[tokio::test]
async fn replay_reports_ids_it_cannot_find() {
    let app = app_with_admin().await;
    let missing = leadgate::lead::LeadId::new().to_string();
    let answer: Value = admin_post(&app, "/admin/dead/replay", json!({"ids": [missing]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["replayed"], json!([]));
    assert_eq!(answer["failed"][0]["id"], missing);
    let both = admin_post(
        &app,
        "/admin/dead/replay",
        json!({"ids": [missing], "all": true}),
    )
    .await;
    assert_eq!(both.status(), 400);
}

/// A replayed dead letter's later attempts go on numbering after the one that killed it, and
/// its story shows where the replay came.
#[tokio::test]
async fn a_replayed_lead_s_attempts_go_on_numbering_after_the_replay_shown_in_its_story() {
    let app = app_with_admin().await;
    let ids = dead_letters(&app, &["Twice Tried"]).await;
    let id = &ids[0];
    // The replay meets a temporary failure first, then is delivered.
    app.sim.push_faults([Fault::status(500)]);
    let answer: Value = admin_post(&app, "/admin/dead/replay", json!({"ids": [id]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["replayed"], json!([id]), "{answer}");
    app.received(1).await;
    let record: Value = eventually(Duration::from_secs(10), "the delivered record", || async {
        let record: Value = admin_get(&app, &format!("/admin/leads/{id}"))
            .await
            .json()
            .await
            .ok()?;
        (record["state"] == "delivered").then_some(record)
    })
    .await;
    let story: Vec<(u64, &str, Option<u64>)> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["number"].as_u64().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["status"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        story,
        [
            (1, "rejected", Some(406)),
            (1, "replayed", None),
            (2, "retry", Some(500)),
            (3, "delivered", Some(201)),
        ],
        "{record}"
    );
}

#[tokio::test]
async fn a_delivered_lead_s_record_shows_its_attempts_and_onpipeline_lead_id() {
    let app = app_with_admin().await;
    app.sim.push_faults([Fault::status(503)]);
    let response = app
        .post_json("website", &json!({"name": "Story Lead"}))
        .await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let leads = app.received(1).await;
    let record: Value = eventually(Duration::from_secs(10), "the delivered record", || async {
        let record: Value = admin_get(&app, &format!("/admin/leads/{id}"))
            .await
            .json()
            .await
            .ok()?;
        (record["state"] == "delivered").then_some(record)
    })
    .await;
    assert_eq!(record["delivery"]["onpipeline_lead_id"], leads[0].lead_id);
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[1]["outcome"], "delivered");
    assert_eq!(attempts[1]["number"], 2);
    assert_eq!(record["work"]["payload"]["FirstName"], "Story");
}

#[tokio::test]
async fn metrics_count_received_leads_and_attempts() {
    let app = app_with_admin().await;
    app.post_json("website", &json!({"name": "Metric Lead"}))
        .await;
    app.post_json("website", &json!({"email": "no-name@example.com"}))
        .await;
    app.received(1).await;
    let text = eventually(Duration::from_secs(10), "the counters", || async {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("leadgate_delivery_attempts_total")
            .then_some(text)
    })
    .await;
    assert!(
        text.contains("leadgate_leads_received_total{source=\"website\",outcome=\"queued\"}"),
        "{text}"
    );
    assert!(
        text.contains("leadgate_leads_received_total{source=\"website\",outcome=\"rejected\"}"),
        "{text}"
    );
    assert!(
        text.contains("leadgate_upstream_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(!text.contains("no-name@example.com"));
}

#[tokio::test]
async fn metrics_want_their_token_when_one_is_set() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_METRICS_TOKEN", "metrics-token-0123456789");
    })
    .await;
    assert_eq!(
        app.http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let ok = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("metrics-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_talks_to_a_running_instance() {
    let app = app_with_admin().await;
    let run = |token: &str, args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_leadgate"));
        command
            .env_clear()
            .env("LEADGATE_ADMIN_TOKEN", token)
            .arg("admin")
            .args(["--url", &app.base])
            .args(args);
        command.output().unwrap()
    };
    let app_ref = &app;
    let stats = tokio::task::block_in_place(|| run(ADMIN, &["stats"]));
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let json: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(json["delivery"]["state"], "running");

    let paused = tokio::task::block_in_place(|| run(ADMIN, &["pause"]));
    assert!(paused.status.success());
    assert!(matches!(
        app_ref.gateway().delivery(),
        leadgate::forwarder::DeliveryStatus::Paused {
            by_operator: true,
            ..
        }
    ));
    let resumed = tokio::task::block_in_place(|| run(ADMIN, &["resume"]));
    assert!(resumed.status.success());

    let denied = tokio::task::block_in_place(|| run("wrong-token-000000", &["stats"]));
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("401"));
}

/// `GET` or `POST` an admin path of a gateway process, as JSON.
async fn admin_call(http: &reqwest::Client, method: reqwest::Method, url: String) -> Value {
    let response = http
        .request(method, url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn readyz(http: &reqwest::Client, base: &str) -> Value {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Two replicas on one Redis: an operator's pause sent to one holds delivery in both (each
/// shows it), and a resume sent to the other delivers every lead once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pause_sent_to_one_replica_holds_every_replica_until_resumed_on_another() {
    use crate::helpers::app::{GatewayEnv, GatewayProcess, client, start_sim, wait_received};
    use crate::helpers::redis::RedisServer;
    use reqwest::Method;

    let redis = RedisServer::start();
    let sim = start_sim(Vec::new()).await;
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", redis.url())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN);
    let replicas = [
        GatewayProcess::start(&env, &[]).await,
        GatewayProcess::start(&env, &[]).await,
    ];
    let [a, b] = [&replicas[0].base, &replicas[1].base];
    let http = client();

    let paused = admin_call(&http, Method::POST, format!("{a}/admin/pause")).await;
    assert_eq!(paused["delivery"]["state"], "paused", "{paused}");
    let since = paused["operator_pause"]["since"].clone();
    assert!(since.is_string(), "{paused}");
    for base in [a, b] {
        let ready = eventually(
            Duration::from_secs(10),
            "every replica to show the pause",
            || async {
                let ready = readyz(&http, base).await;
                (ready["delivery"]["state"] == "paused").then_some(ready)
            },
        )
        .await;
        assert_eq!(ready["status"], "degraded", "{ready}");
        assert_eq!(ready["delivery"]["by_operator"], true, "{ready}");
        assert_eq!(
            ready["delivery"]["since"], since,
            "one pause, one time: {ready}"
        );
        let stats = admin_call(&http, Method::GET, format!("{base}/admin/stats")).await;
        assert_eq!(stats["delivery"]["state"], "paused", "{stats}");
        assert_eq!(stats["operator_pause"]["since"], since, "{stats}");
    }

    for i in 0..6 {
        let base = if i % 2 == 0 { a } else { b };
        let response = http
            .post(format!("{base}/in/website"))
            .json(&json!({"name": format!("Lead Pause{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "leads are accepted while paused");
    }
    // Longer than a lease wait and a pause poll: a replica that ignored the pause would send.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sim.requests().is_empty(), "neither replica delivers");
    let stats = admin_call(&http, Method::GET, format!("{b}/admin/stats")).await;
    assert_eq!(stats["ready"], 6, "{stats}");

    let resumed = admin_call(&http, Method::POST, format!("{b}/admin/resume")).await;
    assert_eq!(resumed["delivery"]["state"], "running", "{resumed}");
    let leads = wait_received(&sim, 6, Duration::from_secs(20)).await;
    let mut names: Vec<_> = leads
        .iter()
        .map(|l| l.payload["LastName"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 6, "each lead once");
    for base in [a, b] {
        eventually(
            Duration::from_secs(10),
            "every replica to resume",
            || async {
                (readyz(&http, base).await["delivery"]["state"] == "running").then_some(())
            },
        )
        .await;
        let stats = admin_call(&http, Method::GET, format!("{base}/admin/stats")).await;
        assert_eq!(stats["operator_pause"], Value::Null, "{stats}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.received().len(), 6);
    assert!(sim.requests().iter().all(|r| r.status == Some(201)));
}

/// `leadgate admin dead`, `lead`, `delete` and `replay` against a running instance, each
/// checked against what the instance then holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_lists_reads_deletes_and_replays_dead_letters() {
    let app = app_with_admin().await;
    let ids = dead_letters(&app, &["Cli Dropped", "Cli Replayed"]).await;
    let (dropped, replayed) = (&ids[0], &ids[1]);
    let run = |args: &[&str]| {
        let output = tokio::task::block_in_place(|| {
            Command::new(env!("CARGO_BIN_EXE_leadgate"))
                .env_clear()
                .env("LEADGATE_ADMIN_TOKEN", ADMIN)
                .env("LEADGATE_ADMIN_URL", &app.base)
                .arg("admin")
                .args(args)
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };

    let (ok, stdout, stderr) = run(&["dead"]);
    assert!(ok, "{stderr}");
    let dead: Value = serde_json::from_str(&stdout).unwrap();
    let listed: Vec<&str> = dead["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{stdout}");
    assert!(listed.contains(&dropped.as_str()) && listed.contains(&replayed.as_str()));
    assert!(
        stdout.contains("bad data"),
        "the reasons are shown: {stdout}"
    );

    let (ok, stdout, stderr) = run(&["lead", dropped]);
    assert!(ok, "{stderr}");
    let record: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(record["state"], "dead", "{stdout}");
    assert_eq!(record["attempts"][0]["status"], 406, "{stdout}");

    let (ok, _, stderr) = run(&["delete", dropped]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&["delete", dropped]);
    assert!(!ok, "a second delete finds nothing");
    assert!(stderr.contains("404"), "{stderr}");

    let (ok, stdout, stderr) = run(&["replay", replayed]);
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["replayed"], json!([replayed]), "{stdout}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Replayed");

    let record = eventually(Duration::from_secs(5), "the delivered record", || async {
        let (ok, stdout, _) = run(&["lead", replayed]);
        let record: Value = serde_json::from_str(&stdout).ok()?;
        (ok && record["state"] == "delivered").then_some(record)
    })
    .await;
    assert_eq!(record["delivery"]["onpipeline_lead_id"], leads[0].lead_id);
    let stats = app.stats().await;
    assert_eq!(stats.dead, 0, "one deleted, one replayed: {stats:?}");
    let (ok, _, stderr) = run(&["lead", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert!(!ok, "an unknown lead is an error");
    assert!(stderr.contains("404"), "{stderr}");
}

/// Runs `leadgate admin ARGS` against `app`, from a blocking section of a multi-threaded test.
fn admin_cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_leadgate"))
            .env_clear()
            .env("LEADGATE_ADMIN_TOKEN", ADMIN)
            .env("LEADGATE_ADMIN_URL", &app.base)
            .arg("admin")
            .args(args)
            .output()
            .unwrap()
    })
}

/// `leadgate admin replay` exits non-zero when any id could not be replayed, and says which and
/// why; the ids it could replay are replayed all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_s_replay_fails_naming_each_id_it_could_not_replay() {
    let app = app_with_admin().await;
    let ids = dead_letters(&app, &["Cli Mixed"]).await;
    let missing = leadgate::lead::LeadId::new().to_string();
    let output = admin_cli(&app, &["replay", &ids[0], &missing]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "1 of 2 dead letters were not replayed: {missing}: no such dead letter"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(ids[0].as_str()), "{stderr}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        answer["replayed"],
        json!([ids[0]]),
        "the answer is printed: {answer}"
    );
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Mixed");

    // Every id replayed: success.
    let more = dead_letters(&app, &["Cli Clean"]).await;
    let output = admin_cli(&app, &["replay", &more[0]]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `leadgate admin replay` with neither ids nor `--all` is a usage error, and sends nothing.
#[test]
fn the_admin_cli_s_replay_without_ids_or_all_is_a_usage_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_leadgate"))
        .env_clear()
        .env("LEADGATE_ADMIN_TOKEN", ADMIN)
        .args(["admin", "--url"])
        .arg(format!("http://{}", listener.local_addr().unwrap()))
        .arg("replay")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap's usage error: {stderr}"
    );
    assert!(
        stderr.contains("<IDS>") && stderr.contains("Usage"),
        "{stderr}"
    );
    assert!(
        listener.accept().is_err(),
        "no request reached the instance"
    );
}

/// A reader that goes away (`leadgate admin dead | head -c1`) ends the command quietly: no
/// panic, no error, the API's answer decides the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_ends_quietly_when_its_output_pipe_is_closed() {
    let app = app_with_admin().await;
    dead_letters(&app, &["Pipe Closed"]).await;
    for args in [&["dead"][..], &["stats"][..]] {
        let output = tokio::task::block_in_place(|| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_leadgate"))
                .env_clear()
                .env("LEADGATE_ADMIN_TOKEN", ADMIN)
                .env("LEADGATE_ADMIN_URL", &app.base)
                .arg("admin")
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // Close the read end before the answer is printed.
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        });
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {}\n{stderr}",
            output.status
        );
        assert!(stderr.is_empty(), "{args:?} said: {stderr}");
    }
}

/// Sends `head` (a request line and headers, ending in the blank line) and `body` on a raw
/// connection, keeps it open, and returns what the gateway answered until it closed the
/// connection (or `limit` passed), with how long that took.
async fn raw_exchange(
    app: &TestApp,
    head: &str,
    body: &[u8],
    limit: Duration,
) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.gateway().addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}Host: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

/// A replay request whose body never finishes: `Content-Length: 100`, one byte sent.
const STALLED_REPLAY: &str =
    "POST /admin/dead/replay HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n";

#[tokio::test]
async fn a_replay_without_the_token_is_refused_at_once_whatever_its_body_does() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_ADMIN_TOKEN", ADMIN)
            .set("LEADGATE_BODY_TIMEOUT", "30s");
    })
    .await;
    let (answer, took) = raw_exchange(&app, STALLED_REPLAY, b"{", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"unauthorized\""), "{answer}");
    assert!(
        took < Duration::from_secs(3),
        "the refusal and the close took {took:?}"
    );

    let wrong = format!("{STALLED_REPLAY}Authorization: Bearer admin-token-0000000000\r\n");
    let (answer, took) = raw_exchange(&app, &wrong, b"{", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // The routes that take no body do not wait for one either.
    let pause = STALLED_REPLAY.replace("/admin/dead/replay", "/admin/pause");
    let (answer, took) = raw_exchange(&app, &pause, b"{", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn a_replay_to_an_instance_without_the_admin_api_is_answered_404_at_once() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_BODY_TIMEOUT", "30s");
    })
    .await;
    let (answer, took) = raw_exchange(&app, STALLED_REPLAY, b"{", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("LEADGATE_ADMIN_TOKEN"), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn an_operator_s_stalled_replay_body_is_cut_off_at_the_body_deadline() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_ADMIN_TOKEN", ADMIN)
            .set("LEADGATE_BODY_TIMEOUT", "1s");
    })
    .await;
    let head = format!("{STALLED_REPLAY}Authorization: Bearer {ADMIN}\r\n");
    let (answer, took) = raw_exchange(&app, &head, b"{", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn a_replay_body_declared_larger_than_the_admin_cap_is_refused_before_reading() {
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.set("LEADGATE_ADMIN_TOKEN", ADMIN)
            .set("LEADGATE_BODY_TIMEOUT", "30s");
    })
    .await;
    let head = format!(
        "POST /admin/dead/replay HTTP/1.1\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\nAuthorization: Bearer {ADMIN}\r\n"
    );
    let (answer, took) = raw_exchange(&app, &head, b"{\"ids\": [", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// `leadgate admin replay` with an id copied in lower case, and named twice: one replay, one
/// delivery, answered once by the id's canonical form, and a successful exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_replays_an_id_given_in_lower_case_and_twice_once() {
    let app = app_with_admin().await;
    let ids = dead_letters(&app, &["Lower Case"]).await;
    let lower = ids[0].to_ascii_lowercase();
    assert_ne!(lower, ids[0]);
    let output = admin_cli(&app, &["replay", &lower, &lower, &ids[0]]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["replayed"], json!([ids[0]]), "{answer}");
    assert_eq!(answer["failed"], json!([]), "{answer}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Case");
    eventually(Duration::from_secs(5), "the delivery", || async {
        (app.stats().await.delivered == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.sim.received().len(), 1, "delivered once");
}

#[tokio::test]
async fn replay_answers_a_missing_id_named_twice_once_in_canonical_form() {
    let app = app_with_admin().await;
    let missing = leadgate::lead::LeadId::new().to_string();
    let lower = missing.to_ascii_lowercase();
    let answer: Value = admin_post(&app, "/admin/dead/replay", json!({"ids": [lower, missing]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["replayed"], json!([]), "{answer}");
    assert_eq!(
        answer["failed"],
        json!([{"id": missing, "error": "no such dead letter"}]),
        "{answer}"
    );
    // A bad id among good ones refuses the whole request: nothing is replayed.
    let ids = dead_letters(&app, &["Not Yet"]).await;
    let bad = admin_post(
        &app,
        "/admin/dead/replay",
        json!({"ids": [ids[0], "not-a-ulid"]}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    assert_eq!(app.stats().await.dead, 1);
}

#[tokio::test]
async fn a_lead_can_be_read_and_its_dead_letter_deleted_by_its_id_in_lower_case() {
    let app = app_with_admin().await;
    let ids = dead_letters(&app, &["Lower Delete"]).await;
    let lower = ids[0].to_ascii_lowercase();
    let response = admin_get(&app, &format!("/admin/leads/{lower}")).await;
    assert_eq!(response.status(), 200);
    let record: Value = response.json().await.unwrap();
    assert_eq!(record["id"], ids[0], "{record}");
    assert_eq!(record["state"], "dead", "{record}");
    let deleted = app
        .http
        .delete(app.url(&format!("/admin/dead/{lower}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(app.stats().await.dead, 0);
}
