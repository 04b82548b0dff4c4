//! Bounded fuzzing of what a worker does with a task message: any bytes off the queue either
//! fail to decode or run to a described failure; nothing panics. Runs in CI with a fixed
//! number of cases; `PROPTEST_CASES=100000` runs longer.

use nightshift_core::session::{SessionOptions, new_session};
use nightshift_core::task::run_task;
use nightshift_proto::PROTOCOL_VERSION;
use nightshift_proto::v1::{self, task_definition, task_result};
use proptest::prelude::*;
use prost::Message;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `task` the way a worker does and checks the outcome describes a failure.
fn run(task: &v1::TaskDefinition) {
    let session = new_session(SessionOptions::default());
    let result = runtime().block_on(run_task(task, &session, "fuzz"));
    assert_eq!(result.job_id, task.job_id);
    assert!(
        matches!(result.outcome, Some(task_result::Outcome::Failed(_))),
        "a garbage task cannot succeed: {result:?}"
    );
}

fn outputs(dir: String) -> impl Strategy<Value = Option<task_definition::Output>> {
    prop_oneof![
        Just(None),
        Just(Some(task_definition::Output::Shuffle(v1::ShuffleOutput {
            prefix: format!("{dir}/scratch"),
        }))),
        ("\\PC{0,40}", "\\PC{0,20}", any::<bool>()).prop_map(
            move |(schema, predicate, quarantine)| Some(task_definition::Output::Table(
                v1::TableOutput {
                    data_location: format!("{dir}/data"),
                    schema_json: schema.clone(),
                    partition_spec_json: "{\"spec-id\":0,\"fields\":[]}".into(),
                    format_version: 2,
                    target_file_size_bytes: 1 << 20,
                    checks: vec![v1::RowCheck {
                        name: "fuzzed".into(),
                        predicate_sql: predicate,
                        quarantine,
                    }],
                    parquet_properties: Default::default(),
                    rejects: quarantine.then(|| v1::RejectsOutput {
                        data_location: format!("{dir}/rejects"),
                        schema_json: schema.clone(),
                        format_version: 2,
                        job_id: "fuzz".into(),
                    }),
                }
            ))
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(task) = v1::TaskDefinition::decode(bytes.as_slice()) {
            // Whatever decoded: a plan this garbage never runs.
            let dir = tempfile::tempdir().unwrap();
            let task = v1::TaskDefinition {
                output: Some(task_definition::Output::Shuffle(v1::ShuffleOutput {
                    prefix: dir.path().display().to_string(),
                })),
                ..task
            };
            run(&task);
        }
        let _ = v1::TaskResult::decode(bytes.as_slice());
    }

    #[test]
    fn garbage_stage_plans_fail_cleanly(
        job in "[a-z0-9-]{1,12}",
        stage in any::<u32>(),
        partition in any::<u32>(),
        attempt in any::<u32>(),
        plan in prop::collection::vec(any::<u8>(), 0..400),
        output in outputs(std::env::temp_dir().join("nightshift-fuzz").display().to_string()),
    ) {
        run(&v1::TaskDefinition {
            protocol_version: PROTOCOL_VERSION,
            job_id: job,
            stage_id: stage,
            partition,
            attempt,
            stage_plan: plan,
            output,
            plan: String::new(),
        });
    }
}
