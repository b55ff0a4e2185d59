//! Every classification row of Onpipeline's answers, driven through the simulator's fault
//! injection: each lead ends delivered exactly once, or dead-lettered with its reason.

use std::time::Duration;

use leadgate::forwarder::DeliveryStatus;
use leadgate::sim::Fault;
use serde_json::{Value, json};

use crate::helpers::app::TestApp;
use crate::helpers::eventually;

fn status(code: u16) -> Fault {
    Fault::Status {
        status: code,
        retry_after: None,
        message: None,
    }
}

async fn post_one(app: &TestApp, name: &str) -> String {
    let response = app.post_json("website", &json!({"name": name})).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// Statuses the simulator answered, in order (None: the connection was dropped).
fn statuses(app: &TestApp) -> Vec<Option<u16>> {
    app.sim.requests().iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn temporary_failures_are_retried_until_one_delivery() {
    let app = TestApp::spawn().await;
    app.sim.push_faults([
        status(500),
        Fault::Drop,
        Fault::NonJson502,
        status(503),
        Fault::Delay { ms: 3_000 }, // longer than LEADGATE_ONPIPELINE_TIMEOUT=2s
    ]);
    post_one(&app, "Retry Me").await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Retry");
    // The simulator stores the lead a moment before it logs its answer.
    let seen = eventually(
        Duration::from_secs(5),
        "the 201 in the request log",
        || async {
            let seen = statuses(&app);
            (seen.last() == Some(&Some(201))).then_some(seen)
        },
    )
    .await;
    assert_eq!(
        &seen[..4],
        &[Some(500), None, Some(502), Some(503)],
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&Some(201)), "{seen:?}");
    // The lead is settled (the gateway records the delivery a moment after the simulator has
    // it), and nothing more arrives.
    let settled = leadgate::queue::Stats {
        delivered: 1,
        ..Default::default()
    };
    eventually(Duration::from_secs(5), "the delivery record", || async {
        (app.stats().await == settled).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.sim.received().len(), 1);
    assert_eq!(app.stats().await, settled);
}

#[tokio::test]
async fn retry_after_on_429_and_503_spaces_the_next_attempt() {
    let app = TestApp::spawn().await;
    app.sim.push_faults([
        Fault::Status {
            status: 429,
            retry_after: Some("2".into()),
            message: Some("Too many requests".into()),
        },
        Fault::Status {
            status: 503,
            retry_after: Some("1".into()),
            message: None,
        },
    ]);
    post_one(&app, "Patient Person").await;
    app.received(1).await;
    let requests = app.sim.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let gap1 = (requests[1].at - requests[0].at).to_std().unwrap();
    let gap2 = (requests[2].at - requests[1].at).to_std().unwrap();
    assert!(
        gap1 >= Duration::from_millis(1950),
        "429 Retry-After: 2 honoured, got {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(950),
        "503 Retry-After: 1 honoured, got {gap2:?}"
    );
}

#[tokio::test]
async fn rejected_data_is_dead_lettered_with_onpipeline_s_reason() {
    for code in [400u16, 406] {
        let app = TestApp::spawn().await;
        app.sim.push_faults([Fault::Status {
            status: code,
            retry_after: None,
            message: Some("Not acceptable - the data is wrong".into()),
        }]);
        let id = post_one(&app, "Bad Data").await;
        let dead = eventually(Duration::from_secs(10), "a dead letter", || async {
            let dead = app.gateway().queue().dead_letters(10).await.unwrap();
            (!dead.is_empty()).then_some(dead)
        })
        .await;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].lead.id.to_string(), id);
        assert!(
            dead[0].reason.contains(&code.to_string()),
            "{}",
            dead[0].reason
        );
        assert!(
            dead[0].reason.contains("the data is wrong"),
            "{}",
            dead[0].reason
        );
        assert_eq!(
            app.sim.requests().len(),
            1,
            "a rejected lead is not retried"
        );
        assert!(app.sim.received().is_empty());
    }
}

