//! The pages and the fragments htmx swaps into them. maud escapes every value it writes, so names,
//! messages and logs from the root are shown as text, never as markup.

use maud::{html, Markup, DOCTYPE};

use crate::assets;
use crate::geo::{self, MapPoint};
use crate::model::{state_class, Application, Cluster, Instance, Service};
use crate::root_api::ApiFailure;
use crate::session::now_s;

/// How often the live parts of a page ask for a new state.
pub const POLL: &str = "every 2s";

/// A result of an action, shown above the live part it changed.
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

/// A whole page: `user` is who is logged in (none on the login page).
pub fn page(title: &str, user: Option<&str>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // no inline styles (the CSP forbids them) and no eval: only the attributes used here
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
                title { (title) " · oakestra-rs" }
                link rel="stylesheet" href=(assets::STYLE_PATH);
                script src=(assets::HTMX_PATH) {}
                script src=(assets::SCRIPT_PATH) defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/" { "oakestra-rs" }
                        @if let Some(user) = user {
                            a href="/clusters" { "Clusters" }
                            a href="/applications" { "Applications" }
                            a href="/applications/new" { "New application" }
                            span.user { "Logged in as " strong #user { (user) } }
                            form method="post" action="/logout" {
                                button.link #logout type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

/// A region that reloads itself from `url` every 2 s (its inner HTML), starting with `initial`.
pub fn live(url: &str, initial: Markup) -> Markup {
    html! { div #live hx-get=(url) hx-trigger=(POLL) hx-swap="innerHTML" { (initial) } }
}

pub fn failure(e: &ApiFailure) -> Markup {
    html! {
        div.error role="alert" {
            @if let Some(f) = e.field() { "Field " code.field { (f) } ": " }
            mark.message { (e.to_string()) }
        }
    }
}

/// The outcome of the last action, outside the live region (so the next poll does not wipe it); an
/// action's answer replaces it out of band.
pub fn note(f: Option<&Flash>, oob: bool) -> Markup {
    html! {
        div #note hx-swap-oob=[oob.then_some("true")] {
            @if let Some(f) = f {
                @if f.ok { div.flash role="status" { (f.text) } }
                @else { div.error role="alert" { mark { (f.text) } } }
            }
        }
    }
}

pub fn login(error: Option<&ApiFailure>, username: &str) -> Markup {
    page(
        "Log in",
        None,
        html! {
            div.login.card {
                @if let Some(e) = error { div #login-error { (failure(e)) } }
                form method="post" action="/login" {
                    label for="username" { "User" }
                    input #username name="username" value=(username) autocomplete="username" required autofocus;
                    label for="password" { "Password" }
                    input #password name="password" type="password" autocomplete="current-password" required;
                    p { button #login type="submit" { "Log in" } }
                }
            }
        },
    )
}

fn ago(ts_s: f64) -> String {
    if ts_s <= 0.0 {
        return "never".into();
    }
    let d = now_s().saturating_sub(ts_s as u64);
    match d {
        0..=89 => format!("{d} s ago"),
        90..=5399 => format!("{} min ago", d / 60),
        _ => format!("{} h ago", d / 3600),
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "—".into()
    } else {
        v.join(", ")
    }
}

/// The clusters, their live resources and the map.
pub fn clusters(list_: &[Cluster]) -> Markup {
    let active = list_.iter().filter(|c| c.active).count();
    let located: Vec<(&Cluster, geo::Location)> =
        list_.iter().filter_map(|c| geo::parse_location(&c.cluster_location).map(|l| (c, l))).collect();
    let points: Vec<MapPoint> =
        located.iter().map(|(c, l)| MapPoint { name: &c.cluster_name, location: *l, active: c.active }).collect();
    let unplaced: Vec<&Cluster> = list_.iter().filter(|c| geo::parse_location(&c.cluster_location).is_none()).collect();
    html! {
        p.muted #clusters-summary { (list_.len()) " clusters, " (active) " active" }
        @if list_.is_empty() {
            p { "No cluster has registered yet." }
        } @else {
            table #clusters {
                thead { tr {
                    th { "Cluster" } th { "State" } th { "Location" } th { "Active workers" } th { "CPU" }
                    th { "Memory" } th { "Arch" } th { "Virtualization" } th { "Address" } th { "Last report" }
                } }
                tbody {
                    @for c in list_ {
                        tr.cluster data-cluster=(c.cluster_name) {
                            td { strong { (c.cluster_name) } br; span.muted { code { (c.cluster_id) } } }
                            td { span.state.(if c.active { "ok" } else { "bad" }) { (if c.active { "active" } else { "inactive" }) } }
                            td { (if c.cluster_location.is_empty() { "—" } else { &c.cluster_location }) }
                            td.workers { (c.active_nodes) }
                            td.cpu { (c.total_cpu_cores) " cores, " (format!("{:.1}", c.aggregated_cpu_percent)) " % used" }
                            td.memory {
                                (c.memory_in_mb.saturating_sub(c.free_memory_in_mb)) " / " (c.memory_in_mb) " MiB used"
                            }
                            td { (list(&c.arch)) }
                            td { (list(&c.virtualization)) }
                            td { code { (c.ip) } }
                            td { (ago(c.last_modified_timestamp)) }
                        }
                    }
                }
            }
        }
        h2 { "Map" }
        (geo::map_svg(&points))
        @if !unplaced.is_empty() {
            p.muted {
                "Not on the map (location is not \"lat,lon[,radius]\"): "
                @for (i, c) in unplaced.iter().enumerate() {
                    @if i > 0 { ", " }
                    (c.cluster_name)
                }
            }
        }
    }
}

/// Every application with its services and their states.
pub fn applications(apps: &[Application], services: &[Service]) -> Markup {
    html! {
        @if apps.is_empty() {
            p #no-applications { "No applications yet. " a href="/applications/new" { "Create one from an SLA." } }
        } @else {
            table #applications {
                thead { tr { th { "Application" } th { "Namespace" } th { "Description" } th { "Services" } } }
                tbody {
                    @for a in apps {
                        tr.application data-application=(a.application_name) {
                            td { a href={ "/applications/" (a.id) } { strong { (a.application_name) } } }
                            td { (a.application_namespace) }
                            td { (a.application_desc) }
                            td {
                                @for s in services.iter().filter(|s| s.application_id == a.id) {
                                    div {
                                        (s.microservice_name) " "
                                        span.state.(state_class(&s.status)) { (s.status) }
                                        " " span.muted { (s.instance_list.len()) " instance(s)" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One application's page: its actions and the live part with its services.
pub fn application(app: &Application, services: &[Service]) -> Markup {
    html! {
        p.muted {
            "Namespace " code { (app.application_namespace) } " · id " code { (app.id) }
            @if !app.application_desc.is_empty() { " · " (app.application_desc) }
        }
        div.actions {
            button.danger #delete-application hx-post={ "/applications/" (app.id) "/delete" } hx-swap="none"
                hx-confirm={ "Delete application " (app.application_name) ", its services and all their instances?" } {
                "Delete application"
            }
        }
        (note(None, false))
        (live(&format!("/applications/{}/live", app.id), services_live(&app.id, services)))
    }
}

/// The services of an application with their instances' live states.
pub fn services_live(app_id: &str, services: &[Service]) -> Markup {
    html! {
        @if services.is_empty() { p #no-services { "This application has no services." } }
        @for s in services {
            @let base = format!("/applications/{app_id}/services/{}", s.id);
            div.card.service data-service=(s.microservice_name) {
                h2 {
                    (s.microservice_name)
                    span.state.(state_class(&s.status)) { (s.status) }
                }
                p.muted {
                    code { (s.image) } " · " (s.virtualization) " · memory " (s.memory) " MB · vcpus " (s.vcpus)
                    @if !s.cmd.is_empty() { " · cmd " code { (s.cmd.join(" ")) } }
                }
                div.actions {
                    button.deploy hx-post={ (base) "/deploy" } hx-target="#live"
                        hx-confirm={ "Deploy one more instance of " (s.microservice_name) "?" } { "Deploy an instance" }
                    button.danger.delete-service hx-post={ (base) "/delete" } hx-target="#live"
                        hx-confirm={ "Delete service " (s.microservice_name) " and undeploy all its instances?" } {
                        "Delete service"
                    }
                }
                @if s.instance_list.is_empty() {
                    p.muted.no-instances { "No instances." }
                } @else {
                    table.instances {
                        thead { tr {
                            th { "#" } th { "State" } th { "Reason" } th { "Worker" } th { "Cluster" }
                            th { "Overlay address" } th { "" }
                        } }
                        tbody { @for i in &s.instance_list { (instance_row(&base, s, i)) } }
                    }
                }
            }
        }
    }
}

fn instance_row(base: &str, s: &Service, i: &Instance) -> Markup {
    let n = i.instance_number;
    html! {
        tr.instance data-instance=(n) {
            td { (n) }
            td { span.state.(state_class(&i.status)) { (i.status) } }
            td.reason {
                (i.status_detail)
                @if let Some(code) = i.exit_code { " (exit code " (code) ")" }
            }
            td { (i.node_name) }
            td { (i.cluster_name) }
            td { code { (i.ns_address) } }
            td {
                div.actions {
                    a href={ (base) "/instances/" (n) } { "details" }
                    @if i.undeploying {
                        span.muted { "undeploying" }
                    } @else {
                        button.danger.undeploy hx-post={ (base) "/instances/" (n) "/undeploy" } hx-target="#live"
                            hx-confirm={ "Undeploy instance " (n) " of " (s.microservice_name) "?" } { "Undeploy" }
                    }
                }
            }
        }
    }
}

/// One instance: where it runs, why it is in its state, and its output.
pub fn instance(s: &Service, i: &Instance) -> Markup {
    html! {
        table #instance {
            tbody {
                tr { th { "Service" } td { (s.microservice_name) " (" (s.app_name) ")" } }
                tr { th { "State" } td { span.state.(state_class(&i.status)) { (i.status) } } }
                tr { th { "Reason" } td.reason { (i.status_detail) } }
                tr { th { "Exit code" } td { @if let Some(c) = i.exit_code { (c) } @else { "—" } } }
                tr { th { "Worker" } td { (i.node_name) } }
                tr { th { "Cluster" } td { (i.cluster_name) } }
                tr { th { "Overlay address" } td { code { (i.ns_address) } } }
                tr { th { "Public address" } td { code { (i.publicip) } } }
            }
        }
        h2 { "Output" }
        p.muted { "The end of the instance's output as of its last state change (the root keeps no live stream)." }
        @if i.logs.is_empty() { p.muted #no-logs { "No output recorded." } }
        @else { pre.logs #logs { (i.logs) } }
    }
}

/// The SLA editor: the document (pasted, or loaded from a file into the text area) and, beside it, the
/// root's answer when it refused the SLA, with the field it names.
pub fn editor(text: &str, error: Option<&ApiFailure>) -> Markup {
    html! {
        div.editor {
            form method="post" action="/applications/new" {
                label for="sla" { "SLA (JSON, Oakestra's sla_version v2.0)" }
                textarea #sla name="sla" spellcheck="false" required
                    placeholder=r#"{"sla_version": "v2.0", "customerID": "Admin", "applications": [...]}"# { (text) }
                div.actions {
                    button #create type="submit" { "Create application" }
                    label.muted for="sla-file" { "or load a file: " }
                    input #sla-file type="file" accept=".json,application/json";
                }
            }
            div {
                @if let Some(e) = error {
                    div #sla-error {
                        p { strong { "The root refused this SLA:" } }
                        (failure(e))
                    }
                } @else {
                    p.muted {
                        "The SLA is checked by the root; if it refuses it, its message, naming the field at "
                        "fault, is shown here. Creating an application does not deploy it: deploy instances "
                        "from the application's page."
                    }
                }
            }
        }
    }
}
