//! The task queue on RabbitMQ.
//!
//! Topology (names under the configured prefix `<p>`):
//! - `<p>.tasks`: durable quorum queue of `TaskDefinition`s, with a delivery limit and
//!   `<p>.dlx` as dead-letter exchange: a task whose worker dies every time is parked in
//!   `<p>.dead` instead of looping;
//! - `<p>.results.<job>`: durable quorum queue of one job's `TaskResult`s, deleted when the
//!   job ends (durable, so a restarted coordinator finds results published while it was away);
//! - `<p>.jobs`: durable quorum queue of job submissions for the coordinator.
//!
//! Every publish waits for the broker's confirm; every consumer acks manually. Workers
//! consume with a bounded prefetch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use nightshift_core::error::{CoreError, Result};
use nightshift_core::ids::JobId;
use nightshift_core::metrics;
use nightshift_core::transport::{Delivery, TaskQueue};
use nightshift_proto::v1;
use prost::Message;
use tokio::sync::{Mutex, RwLock};
use tracing::{debug, info, warn};

use crate::config::{RabbitSection, redact_url};

fn amqp_err(e: lapin::Error) -> CoreError {
    CoreError::Transport(format!("rabbitmq: {e}"))
}

/// Whether the broker answered that the queue does not exist (`NOT_FOUND`, which also
/// closes the channel). A job's result queue is deleted when the job ends: a coordinator
/// that lost its job to another while frozen meets this, and trying again cannot help.
fn is_missing_queue(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// Header naming the job of a task message; dead letters are routed by it.
const JOB_HEADER: &str = "nightshift-job";

/// How long a client keeps trying to reach a broker that went away (or is not up yet when
/// the process starts).
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// How long one connection attempt may take: a broker that accepts TCP but never finishes
/// the AMQP handshake (still booting, app stopped) must not hang a process silently.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection with its publish (confirming) and consume channels.
struct Link {
    generation: u64,
    connection: Connection,
    publish: Channel,
    consume: Channel,
}

/// Results a coordinator holds unacked per job: small messages it takes one after another,
/// so the broker need not wait for each ack before sending the next.
const RESULTS_PREFETCH: u16 = 64;

/// A consumer and the connection generation it belongs to.
type Slot = Mutex<Option<(u64, Consumer)>>;

/// The RabbitMQ task queue. It reconnects by itself when the broker restarts: publishes are
/// retried on the new connection and consumers are recreated; a delivery of the old
/// connection cannot be acked any more and is delivered again by the broker, which the
/// first-result-wins rule makes harmless.
pub struct RabbitQueue {
    config: RabbitSection,
    link: RwLock<Arc<Link>>,
    tasks: Slot,
    jobs: Slot,
    results: Mutex<HashMap<JobId, Arc<Slot>>>,
    /// Set by a graceful stop: no consumer of tasks or submissions is created again.
    stopped: std::sync::atomic::AtomicBool,
    /// Unacked submissions the coordinator may hold: one per job it runs at once.
    job_prefetch: std::sync::atomic::AtomicU16,
}

impl RabbitQueue {
    /// Connects and declares the shared topology.
    pub async fn connect(config: &RabbitSection) -> Result<Self> {
        let url = redact_url(&config.url);
        info!(url = %url, "connecting to rabbitmq");
        let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
        let link = loop {
            match Self::open_link(config, 1).await {
                Ok(link) => break link,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(url = %url, error = %e, "rabbitmq not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let queue = RabbitQueue {
            config: config.clone(),
            link: RwLock::new(Arc::new(link)),
            tasks: Mutex::new(None),
            jobs: Mutex::new(None),
            results: Mutex::new(HashMap::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            job_prefetch: std::sync::atomic::AtomicU16::new(1),
        };
        let link = queue.link().await;
        queue.declare_topology(&link).await?;
        Ok(queue)
    }

    async fn open_link(config: &RabbitSection, generation: u64) -> Result<Link> {
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&config.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| {
            CoreError::Transport(format!(
                "rabbitmq: no AMQP handshake from {} within {CONNECT_TIMEOUT:?}",
                redact_url(&config.url)
            ))
        })?
        .map_err(amqp_err)?;
        let publish = connection.create_channel().await.map_err(amqp_err)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp_err)?;
        let consume = connection.create_channel().await.map_err(amqp_err)?;
        consume
            .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(amqp_err)?;
        Ok(Link {
            generation,
            connection,
            publish,
            consume,
        })
    }

    async fn link(&self) -> Arc<Link> {
        self.link.read().await.clone()
    }

    /// Replaces the connection of generation `broken` (once, whoever notices first), trying
    /// for [`RECONNECT_FOR`].
    async fn reconnect(&self, broken: u64) -> Result<Arc<Link>> {
        let mut link = self.link.write().await;
        if link.generation != broken {
            return Ok(link.clone());
        }
        let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
        loop {
            match Self::open_link(&self.config, broken + 1).await {
                Ok(new) => {
                    let new = Arc::new(new);
                    self.declare_topology(&new).await?;
                    info!(generation = new.generation, "reconnected to rabbitmq");
                    *link = new.clone();
                    return Ok(new);
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "rabbitmq unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.config.prefix)
    }

    pub fn tasks_queue(&self) -> String {
        self.name("tasks")
    }

    pub fn dead_queue(&self) -> String {
        self.name("dead")
    }

    pub fn jobs_queue(&self) -> String {
        self.name("jobs")
    }

    fn results_queue(&self, job: &JobId) -> String {
        self.name(&format!("results.{job}"))
    }

    fn dead_letter_exchange(&self) -> String {
        self.name("dead-letters")
    }

    async fn declare_topology(&self, link: &Link) -> Result<()> {
        let dlx = self.dead_letter_exchange();
        link.publish
            .exchange_declare(
                ShortString::from(dlx.as_str()),
                ExchangeKind::Headers,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err)?;
        declare_queue(link, &self.dead_queue(), FieldTable::default()).await?;
        // Every dead letter is kept in `<p>.dead` for inspection...
        bind_headers(link, &self.dead_queue(), &dlx, None).await?;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(self.config.delivery_limit as i32),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(dlx.as_str().into()),
        );
        declare_queue(link, &self.tasks_queue(), args).await?;
        declare_queue(link, &self.jobs_queue(), FieldTable::default()).await
    }

    /// Publishes a persistent message to `queue` and waits for the broker's confirm,
    /// reconnecting if the broker went away.
    pub async fn publish_to(&self, queue: &str, payload: &[u8]) -> Result<()> {
        self.publish_with(queue, payload, None).await
    }

    async fn publish_with(&self, queue: &str, payload: &[u8], job: Option<&str>) -> Result<()> {
        let mut refusals = 0;
        loop {
            let link = self.link().await;
            match publish(&link, queue, payload, job).await {
                Ok(()) => return Ok(()),
                Err(e) if !link.publish.status().connected() => {
                    warn!(error = %e, queue, "publish failed; reconnecting");
                    self.reconnect(link.generation).await?;
                }
                Err(e @ CoreError::Refused { .. }) => {
                    wait_after_refusal(&mut refusals, e, queue).await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message of `queue` from the consumer in `slot`, (re)creating the consumer
    /// on the current connection and reconnecting when the broker went away.
    async fn next_from(&self, slot: &Slot, queue: &str) -> Result<Option<Box<dyn Delivery>>> {
        let mut slot = slot.lock().await;
        loop {
            let link = self.link().await;
            if slot
                .as_ref()
                .is_none_or(|(generation, _)| *generation != link.generation)
            {
                let prefetch = if queue == self.jobs_queue() {
                    self.job_prefetch.load(std::sync::atomic::Ordering::SeqCst)
                } else if queue == self.tasks_queue() {
                    self.config.prefetch.max(1)
                } else {
                    RESULTS_PREFETCH
                };
                match consume(&link, queue, prefetch, self.config.prefetch.max(1)).await {
                    Ok(consumer) => *slot = Some((link.generation, consumer)),
                    Err(e) if is_missing_queue(&e) => {
                        // The refusal closed the channel the other consumers share: they
                        // get a new one; this queue is not asked for again.
                        warn!(error = %e, queue, "the queue no longer exists");
                        self.reconnect(link.generation).await?;
                        return Err(CoreError::Transport(format!(
                            "rabbitmq: queue `{queue}` no longer exists (a job's result queue is deleted when the job ends)"
                        )));
                    }
                    Err(e) if !link.consume.status().connected() => {
                        warn!(error = %e, queue, "consume failed; reconnecting");
                        self.reconnect(link.generation).await?;
                        continue;
                    }
                    Err(e) => return Err(amqp_err(e)),
                }
            }
            let (generation, consumer) = slot.as_mut().expect("created above");
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    let delivery = RabbitDelivery(delivery);
                    if delivery.is_dead_letter() {
                        metrics::task_dead_lettered();
                        return Ok(Some(Box::new(delivery.into_failure())));
                    }
                    return Ok(Some(Box::new(delivery)));
                }
                Some(Err(e)) => {
                    warn!(error = %e, queue, "consumer failed; reconnecting");
                    let broken = *generation;
                    *slot = None;
                    self.reconnect(broken).await?;
                }
                None if link.consume.status().connected() => return Ok(None),
                None => {
                    let broken = *generation;
                    *slot = None;
                    self.reconnect(broken).await?;
                }
            }
        }
    }

    /// How many submissions the coordinator holds unacked at once: its `max_jobs` (a
    /// submission is acked when its job ends). Takes effect for the next submission consumer.
    pub fn set_job_prefetch(&self, jobs: usize) {
        let jobs = u16::try_from(jobs.max(1)).unwrap_or(u16::MAX);
        self.job_prefetch
            .store(jobs, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next job submission (coordinator side).
    pub async fn next_job(&self) -> Result<Option<Box<dyn Delivery>>> {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        self.next_from(&self.jobs, &self.jobs_queue()).await
    }

    /// Messages waiting in `queue` (for tests and autoscaling).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        Ok(self.queue_stats(queue).await?.0)
    }

    /// Messages ready in `queue` (not counting those delivered and not yet acked) and its
    /// consumers, from a passive declare on this process's connection.
    pub async fn queue_stats(&self, queue: &str) -> Result<(u32, u32)> {
        let link = self.link().await;
        let q = link
            .publish
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err)?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Stops taking tasks (a worker that drains): the broker delivers nothing more to this
    /// process, and messages it holds can still be acked or nacked. `next_task` returns
    /// `None` from now on.
    pub async fn stop_consuming_tasks(&self) -> Result<()> {
        self.stop_consuming(&self.tasks).await
    }

    /// Stops taking job submissions (a coordinator that stops): submissions of running jobs
    /// stay unacked and go to the next coordinator when this connection closes.
    pub async fn stop_consuming_jobs(&self) -> Result<()> {
        self.stop_consuming(&self.jobs).await
    }

    async fn stop_consuming(&self, slot: &Slot) -> Result<()> {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let link = self.link().await;
        if let Some((generation, consumer)) = slot.lock().await.take()
            && generation == link.generation
        {
            link.consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(amqp_err)?;
        }
        Ok(())
    }
}

/// A task message parked in the dead-letter queue `<p>.dead`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadTask {
    pub job_id: String,
    pub stage: u32,
    pub partition: u32,
    pub attempt: u32,
    /// Why the broker dead-lettered it (`delivery_limit`: every worker that took it died
    /// or gave it back; `rejected`; `expired`).
    pub reason: String,
    /// Deliveries from the task queue before it was dead-lettered, when the broker says.
    pub deliveries: Option<u64>,
    /// When it was dead-lettered (Unix seconds), when the broker says.
    pub dead_lettered_at: Option<u64>,
}

impl DeadTask {
    fn from_message(data: &[u8], headers: Option<&FieldTable>, delivery_limit: u32) -> Self {
        let task = v1::TaskDefinition::decode(data).unwrap_or_default();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name).cloned());
        let job_id = match header(JOB_HEADER) {
            Some(AMQPValue::LongString(job)) => job.to_string(),
            _ => task.job_id.clone(),
        };
        // The first x-death entry is the latest: reason, time and how often.
        let death = match header("x-death") {
            Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
                Some(AMQPValue::FieldTable(t)) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        };
        let field = |name: &str| death.as_ref().and_then(|t| t.inner().get(name).cloned());
        let reason = match field("reason") {
            Some(AMQPValue::LongString(r)) => r.to_string(),
            _ => "unknown".into(),
        };
        let dead_lettered_at = match field("time") {
            Some(AMQPValue::Timestamp(t)) => Some(t),
            _ => None,
        };
        // A quorum queue dead-letters at its delivery limit: that many returns, one more
        // delivery than the limit.
        let deliveries = (reason == "delivery_limit").then(|| u64::from(delivery_limit) + 1);
        DeadTask {
            job_id,
            stage: task.stage_id,
            partition: task.partition,
            attempt: task.attempt,
            reason,
            deliveries,
            dead_lettered_at,
        }
    }
}

/// What becomes of a dead-lettered task when the queue is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadFate {
    /// Left in the dead-letter queue.
    Keep,
    /// Moved back to the task queue with a fresh delivery count.
    Replay,
    /// Removed: nothing would run it (its job has ended).
    Remove,
}

impl RabbitQueue {
    /// Every task in the dead-letter queue, left there.
    pub async fn dead_tasks(&self) -> Result<Vec<DeadTask>> {
        let mut all = Vec::new();
        self.settle_dead_tasks(|tasks| {
            all = tasks.to_vec();
            async { vec![DeadFate::Keep; all.len()] }
        })
        .await?;
        Ok(all)
    }

    /// Takes every message of `<p>.dead` (unacked, on a channel of its own) and asks
    /// `decide` the fate of each: those to replay go back to the task queue (a fresh delivery
    /// count, the job header kept), those to remove are acked; closing the channel returns
    /// the rest to `<p>.dead`. Returns the tasks replayed or removed.
    pub async fn settle_dead_tasks<F, Fut>(&self, decide: F) -> Result<Vec<DeadTask>>
    where
        F: FnOnce(&[DeadTask]) -> Fut,
        Fut: Future<Output = Vec<DeadFate>>,
    {
        let link = self.link().await;
        let channel = link.connection.create_channel().await.map_err(amqp_err)?;
        let visited = async {
            let mut messages = Vec::new();
            while let Some(message) = channel
                .basic_get(
                    ShortString::from(self.dead_queue().as_str()),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(amqp_err)?
            {
                let delivery = message.delivery;
                let dead = DeadTask::from_message(
                    &delivery.data,
                    delivery.properties.headers().as_ref(),
                    self.config.delivery_limit,
                );
                messages.push((dead, delivery));
            }
            let tasks: Vec<DeadTask> = messages.iter().map(|(t, _)| t.clone()).collect();
            let fates = decide(&tasks).await;
            let mut moved = Vec::new();
            for ((dead, delivery), fate) in messages.into_iter().zip(fates) {
                match fate {
                    DeadFate::Keep => continue,
                    DeadFate::Replay => {
                        self.publish_with(&self.tasks_queue(), &delivery.data, Some(&dead.job_id))
                            .await?;
                    }
                    DeadFate::Remove => {}
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(amqp_err)?;
                moved.push(dead);
            }
            Ok::<_, CoreError>(moved)
        }
        .await;
        let closed = channel
            .close(200, ShortString::from("done"))
            .await
            .map_err(amqp_err);
        let moved = visited?;
        closed?;
        Ok(moved)
    }
}

/// Declares a durable quorum queue with `args`.
async fn declare_queue(link: &Link, name: &str, mut args: FieldTable) -> Result<()> {
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    link.publish
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(amqp_err)?;
    Ok(())
}

/// Binds `queue` to the headers exchange `exchange`: messages of `job` only, or all.
async fn bind_headers(link: &Link, queue: &str, exchange: &str, job: Option<&str>) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-match"),
        AMQPValue::LongString("all".into()),
    );
    if let Some(job) = job {
        args.insert(
            ShortString::from(JOB_HEADER),
            AMQPValue::LongString(job.into()),
        );
    }
    link.publish
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(""),
            QueueBindOptions::default(),
            args,
        )
        .await
        .map_err(amqp_err)
}

async fn publish(link: &Link, queue: &str, payload: &[u8], job: Option<&str>) -> Result<()> {
    let confirm = send(link, queue, payload, job).await?;
    confirmed(queue, confirm.await.map_err(amqp_err)?)
}

/// Sends a persistent, mandatory message to `queue` and returns the broker's confirm still
/// to come: a caller with many messages sends them all before waiting for any confirm.
async fn send(
    link: &Link,
    queue: &str,
    payload: &[u8],
    job: Option<&str>,
) -> Result<lapin::PublisherConfirm> {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(job) = job {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(JOB_HEADER),
            AMQPValue::LongString(job.into()),
        );
        properties = properties.with_headers(headers);
    }
    link.publish
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            properties,
        )
        .await
        .map_err(amqp_err)
}

