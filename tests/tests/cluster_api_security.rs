//! The job API as a careless or hostile client meets it: a coordinator whose `[access]`
//! policy allows one data directory and one namespace, asked to read around the policy
//! (encoded `..`, `sql_file`, symbolic links), to leak what it refuses, to accept an
//! oversize request, or to hand one idempotency key to two different requests.

use std::time::Duration;

use nightshift_proto::v1::{GetJobRequest, JobState, SubmitJobRequest};
use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};

/// A pipeline reading `location` (CSV) into `table`.
fn csv_spec(location: &str, table: &str) -> String {
    format!(
        r#"[pipeline]
name = "security_test"

[[source]]
name = "lines"
format = "csv"
location = "{location}"

[transform]
sql = "SELECT * FROM lines"

[target]
table = "{table}"
"#
    )
}

/// A coordinator allowed `<sandbox>/data/` and the `tests` namespace, with `workers` workers.
fn start(workers: usize, env: &[(&str, &str)]) -> ClusterSandbox {
    let mut cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 0, env);
    let data = cluster.sandbox.path("data");
    std::fs::create_dir_all(data.join("lines")).unwrap();
    std::fs::write(data.join("lines/a.csv"), "id,name\n1,one\n2,two\n").unwrap();
    cluster.kill_coordinator();
    cluster.add_env(
        "NIGHTSHIFT_ALLOWED_LOCATIONS",
        &format!("{}/", data.display()),
    );
    cluster.add_env("NIGHTSHIFT_ALLOWED_TABLES", "tests.*");
    cluster.start_coordinator();
    for _ in 0..workers {
        cluster.start_worker();
    }
    cluster
}

fn inline(spec: String) -> SubmitJobRequest {
    SubmitJobRequest {
        spec,
        ..Default::default()
    }
}

