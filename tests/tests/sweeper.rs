//! The scratch sweeper removes what jobs of crashed coordinators left, and nothing else.

use std::process::Command;
use std::time::Duration;

use nightshift_coordinator::cleanup::sweep_scratch;
use nightshift_core::ids::JobId;
use nightshift_core::storage::Location;
use nightshift_core::transport::memory::MemoryState;
use nightshift_core::transport::{JobState, StateStore};
use nightshift_tests::Sandbox;

fn age(path: &std::path::Path, when: &str) {
    let status = Command::new("touch")
        .args(["-d", when])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sweeps_old_abandoned_scratch_only() {
    let sandbox = Sandbox::new();
    let abandoned = sandbox.write("scratch/job-old/stage-1/map-0/attempt-1-x/data.arrow", "x");
    let running = sandbox.write(
        "scratch/job-running/stage-1/map-0/attempt-1-y/data.arrow",
        "y",
    );
    let fresh = sandbox.write(
        "scratch/job-fresh/stage-1/map-0/attempt-1-z/data.arrow",
        "z",
    );
    age(&abandoned, "2 days ago");
    age(&running, "2 days ago");
    let state = MemoryState::default();
    state
        .set_job_state(&JobId::parse("job-running").unwrap(), JobState::Running, "")
        .await
        .unwrap();
    let scratch = Location::parse(
        &sandbox.path("scratch").display().to_string(),
        std::path::Path::new("/"),
    )
    .unwrap();
    let swept = sweep_scratch(&scratch, &state, Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert_eq!(swept, vec!["job-old".to_string()]);
    assert!(!sandbox.path("scratch/job-old").exists());
    assert!(
        running.exists(),
        "a running job's scratch is kept however old"
    );
    assert!(fresh.exists(), "recent scratch is kept");
}