/// How long to wait before sending a refused message again, after `refusals` refusals of
/// it; `None` once it has been refused six times (about 3 s in all): the refusal is then
/// not the moment a new quorum queue elects its leader, and the caller's error says so.
fn retry_refused_after(refusals: u32) -> Option<Duration> {
    (refusals < 6).then(|| Duration::from_millis(50 << refusals))
}

/// Waits before a refused message is sent again, or gives `refusal` back once the message
/// has been refused too often ([`retry_refused_after`]).
async fn wait_after_refusal(refusals: &mut u32, refusal: CoreError, queue: &str) -> Result<()> {
    let wait = retry_refused_after(*refusals).ok_or(refusal)?;
    warn!(
        queue,
        refusals = *refusals,
        "rabbitmq refused a message; sending it again"
    );
    *refusals += 1;
    tokio::time::sleep(wait).await;
    Ok(())
}

/// What the broker's confirm of a message to `queue` means.
fn confirmed(queue: &str, confirm: Confirmation) -> Result<()> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        // A mandatory publish that no queue took comes back as a return, then an ack.
        Confirmation::Ack(Some(_)) => Err(CoreError::Unroutable {
            queue: queue.to_string(),
        }),
        Confirmation::Nack(_) => Err(CoreError::Refused {
            queue: queue.to_string(),
        }),
    }
}

