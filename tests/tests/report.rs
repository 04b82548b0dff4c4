//! The job report page: `nightshift report` writes it for an embedded run (succeeded or
//! failed), and the coordinator serves it for a cluster's job, with its progress while it
//! runs. Every page is parsed by html5lib in strict mode (`tests/py/check_report.py`): it
//! must be valid HTML5 and show the job's stages, tasks and checks; a sample row holding
//! markup stays text.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::{ClusterOptions, ClusterSandbox, ClusterStorage, http_get_with};
use nightshift_tests::{Sandbox, check_report_page};
use serde_json::Value;

/// Accounts whose odd row has markup in its status: the page must show it as text.
const ACCOUNTS: &str = "id,status,balance\n\
     1,open,10\n\
     2,open,0\n\
     3,closed,5\n\
     4,<b>frozen</b>,-7\n\
     5,open,3\n";

fn spec(data: &Path, checks: &str) -> String {
    format!(
        r#"[pipeline]
name = "accounts"

[[source]]
name = "accounts"
format = "csv"
location = "{data}"

[transform]
sql = "SELECT status, count(*) AS accounts, sum(balance) AS total FROM accounts GROUP BY status"

[target]
table = "tests.by_status"

[[check]]
name = "known_status"
type = "accepted_values"
columns = ["status"]
values = ["open", "closed"]
severity = "warn"
{checks}
"#,
        data = data.display()
    )
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The stage graph, the timeline and the checks of a two-stage run of `spec`.
fn assert_shows_the_run(seen: &Value, job: &str, status: &str) {
    assert_eq!(seen["title"], format!("Job {job} — {status}"), "{seen:#}");
    assert_eq!(
        strings(&seen["headings"]),
        ["Stages", "Tasks", "Checks", "Lineage", "SQL"]
    );
    let boxes = strings(&seen["stage_boxes"]);
    assert_eq!(boxes.len(), 2, "{seen:#}");
    assert!(boxes[0].starts_with("stage 1: ") && boxes[0].contains("AggregateExec"));
    assert!(
        boxes[1].starts_with("stage 2 · writes the table: ")
            && boxes[1].contains("mode=FinalPartitioned")
    );
    // Stage 1 scans one file (one task), stage 2 has two partitions.
    let bars = strings(&seen["task_bars"]);
    assert!(
        bars.iter()
            .filter(|b| b.starts_with("stage 1 task 0 attempt 1 (won)"))
            .count()
            == 1
            && bars.iter().filter(|b| b.starts_with("stage 2 ")).count() == 2,
        "{bars:#?}"
    );
    let checks = &seen["checks"][0];
    assert_eq!(checks[0], "known_status", "{seen:#}");
    assert_eq!(checks[1], "warn", "{seen:#}");
    assert_eq!(checks[2], "1", "{seen:#}");
    // The sample's markup is text, not an element.
    assert!(
        checks[3].as_str().unwrap().contains("<b>frozen</b>"),
        "{seen:#}"
    );
    assert!(
        !strings(&seen["bold"]).iter().any(|b| b.contains("frozen")),
        "{seen:#}"
    );
    assert!(!strings(&seen["tags"]).contains(&"script".to_string()));
    let text = seen["text"].as_str().unwrap();
    assert!(text.contains("files=1"), "the lineage shows the input");
}

fn run(sandbox: &Sandbox, job: &str) -> std::process::Output {
    sandbox.cli(&[
        "run",
        "pipeline.toml",
        "--job-id",
        job,
        "--staged",
        "--partitions",
        "2",
    ])
}

#[test]
fn nightshift_report_draws_an_embedded_run_succeeded_or_failed() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);

    // Before any run there is nothing to report, and it says so.
    let out = sandbox.cli(&["report", "--last"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job has run with this warehouse"));

    sandbox.spec(&spec(&data, ""));
    let out = run(&sandbox, "report-ok");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sandbox.cli(&["report", "--last", "--out", "last.html"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "report of job report-ok (succeeded) written to last.html\n"
    );
    let page = std::fs::read_to_string(sandbox.path("last.html")).unwrap();
    let seen = check_report_page(&page);
    assert_shows_the_run(&seen, "report-ok", "succeeded");

    // A failed error check: the page says why, and shows the checks that failed.
    sandbox.spec(&spec(
        &data,
        "[[check]]\nname = \"enough\"\ntype = \"row_count\"\nmin = 10\n",
    ));
    let out = run(&sandbox, "report-failed");
    assert_eq!(out.status.code(), Some(1));
    let out = sandbox.cli(&["report", "report-failed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(sandbox.path("report-report-failed.html")).unwrap();
    let seen = check_report_page(&page);
    assert_shows_the_run(&seen, "report-failed", "failed");
    assert!(
        seen["text"].as_str().unwrap().contains("Why it failed"),
        "{seen:#}"
    );
    let enough = &seen["checks"][1];
    assert_eq!(enough[0], "enough", "{seen:#}");
    assert_eq!(enough[1], "failed", "{seen:#}");

    // The earlier job is still there by its id; an unknown one is an error.
    assert!(sandbox.cli(&["report", "report-ok"]).status.success());
    let out = sandbox.cli(&["report", "no-such-job"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no record of that job"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_the_page_while_and_after_the_job_runs() {
    let cluster = ClusterSandbox::start_with(
        ClusterStorage::LocalWithPostgres,
        ClusterOptions {
            workers: 2,
            env: &[
                ("FAILPOINTS", "worker-task-delay=return(1500)"),
                ("NIGHTSHIFT_METRICS_LISTEN", "127.0.0.1:0"),
            ],
            ..ClusterOptions::default()
        },
    );
    let admin = cluster
        .admin_addr(&cluster.coordinator_log_name(), Duration::from_secs(60))
        .expect("the coordinator's admin endpoint");
    let data = cluster.sandbox.write("data/accounts.csv", ACCOUNTS);
    cluster.sandbox.spec(&spec(&data, "").replace(
        "[target]",
        "[execution]\nshuffle_partitions = 2\n\n[target]",
    ));
    let path = "/jobs/report-cluster/report";
    let token = format!("Bearer {}", cluster.api_token);
    let authorized = [("Authorization", token.as_str())];

    let mut client = cluster.submit_in_background("report-cluster");
    // While it runs: the progress page, only with the API's token.
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let (status, body) = http_get_with(&admin, path, &authorized).unwrap();
        if status == 200 && body.contains("reloads every 5 s") && body.contains("stage 1") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no progress page: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let seen = check_report_page(&progress);
    assert!(
        seen["title"]
            .as_str()
            .unwrap()
            .starts_with("Job report-cluster — "),
        "{seen:#}"
    );
    let (status, _) = http_get_with(&admin, path, &[]).unwrap();
    assert_eq!(status, 401);
    let (status, _) = http_get_with(&admin, path, &[("Authorization", "Bearer wrong")]).unwrap();
    assert_eq!(status, 401);

    let outcome = cluster.wait_for_outcome(&mut client);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let (status, body) = http_get_with(&admin, path, &authorized).unwrap();
        if status == 200 && body.contains("<h2>Tasks</h2>") {
            break body;
        }
        assert!(Instant::now() < deadline, "no report page: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let seen = check_report_page(&page);
    assert_shows_the_run(&seen, "report-cluster", "succeeded");
    // Two workers ran the tasks.
    let workers: std::collections::BTreeSet<String> = strings(&seen["task_bars"])
        .iter()
        .filter_map(|b| {
            b.split(" on ")
                .nth(1)?
                .split(':')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert!(!workers.is_empty(), "{seen:#}");
    assert_eq!(
        http_get_with(&admin, "/jobs/no-such-job/report", &authorized)
            .unwrap()
            .0,
        404
    );

    // `nightshift report --cluster` writes the same page from the record in Redis.
    let out = cluster.sandbox.cli(&[
        "report",
        "report-cluster",
        "--cluster",
        &cluster.config.display().to_string(),
        "--out",
        "cluster.html",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(cluster.sandbox.path("cluster.html")).unwrap();
    assert_shows_the_run(&check_report_page(&written), "report-cluster", "succeeded");
}
