//! The pages and the fragments htmx swaps into them. maud escapes every value it writes, so names,
//! messages and logs from the root are shown as text, never as markup.

use maud::{html, Markup, DOCTYPE};

use crate::assets;
use crate::charts::bytes;
use crate::counters;
use crate::geo::{self, MapPoint};
use crate::model::{state_class, Application, Cluster, Instance, Logs, Service, Worker};
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
                            a href="/network" { "Network" }
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
                            td {
                                a.cluster-link href={ "/clusters/" (c.cluster_id) } { strong { (c.cluster_name) } }
                                br; span.muted { code { (c.cluster_id) } }
                            }
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
                    @let active = s.instance_list.iter().filter(|i| !i.undeploying).count();
                    form.scale hx-post={ (base) "/scale" } hx-target="#live" data-service-name=(s.microservice_name) {
                        label { "Scale to "
                            // kept as typed while the list around it refreshes
                            input #{ "scale-" (s.id) } type="number" name="instances" min="0"
                                max=(crate::scale::MAX_INSTANCES) value=(active) required hx-preserve;
                            " instances " }
                        button.scale type="submit" { "Scale" }
                    }
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

/// One instance: where it runs, why it is in its state, and its use over time.
pub fn instance(s: &Service, i: &Instance, usage: Markup) -> Markup {
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
                tr { th { "Service IPs" } td {
                    "round-robin " code { (or_dash(&s.addresses.rr_ip)) } ", closest " code { (or_dash(&s.addresses.closest_ip)) }
                } }
                tr { th { "Public address" } td { code { (i.publicip) } } }
            }
        }
        div.charts { (usage) }
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

/// Worker details come only to the Admin (the root answers 403 to anyone else): say so, or show the failure.
fn workers_failure(e: &ApiFailure) -> Markup {
    html! {
        @if e.status() == Some(403) {
            p.muted #workers-admin-only {
                "Worker details (each worker's resources, address and overlay) are for the Admin; "
                "the root answered: " (e.to_string())
            }
        } @else {
            (failure(e))
        }
    }
}

/// A worker's datapath in words, with the root's own name kept in `data-datapath`.
fn datapath(w: &Worker) -> Markup {
    let (raw, words) = match w.network.as_ref().map(|n| n.datapath.as_str()) {
        Some("ebpf") => ("ebpf", "eBPF (fast path; tun for the rest)"),
        Some("tun") => ("tun", "tun"),
        Some("none") => ("none", "none (overlay off)"),
        Some(other) => (other, other),
        None => ("", "no NetManager"),
    };
    html! { span.datapath data-datapath=(raw) { (words) } }
}