/// Sends every task of `tasks` (with its job's header), then waits for all their confirms.
async fn publish_all(link: &Link, queue: &str, tasks: &[(String, Bytes)]) -> Result<()> {
    let mut confirms = Vec::with_capacity(tasks.len());
    for (job, task) in tasks {
        confirms.push(send(link, queue, task, Some(job)).await?);
    }
    for confirm in futures::future::join_all(confirms).await {
        confirmed(queue, confirm.map_err(amqp_err)?)?;
    }
    Ok(())
}

/// A consumer of `queue` holding at most `prefetch` unacked messages; the channel's
/// default for later consumers stays `default_prefetch`.
async fn consume(
    link: &Link,
    queue: &str,
    prefetch: u16,
    default_prefetch: u16,
) -> std::result::Result<Consumer, lapin::Error> {
    if prefetch != default_prefetch {
        link.consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
    }
    let consumer = link
        .consume
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if prefetch != default_prefetch {
        link.consume
            .basic_qos(default_prefetch, BasicQosOptions::default())
            .await?;
    }
    Ok(consumer)
}

/// One message owned by this consumer until acked or nacked.
struct RabbitDelivery(lapin::message::Delivery);

/// A dead-lettered task that reached its job's result queue, presented to the coordinator
/// as the task's failure.
struct DeadLetter {
    delivery: RabbitDelivery,
    failure: Vec<u8>,
}

