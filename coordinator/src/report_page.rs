//! The job report: one self-contained HTML page (no script, no external file) drawn from a
//! [`RunRecord`] — the plan's stages as a graph with rows, bytes and time per stage, the task
//! timeline by worker, the checks with samples of failing rows, inputs → output lineage and
//! the snapshot. `nightshift report` writes it; the coordinator serves it (and a progress
//! page while the job runs). Every value is escaped (`maud`): sample rows are data, and data
//! may hold markup.

use std::collections::{BTreeMap, BTreeSet};

use maud::{DOCTYPE, Markup, PreEscaped, html};
use nightshift_core::checks::CheckResult;

use crate::StageCount;
use crate::job::record::{RunRecord, StageSummary, TaskSpan};

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px;overflow-x:auto}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.fact b{display:block;font-size:12px;color:#5b6475;font-weight:500}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:13px}
.succeeded,.passed{background:#dcf5e3;color:#145c2c}.failed{background:#fde2e1;color:#8a1c16}
.cancelled,.warn,.quarantined{background:#fff1d6;color:#7a4b00}.running,.queued,.committing{background:#e1ecfd;color:#1b4a91}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:6px 8px;border-bottom:1px solid #eceff3;vertical-align:top}
th{font-size:12px;color:#5b6475;font-weight:600}
pre,code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}pre{white-space:pre-wrap;margin:6px 0}
.error{border-left:4px solid #c4302b}.num{text-align:right;font-variant-numeric:tabular-nums}
.flow{display:flex;align-items:center;gap:18px;flex-wrap:wrap}.flow ul{margin:0;padding-left:18px}
.arrow{font-size:26px;color:#8a93a3}.muted{color:#5b6475}
"#;

/// Colours of the stages in the graph and the timeline, in turn.
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#e15759", "#9c755f",
];

fn colour(stage: u32) -> &'static str {
    PALETTE[stage as usize % PALETTE.len()]
}

/// The page of an ended job.
pub fn render(record: &RunRecord) -> String {
    let report = &record.report;
    let title = format!("Job {} — {}", report.job_id, record.status);
    page(
        &title,
        None,
        html! {
            h1 { "Job " code { (report.job_id) } " " span class={"badge " (record.status)} { (record.status) } }
            p class="muted" { "pipeline " b { (report.pipeline) } " → " b { (report.table) } " · started " (utc(record.started_at_ms)) }
            @if let Some(error) = &record.error {
                div class="card error" { b { "Why it failed" } pre { (error) } }
            }
            (facts(record))
            h2 { "Stages" }
            div class="card" { (stage_graph(&record.stages)) (stage_table(&record.stages)) }
            h2 { "Tasks" }
            div class="card" { (timeline(&record.timeline)) }
            h2 { "Checks" }
            div class="card" { (checks(&report.checks)) }
            h2 { "Lineage" }
            div class="card" { (lineage(record)) }
            @if !record.sql.is_empty() {
                h2 { "SQL" }
                div class="card" { pre { (record.sql) } }
            }
        },
    )
}

/// The page of a job still queued or running: its state and each stage's progress. It
/// reloads itself every five seconds.
pub fn render_progress(job_id: &str, pipeline: &str, state: &str, stages: &[StageCount]) -> String {
    page(
        &format!("Job {job_id} — {state}"),
        Some(5),
        html! {
            h1 { "Job " code { (job_id) } " " span class={"badge " (state)} { (state) } }
            p class="muted" { "pipeline " b { (pipeline) } " · this page reloads every 5 s; the full report appears when the job ends" }
            div class="card" {
                @if stages.is_empty() { p { "Not planned yet." } }
                table {
                    @for stage in stages {
                        tr {
                            td { "stage " (stage.stage) }
                            td { progress max=(stage.total) value=(stage.done) { (stage.done) "/" (stage.total) } }
                            td class="num" { (stage.done) " / " (stage.total) " tasks" }
                        }
                    }
                }
            }
        },
    )
}

fn page(title: &str, refresh_secs: Option<u32>, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(secs) = refresh_secs { meta http-equiv="refresh" content=(secs); }
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { main { (body) } }
        }
    }
    .into_string()
}

fn facts(record: &RunRecord) -> Markup {
    let r = &record.report;
    let snapshot = match (r.snapshot_id, r.already_committed) {
        (Some(id), true) => format!("{id} (committed earlier)"),
        (Some(id), false) => id.to_string(),
        (None, _) => "none".to_string(),
    };
    html! {
        div class="card facts" {
            div class="fact" { b { "snapshot" } (snapshot) }
            div class="fact" { b { "mode" } (r.mode) }
            div class="fact" {
                b { @if record.status == "succeeded" { "rows published" } @else { "rows written, not published" } }
                (r.rows)
            }
            @if r.rejected_rows > 0 || r.rejects_snapshot_id.is_some() {
                div class="fact" { b { "rows quarantined" } (r.rejected_rows) " → " (nightshift_spec::rejects_table(&r.table)) }
            }
            div class="fact" { b { "data files" } (r.files) " (" (bytes(r.bytes)) ")" }
            div class="fact" { b { "stages · tasks" } (r.stages) " · " (r.tasks) }
            div class="fact" { b { "duration" } (seconds(r.duration_ms)) }
        }
    }
}

/// Each stage's column: one more than the deepest stage it reads.
fn depths(stages: &[StageSummary]) -> BTreeMap<u32, usize> {
    let mut depth = BTreeMap::new();
    // Stages come in dependency order; a stage naming an unknown upstream sits at 0.
    for stage in stages {
        let d = stage
            .upstream
            .iter()
            .filter_map(|u| depth.get(u))
            .map(|d| d + 1)
            .max()
            .unwrap_or(0);
        depth.insert(stage.stage, d);
    }
    depth
}

const BOX_W: usize = 240;
const BOX_H: usize = 84;
const GAP_X: usize = 70;
const GAP_Y: usize = 22;

/// The stages as boxes in columns by depth, an arrow from each stage to the stages reading it.
fn stage_graph(stages: &[StageSummary]) -> Markup {
    if stages.is_empty() {
        return html! { p class="muted" { "No stage ran (the job ended before planning, or was committed before)." } };
    }
    let depth = depths(stages);
    let mut row_in_column: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for stage in stages {
        let column = depth[&stage.stage];
        let row = row_in_column.entry(column).or_default();
        at.insert(
            stage.stage,
            (10 + column * (BOX_W + GAP_X), 10 + *row * (BOX_H + GAP_Y)),
        );
        *row += 1;
    }
    let width = at.values().map(|(x, _)| x + BOX_W + 10).max().unwrap_or(0);
    let height = at.values().map(|(_, y)| y + BOX_H + 10).max().unwrap_or(0);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} role="img" aria-label="stage graph" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto" {
                    path d="M0,0 L10,5 L0,10 z" fill="#8a93a3" {}
                }
            }
            @for stage in stages {
                @for upstream in &stage.upstream {
                    @if let (Some((fx, fy)), Some((tx, ty))) = (at.get(upstream), at.get(&stage.stage)) {
                        line x1=(fx + BOX_W) y1=(fy + BOX_H / 2) x2=(tx) y2=(ty + BOX_H / 2) stroke="#8a93a3" stroke-width="1.5" marker-end="url(#arrow)" {}
                    }
                }
            }
            @for stage in stages {
                @let (x, y) = at[&stage.stage];
                g {
                    title { "stage " (stage.stage) (stage_role(stage)) ": " (stage.operators.join("\n")) }
                    rect x=(x) y=(y) width=(BOX_W) height=(BOX_H) rx="6" fill="#fff" stroke=(colour(stage.stage)) stroke-width="2" {}
                    rect x=(x) y=(y) width="6" height=(BOX_H) fill=(colour(stage.stage)) {}
                    text x=(x + 14) y=(y + 20) font-weight="600" font-size="13" {
                        "stage " (stage.stage) (stage_role(stage))
                    }
                    text x=(x + 14) y=(y + 38) font-size="12" fill="#5b6475" {
                        (stage.tasks_done) "/" (stage.tasks) " tasks · " (stage_time(stage))
                    }
                    text x=(x + 14) y=(y + 55) font-size="12" {
                        (stage.rows) " rows · " (bytes(stage.bytes))
                    }
                    text x=(x + 14) y=(y + 72) font-size="11" fill="#5b6475" {
                        (short(&short_operators(&stage.operators), 38))
                    }
                }
            }
        }
    }
}