/// One cluster's live part: its aggregate, its CPU and memory over time, its workers and their throughput.
pub fn cluster_live(
    c: &Cluster,
    workers: &Result<Vec<Worker>, ApiFailure>,
    usage: Markup,
    throughput: Markup,
) -> Markup {
    html! {
        p #cluster-summary {
            span.state.(if c.active { "ok" } else { "bad" }) { (if c.active { "active" } else { "inactive" }) }
            " · " (c.active_nodes) " active worker(s) · " (c.total_cpu_cores) " cores, "
            (format!("{:.1}", c.aggregated_cpu_percent)) " % used · "
            (c.memory_in_mb.saturating_sub(c.free_memory_in_mb)) " / " (c.memory_in_mb) " MiB used · last report "
            (ago(c.last_modified_timestamp))
        }
        div.charts { (usage) (throughput) }
        h2 { "Workers" }
        @match workers {
            Err(e) => { (workers_failure(e)) }
            Ok(ws) if ws.is_empty() => { p.muted #no-workers { "No worker." } }
            Ok(ws) => {
                table #workers {
                    thead { tr {
                        th { "Worker" } th { "State" } th { "CPU" } th { "Memory" } th { "Disk free" } th { "Arch" }
                        th { "Virtualization" } th { "Datapath" } th { "Overlay subnet" } th { "Address" }
                        th { "Reserved" }
                    } }
                    tbody {
                        @for w in ws {
                            tr.worker data-worker=(w.node_name) {
                                td { strong { (w.node_name) } br; span.muted { code { (w.node_id) } } }
                                td.state {
                                    @if w.state == "lost" {
                                        span.state.bad { "lost" } br;
                                        span.muted { "silent since " (ago(w.last_report_ms as f64 / 1000.0)) }
                                    } @else {
                                        span.state.ok { (w.state) }
                                    }
                                }
                                td.cpu { (w.cpu_cores) " cores, " (format!("{:.1}", w.cpu_percent)) " % used" }
                                td.memory {
                                    (w.memory_total_mb.saturating_sub(w.memory_free_mb)) " / " (w.memory_total_mb) " MiB used"
                                }
                                td { (w.disk_free_mb) " MiB" }
                                td.arch { (w.arch) }
                                td { (list(&w.virtualization)) }
                                td { (datapath(w)) }
                                td.subnet { code { (w.network.as_ref().map(|n| n.subnet.as_str()).unwrap_or("—")) } }
                                td.address { code { (w.address) } }
                                td { (format!("{:.2}", w.reserved_cpu)) " vcpus, " (w.reserved_memory_mb) " MiB" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The network view's live part: the service IPs with the instances behind them, then each worker's
/// datapath and counters, so one sees which path carries the traffic.
pub fn network(
    services: &[Service],
    workers: &Result<Vec<(String, Worker)>, ApiFailure>,
    throughput: Markup,
) -> Markup {
    let worker_of = |name: &str| workers.as_ref().ok().and_then(|ws| ws.iter().find(|(_, w)| w.node_name == name));
    html! {
        h2 { "Service IPs" }
        @if services.is_empty() {
            p.muted #no-services { "No services." }
        } @else {
            table #service-ips {
                thead { tr {
                    th { "Service" } th { "Round-robin IP" } th { "Closest IP" }
                    th { "Instances (overlay address, worker, datapath)" }
                } }
                tbody {
                    @for s in services {
                        tr.service-ip data-service=(s.microservice_name) {
                            td {
                                a href={ "/applications/" (s.application_id) } { strong { (s.microservice_name) } }
                                br; span.muted { (s.app_name) }
                            }
                            td.rr-ip { code { (or_dash(&s.addresses.rr_ip)) } }
                            td.closest-ip { code { (or_dash(&s.addresses.closest_ip)) } }
                            td.instances {
                                @if s.instance_list.is_empty() { span.muted { "no instances" } }
                                @for i in &s.instance_list {
                                    div.instance data-instance=(i.instance_number) {
                                        "#" (i.instance_number) " "
                                        code.ns-address { (or_dash(&i.ns_address)) } " on "
                                        span.node { (or_dash(&i.node_name)) }
                                        @if let Some((_, w)) = worker_of(&i.node_name) { " · " (datapath(w)) }
                                        " " span.state.(state_class(&i.status)) { (i.status) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Workers" }
        @match workers {
            Err(e) => { (workers_failure(e)) }
            Ok(ws) if ws.is_empty() => { p.muted #no-workers { "No worker." } }
            Ok(ws) => {
                div.charts { (throughput) }
                div.workers {
                    @for (cluster, w) in ws {
                        div.card.worker-net data-worker=(w.node_name) {
                            h3 { (w.node_name) span.muted { " in " (cluster) } }
                            @match &w.network {
                                None => { p.muted { "No NetManager reports for this worker." } }
                                Some(n) => {
                                    p {
                                        "Datapath " (datapath(w)) " · subnet " code.subnet { (or_dash(&n.subnet)) }
                                        " · tunnel endpoint " code { (or_dash(&n.tunnel_endpoint)) }
                                    }
                                    p.carried {
                                        "Carried so far: eBPF fast path " strong.ebpf-bytes { (bytes(n.ebpf_bytes() as f64)) }
                                        ", tun path " strong.tun-bytes { (bytes(n.tun_bytes() as f64)) }
                                    }
                                    @let groups = counters::grouped(&n.counters);
                                    @if groups.is_empty() { p.muted.no-counters { "No packets counted yet." } }
                                    div.counter-groups {
                                        @for (group, rows) in &groups {
                                            table.counters data-group=(group) {
                                                thead { tr { th colspan="2" { (group) } } }
                                                tbody {
                                                    @for (key, label, v) in rows {
                                                        tr data-counter=(key) {
                                                            td { (label) }
                                                            td.value {
                                                                @if counters::is_bytes(key) { (bytes(*v as f64)) }
                                                                @else { (v) }
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
                    }
                }
            }
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "—"
    } else {
        s
    }
}

/// The end of an instance's log and the element that asks for what follows: while following, it asks
/// every 2 s from `next` and is replaced by the new text and a new one of itself; the hidden offset is
/// what the Follow button starts from.
pub fn log_next(url: &str, next: u64, follow: bool, error: Option<&ApiFailure>) -> Markup {
    html! {
        @if follow {
            span #log-next hx-get={ (url) "?follow=1&offset=" (next) } hx-trigger=(POLL) hx-swap="outerHTML" {
                input #log-offset type="hidden" name="offset" value=(next);
                @if let Some(e) = error { span.log-error { "[log not available now: " (e.to_string()) "]" } }
            }
        } @else {
            span #log-next { input #log-offset type="hidden" name="offset" value=(next); }
        }
    }
}

/// Follow or stop following the log, without reloading the page (the answer swaps `#log-next`).
pub fn log_controls(url: &str, follow: bool, oob: bool) -> Markup {
    html! {
        div.actions #log-controls hx-swap-oob=[oob.then_some("true")] {
            @if follow {
                button #log-stop hx-get={ (url) "?follow=0&toggle=1" } hx-include="#log-offset"
                    hx-target="#log-next" hx-swap="outerHTML" { "Stop following" }
                span.muted #log-following { "following: new output is appended every 2 s" }
            } @else {
                button #log-follow hx-get={ (url) "?follow=1&toggle=1" } hx-include="#log-offset"
                    hx-target="#log-next" hx-swap="outerHTML" { "Follow" }
            }
        }
    }
}

/// The log part of an instance's page: the last part of its log now, or, when the worker cannot be asked,
/// why, and the output the instance had at its last state change.
pub fn instance_log(url: &str, i: &Instance, logs: &Result<Logs, ApiFailure>) -> Markup {
    html! {
        h2 { "Log" }
        @match logs {
            Ok(l) => {
                p.muted {
                    "stdout and stderr as the worker keeps them: "
                    @if l.offset > 0 { "the last " (bytes((l.next_offset - l.offset) as f64)) " of " (bytes(l.size as f64)) }
                    @else { (bytes(l.size as f64)) }
                    "."
                }
                (log_controls(url, false, false))
                pre.logs #log { (l.text) (log_next(url, l.next_offset, false, None)) }
            }
            Err(e) => {
                div #log-unavailable { (failure(e)) }
                p.muted { "The end of the instance's output as of its last state change:" }
                @if i.logs.is_empty() { p.muted #no-logs { "No output recorded." } }
                @else { pre.logs #logs { (i.logs) } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkerNetwork;

    #[test]
    fn log_text_is_escaped_and_the_poller_carries_the_next_offset() {
        let i = Instance::default();
        let logs = Ok(Logs {
            offset: 0,
            next_offset: 17,
            size: 17,
            text: "<script>x</script>\n".into(),
            ..Default::default()
        });
        let html = instance_log("/l", &i, &logs).into_string();
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;") && !html.contains("<script>"), "{html}");
        assert!(html.contains(r#"<input id="log-offset" type="hidden" name="offset" value="17">"#), "{html}");
        assert!(!html.contains("hx-trigger"), "no polling before Follow: {html}");
        let following = log_next("/l", 42, true, None).into_string();
        assert!(following.contains(r#"hx-get="/l?follow=1&amp;offset=42""#), "{following}");
        assert!(following.contains(r#"hx-trigger="every 2s""#) && following.contains(r#"hx-swap="outerHTML""#));
        let failed = ApiFailure::Answer { status: 503, message: "worker <w> is not connected".into(), field: None };
        let kept = log_next("/l", 42, true, Some(&failed)).into_string();
        assert!(kept.contains("offset=42") && kept.contains("worker &lt;w&gt; is not connected"), "{kept}");
    }

    #[test]
    fn workers_for_the_admin_only_and_their_datapath() {
        let c = Cluster { cluster_name: "doc".into(), active: true, ..Default::default() };
        let refused = Err(ApiFailure::Answer { status: 403, message: "Admin only".into(), field: None });
        let html = cluster_live(&c, &refused, html! {}, html! {}).into_string();
        assert!(html.contains(r#"id="workers-admin-only""#) && html.contains("Admin only"), "{html}");
        let w = Worker {
            node_name: "w1".into(),
            network: Some(WorkerNetwork {
                datapath: "ebpf".into(),
                subnet: "10.18.0.0/26".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // a worker its cluster lost: shown as lost, with how long it has been silent
        let lost = Worker {
            node_name: "w2".into(),
            state: "lost".into(),
            last_report_ms: (now_s() - 120) * 1000,
            ..Default::default()
        };
        let html = cluster_live(&c, &Ok(vec![w, lost]), html! {}, html! {}).into_string();
        assert!(html.contains(r#"data-datapath="ebpf""#) && html.contains("10.18.0.0/26"), "{html}");
        assert!(html.contains(r#"<span class="state bad">lost</span>"#), "{html}");
        assert!(html.contains("silent since 2 min ago"), "{html}");
    }
}