/// A 400 or 406 HTML page is a proxy or WAF talking, not Onpipeline (whose API always answers
/// JSON): the lead is retried and delivered, not dead-lettered.
#[tokio::test]
async fn html_error_pages_from_something_in_between_are_retried_not_dead_lettered() {
    let app = TestApp::spawn().await;
    app.sim.push_faults([
        Fault::NonJson { status: 400 },
        Fault::NonJson { status: 406 },
        Fault::NonJson { status: 413 },
    ]);
    let id = post_one(&app, "Behind Proxy").await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Proxy");
    let record = eventually(Duration::from_secs(5), "the delivered record", || async {
        let record = app
            .gateway()
            .queue()
            .lead(id.parse().unwrap())
            .await
            .unwrap()?;
        (record.state == leadgate::queue::LeadState::Delivered).then_some(record)
    })
    .await;
    let seen: Vec<_> = record
        .attempts
        .iter()
        .map(|a| (a.status, a.outcome))
        .collect();
    use leadgate::queue::AttemptOutcome::{Delivered, Retry};
    assert_eq!(
        seen,
        [
            (Some(400), Retry),
            (Some(406), Retry),
            (Some(413), Retry),
            (Some(201), Delivered)
        ],
        "{record:?}"
    );
    assert!(
        record.attempts[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("400 Bad Request")),
        "{record:?}"
    );
    assert!(
        app.gateway()
            .queue()
            .dead_letters(10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// An HTML 403 (a WAF refusing our address) still pauses delivery, uncounted, and the probe
/// that follows delivers the lead.
#[tokio::test]
async fn an_html_403_page_pauses_delivery_like_onpipeline_s_own_403() {
    let app = TestApp::spawn().await;
    app.sim.push_faults([Fault::NonJson { status: 403 }]);
    let id = post_one(&app, "Waf Blocked").await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Blocked");
    let record = eventually(Duration::from_secs(5), "the delivered record", || async {
        let record = app
            .gateway()
            .queue()
            .lead(id.parse().unwrap())
            .await
            .unwrap()?;
        (record.state == leadgate::queue::LeadState::Delivered).then_some(record)
    })
    .await;
    let seen: Vec<_> = record
        .attempts
        .iter()
        .map(|a| (a.number, a.status, a.outcome))
        .collect();
    use leadgate::queue::AttemptOutcome::{Delivered, Paused};
    assert_eq!(
        seen,
        [(1, Some(403), Paused), (1, Some(201), Delivered)],
        "paused, not counted, then delivered by the probe: {record:?}"
    );
    assert_eq!(app.gateway().delivery(), DeliveryStatus::Running);
}

/// Onpipeline documents 200, 201 and 202 as success: each, with its `Header`, is a delivery
/// with the `LeadID` recorded, sent once.
#[tokio::test]
async fn a_200_or_202_with_a_header_is_delivered_once_with_its_lead_id() {
    for code in [200u16, 202] {
        let app = TestApp::spawn().await;
        app.sim.push_faults([Fault::SuccessStatus { status: code }]);
        let id = post_one(&app, "Quietly Accepted").await;
        let leads = app.received(1).await;
        let delivery = eventually(Duration::from_secs(10), "the delivery record", || async {
            app.gateway()
                .queue()
                .delivery_of(id.parse().unwrap())
                .await
                .unwrap()
        })
        .await;
        assert!(!delivery.duplicate, "{delivery:?}");
        assert_eq!(
            delivery.onpipeline_lead_id.as_deref(),
            Some(leads[0].lead_id.as_str()),
            "HTTP {code}"
        );
        assert_eq!(statuses(&app), [Some(code)]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.sim.requests().len(), 1, "sent once");
        assert_eq!(
            app.stats().await,
            leadgate::queue::Stats {
                delivered: 1,
                ..Default::default()
            }
        );
    }
}

#[tokio::test]
async fn a_409_duplicate_counts_as_delivered_and_is_not_resent() {
    let app = TestApp::spawn().await;
    app.sim.push_faults([status(409)]);
    let id = post_one(&app, "Already There").await;
    let delivery = eventually(Duration::from_secs(10), "the delivery record", || async {
        app.gateway()
            .queue()
            .delivery_of(id.parse().unwrap())
            .await
            .unwrap()
    })
    .await;
    assert!(delivery.duplicate);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.sim.requests().len(), 1);
    assert_eq!(
        app.stats().await,
        leadgate::queue::Stats {
            delivered: 1,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn credential_errors_pause_delivery_until_onpipeline_accepts_again() {
    for code in [401u16, 403, 404] {
        let app = TestApp::spawn().await;
        app.sim
            .push_faults([status(code), status(code), status(code)]);
        post_one(&app, "Paused Lead").await;
        let readyz: Value = eventually(Duration::from_secs(10), "delivery to pause", || async {
            let body: Value = app
                .http
                .get(app.url("/readyz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["delivery"]["state"] == "paused").then_some(body)
        })
        .await;
        assert_eq!(readyz["status"], "degraded");
        assert!(
            readyz["delivery"]["reason"]
                .as_str()
                .unwrap()
                .contains(&code.to_string()),
            "{readyz}"
        );
        // Probes continue with back-off; once the faults are used up the lead goes through.
        let leads = app.received(1).await;
        assert_eq!(leads[0].payload["LastName"], "Lead");
        eventually(Duration::from_secs(5), "delivery to resume", || async {
            (app.gateway().delivery() == DeliveryStatus::Running).then_some(())
        })
        .await;
        assert_eq!(
            statuses(&app),
            [Some(code), Some(code), Some(code), Some(201)]
        );
    }
}

#[tokio::test]
async fn many_leads_through_mixed_failures_arrive_exactly_once() {
    let app = TestApp::spawn().await;
    let faults: Vec<Fault> = (0..30)
        .map(|i| match i % 5 {
            0 => status(500),
            1 => Fault::Drop,
            2 => Fault::NonJson502,
            3 => status(429),
            _ => status(503),
        })
        .collect();
    app.sim.push_faults(faults);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(post_one(&app, &format!("Lead Number{i}")).await);
    }
    let leads = app.received(40).await;
    let mut names: Vec<String> = leads
        .iter()
        .map(|l| l.payload["LastName"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 40, "every lead exactly once");
}

#[tokio::test]
async fn an_error_object_in_a_2xx_answer_is_not_taken_for_a_delivery() {
    let app = TestApp::spawn().await;
    let body = json!({"Error": {"Code": "406", "Message": "Not acceptable - FirstName", "Time": "2026-12-03 10:00:00", "IP": "127.0.0.1"}});
    app.sim.push_faults([Fault::Raw {
        status: 200,
        content_type: Some("application/json".into()),
        body: body.to_string(),
        retry_after: None,
    }]);
    let id = post_one(&app, "Tricky Answer").await;
    let dead = eventually(Duration::from_secs(10), "a dead letter", || async {
        let dead = app.gateway().queue().dead_letters(10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead[0].lead.id.to_string(), id);
    assert!(dead[0].reason.contains("406"), "{}", dead[0].reason);
    let record = app
        .gateway()
        .queue()
        .delivery_of(id.parse().unwrap())
        .await
        .unwrap();
    assert!(record.is_none(), "not recorded as delivered");
}

#[tokio::test]
async fn a_lead_onpipeline_took_before_the_answer_was_lost_is_not_created_twice() {
    let app = TestApp::spawn().await;
    app.sim.set_detect_duplicates(true);
    // Onpipeline stores the lead, then the connection drops before its answer: the retry is
    // answered 409, which counts as delivered.
    app.sim.push_faults([Fault::DropAfterAccept]);
    let id = post_one(&app, "Stored Once").await;
    let delivery = eventually(Duration::from_secs(10), "the delivery record", || async {
        app.gateway()
            .queue()
            .delivery_of(id.parse().unwrap())
            .await
            .unwrap()
    })
    .await;
    assert!(delivery.duplicate, "{delivery:?}");
    assert_eq!(app.sim.received().len(), 1);
    assert_eq!(statuses(&app), [None, Some(409)]);
}

#[tokio::test]
async fn connection_refused_is_retried_and_delivered_once_onpipeline_is_reachable() {
    let sim = std::sync::Arc::new(crate::helpers::app::start_sim(Vec::new()).await);
    let closed = crate::helpers::app::free_port();
    let mut app = TestApp::spawn_against(sim, &crate::helpers::app::default_sources(), |env| {
        env.set("LEADGATE_ONPIPELINE_URL", format!("https://{closed}"))
            .set("LEADGATE_RETRY_BASE", "2s")
            .set("LEADGATE_RETRY_MAX_DELAY", "2s");
    })
    .await;
    post_one(&app, "Patient Lead").await;
    let stats = eventually(
        Duration::from_secs(10),
        "a retry to be scheduled",
        || async {
            let stats = app.stats().await;
            (stats.delayed == 1).then_some(stats)
        },
    )
    .await;
    assert_eq!(stats.dead, 0);
    app.stop().await;
    let url = app.sim.base_url();
    app.env.set("LEADGATE_ONPIPELINE_URL", url);
    app.start().await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Lead");
}

#[tokio::test]
async fn a_lead_still_failing_past_the_retry_max_age_is_dead_lettered_with_every_attempt() {
    let app = TestApp::spawn_with(&crate::helpers::app::default_sources(), |env| {
        env.set("LEADGATE_RETRY_MAX_AGE", "2s");
    })
    .await;
    // Onpipeline fails every request for longer than the lead may keep trying.
    app.sim.push_faults((0..1000).map(|_| status(500)));
    let id = post_one(&app, "Never Delivered").await;
    let dead = eventually(Duration::from_secs(20), "the dead letter", || async {
        let dead = app.gateway().queue().dead_letters(10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    app.sim.clear_faults();
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.lead.id.to_string(), id);
    assert!(
        letter
            .reason
            .starts_with(&format!("gave up after {} attempts", letter.attempts)),
        "{}",
        letter.reason
    );
    assert!(letter.reason.contains("500"), "{}", letter.reason);
    // The full history: one entry per request Onpipeline saw, numbered 1, 2, 3…, each a 500.
    let requests = app.sim.requests();
    assert!(
        requests.len() > 3,
        "retried until the age ran out: {requests:?}"
    );
    assert_eq!(letter.history.len(), requests.len(), "{:?}", letter.history);
    assert_eq!(letter.attempts as usize, requests.len());
    for (n, attempt) in letter.history.iter().enumerate() {
        assert_eq!(attempt.number as usize, n + 1, "{:?}", letter.history);
        assert_eq!(attempt.status, Some(500));
        assert_eq!(attempt.outcome, leadgate::queue::AttemptOutcome::Retry);
    }
    let span = letter.history.last().unwrap().at - letter.history[0].at;
    assert!(
        span < chrono::Duration::seconds(2),
        "no attempt after the max age: {span:?}"
    );
    let stats = app.stats().await;
    assert_eq!((stats.dead, stats.ready, stats.delayed), (1, 0, 0));
    assert!(app.sim.received().is_empty());
}
