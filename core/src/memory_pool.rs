//! The memory pool tasks run in: a fair share of the limit for each operator that holds
//! state and can spill (a hash aggregate, a sort, a join's input), as DataFusion's
//! `FairSpillPool` gives, except that repartition channels take no share.
//!
//! DataFusion registers each output channel of a `RepartitionExec` as a spilling consumer,
//! and `FairSpillPool` divides the limit by every spilling consumer: an embedded run of
//! `SELECT key, sum(..) GROUP BY key` on two cores has two partial and two final
//! aggregates and two repartition channels, so each aggregate may hold a sixth of the
//! limit, and the final aggregates spilled under a limit they could have held. A channel
//! only buffers the batches in flight between its input and output, so here it counts
//! against the limit as a whole but takes no share from the operators that hold state.

use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use std::sync::Mutex;

/// A pool of `pool_size` bytes; see the module documentation.
#[derive(Debug)]
pub struct OperatorSharePool {
    pool_size: usize,
    state: Mutex<Reserved>,
}

/// What the pool's consumers hold now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reserved {
    /// Registered consumers that take a share ([`takes_a_share`]).
    holders: usize,
    /// Bytes held by consumers that can spill.
    spillable: usize,
    /// Bytes held by consumers that cannot.
    unspillable: usize,
}

/// Whether `consumer` takes a fair share of the limit: it can spill and is not a
/// repartition channel (DataFusion names those `RepartitionExec[<partition>]`).
pub fn takes_a_share(consumer: &MemoryConsumer) -> bool {
    consumer.can_spill() && !consumer.name().starts_with("RepartitionExec[")
}

impl Reserved {
    /// The most a consumer may hold after growing by `additional` when it holds `size` now:
    /// `Ok` if it may grow, else `Err` with the bytes it may hold at most.
    fn may_grow(
        &self,
        pool_size: usize,
        consumer: (bool, bool),
        size: usize,
        additional: usize,
    ) -> Result<(), usize> {
        let (can_spill, share) = consumer;
        let free = pool_size.saturating_sub(self.spillable + self.unspillable);
        if additional > free {
            return Err(size + free);
        }
        if can_spill && share {
            let fair = pool_size.saturating_sub(self.unspillable) / self.holders.max(1);
            if size + additional > fair {
                return Err(fair);
            }
        }
        Ok(())
    }

    fn add(&mut self, can_spill: bool, bytes: usize) {
        if can_spill {
            self.spillable += bytes;
        } else {
            self.unspillable += bytes;
        }
    }

    fn remove(&mut self, can_spill: bool, bytes: usize) {
        if can_spill {
            self.spillable = self.spillable.saturating_sub(bytes);
        } else {
            self.unspillable = self.unspillable.saturating_sub(bytes);
        }
    }
}

impl OperatorSharePool {
    pub fn new(pool_size: usize) -> Self {
        OperatorSharePool {
            pool_size,
            state: Mutex::new(Reserved::default()),
        }
    }

    fn reserved_now(&self) -> std::sync::MutexGuard<'_, Reserved> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MemoryPool for OperatorSharePool {
    fn register(&self, consumer: &MemoryConsumer) {
        if takes_a_share(consumer) {
            self.reserved_now().holders += 1;
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if takes_a_share(consumer) {
            let mut reserved = self.reserved_now();
            reserved.holders = reserved.holders.saturating_sub(1);
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let can_spill = reservation.consumer().can_spill();
        self.reserved_now().add(can_spill, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let can_spill = reservation.consumer().can_spill();
        self.reserved_now().remove(can_spill, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        let consumer = reservation.consumer();
        let kind = (consumer.can_spill(), takes_a_share(consumer));
        let mut reserved = self.reserved_now();
        match reserved.may_grow(self.pool_size, kind, reservation.size(), additional) {
            Ok(()) => {
                reserved.add(kind.0, additional);
                Ok(())
            }
            Err(at_most) => Err(DataFusionError::ResourcesExhausted(format!(
                "Failed to allocate additional {additional} bytes for {} with {} bytes already allocated for this reservation - it may hold {at_most} bytes",
                consumer.name(),
                reservation.size()
            ))),
        }
    }

    fn reserved(&self) -> usize {
        let reserved = self.reserved_now();
        reserved.spillable + reserved.unspillable
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.pool_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pool(size: usize) -> Arc<dyn MemoryPool> {
        Arc::new(OperatorSharePool::new(size))
    }

    #[test]
    fn repartition_channels_take_no_share_from_the_aggregates() {
        let pool = pool(1200);
        let aggregates: Vec<MemoryReservation> = (0..2)
            .map(|p| {
                MemoryConsumer::new(format!("GroupedHashAggregateStream[{p}]"))
                    .with_can_spill(true)
                    .register(&pool)
            })
            .collect();
        let channels: Vec<MemoryReservation> = (0..2)
            .map(|p| {
                MemoryConsumer::new(format!("RepartitionExec[{p}]"))
                    .with_can_spill(true)
                    .register(&pool)
            })
            .collect();
        // Each aggregate may hold half the limit (FairSpillPool: a quarter).
        let [first, second] = aggregates.try_into().unwrap();
        first.try_grow(500).unwrap();
        second.try_grow(500).unwrap();
        assert!(first.try_grow(101).is_err(), "past its half");
        // The channels count against the limit as a whole: 200 bytes are left.
        channels[0].try_grow(150).unwrap();
        assert!(channels[1].try_grow(51).is_err(), "past the limit");
        channels[1].try_grow(50).unwrap();
        assert_eq!(pool.reserved(), 1200);
        assert!(first.try_grow(1).is_err(), "the limit holds for shares too");
        channels[0].free();
        first.try_grow(100).unwrap();
        assert!(first.try_grow(1).is_err());
    }

    #[test]
    fn operators_that_cannot_spill_get_what_is_left_and_shrink_the_shares() {
        let pool = pool(1000);
        let sort = MemoryConsumer::new("ExternalSorter[0]")
            .with_can_spill(true)
            .register(&pool);
        let merge = MemoryConsumer::new("ExternalSorterMerge[0]").register(&pool);
        merge.try_grow(400).unwrap();
        // One holder: its share is what the unspillable consumers leave.
        assert!(sort.try_grow(601).is_err());
        sort.try_grow(600).unwrap();
        assert!(merge.try_grow(1).is_err(), "nothing is left");
        drop(sort);
        assert_eq!(pool.reserved(), 400);
        let again = MemoryConsumer::new("ExternalSorter[1]")
            .with_can_spill(true)
            .register(&pool);
        again.try_grow(600).unwrap();
    }

    #[test]
    fn a_consumer_takes_a_share_when_it_spills_and_is_no_channel() {
        let spilling = |name: &str| MemoryConsumer::new(name).with_can_spill(true);
        assert!(takes_a_share(&spilling("GroupedHashAggregateStream[0]")));
        assert!(takes_a_share(&spilling("ExternalSorter[3]")));
        assert!(!takes_a_share(&spilling("RepartitionExec[1]")));
        assert!(!takes_a_share(&MemoryConsumer::new("HashJoinInput[0]")));
    }
}
