//! Soak load generator (run by `tests/bench/soak.sh`, not by CI): posts `--total` leads to a
//! running gateway at a steady `--rate` per second and, every second, records the gateway's
//! resident memory (from /proc) and its queue depth (from the admin API) as CSV on stdout.
//!
//! Usage: soak --url http://127.0.0.1:18090 --pid 1234 --admin-token T --rate 500 --total 100000

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

struct Args {
    url: String,
    pid: u32,
    admin_token: String,
    rate: u64,
    total: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut url = None;
    let mut pid = None;
    let mut admin_token = None;
    let mut rate = 500;
    let mut total = 100_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--pid" => pid = Some(value.parse()?),
            "--admin-token" => admin_token = Some(value),
            "--rate" => rate = value.parse()?,
            "--total" => total = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        url: url.context("--url is required")?,
        pid: pid.context("--pid is required")?,
        admin_token: admin_token.context("--admin-token is required")?,
        rate,
        total,
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    leadgate::tls::install_default_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()?;
    let started = Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));

    // The sampler: one CSV line a second until everything is sent and the queue is empty.
    let sampler = {
        let (http, url, token, pid) = (
            http.clone(),
            args.url.clone(),
            args.admin_token.clone(),
            args.pid,
        );
        let (sent, failed, total) = (sent.clone(), failed.clone(), args.total);
        tokio::spawn(async move {
            println!("seconds,sent,failed,rss_kib,ready,leased,delayed,dead,delivered");
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let stats: Value = match http
                    .get(format!("{url}/admin/stats"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => Value::Null,
                };
                let n = |k: &str| stats[k].as_u64().unwrap_or(0);
                let sent_now = sent.load(std::sync::atomic::Ordering::Relaxed);
                println!(
                    "{},{},{},{},{},{},{},{},{}",
                    started.elapsed().as_secs(),
                    sent_now,
                    failed.load(std::sync::atomic::Ordering::Relaxed),
                    rss_kib(pid),
                    n("ready"),
                    n("leased"),
                    n("delayed"),
                    n("dead"),
                    n("delivered"),
                );
                if sent_now >= total && n("ready") + n("leased") + n("delayed") == 0 {
                    break;
                }
            }
        })
    };

    // Steady rate: a tick per lead, each post in its own task.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.total {
        tick.tick().await;
        let (http, url, sent, failed) =
            (http.clone(), args.url.clone(), sent.clone(), failed.clone());
        tasks.spawn(async move {
            let body = json!({
                "first_name": "Soak",
                "last_name": format!("Lead{i}"),
                "email": format!("soak{i}@example.com"),
                "phone": "020 7946 0018",
                "company": "Soak Ltd",
                "message": "A steady stream of leads to watch memory over time.",
            });
            let answer = http
                .post(format!("{url}/in/website"))
                .json(&body)
                .send()
                .await;
            let refusal = match answer {
                Ok(r) if r.status() == 202 => None,
                Ok(r) => Some(r.status().to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(refusal) = refusal {
                // The first few refusals are shown; the CSV counts them all.
                if failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                    eprintln!("lead {i} refused: {refusal}");
                }
            }
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    sampler.await?;
    Ok(())
}
