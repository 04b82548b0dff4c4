//! Incremental Iceberg sources: a job reads only the snapshots appended upstream since this
//! pipeline's last committed run.
//!
//! The record of what was consumed is the target table itself: each commit of a job with an
//! incremental source puts `nightshift.consumed.<source table> = <snapshot id>` in its own
//! snapshot summary ([`consumed_key`]), in the same atomic commit as the rows. The next run
//! finds the newest such record in the target's history ([`last_consumed`]) and reads the
//! source's snapshots after it ([`range_to_read`]). A failed run commits neither rows nor
//! record, so its rerun reads the same snapshots again; a run that committed is found by its
//! job id before anything is read. No checkpoint store can disagree with the table.

use std::collections::HashMap;

use nightshift_spec::OnSourceRewrite;

use crate::table::PIPELINE_PROPERTY;

/// Summary key prefix of the source snapshots a commit consumed up to.
pub const CONSUMED_PREFIX: &str = "nightshift.consumed.";
/// Summary key prefix of the source snapshots a commit consumed from (exclusive; `none` for
/// a first run): what the target's history must still say when the commit lands.
pub const CONSUMED_AFTER_PREFIX: &str = "nightshift.consumed-after.";

/// Summary key of the names the pipeline had before (`[pipeline] previous_names`), one per
/// line: their records are its own.
pub const PREVIOUS_NAMES_PROPERTY: &str = "nightshift.previous-names";

/// The names whose records a commit with `summary` counts as its pipeline's: its pipeline's
/// name, then the names it had before.
pub fn pipeline_names(summary: &HashMap<String, String>) -> Vec<&str> {
    let previous = summary
        .get(PREVIOUS_NAMES_PROPERTY)
        .map(|names| names.lines().collect::<Vec<_>>())
        .unwrap_or_default();
    summary
        .get(PIPELINE_PROPERTY)
        .map(String::as_str)
        .into_iter()
        .chain(previous)
        .collect()
}

/// The summary key recording how far `table` (as the spec names it) was consumed.
pub fn consumed_key(table: &str) -> String {
    format!("{CONSUMED_PREFIX}{table}")
}

/// What one incremental source of a job consumes: `table`'s snapshots after `after` up to
/// and including `upto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumption {
    pub table: String,
    pub after: Option<i64>,
    pub upto: i64,
}

impl Consumption {
    /// The snapshot summary properties recording it.
    pub fn summary(&self) -> [(String, String); 2] {
        [
            (consumed_key(&self.table), self.upto.to_string()),
            (
                format!("{CONSUMED_AFTER_PREFIX}{}", self.table),
                self.after.map_or("none".to_string(), |a| a.to_string()),
            ),
        ]
    }
}

/// Why a commit with `summary` must not land on a table with `target_history` (newest
/// first): another run of the pipeline consumed one of its incremental sources since this
/// job read it, and publishing would count those rows twice. `None`: it may land.
pub fn overtaken<'a>(
    summary: &HashMap<String, String>,
    target_history: impl IntoIterator<Item = &'a HashMap<String, String>> + Clone,
) -> Option<String> {
    let pipeline = summary.get(PIPELINE_PROPERTY)?;
    let names = pipeline_names(summary);
    summary.iter().find_map(|(key, after)| {
        let table = key.strip_prefix(CONSUMED_AFTER_PREFIX)?;
        let expected = after.parse::<i64>().ok();
        // Read on from a record under the table's old name (renamed upstream): that record
        // must still be the newest of its name.
        let now = last_consumed(target_history.clone(), &names, table).or_else(|| {
            expected.filter(|expected| {
                records_of_other_tables(target_history.clone(), &names, table)
                    .iter()
                    .any(|(_, upto)| upto == expected)
            })
        });
        (now != expected).then(|| {
            format!(
                "another run of pipeline `{pipeline}` consumed `{table}` up to snapshot {} while this job ran (it read from {after}); publishing would count those rows twice: run the job again",
                now.map_or("none".to_string(), |n| n.to_string())
            )
        })
    })
}

