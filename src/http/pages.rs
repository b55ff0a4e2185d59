//! HTML pages for people: the built-in thank-you page, the error page a browser form post
//! gets, and the sandbox's demo form and inbox. maud escapes every value by construction.

use maud::{DOCTYPE, Markup, html};

use crate::error::IngestError;
use crate::sim::ReceivedLead;

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#222}\
label{display:block;margin:.6rem 0 .2rem}input,textarea,select{width:100%;padding:.4rem;box-sizing:border-box}\
button{margin-top:1rem;padding:.5rem 1.2rem}table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.3rem;vertical-align:top;text-align:left}\
pre{white-space:pre-wrap;margin:0;font-size:.85rem}.error{color:#a00}.note{color:#555;font-size:.9rem}";

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (maud::PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

pub fn thanks_page() -> Markup {
    layout(
        "Thank you",
        html! {
            h1 { "Thank you!" }
            p { "We have received your details and will be in touch soon." }
        },
    )
}

pub fn error_page(error: &IngestError) -> Markup {
    let title = match error {
        IngestError::Rejected(_) => "Please check the form",
        IngestError::RateLimited { .. } | IngestError::Unavailable { .. } => {
            "Please try again shortly"
        }
        _ => "Your submission could not be accepted",
    };
    layout(
        title,
        html! {
            h1 { (title) }
            p.error { (error.public_message()) }
            @if let Some(fields) = error.fields() {
                ul {
                    @for (field, messages) in fields {
                        @for message in messages {
                            li { strong { (field) } ": " (message) }
                        }
                    }
                }
            }
            p { a href="javascript:history.back()" { "Go back to the form" } }
            p.note { "Error code: " code { (error.code()) } }
        },
    )
}

/// The sandbox's demo form: posts to `/in/{source}` as a plain HTML form.
pub fn demo_page(source: &str) -> Markup {
    let action = format!("/in/{source}");
    layout(
        "leadgate sandbox",
        html! {
            h1 { "leadgate sandbox" }
            p.note {
                "This form posts to " code { (action) } " like a form on your website would. "
                "The lead is queued, then delivered to the built-in Onpipeline simulator. "
                a href="/sandbox" { "See what the simulator received" } "."
            }
            form method="post" action=(action) {
                label for="name" { "Name" }
                input id="name" name="name" autocomplete="name";
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="email";
                label for="phone" { "Phone" }
                input id="phone" name="phone" type="tel" autocomplete="tel";
                label for="company" { "Company" }
                input id="company" name="company" autocomplete="organization";
                label for="budget" { "Budget" }
                select id="budget" name="budget" {
                    option { "under 10k" }
                    option { "10k-50k" }
                    option { "over 50k" }
                }
                label for="message" { "Message" }
                textarea id="message" name="message" rows="3" {}
                input type="hidden" name="utm_campaign" value="sandbox-demo";
                button type="submit" { "Send" }
            }
        },
    )
}

/// What the simulator received, newest first.
pub fn sandbox_page(leads: &[ReceivedLead]) -> Markup {
    layout(
        "leadgate sandbox: received leads",
        html! {
            h1 { "Leads received by the Onpipeline simulator" }
            p.note { (leads.len()) " lead(s). " a href="/" { "Send another" } " · " a href="/sandbox" { "Refresh" } }
            table {
                tr { th { "Onpipeline LeadID" } th { "Received" } th { "From" } th { "Leadsin payload" } }
                @for lead in leads.iter().rev() {
                    tr {
                        td { code { (lead.lead_id) } }
                        td { (lead.received_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                        td { (lead.peer_ip) }
                        td { pre { (serde_json::to_string_pretty(&lead.payload).unwrap_or_default()) } }
                    }
                }
            }
        },
    )
}