/// What a stage is for, after its number: writing the table, or a check's query.
fn stage_role(stage: &StageSummary) -> String {
    match (&stage.check, stage.is_final) {
        (Some(check), _) => format!(" · check {}", short(check, 18)),
        (None, true) => " · writes the table".to_string(),
        (None, false) => String::new(),
    }
}

fn stage_table(stages: &[StageSummary]) -> Markup {
    html! {
        table {
            tr { th { "stage" } th { "reads" } th class="num" { "tasks" } th class="num" { "rows" } th class="num" { "bytes" } th class="num" { "time" } th class="num" { "other attempts" } th { "plan" } }
            @for stage in stages {
                tr {
                    td { (stage.stage) @if let Some(check) = &stage.check { " (check " code { (check) } ")" } }
                    td { @if stage.upstream.is_empty() { "sources" } @else { (stage.upstream.iter().map(|u| format!("stage {u}")).collect::<Vec<_>>().join(", ")) } }
                    td class="num" { (stage.tasks_done) "/" (stage.tasks) }
                    td class="num" { (stage.rows) }
                    td class="num" { (bytes(stage.bytes)) }
                    td class="num" { (stage_time(stage)) }
                    td class="num" { (stage.other_attempts) }
                    td { details { summary { (short_operators(&stage.operators)) } pre { (stage.operators.join("\n")) } } }
                }
            }
        }
    }
}

