//! The benchmark's ceiling: an actix-web server whose one route only reads the body and
//! answers 202, with the same worker count the gateway uses. Run by `tests/bench/run.sh`.

use actix_web::{App, HttpResponse, HttpServer, web};

async fn read_body(body: web::Bytes) -> HttpResponse {
    HttpResponse::Accepted()
        .content_type("application/json")
        .body(format!("{{\"read\":{}}}", body.len()))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::var("BARE_LISTEN").unwrap_or_else(|_| "127.0.0.1:18080".to_owned());
    HttpServer::new(|| App::new().route("/in/{source}", web::post().to(read_body)))
        .bind(listen)?
        .run()
        .await
}