impl RabbitDelivery {
    fn is_dead_letter(&self) -> bool {
        self.0
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-death"))
    }

    /// The failure result standing for a dead-lettered task.
    fn into_failure(self) -> DeadLetter {
        let task = v1::TaskDefinition::decode(self.0.data.as_slice()).unwrap_or_default();
        let result = v1::TaskResult {
            protocol_version: nightshift_proto::PROTOCOL_VERSION,
            job_id: task.job_id,
            stage_id: task.stage_id,
            partition: task.partition,
            attempt: task.attempt,
            plan: task.plan,
            outcome: Some(v1::task_result::Outcome::Failed(v1::TaskFailed {
                message: "poison task: every worker that took it died before reporting; \
                          dead-lettered after the queue's delivery limit"
                    .into(),
                retryable: false,
            })),
            ..Default::default()
        };
        DeadLetter {
            delivery: self,
            failure: result.encode_to_vec(),
        }
    }
}

#[async_trait]
impl Delivery for DeadLetter {
    fn payload(&self) -> &[u8] {
        &self.failure
    }

    fn redeliveries(&self) -> u32 {
        self.delivery.redeliveries()
    }

    async fn ack(self: Box<Self>) -> Result<()> {
        Box::new(self.delivery).ack().await
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        Box::new(self.delivery).nack(requeue).await
    }
}