/// The operator names of a stage's plan, top down, without their arguments, duplicates or
/// the shuffle writer at the root.
fn short_operators(lines: &[String]) -> String {
    let mut seen = BTreeSet::new();
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|line| line.trim().split([':', ' ']).next())
        .filter(|name| !name.is_empty() && !name.contains("ShuffleWriter"))
        .filter(|name| seen.insert(*name))
        .map(|name| match name.trim_end_matches("Exec") {
            // Placeholders the coordinator resolves to readers of the upstream output.
            "UnresolvedShuffle" | "ObjectStoreShuffleReader" => "ShuffleRead",
            other => other,
        })
        .take(4)
        .collect();
    names.join(" → ")
}

fn stage_time(stage: &StageSummary) -> String {
    match (stage.start_ms, stage.end_ms) {
        (Some(start), Some(end)) => seconds(end.saturating_sub(start)),
        _ => "—".to_string(),
    }
}

const LANE_H: usize = 22;
const TIMELINE_W: usize = 900;
const LABEL_W: usize = 130;

/// The attempts as bars on one lane per worker, along the job's time.
fn timeline(spans: &[TaskSpan]) -> Markup {
    if spans.is_empty() {
        return html! { p class="muted" { "No task reported." } };
    }
    let workers: BTreeSet<&str> = spans.iter().map(|s| s.worker.as_str()).collect();
    let lane: BTreeMap<&str, usize> = workers.iter().enumerate().map(|(i, w)| (*w, i)).collect();
    let end = spans.iter().map(|s| s.end_ms).max().unwrap_or(1).max(1);
    let x = |ms: u64| LABEL_W + (ms as f64 / end as f64 * TIMELINE_W as f64) as usize;
    let height = workers.len() * LANE_H + 30;
    let ticks: Vec<u64> = (0..=4).map(|i| end * i / 4).collect();
    let stages: BTreeSet<u32> = spans.iter().map(|s| s.stage).collect();
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(LABEL_W + TIMELINE_W + 20) height=(height) role="img" aria-label="task timeline" {
            @for (worker, i) in &lane {
                text x="0" y=(i * LANE_H + 15) font-size="11" fill="#5b6475" { (short(worker, 20)) }
            }
            @for tick in &ticks {
                line x1=(x(*tick)) y1="0" x2=(x(*tick)) y2=(height - 18) stroke="#eceff3" {}
                text x=(x(*tick)) y=(height - 4) font-size="10" fill="#5b6475" text-anchor="middle" { (seconds(*tick)) }
            }
            @for span in spans {
                @let lane_y = lane[span.worker.as_str()] * LANE_H + 3;
                @let left = x(span.start_ms);
                @let width = x(span.end_ms).saturating_sub(left).max(2);
                rect x=(left) y=(lane_y) width=(width) height=(LANE_H - 6) rx="3"
                    fill=(colour(span.stage)) fill-opacity=(if span.outcome == "won" { "0.9" } else { "0.35" })
                    stroke=(if span.outcome == "failed" { "#c4302b" } else { "none" }) stroke-width="2" {
                    title {
                        "stage " (span.stage) " task " (span.partition) " attempt " (span.attempt) " (" (span.outcome) ") on " (span.worker)
                        ": " (seconds(span.end_ms.saturating_sub(span.start_ms))) ", " (span.rows) " rows, " (bytes(span.bytes))
                        @if !span.error.is_empty() { " — " (span.error) }
                    }
                }
            }
        }
        p class="muted" {
            @for stage in &stages { span style={"color:" (colour(*stage))} { "■ " } "stage " (stage) "  " }
            " · faded: an attempt whose output was not used; red outline: failed. Times as the coordinator received the results."
        }
    }
}