/// The source snapshot this pipeline's last committed run consumed `table` up to: the
/// record in the newest snapshot (of `target_history`, newest first) made under one of the
/// pipeline's `names` (its name, then the names it had before) that has one. Snapshots of
/// other pipelines or of maintenance are passed over.
pub fn last_consumed<'a>(
    target_history: impl IntoIterator<Item = &'a HashMap<String, String>>,
    names: &[&str],
    table: &str,
) -> Option<i64> {
    let key = consumed_key(table);
    target_history
        .into_iter()
        .filter(|summary| {
            summary
                .get(PIPELINE_PROPERTY)
                .is_some_and(|p| names.contains(&p.as_str()))
        })
        .find_map(|summary| summary.get(&key)?.parse().ok())
}

/// The newest record of each table other than `table` that a run of the pipeline known by
/// `names` made in this target (`target_history`, newest first), newest first: where `table`
/// stands when it is one of them renamed upstream ([`record_before_rename`]).
pub fn records_of_other_tables<'a>(
    target_history: impl IntoIterator<Item = &'a HashMap<String, String>>,
    names: &[&str],
    table: &str,
) -> Vec<(String, i64)> {
    let mut records: Vec<(String, i64)> = Vec::new();
    for summary in target_history.into_iter().filter(|summary| {
        summary
            .get(PIPELINE_PROPERTY)
            .is_some_and(|p| names.contains(&p.as_str()))
    }) {
        for (key, upto) in summary {
            let Some(other) = key.strip_prefix(CONSUMED_PREFIX) else {
                continue;
            };
            if other != table
                && !records.iter().any(|(seen, _)| seen == other)
                && let Ok(upto) = upto.parse()
            {
                records.push((other.to_string(), upto));
            }
        }
    }
    records
}

/// The record, among the pipeline's records of other table names (`records`, newest first),
/// made for the table whose history is `history` (newest first) under the name it had before
/// a rename upstream: its snapshot is in that history, or is the one the oldest snapshot left
/// was committed on (expired since). Snapshot ids are random 63-bit numbers, so another table
/// shares none; a table renamed keeps its history. Without it, a source renamed upstream (and
/// in the spec) was read whole again, and an append target got every row twice.
pub fn record_before_rename<'r>(
    records: &'r [(String, i64)],
    history: &[Upstream],
) -> Option<&'r (String, i64)> {
    records.iter().find(|(_, upto)| {
        history.iter().any(|s| s.snapshot_id == *upto)
            || history
                .last()
                .is_some_and(|oldest| oldest.parent_id == Some(*upto))
    })
}

/// Why a pipeline known by `names` must not read `table` from its own record: the newest
/// record of `table` in this target (`target_history`, newest first) is another pipeline's.
/// Without a record of its own, a first run would read `table` whole and publish again every
/// row the other published (a rename not said); with an older one, it would read on from
/// there and publish again what the other published since (a rename reverted, or the old
/// spec left scheduled). `None` when the newest record is under one of `names`, or there is
/// none.
pub fn consumed_under_another_name<'a>(
    target_history: impl IntoIterator<Item = &'a HashMap<String, String>> + Clone,
    names: &[&str],
    table: &str,
) -> Option<String> {
    let key = consumed_key(table);
    let (other, upto) = target_history.clone().into_iter().find_map(|summary| {
        let upto = summary.get(&key)?;
        Some((summary.get(PIPELINE_PROPERTY)?, upto))
    })?;
    if names.contains(&other.as_str()) {
        return None;
    }
    let name = names.first().copied().unwrap_or_default();
    let what_it_would_do = match last_consumed(target_history, names, table) {
        None => format!(
            "pipeline `{name}` has not consumed `{table}` into this target before, but pipeline `{other}` has (up to snapshot {upto}): a first run reads all of `{table}`, and would publish again every row `{other}` published"
        ),
        Some(own) => format!(
            "pipeline `{other}` consumed `{table}` into this target (up to snapshot {upto}) after pipeline `{name}` last did (up to snapshot {own}): reading on from snapshot {own} would publish again what `{other}` published"
        ),
    };
    Some(format!(
        "{what_it_would_do}. If `{name}` is `{other}` renamed (or renamed back), add previous_names = [\"{other}\"] under [pipeline], and it goes on from snapshot {upto}; if it is another pipeline, give it a target of its own"
    ))
}

