//! A real headless Chromium submits the web-form paths: a plain HTML form whose action is the
//! gateway, and `fetch()` from an allowed origin (CORS) and from a foreign one.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use chromiumoxide::Page;
use chromiumoxide::browser::{Browser, BrowserConfig};
use futures_util::StreamExt;
use serde_json::Value;

use crate::helpers::app::{TestApp, default_sources, free_port};

/// A website on its own origin, serving pages that post to the gateway at `gateway`.
struct Website {
    origin: String,
    gateway: Arc<OnceLock<String>>,
    handle: actix_web::dev::ServerHandle,
}

impl Website {
    fn start() -> Self {
        let addr = free_port();
        let gateway: Arc<OnceLock<String>> = Arc::default();
        let pages = gateway.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::from(pages.clone()))
                .route("/form.html", web::get().to(form_page))
                .route("/fetch.html", web::get().to(fetch_page))
        })
        .workers(1)
        .bind(addr)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            origin: format!("http://{addr}"),
            gateway,
            handle,
        }
    }
}

async fn form_page(gateway: web::Data<OnceLock<String>>) -> HttpResponse {
    let action = format!("{}/in/website", gateway.get().unwrap());
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Contact us</title></head><body>
<form method="post" action="{action}">
  <input name="name" id="name"><input name="email" id="email"><input name="phone" id="phone">
  <input type="hidden" name="utm_campaign" value="browser-test">
  <button type="submit" id="send">Send</button>
</form></body></html>"#
    ))
}

async fn fetch_page(gateway: web::Data<OnceLock<String>>) -> HttpResponse {
    let url = format!("{}/in/website", gateway.get().unwrap());
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>fetch</title></head><body><script>
async function send(name) {{
  try {{
    const r = await fetch("{url}", {{
      method: "POST",
      headers: {{"Content-Type": "application/json", "Accept": "application/json"}},
      body: JSON.stringify({{name: name, email: "fetch@example.com"}})
    }});
    return JSON.stringify({{status: r.status, body: await r.json()}});
  }} catch (e) {{
    return JSON.stringify({{blocked: String(e)}});
  }}
}}
</script></body></html>"#
    ))
}

fn chromium_path() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!(
        "no Chromium found: install it (apt-get install chromium) or set CHROMIUM; tests/run does this"
    );
}

async fn launch() -> (Browser, tokio::task::JoinHandle<()>, tempfile::TempDir) {
    let profile = tempfile::tempdir().unwrap();
    let config = BrowserConfig::builder()
        .chrome_executable(chromium_path())
        .no_sandbox()
        .user_data_dir(profile.path())
        .args([
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .build()
        .unwrap();
    let (browser, mut handler) = Browser::launch(config).await.expect("Chromium starts");
    let driver = tokio::spawn(async move { while handler.next().await.is_some() {} });
    (browser, driver, profile)
}

async fn setup() -> (TestApp, Website) {
    let website = Website::start();
    let sources = default_sources()
        .replace(
            "allowed_origins = [\"https://www.example.com\"]",
            &format!("allowed_origins = [\"{}\"]", website.origin),
        )
        .replace("thank_you_url = \"https://www.example.com/thanks\"\n", "");
    let app = TestApp::spawn_with(&sources, |_| {}).await;
    website.gateway.set(app.base.clone()).unwrap();
    (app, website)
}

async fn run_js(page: &Page, call: &str) -> Value {
    let text: String = page.evaluate(call).await.unwrap().into_value().unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_html_form_lands_on_the_thank_you_page_and_the_lead_arrives() {
    let (app, website) = setup().await;
    let (mut browser, driver, _profile) = launch().await;
    let page = browser
        .new_page(format!("{}/form.html", website.origin))
        .await
        .unwrap();
    // Typing goes through key events, which know no "í": set that value as an input method would.
    page.evaluate("document.getElementById('name').value = 'Bruno Díaz'")
        .await
        .unwrap();
    page.find_element("#email")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str("bruno@example.com")
        .await
        .unwrap();
    page.find_element("#phone")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str("020 7946 0018")
        .await
        .unwrap();
    page.find_element("#send")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let thanks =
        crate::helpers::eventually(Duration::from_secs(15), "the thank-you page", || async {
            let url = page.url().await.ok()??;
            let content = page.content().await.ok()?;
            (url.contains("/thanks") && content.contains("Thank you")).then_some(url)
        })
        .await;
    assert!(thanks.starts_with(&app.base), "{thanks}");
    let leads = app.received(1).await;
    let lead = &leads[0].payload;
    assert_eq!(lead["FirstName"], "Bruno");
    assert_eq!(lead["LastName"], "Díaz");
    assert_eq!(lead["Phone"][0]["Number"], "+442079460018");
    assert_eq!(
        lead["Extra"][0],
        serde_json::json!({"ID": "2222222", "Value": "browser-test"})
    );
    browser.close().await.unwrap();
    driver.await.unwrap();
    website.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_an_allowed_origin_is_granted_by_cors() {
    let (app, website) = setup().await;
    let (mut browser, driver, _profile) = launch().await;
    let page = browser
        .new_page(format!("{}/fetch.html", website.origin))
        .await
        .unwrap();
    let result = run_js(&page, "send('Carla Fetch')").await;
    assert_eq!(result["status"], 202, "{result}");
    assert_eq!(result["body"]["status"], "queued", "{result}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Carla");
    browser.close().await.unwrap();
    driver.await.unwrap();
    website.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_a_foreign_origin_is_refused() {
    let (app, website) = setup().await;
    // Another site, on another origin, that the source does not allow.
    let foreign = Website::start();
    foreign.gateway.set(app.base.clone()).unwrap();
    let (mut browser, driver, _profile) = launch().await;
    let page = browser
        .new_page(format!("{}/fetch.html", foreign.origin))
        .await
        .unwrap();
    let result = run_js(&page, "send('Eve Foreign')").await;
    assert!(
        result.get("blocked").is_some(),
        "the browser must block it: {result}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = app.stats().await;
    assert_eq!(
        stats.ready + stats.leased + stats.delayed,
        0,
        "nothing queued: {stats:?}"
    );
    assert!(app.sim.received().is_empty());
    browser.close().await.unwrap();
    driver.await.unwrap();
    website.handle.stop(false).await;
    foreign.handle.stop(false).await;
}