fn checks(results: &[CheckResult]) -> Markup {
    if results.is_empty() {
        return html! { p class="muted" { "The pipeline declares no [[check]]." } };
    }
    html! {
        table {
            tr { th { "check" } th { "verdict" } th class="num" { "failing rows" } th { "what was found" } }
            @for check in results {
                @let verdict = if check.passed { "passed" } else if check.quarantined { "quarantined" } else if check.severity == "warn" { "warn" } else { "failed" };
                tr {
                    td { code { (check.name) } }
                    td { span class={"badge " (verdict)} { (verdict) } }
                    td class="num" { (check.failed_rows) }
                    td {
                        (check.detail)
                        @if !check.samples.is_empty() {
                            details { summary { "sample rows (" (check.samples.len()) ")" } @for sample in &check.samples { pre { (sample) } } }
                        }
                    }
                }
            }
        }
    }
}

/// Inputs → output, then what made the snapshot (code digest, git commit, parameters).
fn lineage(record: &RunRecord) -> Markup {
    let inputs: Vec<(&str, &str)> = record
        .lineage
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("nightshift.input.")?, v.as_str())))
        .collect();
    let other: Vec<(&String, &String)> = record
        .lineage
        .iter()
        .filter(|(k, _)| !k.starts_with("nightshift.input.") && !k.starts_with("nightshift.check."))
        .collect();
    let r = &record.report;
    html! {
        div class="flow" {
            div {
                b { "inputs" }
                ul { @for (name, what) in &inputs { li { code { (name) } " " span class="muted" { (what) } } } }
            }
            div class="arrow" { "→" }
            div {
                b { "output" }
                ul {
                    li { code { (r.table) } " snapshot " (r.snapshot_id.map_or("none".to_string(), |s| s.to_string())) }
                    @if let Some(id) = r.rejects_snapshot_id {
                        li { code { (nightshift_spec::rejects_table(&r.table)) } " snapshot " (id) }
                    }
                }
            }
        }
        table {
            @for (key, value) in &other { tr { td { code { (key) } } td { (value) } } }
        }
    }
}

fn short(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        text.to_string()
    } else {
        let cut: String = text.chars().take(chars - 1).collect();
        format!("{cut}…")
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

fn bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(id: u32, upstream: &[u32]) -> StageSummary {
        StageSummary {
            stage: id,
            upstream: upstream.to_vec(),
            tasks: 2,
            operators: vec![
                "ShuffleWriterExec: partitioning: Hash([a], 2)".into(),
                "  AggregateExec: mode=Partial".into(),
                "    DataSourceExec: file_groups={...}".into(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_stage_sits_one_column_right_of_the_deepest_it_reads() {
        let stages = [
            stage(1, &[]),
            stage(2, &[]),
            stage(3, &[1, 2]),
            stage(4, &[3, 1]),
        ];
        let depth = depths(&stages);
        assert_eq!(
            depth.into_iter().collect::<Vec<_>>(),
            [(1, 0), (2, 0), (3, 1), (4, 2)]
        );
    }

    #[test]
    fn operators_are_named_without_the_writer_or_arguments() {
        assert_eq!(
            short_operators(&stage(1, &[]).operators),
            "Aggregate → DataSource"
        );
        let reading = [
            "ShuffleWriterExec: x",
            "  HashJoinExec: y",
            "    UnresolvedShuffleExec: z",
        ];
        assert_eq!(
            short_operators(&reading.map(String::from)),
            "HashJoin → ShuffleRead"
        );
    }

    #[test]
    fn sizes_and_names_read_as_people_write_them() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(short("embedded-worker-1234567890", 10), "embedded-…");
        assert_eq!(seconds(1234), "1.23 s");
    }
}
