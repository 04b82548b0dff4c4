//! Progress bars on a terminal: one bar per stage, for `nightshift run` (from job events) and
//! `nightshift watch` / `submit --wait` (from the job API). Nothing is drawn when stderr is
//! not a terminal; logs and the final report say what happened.

use std::collections::BTreeMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nightshift_coordinator::{JobEvent, StageCount};
use nightshift_proto::v1::Job;

/// One bar per stage plus a status line.
pub struct StageBars {
    multi: MultiProgress,
    status: ProgressBar,
    bars: Mutex<BTreeMap<u32, ProgressBar>>,
}

impl StageBars {
    /// Bars on stderr when `enabled`, hidden otherwise.
    pub fn new(enabled: bool) -> Self {
        let target = if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let status = multi.add(ProgressBar::new_spinner());
        status.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("template"),
        );
        status.enable_steady_tick(std::time::Duration::from_millis(200));
        StageBars {
            multi,
            status,
            bars: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the status line.
    pub fn message(&self, text: String) {
        self.status.set_message(text);
    }

    /// Moves each stage's bar to `done` of `total`, adding bars for new stages.
    pub fn update(&self, stages: impl IntoIterator<Item = (u32, u64, u64)>) {
        let mut bars = self.bars.lock().expect("bars lock");
        for (stage, done, total) in stages {
            let bar = bars.entry(stage).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template("  stage {prefix:>3} {bar:30} {pos}/{len} tasks")
                        .expect("template"),
                );
                bar.set_prefix(stage.to_string());
                bar
            });
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    /// Progress from an embedded job's events.
    pub fn on_event(&self, event: JobEvent) {
        let counts = |stages: &[StageCount]| {
            stages
                .iter()
                .map(|s| (s.stage, s.done as u64, s.total as u64))
                .collect::<Vec<_>>()
        };
        match event {
            JobEvent::Planned { stages, tasks } => {
                self.message(format!("{} stage(s), {tasks} task(s)", stages.len()));
                self.update(counts(&stages));
            }
            JobEvent::TaskFinished { stages, rows, .. } => {
                if rows > 0 {
                    self.message(format!("{rows} rows written"));
                }
                self.update(counts(&stages));
            }
            JobEvent::Committing { files } => {
                self.message(format!("committing {files} file(s)"));
            }
            JobEvent::Finished(_) => {}
        }
    }

    /// Progress from the job API.
    pub fn on_job(&self, job: &Job) {
        self.message(crate::client::describe(job));
        self.update(
            job.stages
                .iter()
                .map(|s| (s.stage, s.tasks_done, s.tasks_total)),
        );
    }

    /// Removes the bars.
    pub fn finish(&self) {
        for bar in self.bars.lock().expect("bars lock").values() {
            bar.finish_and_clear();
        }
        self.status.finish_and_clear();
    }
}