/// The snapshots of `history` (newest first, as `(id, summary)`) that snapshot expiry must
/// keep so that every incremental pipeline still finds where it stands: each pipeline's
/// newest snapshot with a consumed record, and every snapshot after it (the history is
/// walked from the current snapshot through parents, so a gap would hide the record). An
/// expired record makes the next run read its sources whole again, into the same target.
pub fn kept_for_consumed_records<'a>(
    history: impl IntoIterator<Item = (i64, &'a HashMap<String, String>)>,
) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut through = 0;
    let mut pipelines_found = std::collections::HashSet::new();
    for (at, (id, summary)) in history.into_iter().enumerate() {
        seen.push(id);
        let pipeline = summary.get(PIPELINE_PROPERTY);
        if let Some(pipeline) = pipeline
            && summary.keys().any(|k| k.starts_with(CONSUMED_PREFIX))
            && pipelines_found.insert(pipeline.clone())
        {
            through = at + 1;
        }
    }
    seen.truncate(through);
    seen
}

/// One upstream snapshot, as the range decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub snapshot_id: i64,
    /// The snapshot it was committed on (kept when expiry has removed that one).
    pub parent_id: Option<i64>,
    /// `append`, `overwrite`, `delete` or `replace`.
    pub operation: String,
}

/// The operation of a snapshot that rewrites files without changing rows.
const REPLACE: &str = "replace";

/// What an incremental source reads this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Range {
    /// The whole current table: the first run, or a rewrite with `on_source_rewrite = "full"`.
    Everything { why: String },
    /// Nothing: no snapshot since the last run.
    Nothing,
    /// The files these snapshots added, oldest first: all appends since the last run.
    Appended(Vec<i64>),
}

/// Why an incremental source cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(
        "snapshot {snapshot_id} ({operation}) rewrote the source since the last run consumed snapshot {consumed}; \
         set on_source_rewrite = \"full\" to read the whole table"
    )]
    Rewritten {
        snapshot_id: i64,
        operation: String,
        consumed: i64,
    },
    #[error(
        "the last run consumed snapshot {consumed}, which is no longer in the source's history \
         (rolled back, replaced or expired); set on_source_rewrite = \"full\" to read the whole table"
    )]
    Lost { consumed: i64 },
}