#[async_trait]
impl Delivery for RabbitDelivery {
    fn payload(&self) -> &[u8] {
        &self.0.data
    }

    fn redeliveries(&self) -> u32 {
        let count = self
            .0
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        match count {
            Some(AMQPValue::LongLongInt(n)) => n as u32,
            Some(AMQPValue::LongInt(n)) => n as u32,
            _ => u32::from(self.0.redelivered),
        }
    }

    async fn ack(self: Box<Self>) -> Result<()> {
        self.0
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp_err)?;
        Ok(())
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.0
            .acker
            .nack(BasicNackOptions {
                requeue,
                ..Default::default()
            })
            .await
            .map_err(amqp_err)?;
        Ok(())
    }
}

#[async_trait]
impl TaskQueue for RabbitQueue {
    async fn publish_task(&self, task: Bytes) -> Result<()> {
        self.publish_tasks(vec![task]).await
    }

    /// Sends the whole batch before waiting for a confirm: one broker round trip (and one
    /// quorum-queue write) for a stage's tasks, not one per task. After a lost connection
    /// the batch is sent again on the new one; a task delivered twice runs twice, which
    /// first-result-wins makes harmless.
    async fn publish_tasks(&self, tasks: Vec<Bytes>) -> Result<()> {
        let mut headed = Vec::with_capacity(tasks.len());
        let mut attempts = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (job, attempt) = v1::TaskDefinition::decode(task.as_ref())
                .map(|t| (t.job_id, t.attempt))
                .map_err(|e| CoreError::Protocol(format!("task message: {e}")))?;
            headed.push((job, task));
            attempts.push(attempt);
        }
        let queue = self.tasks_queue();
        let mut refusals = 0;
        loop {
            let link = self.link().await;
            match publish_all(&link, &queue, &headed).await {
                Ok(()) => break,
                Err(e) if !link.publish.status().connected() => {
                    warn!(error = %e, queue, "publish failed; reconnecting");
                    self.reconnect(link.generation).await?;
                }
                // Some tasks of the batch may be enqueued already: a task sent twice runs
                // twice, which first-result-wins makes harmless (as after a reconnect).
                Err(e @ CoreError::Refused { .. }) => {
                    wait_after_refusal(&mut refusals, e, &queue).await?
                }
                Err(e) => return Err(e),
            }
        }
        attempts.into_iter().for_each(metrics::task_published);
        Ok(())
    }

    async fn next_task(&self) -> Result<Option<Box<dyn Delivery>>> {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        self.next_from(&self.tasks, &self.tasks_queue()).await
    }

    async fn open_results(&self, job: &JobId) -> Result<()> {
        loop {
            let link = self.link().await;
            let queue = self.results_queue(job);
            let declared = match declare_queue(&link, &queue, FieldTable::default()).await {
                // ...and a job's dead tasks also reach its result queue, as failures.
                Ok(()) => {
                    bind_headers(
                        &link,
                        &queue,
                        &self.dead_letter_exchange(),
                        Some(job.as_str()),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match declared {
                Ok(()) => return Ok(()),
                Err(_) if !link.publish.status().connected() => {
                    self.reconnect(link.generation).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn publish_result(&self, job: &JobId, result: Bytes) -> Result<()> {
        self.publish_to(&self.results_queue(job), &result).await
    }

    async fn next_result(&self, job: &JobId) -> Result<Option<Box<dyn Delivery>>> {
        let slot = self
            .results
            .lock()
            .await
            .entry(job.clone())
            .or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone();
        self.next_from(&slot, &self.results_queue(job)).await
    }

    async fn close_results(&self, job: &JobId) -> Result<()> {
        let link = self.link().await;
        // Cancel our consumer before deleting its queue: a deletion racing the implicit
        // cancel of a dropped consumer makes the broker close the connection.
        if let Some(slot) = self.results.lock().await.remove(job)
            && let Some((generation, consumer)) = slot.lock().await.take()
            && generation == link.generation
        {
            link.consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(amqp_err)?;
        }
        let name = self.results_queue(job);
        debug!(queue = %name, "deleting result queue");
        link.publish
            .queue_delete(
                ShortString::from(name.as_str()),
                QueueDeleteOptions::default(),
            )
            .await
            .map_err(amqp_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn only_not_found_is_a_missing_queue() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let refused = |kind: AMQPErrorKind| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                kind,
                "refused".into(),
            )))
        };
        assert!(is_missing_queue(&refused(AMQPSoftError::NOTFOUND.into())));
        // Other refusals, and a lost connection, are not: those are retried.
        assert!(!is_missing_queue(&refused(
            AMQPSoftError::ACCESSREFUSED.into()
        )));
        assert!(!is_missing_queue(&refused(
            AMQPHardError::CONNECTIONFORCED.into()
        )));
        let lost = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!is_missing_queue(&lapin::Error::from(
            lapin::ErrorKind::IOError(std::sync::Arc::new(lost))
        )));
    }

    #[test]
    fn a_refused_message_is_sent_again_six_times_over_about_three_seconds() {
        let waits: Vec<Duration> = (0..).map_while(retry_refused_after).collect();
        assert_eq!(waits.len(), 6);
        assert_eq!(waits[0], Duration::from_millis(50));
        assert!(waits.windows(2).all(|w| w[1] == w[0] * 2), "{waits:?}");
        let total: Duration = waits.iter().sum();
        assert_eq!(total, Duration::from_millis(3150));
    }
}