/// How many `..` it takes from `dir` to the root, so a traversal surely reaches `/etc`.
fn ups(dir: &std::path::Path) -> usize {
    dir.components().count() + 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_traversal_symlinks_and_sql_file_cannot_leave_the_allowed_locations() {
    let cluster = start(0, &[]);
    let data = cluster.sandbox.path("data");
    let d = data.display().to_string();
    let mut client = cluster.api_client().await;
    let n = ups(&data);
    // Links planted inside the allowed directory, pointing out of it.
    std::os::unix::fs::symlink("/etc", data.join("etc_link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("passwd.csv")).unwrap();
    std::fs::create_dir_all(data.join("mixed")).unwrap();
    std::fs::write(data.join("mixed/ok.csv"), "id,name\n3,three\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("mixed/zz.csv")).unwrap();
    let denied = [
        format!("file://{d}/{}etc/passwd", "..%2F".repeat(n)),
        format!("file://{d}/{}etc/passwd", "..%2f".repeat(n)),
        format!("file://{d}/{}etc/passwd", "%2E%2E%2F".repeat(n)),
        format!("file://{d}/{}etc/passwd", "%2e%2e/".repeat(n)),
        format!("file://{d}/{}etc/passwd", "..%252F".repeat(n)),
        format!("file://{d}/lines/%2E%2E/{}etc/passwd", "%2E%2E/".repeat(n)),
        format!("FILE://{d}/{}etc/passwd", "..%2F".repeat(n)),
        format!("{d}/etc_link/passwd"),
        format!("{d}/passwd.csv"),
        format!("{d}/etc_link/"),
        format!("{d}/mixed/"),
        format!("{d}/mixed/*.csv"),
        format!("{d}/*/passwd"),
    ];
    for location in &denied {
        let status = client
            .submit_job(inline(csv_spec(location, "tests.leak")))
            .await
            .expect_err(location);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{location}: {status:?}"
        );
        assert!(
            status.message().contains("allowed locations"),
            "{location}: {}",
            status.message()
        );
        assert!(!status.message().contains("root:"), "{}", status.message());
    }
    // Spelled oddly but inside: accepted.
    for location in [
        format!("{d}//lines/./a.csv"),
        format!("file://{d}/lines/%61.csv"),
        format!("{d}/lines/../lines/"),
    ] {
        let job = client
            .submit_job(inline(csv_spec(&location, "tests.ok")))
            .await
            .unwrap_or_else(|s| panic!("{location}: {s:?}"))
            .into_inner();
        assert!(job.created, "{location}");
        client
            .cancel_job(GetJobRequest { job_id: job.job_id })
            .await
            .unwrap();
    }
    // A spec by reference: an encoded `..` is refused as outside, not retried as unavailable.
    std::fs::write(
        data.join("p.toml"),
        csv_spec(&format!("{d}/lines/"), "tests.ref"),
    )
    .unwrap();
    let uri = format!("file://{d}/{}etc/passwd", "..%2F".repeat(n));
    let status = client
        .submit_job(SubmitJobRequest {
            spec_uri: uri.clone(),
            ..Default::default()
        })
        .await
        .expect_err(&uri);
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // `sql_file` names what the request carries, never a file of the coordinator's disk;
    // whatever the name, the message never quotes a file's contents.
    let with_sql_file = |file: &str| {
        csv_spec(&format!("{d}/lines/"), "tests.sql").replace(
            "sql = \"SELECT * FROM lines\"",
            &format!("sql_file = \"{file}\""),
        )
    };
    let outside_sql = cluster.sandbox.write("outside.sql", "SELECT 42 AS secret");
    for file in [
        outside_sql.display().to_string(),
        format!("{}etc/passwd", "../".repeat(n)),
        "/etc/passwd".to_string(),
        "%2E%2E/outside.sql".to_string(),
    ] {
        let status = client
            .submit_job(inline(with_sql_file(&file)))
            .await
            .expect_err(&file);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("was not sent with the spec"),
            "{file}: {}",
            status.message()
        );
        assert!(
            !status.message().contains("root") && !status.message().contains("42"),
            "{file}: {}",
            status.message()
        );
    }
    // Sent with the spec, under the name the spec gives: used, nothing read from disk.
    let mut sent = inline(with_sql_file("../../anywhere/t.sql"));
    sent.files
        .insert("../../anywhere/t.sql".into(), "SELECT * FROM lines".into());
    let job = client.submit_job(sent).await.unwrap().into_inner();
    assert!(job.created);
    client
        .cancel_job(GetJobRequest { job_id: job.job_id })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_redacted_sized_and_namespaces_are_not_nested() {
    let cluster = start(0, &[]);
    let data = cluster.sandbox.path("data");
    let d = data.display().to_string();
    let mut client = cluster.api_client().await;
    let secret = "hunter2-never-print";
    let status = client
        .submit_job(inline(csv_spec(
            &format!("s3://user:{secret}@lake/raw/x.csv"),
            "tests.t",
        )))
        .await
        .expect_err("outside");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        !status.message().contains(secret) && status.message().contains("***"),
        "{}",
        status.message()
    );
    // One limit, one code: just over the documented 1 MiB and far over it.
    for size in [(1 << 20) + 1024, 8 << 20] {
        let status = client
            .submit_job(inline("#".repeat(size)))
            .await
            .expect_err("too big");
        assert_eq!(
            status.code(),
            tonic::Code::ResourceExhausted,
            "{size}: {status:?}"
        );
        assert!(
            status.message().contains("1048576"),
            "{size}: {}",
            status.message()
        );
    }
    // `tests.*` is the tables of `tests`, not of namespaces below it.
    let lines = format!("{d}/lines/");
    let status = client
        .submit_job(inline(csv_spec(&lines, "tests.sub.t")))
        .await
        .expect_err("nested namespace");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("`tests.sub.t`"),
        "{}",
        status.message()
    );
    let job = client
        .submit_job(inline(csv_spec(&lines, "tests.flat")))
        .await
        .unwrap()
        .into_inner();
    client
        .cancel_job(GetJobRequest { job_id: job.job_id })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_bound_to_the_request_it_first_came_with() {
    // The first publish of a submission fails once: the key must not be left naming a job
    // that never runs.
    let cluster = start(1, &[("FAILPOINTS", "api-publish=1*return")]);
    let data = cluster.sandbox.path("data");
    let lines = format!("{}/lines/", data.display());
    let mut client = cluster.api_client().await;
    let request = |spec: String, params: &[(&str, &str)], key: &str| SubmitJobRequest {
        spec,
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        idempotency_key: key.to_string(),
        ..Default::default()
    };
    let spec = csv_spec(&lines, "tests.idem")
        .replace("[transform]", "[params]\nday = \"x\"\n\n[transform]");
    let first = client
        .submit_job(request(spec.clone(), &[("day", "1")], "nightly-1"))
        .await
        .expect_err("the injected publish failure");
    assert_eq!(first.code(), tonic::Code::Unavailable, "{first:?}");
    // The retry the client makes: accepted, queued and run.
    let retried = client
        .submit_job(request(spec.clone(), &[("day", "1")], "nightly-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.created, "{retried:?}");
    let again = client
        .submit_job(request(spec.clone(), &[("day", "1")], "nightly-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, retried.job_id);
    assert!(!again.created);
    // The same key with another spec, or other parameters: refused, naming the key.
    for (other, params) in [
        (
            spec.replace("tests.idem", "tests.idem_other"),
            vec![("day", "1")],
        ),
        (spec.clone(), vec![("day", "2")]),
    ] {
        let status = client
            .submit_job(request(other, &params, "nightly-1"))
            .await
            .expect_err("a different request under the key");
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
        assert!(
            status.message().contains("`nightly-1`") && status.message().contains(&retried.job_id),
            "{}",
            status.message()
        );
    }
    // The CLI says so and exits non-zero instead of following the other job.
    cluster
        .sandbox
        .spec(&spec.replace("tests.idem", "tests.idem_cli"));
    let out = cluster.api_command(&[
        "submit",
        "pipeline.toml",
        "--param",
        "day=1",
        "--idempotency-key",
        "nightly-1",
        "--wait",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("nightly-1"), "{stderr}");
    // The job behind the key ran once.
    let job = succeeded(&mut client, &retried.job_id, &cluster).await;
    assert_eq!(job.rows, 2, "{job:?}");
    // Redis loses everything of this cluster (flushed, restarted without persistence): the
    // same request again runs under the same job id, which the table knows as committed,
    // so its rows are not written twice (a new id used to be drawn, and every row doubled).
    let flushed = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{}*' | xargs -r redis-cli del",
            cluster.prefix
        ))
        .output()
        .expect("redis-cli");
    assert!(flushed.status.success(), "{flushed:?}");
    let after_flush = client
        .submit_job(request(spec.clone(), &[("day", "1")], "nightly-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after_flush.job_id, retried.job_id);
    succeeded(&mut client, &after_flush.job_id, &cluster).await;
    let read = cluster.read_table("tests.idem", None);
    assert_eq!(read["pyiceberg"]["rows"], 2, "{read:#}");
    assert_eq!(nightshift_tests::snapshot_count(&read), 1, "{read:#}");
}

/// Job `job_id` once it has succeeded; a failure fails the test with the cluster's logs.
async fn succeeded(
    client: &mut nightshift::client::ApiClient,
    job_id: &str,
    cluster: &ClusterSandbox,
) -> nightshift_proto::v1::Job {
    let job = finished(client, job_id, cluster).await;
    assert_eq!(
        job.state,
        JobState::Succeeded as i32,
        "{job:?}\n{}",
        cluster.logs()
    );
    job
}

/// Job `job_id` once it has succeeded or failed, polled through the API for at most two
/// minutes; the deadline fails the test with the cluster's logs.
async fn finished(
    client: &mut nightshift::client::ApiClient,
    job_id: &str,
    cluster: &ClusterSandbox,
) -> nightshift_proto::v1::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let job = client
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        if job.state == JobState::Succeeded as i32 || job.state == JobState::Failed as i32 {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{job:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A file admitted inside the allowed directory, and a directory, each swapped for a link out
/// of it after admission, before they are read: nothing outside is read (the planner's
/// schema inference on the coordinator and the worker's scan both open beneath the allowed
/// location), and each job fails saying a link leads out. Both used to read the file the
/// link led to and publish its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_swapped_for_a_link_after_admission_is_not_read() {
    let mut cluster = start(0, &[]);
    let data = cluster.sandbox.path("data");
    let outside = cluster.sandbox.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.csv"), "id,name\n99,secret\n").unwrap();
    std::fs::create_dir_all(data.join("swapped_dir")).unwrap();
    std::fs::write(data.join("swapped_dir/secret.csv"), "id,name\n5,five\n").unwrap();
    std::fs::write(data.join("swapped.csv"), "id,name\n6,six\n").unwrap();
    let d = data.display().to_string();
    let mut client = cluster.api_client().await;
    let mut jobs = Vec::new();
    for (location, table) in [
        (format!("{d}/swapped.csv"), "tests.swapped_file"),
        (format!("{d}/swapped_dir/"), "tests.swapped_dir"),
    ] {
        let job = client
            .submit_job(inline(csv_spec(&location, table)))
            .await
            .unwrap_or_else(|s| panic!("{location}: {s:?}"))
            .into_inner();
        jobs.push(job.job_id);
    }
    std::fs::remove_file(data.join("swapped.csv")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.csv"), data.join("swapped.csv")).unwrap();
    std::fs::remove_dir_all(data.join("swapped_dir")).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("swapped_dir")).unwrap();
    cluster.start_worker();
    for job_id in &jobs {
        let job = finished(&mut client, job_id, &cluster).await;
        assert_eq!(job.state, JobState::Failed as i32, "{job:?}");
        // A coordinator that takes the job after the swap refuses it at admission; one that
        // took it before, when the scan opens the file.
        assert!(
            job.error.contains("leads out of the allowed location")
                || job.error.contains("which is outside the allowed locations"),
            "{job:?}"
        );
        assert_eq!(job.rows, 0, "{job:?}");
    }
}

/// A job still queued when its source is swapped for a link out of the allowed directory is
/// refused when a coordinator takes it, and ends `failed`: it stayed `queued` for good, its
/// refusal only in its report. One job at a time (`--max-jobs 1`), so the second is taken
/// only after the first ends, and the first only ends once a worker starts, after the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_whose_source_is_swapped_out_fails_when_taken() {
    let mut cluster = start(0, &[]);
    cluster.kill_coordinator();
    cluster.coordinator_args = vec!["--max-jobs".into(), "1".into()];
    cluster.start_coordinator();
    let data = cluster.sandbox.path("data");
    let outside = cluster.sandbox.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.csv"), "id,name\n99,secret\n").unwrap();
    std::fs::write(data.join("later.csv"), "id,name\n6,six\n").unwrap();
    let d = data.display().to_string();
    let mut client = cluster.api_client().await;
    let mut submit = async |location: String, table: &str| {
        client
            .submit_job(inline(csv_spec(&location, table)))
            .await
            .unwrap_or_else(|s| panic!("{location}: {s:?}"))
            .into_inner()
            .job_id
    };
    let first = submit(format!("{d}/lines/"), "tests.first").await;
    let queued = submit(format!("{d}/later.csv"), "tests.queued").await;
    std::fs::remove_file(data.join("later.csv")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.csv"), data.join("later.csv")).unwrap();
    cluster.start_worker();
    succeeded(&mut client, &first, &cluster).await;
    let job = finished(&mut client, &queued, &cluster).await;
    assert_eq!(job.state, JobState::Failed as i32, "{job:?}");
    assert!(
        job.error.contains("outside the allowed locations")
            || job.error.contains("leads out of the allowed location"),
        "{job:?}"
    );
    assert_eq!(job.rows, 0, "{job:?}");
}

/// The ids `client` lists (the first page of up to 500).
async fn listed(client: &mut nightshift::client::ApiClient) -> std::collections::BTreeSet<String> {
    client
        .list_jobs(nightshift_proto::v1::ListJobsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_client_sees_cancels_and_keys_only_its_own_jobs() {
    let mut cluster = start(0, &[("NIGHTSHIFT_METRICS_LISTEN", "127.0.0.1:0")]);
    // Two clients whose names share a prefix, an operator, and the unnamed token.
    let secret = |who: &str| format!("tok-{who}-{}", cluster.prefix);
    let (alice_token, alice2_token, ops_token) = (secret("alice"), secret("alice2"), secret("ops"));
    cluster.kill_coordinator();
    cluster.more_api_tokens = vec![
        format!("alice {alice_token}"),
        format!("alice2 {alice2_token}"),
        format!("ops {ops_token} operator"),
    ];
    cluster.start_coordinator();
    cluster.start_worker();
    let mut shared = cluster.api_client().await;
    let mut alice = cluster.api_client_bearing(&alice_token).await;
    let mut alice2 = cluster.api_client_bearing(&alice2_token).await;
    let mut ops = cluster.api_client_bearing(&ops_token).await;
    let lines = format!("{}/lines/", cluster.sandbox.path("data").display());
    let keyed = |key: &str| SubmitJobRequest {
        spec: csv_spec(&lines, "tests.clients"),
        idempotency_key: key.to_string(),
        ..Default::default()
    };

    // The same key and request from three namespaces: three jobs.
    let mut jobs = Vec::new();
    for client in [&mut alice, &mut alice2, &mut shared] {
        let submitted = client
            .submit_job(keyed("nightly"))
            .await
            .unwrap()
            .into_inner();
        assert!(submitted.created, "{submitted:?}");
        jobs.push(submitted.job_id);
    }
    let (a, a2, s) = (jobs[0].clone(), jobs[1].clone(), jobs[2].clone());
    assert!(a != a2 && a != s && a2 != s, "{jobs:?}");
    // A retry within a namespace still answers with its job.
    let again = alice
        .submit_job(keyed("nightly"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (a.as_str(), false));

    // Another client's job is no job: get, watch and cancel say so in the same words.
    for (client, theirs) in [(&mut alice2, &a), (&mut shared, &a), (&mut alice, &a2)] {
        let get = || GetJobRequest {
            job_id: theirs.clone(),
        };
        let got = client.get_job(get()).await.unwrap_err();
        assert_eq!(got.code(), tonic::Code::NotFound, "{got:?}");
        assert_eq!(got.message(), format!("no job {theirs}"));
        let watched = client.watch_job(get()).await.unwrap_err();
        assert_eq!(watched.code(), tonic::Code::NotFound, "{watched:?}");
        let cancelled = client.cancel_job(get()).await.unwrap_err();
        assert_eq!(cancelled.code(), tonic::Code::NotFound, "{cancelled:?}");
    }
    let everyone: std::collections::BTreeSet<String> = jobs.iter().cloned().collect();
    assert_eq!(listed(&mut alice).await, [a.clone()].into());
    assert_eq!(listed(&mut alice2).await, [a2.clone()].into());
    assert_eq!(listed(&mut shared).await, [s.clone()].into());
    assert_eq!(listed(&mut ops).await, everyone);
    // A named client's pages count its own jobs only: the token says nothing of others'.
    let page = |token: &str| nightshift_proto::v1::ListJobsRequest {
        page_size: 1,
        page_token: token.to_string(),
        ..Default::default()
    };
    let first = alice.list_jobs(page("")).await.unwrap().into_inner();
    assert_eq!(first.jobs.len(), 1);
    assert_eq!(first.next_page_token, "1");
    let beyond = alice
        .list_jobs(page("18446744073709551615"))
        .await
        .unwrap()
        .into_inner();
    assert!(beyond.jobs.is_empty() && beyond.next_page_token.is_empty());
    let long_key = alice.submit_job(keyed(&"k".repeat(600))).await.unwrap_err();
    assert_eq!(
        long_key.code(),
        tonic::Code::InvalidArgument,
        "{long_key:?}"
    );
    assert!(
        !long_key.message().contains("kkkk"),
        "{}",
        long_key.message()
    );

    // A chosen id another client's job holds is refused without a word about that job.
    let taken = alice2
        .submit_job(SubmitJobRequest {
            job_id: a.clone(),
            ..keyed("")
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");
    assert_eq!(
        taken.message(),
        format!("job id `{a}` is taken by another client; choose another id")
    );

    // Nor can a client take, by choosing it, the id another's key will derive: the key's
    // owner is refused (the id is the table's name for a commit) instead of its job being
    // taken for the other's.
    let later = keyed("later");
    let derived = nightshift_cluster::submission::keyed_job_id(
        Some("alice"),
        "later",
        &nightshift_cluster::submission::JobSubmission {
            job_id: String::new(),
            spec: later.spec.clone(),
            files: Default::default(),
            params: Vec::new(),
            git_commit: None,
            client: None,
        }
        .request_digest(),
    )
    .to_string();
    let claimed = alice2
        .submit_job(SubmitJobRequest {
            job_id: derived.clone(),
            ..keyed("")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.job_id, derived);
    let refused = alice.submit_job(later).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!(
            "job id `{derived}`, which idempotency key `later` gives this request, is taken by another client; use another key"
        )
    );

    // The report page: the owner's and the operator's token, never another client's.
    let admin = cluster
        .admin_addr(&cluster.coordinator_log_name(), Duration::from_secs(60))
        .expect("the coordinator's admin endpoint");
    let page = |token: &str| {
        let bearer = format!("Bearer {token}");
        nightshift_tests::cluster::http_get_with(
            &admin,
            &format!("/jobs/{a}/report"),
            &[("Authorization", bearer.as_str())],
        )
        .unwrap()
        .0
    };
    assert_eq!(page(&alice_token), 200);
    assert_eq!(page(&ops_token), 200);
    assert_eq!(page(&alice2_token), 404);
    assert_eq!(page(&cluster.api_token), 404);

    // The operator cancels the shared namespace's job; alice's runs to the end as hers.
    let cancelled = ops
        .cancel_job(GetJobRequest { job_id: s.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.job_id, s);
    let job = succeeded(&mut alice, &a, &cluster).await;
    assert_eq!(job.rows, 2, "{job:?}");
    assert_eq!(listed(&mut alice).await, [a.clone()].into());
}