/// The snapshots to read, from what was consumed and the source's history (newest first,
/// from its current snapshot back to its first).
pub fn range_to_read(
    consumed: Option<i64>,
    history: &[Upstream],
    on_rewrite: OnSourceRewrite,
) -> Result<Range, RangeError> {
    let Some(consumed) = consumed else {
        return Ok(Range::Everything {
            why: "no earlier run of this pipeline consumed it".to_string(),
        });
    };
    // Expiry upstream may have removed the consumed snapshot but kept every one after it
    // (the usual nightly case: `expire older than a day` after the next load): the oldest
    // snapshot left was committed on it, so the history since the record is whole.
    let after_expired_record = history
        .last()
        .is_some_and(|oldest| oldest.parent_id == Some(consumed))
        .then_some(history.len());
    let position = history.iter().position(|s| s.snapshot_id == consumed);
    let verdict = match position.or(after_expired_record) {
        None => Err(RangeError::Lost { consumed }),
        Some(0) => return Ok(Range::Nothing),
        Some(at) => {
            // A `replace` (a compaction, a manifest rewrite) changes files, not rows: the rows
            // of the appends it rewrote are still read from the files those appends added.
            let newer: Vec<&Upstream> = history[..at]
                .iter()
                .filter(|s| s.operation != REPLACE)
                .collect();
            match newer.iter().rev().find(|s| s.operation != "append") {
                _ if newer.is_empty() => return Ok(Range::Nothing),
                Some(rewrite) => Err(RangeError::Rewritten {
                    snapshot_id: rewrite.snapshot_id,
                    operation: rewrite.operation.clone(),
                    consumed,
                }),
                None => Ok(Range::Appended(
                    newer.iter().rev().map(|s| s.snapshot_id).collect(),
                )),
            }
        }
    };
    match (verdict, on_rewrite) {
        (Err(e), OnSourceRewrite::Full) => Ok(Range::Everything {
            why: format!("{e} (on_source_rewrite = \"full\")"),
        }),
        (verdict, _) => verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(pipeline: &str, consumed: Option<(&str, i64)>) -> HashMap<String, String> {
        let mut s = HashMap::from([(PIPELINE_PROPERTY.to_string(), pipeline.to_string())]);
        if let Some((table, id)) = consumed {
            s.insert(consumed_key(table), id.to_string());
        }
        s
    }

    /// Newest first, each committed on the one after it; the oldest is the table's first.
    fn history(ops: &[(i64, &str)]) -> Vec<Upstream> {
        ops.iter()
            .enumerate()
            .map(|(at, (id, op))| Upstream {
                snapshot_id: *id,
                parent_id: ops.get(at + 1).map(|(parent, _)| *parent),
                operation: op.to_string(),
            })
            .collect()
    }

    /// [`history`] whose oldest snapshot was committed on `expired`, which expiry removed.
    fn after_expired(expired: i64, ops: &[(i64, &str)]) -> Vec<Upstream> {
        let mut h = history(ops);
        if let Some(oldest) = h.last_mut() {
            oldest.parent_id = Some(expired);
        }
        h
    }

    #[test]
    fn the_newest_record_of_this_pipeline_and_table_counts() {
        let newest_first = [
            summary("other", Some(("raw.events", 99))),
            HashMap::new(), // maintenance: no pipeline
            summary("daily", Some(("raw.users", 7))),
            summary("daily", Some(("raw.events", 42))),
            summary("daily", Some(("raw.events", 41))),
        ];
        assert_eq!(
            last_consumed(&newest_first, &["daily"], "raw.events"),
            Some(42)
        );
        assert_eq!(
            last_consumed(&newest_first, &["daily"], "raw.users"),
            Some(7)
        );
        // A table whose name shares a prefix with a recorded one is not it.
        assert_eq!(last_consumed(&newest_first, &["daily"], "raw.event"), None);
        assert_eq!(
            last_consumed(&newest_first, &["weekly"], "raw.events"),
            None
        );
        assert_eq!(last_consumed(&[], &["daily"], "raw.events"), None);
    }

    #[test]
    fn a_renamed_pipeline_goes_on_from_its_old_names_record_or_is_refused() {
        let newest_first = [
            summary("old", Some(("raw.events", 42))),
            summary("old", Some(("raw.events", 41))),
        ];
        // Renamed without saying so: no record of its own, and reading all would publish
        // old's rows again.
        let refused = consumed_under_another_name(&newest_first, &["new"], "raw.events");
        assert!(
            refused
                .as_deref()
                .is_some_and(|why| why.contains("previous_names = [\"old\"]")
                    && why.contains("up to snapshot 42")),
            "{refused:?}"
        );
        // Said: old's record is its own.
        let names = ["new", "old"];
        assert_eq!(last_consumed(&newest_first, &names, "raw.events"), Some(42));
        assert_eq!(
            consumed_under_another_name(&newest_first, &names, "raw.events"),
            None
        );
        // Its own record after the rename is newer than old's.
        let renamed = [
            summary("new", Some(("raw.events", 50))),
            summary("old", Some(("raw.events", 42))),
        ];
        assert_eq!(last_consumed(&renamed, &names, "raw.events"), Some(50));
        // Renamed back without saying so: the old name's own record is older than what
        // the other name consumed since.
        let reverted = consumed_under_another_name(&renamed, &["old"], "raw.events");
        assert!(
            reverted.as_deref().is_some_and(|why| why
                .contains("after pipeline `old` last did (up to snapshot 42)")
                && why.contains("previous_names = [\"new\"]")),
            "{reverted:?}"
        );
        assert_eq!(
            consumed_under_another_name(&renamed, &["old", "new"], "raw.events"),
            None
        );
        assert_eq!(
            last_consumed(&renamed, &["old", "new"], "raw.events"),
            Some(50)
        );
        // Another source, or a target nobody consumed into: a first run.
        assert_eq!(
            consumed_under_another_name(&newest_first, &["new"], "raw.users"),
            None
        );
        assert_eq!(
            consumed_under_another_name(&[], &["new"], "raw.events"),
            None
        );
        // The names a commit counts as its own travel in its summary.
        let mut with_names = summary("new", None);
        with_names.insert(PREVIOUS_NAMES_PROPERTY.into(), "old\nolder".into());
        assert_eq!(pipeline_names(&with_names), ["new", "old", "older"]);
        assert_eq!(pipeline_names(&summary("new", None)), ["new"]);
    }

    #[test]
    fn a_table_renamed_upstream_is_read_on_from_its_old_names_record() {
        let target = [
            summary("daily", Some(("raw.events", 20))),
            summary("other", Some(("raw.clicks", 31))),
            summary("daily", Some(("raw.events", 10))),
            summary("daily", Some(("raw.orders", 40))),
        ];
        // No record of `raw.events_v2`: the newest of each other table of this pipeline.
        let records = records_of_other_tables(&target, &["daily"], "raw.events_v2");
        assert_eq!(
            records,
            [
                ("raw.events".to_string(), 20),
                ("raw.orders".to_string(), 40)
            ]
        );
        // The renamed table's history holds snapshot 20: it is `raw.events` renamed.
        let renamed = history(&[(22, "append"), (20, "append"), (10, "append")]);
        assert_eq!(
            record_before_rename(&records, &renamed),
            Some(&("raw.events".to_string(), 20))
        );
        // So does one whose snapshot 20 expired, the oldest left committed on it.
        let expired = after_expired(20, &[(22, "append")]);
        assert_eq!(
            record_before_rename(&records, &expired).map(|r| r.1),
            Some(20)
        );
        // Another table (none of its snapshots recorded) is read whole, as a first run.
        let another = history(&[(52, "append"), (51, "append")]);
        assert_eq!(record_before_rename(&records, &another), None);
        assert_eq!(record_before_rename(&[], &renamed), None);

        // Its commit records `raw.events_v2` read after 20, and lands while 20 is still the
        // newest record of the old name; another run that consumed further refuses it.
        let mut commit = summary("daily", None);
        commit.extend(
            Consumption {
                table: "raw.events_v2".into(),
                after: Some(20),
                upto: 22,
            }
            .summary(),
        );
        assert_eq!(overtaken(&commit, &target), None);
        let mut moved_on = target.to_vec();
        moved_on.insert(0, summary("daily", Some(("raw.events", 21))));
        assert!(overtaken(&commit, &moved_on).is_some());
        moved_on[0] = summary("daily", Some(("raw.events_v2", 22)));
        assert!(overtaken(&commit, &moved_on).is_some());
    }

    #[test]
    fn a_commit_overtaken_by_another_run_is_refused() {
        let job = |after: Option<i64>, upto: i64| {
            let mut s = summary("daily", None);
            s.extend(
                Consumption {
                    table: "raw.events".into(),
                    after,
                    upto,
                }
                .summary(),
            );
            s
        };
        let first = job(None, 10);
        assert_eq!(first["nightshift.consumed-after.raw.events"], "none");
        assert_eq!(overtaken(&first, &[]), None);
        // Another first run landed meanwhile.
        let landed = [job(None, 10)];
        assert!(overtaken(&first, &landed).is_some_and(|why| why.contains("up to snapshot 10")));
        // The history still ends at what this job read from: it lands.
        let second = job(Some(10), 12);
        assert_eq!(overtaken(&second, &landed), None);
        assert!(overtaken(&second, &[job(Some(10), 11), job(None, 10)]).is_some());
        // Snapshots of other pipelines in between do not matter.
        assert_eq!(
            overtaken(&second, &[summary("other", None), job(None, 10)]),
            None
        );
        // A summary without incremental sources is never overtaken.
        assert_eq!(overtaken(&summary("daily", None), &landed), None);
    }

    #[test]
    fn appends_since_the_record_are_read_oldest_first() {
        let h = history(&[(5, "append"), (4, "append"), (3, "append"), (1, "append")]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Ok(Range::Appended(vec![4, 5]))
        );
        assert_eq!(
            range_to_read(Some(5), &h, OnSourceRewrite::Fail),
            Ok(Range::Nothing)
        );
        assert!(matches!(
            range_to_read(None, &h, OnSourceRewrite::Fail),
            Ok(Range::Everything { .. })
        ));
        // A source with no snapshot yet and no record: everything there is (nothing).
        assert!(matches!(
            range_to_read(None, &[], OnSourceRewrite::Fail),
            Ok(Range::Everything { .. })
        ));
    }

    #[test]
    fn expiry_keeps_each_pipelines_newest_record_and_what_follows_it() {
        let with_id = |summaries: &[HashMap<String, String>]| -> Vec<i64> {
            let history = summaries
                .iter()
                .enumerate()
                .map(|(i, s)| (100 - i as i64, s));
            kept_for_consumed_records(history)
        };
        let compaction = HashMap::new();
        let newest_first = [
            compaction.clone(),                         // 100
            summary("daily", Some(("raw.events", 9))),  // 99
            compaction.clone(),                         // 98
            summary("hourly", Some(("raw.clicks", 7))), // 97
            summary("daily", Some(("raw.events", 8))),  // 96
            summary("hourly", None),                    // 95
        ];
        assert_eq!(with_id(&newest_first), vec![100, 99, 98, 97]);
        // No incremental pipeline: nothing is kept for records.
        assert!(with_id(&[compaction.clone(), summary("daily", None)]).is_empty());
        assert!(with_id(&[]).is_empty());
    }

    #[test]
    fn a_compaction_upstream_is_passed_over() {
        let h = history(&[
            (7, "replace"),
            (6, "append"),
            (5, "replace"),
            (4, "append"),
            (3, "append"),
        ]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Ok(Range::Appended(vec![4, 6]))
        );
        assert_eq!(
            range_to_read(Some(6), &h, OnSourceRewrite::Fail),
            Ok(Range::Nothing)
        );
    }

    #[test]
    fn an_expired_record_is_read_on_from_when_every_later_snapshot_is_left() {
        // 3 was consumed and expired; 4 (committed on 3) and 5 are left.
        let h = after_expired(3, &[(5, "append"), (4, "append")]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Ok(Range::Appended(vec![4, 5]))
        );
        // 3 and 4 expired: what 4 appended is unknown, so the run fails as before.
        let h = after_expired(4, &[(5, "append")]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Err(RangeError::Lost { consumed: 3 })
        );
        // What followed the record is still judged: a rewrite fails, a compaction is passed.
        let h = after_expired(3, &[(6, "replace"), (5, "append"), (4, "overwrite")]);
        assert!(matches!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Err(RangeError::Rewritten { snapshot_id: 4, .. })
        ));
        let h = after_expired(3, &[(5, "replace"), (4, "append")]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Ok(Range::Appended(vec![4]))
        );
        // Only the expired compaction left: nothing since the record.
        let h = after_expired(3, &[(4, "replace")]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Ok(Range::Nothing)
        );
    }

    #[test]
    fn a_rewrite_or_a_lost_record_fails_or_reads_everything() {
        let h = history(&[
            (6, "append"),
            (5, "delete"),
            (4, "overwrite"),
            (3, "append"),
        ]);
        assert_eq!(
            range_to_read(Some(3), &h, OnSourceRewrite::Fail),
            Err(RangeError::Rewritten {
                snapshot_id: 4,
                operation: "overwrite".into(),
                consumed: 3
            })
        );
        assert_eq!(
            range_to_read(Some(2), &h, OnSourceRewrite::Fail),
            Err(RangeError::Lost { consumed: 2 })
        );
        for consumed in [3, 2] {
            let range = range_to_read(Some(consumed), &h, OnSourceRewrite::Full).unwrap();
            assert!(
                matches!(&range, Range::Everything { why } if why.contains("on_source_rewrite")),
                "{range:?}"
            );
        }
        // A rewrite before the record is history already consumed.
        assert_eq!(
            range_to_read(Some(6), &h, OnSourceRewrite::Fail),
            Ok(Range::Nothing)
        );
    }
}
