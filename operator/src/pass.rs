//! The region pass: observe the region's node Leases, fail over the slots of nodes that
//! failed, take one safe step towards the balanced placement, publish the map (replace with the
//! `resourceVersion` read, so two operators can never publish different maps under one
//! version), start hand-offs in the background, and delete the Leases of nodes that are gone.
//!
//! The decisions are `crate::region`'s (pure); this module does the I/O around them.

use crate::builders::{self, read_placement};
use crate::context::{Context, RegionState, lock};
use crate::crd::{Colo, Jurisdiction, ObjectNamespace};
use crate::error::{Error, Result};
use crate::node_admin::{NodeAdmin, Unfenced, unfenced_answer};
use crate::region::{
    self, ColoView, FailoverOutcome, Health, LeaseRef, NodeView, Nodes, PlanInput, PlannedHandoff,
    SlotProgress,
};
use crate::serving::served;
use crate::settings::{FIELD_MANAGER, NODE_PORT};
use colony_node::cluster::kubernetes::LABEL_COLO;
use colony_node::placement::{NodeInfo, PlacementMap};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Concurrent admin calls of one pass (fences, progress reports).
const ADMIN_CONCURRENCY: usize = 32;

/// What a region pass found and did, for the status of the region's Colos.
#[derive(Clone, Debug, Default)]
pub struct RegionOutcome {
    /// The placement as published after this pass.
    pub map: Option<PlacementMap>,
    pub health: BTreeMap<String, Health>,
    pub failover_errors: Vec<String>,
    /// Slots whose balanced owner is another live node.
    pub unbalanced: usize,
    /// Slots changing membership.
    pub changing: usize,
    pub handoffs_started: usize,
    pub unplaced: Vec<String>,
    pub slot_mismatch: Vec<String>,
    /// The region's node Leases left after this pass.
    pub leases: Vec<LeaseRef>,
    /// Slots fenced at an epoch not published yet (kept in the status of their colo).
    pub fenced: BTreeMap<(String, u32), u64>,
}

pub fn node_address(pod: &str, colo: &str, ns: &str) -> String {
    format!("{pod}.{colo}.{ns}.svc:{NODE_PORT}")
}

fn lease_duration(lease: Option<&Lease>, default: Duration) -> Duration {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(default)
}

fn deleting(c: &Colo) -> bool {
    c.meta().deletion_timestamp.is_some()
}

/// Replication of the namespaces served in the region: place for the largest replica count,
/// and require failover answers enough for the smallest write quorum.
fn region_replication(
    active: &[&Colo],
    ons: &[ObjectNamespace],
    jurisdictions: &[Jurisdiction],
    colos: &[Colo],
) -> (usize, usize) {
    let names: BTreeSet<String> = active.iter().map(|c| c.name_any()).collect();
    let mut replicas = 0usize;
    let mut write_quorum = usize::MAX;
    for on in ons {
        if let Ok(s) = served(on, jurisdictions, colos)
            && s.colos.iter().any(|c| names.contains(c))
        {
            replicas = replicas.max(s.config.replication.replicas);
            write_quorum = write_quorum.min(s.config.replication.write_quorum);
        }
    }
    if replicas == 0 {
        (5, 3)
    } else {
        (replicas, write_quorum)
    }
}

/// One pass over the region of `colos` named `region` in Kubernetes namespace `ns`. Runs only
/// while this operator leads.
pub async fn region_pass(
    ctx: &Arc<Context>,
    admin: &Arc<dyn NodeAdmin>,
    ns: &str,
    region: &str,
    colos: &[Colo],
    ons: &[ObjectNamespace],
    jurisdictions: &[Jurisdiction],
) -> Result<RegionOutcome> {
    let work: BoxFuture<'_, Result<RegionOutcome>> =
        Box::pin(pass(ctx, admin, ns, region, colos, ons, jurisdictions));
    ctx.leadership.run(work).await?
}

async fn pass(
    ctx: &Arc<Context>,
    admin: &Arc<dyn NodeAdmin>,
    ns: &str,
    region_name: &str,
    colos: &[Colo],
    ons: &[ObjectNamespace],
    jurisdictions: &[Jurisdiction],
) -> Result<RegionOutcome> {
    let state = ctx.region(ns, region_name);
    let _guard = state.lock.lock().await;
    let mut in_region: Vec<&Colo> = colos
        .iter()
        .filter(|c| c.spec.region == region_name)
        .collect();
    in_region.sort_by_key(|c| c.name_any());
    let active: Vec<&Colo> = in_region.iter().copied().filter(|c| !deleting(c)).collect();
    let (replicas, write_quorum) = region_replication(&active, ons, jurisdictions, colos);

    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let cm_name = builders::placement_name(region_name);
    let current = cm_api.get_opt(&cm_name).await?;
    let resource_version = current
        .as_ref()
        .and_then(|c| c.metadata.resource_version.clone());
    let previous = match &current {
        Some(cm) => read_placement(cm, region_name)?,
        None => None,
    };
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    let leases: BTreeMap<String, Lease> = lease_api
        .list(&ListParams::default().labels(&builders::node_lease_selector(region_name)))
        .await?
        .items
        .into_iter()
        .map(|l| (l.name_any(), l))
        .collect();
    let lease_refs: Vec<LeaseRef> = leases
        .values()
        .map(|l| LeaseRef {
            name: l.name_any(),
            colo: l.labels().get(LABEL_COLO).cloned().unwrap_or_default(),
            resource_version: l.metadata.resource_version.clone(),
        })
        .collect();

    let slot_count = previous
        .as_ref()
        .map(|m| m.slot_count)
        .or_else(|| active.first().map(|c| c.spec.slots.max(1) as u32))
        .unwrap_or(1024);
    let mut outcome = RegionOutcome::default();
    let mut map = previous
        .clone()
        .unwrap_or_else(|| region::empty_map(region_name, slot_count, replicas));
    let published_version = map.version;

    // The colos whose slots are placed: the region's Colos, and colos that are gone but whose
    // slots (objects homed there) are still in the map. A Colo being deleted keeps its slots
    // in the map (served by the others) but is never placed for the first time.
    let mut views: Vec<ColoView> = Vec::new();
    for c in &in_region {
        if c.spec.slots.max(1) as u32 != slot_count {
            outcome.slot_mismatch.push(c.name_any());
        } else if !deleting(c) || map.colos.contains_key(&c.name_any()) {
            views.push(ColoView {
                name: c.name_any(),
                slots: slot_count,
            });
        }
    }
    for colo in map.colos.keys() {
        if !views.iter().any(|v| v.name == *colo) && !outcome.slot_mismatch.contains(colo) {
            views.push(ColoView {
                name: colo.clone(),
                slots: slot_count,
            });
        }
    }

    // Every node the operator knows of, and whether its pod is wanted.
    let mut infos: BTreeMap<String, (NodeInfo, bool)> = BTreeMap::new();
    for c in &active {
        for pod in builders::pod_names(&c.name_any(), c.spec.nodes) {
            let info = NodeInfo {
                address: node_address(&pod, &c.name_any(), ns),
                name: pod.clone(),
                colo: c.name_any(),
            };
            infos.insert(pod, (info, true));
        }
    }
    for n in map.nodes.values() {
        infos
            .entry(n.name.clone())
            .or_insert_with(|| (n.clone(), false));
    }
    for l in &lease_refs {
        infos.entry(l.name.clone()).or_insert_with(|| {
            (
                NodeInfo {
                    address: node_address(&l.name, &l.colo, ns),
                    name: l.name.clone(),
                    colo: l.colo.clone(),
                },
                false,
            )
        });
    }
    let now = ctx.now();
    let nodes: Nodes = ctx.with_tracker(|t| {
        for c in &in_region {
            if let Some(s) = &c.status {
                t.seed(ns, &s.failing_nodes);
                for f in &s.fenced_slots {
                    if let (Ok(slot), Ok(epoch)) = (u32::try_from(f.slot), u64::try_from(f.epoch)) {
                        state.note_fenced(&c.name_any(), slot, epoch);
                    }
                }
            }
        }
        infos
            .into_iter()
            .map(|(name, (info, wanted))| {
                let lease = leases.get(&name);
                let renew = lease
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.renew_time.as_ref())
                    .map(|t| t.0.to_string());
                t.observe(ns, &name, renew.as_deref(), now);
                let d = lease_duration(lease, ctx.settings.node_lease_duration);
                let health = t.health(ns, &name, map.nodes.contains_key(&name), d, now);
                (
                    name,
                    NodeView {
                        info,
                        health,
                        wanted,
                    },
                )
            })
            .collect()
    });
    outcome.health = nodes
        .iter()
        .map(|(n, v)| (n.clone(), v.health.clone()))
        .collect();
    {
        let mut reported = lock(&ctx.reported);
        reported
            .failing_over
            .retain(|(n, node)| n != ns || nodes.get(node).is_none_or(|v| v.health.is_failed()));
    }

    if active.is_empty() {
        // Every colo of the region is going away: nothing to place or fail over, only the
        // Leases of the nodes that stopped to clean up.
        outcome.leases =
            delete_orphans(ctx, &lease_api, ns, &lease_refs, &nodes, &map, true).await?;
        outcome.map = previous;
        return Ok(outcome);
    }

    // Failover.
    let tasks = region::failover_tasks(&map, &nodes);
    let mut failovers: Vec<FailoverOutcome> = Vec::new();
    if tasks.is_empty() {
        // Nothing blocked in this region any more: a later blockage is a new episode.
        lock(&ctx.reported)
            .blocked
            .retain(|(n, colo, _)| n != ns || !map.colos.contains_key(colo));
    } else {
        // Once fenced, those members refuse the owner's epoch: it must be published whatever
        // comes of the failover.
        for t in &tasks {
            state.note_fenced(&t.colo, t.slot, t.fence_epoch);
        }
        let calls: Vec<(usize, NodeInfo, String, u32, u64)> = tasks
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                t.ask
                    .iter()
                    .map(move |n| (i, n.clone(), t.colo.clone(), t.slot, t.fence_epoch))
            })
            .collect();
        let results: Vec<(usize, String, Option<colony_node::lsn::Lsn>)> = futures::stream::iter(
            calls,
        )
        .map(|(i, node, colo, slot, epoch)| async move {
            match admin.fence(&node.address, &colo, slot, epoch).await {
                Ok(lsn) => (i, node.name, Some(lsn)),
                Err(e) => {
                    tracing::warn!(node = %node.name, colo, slot, error = %e, "fence failed");
                    ctx.admin_refused(ns, &e);
                    (i, node.name, None)
                }
            }
        })
        .buffer_unordered(ADMIN_CONCURRENCY)
        .collect()
        .await;
        let mut answers = vec![Vec::new(); tasks.len()];
        for (i, node, durable) in results {
            answers[i].push(region::report(&node, durable));
        }
        failovers = region::decide_failovers(&tasks, &answers, write_quorum);
        announce_failovers(ctx, ns, &map, &failovers, &nodes).await;
        region::apply_failovers(&mut map, &failovers);
    }
    outcome.failover_errors = blocked_messages(&failovers);

    // Hand-offs that completed since the last publication, and epochs fenced but not published.
    let done = state.done();
    region::apply_handoffs(&mut map, &done);
    let settled = region::finish_fenced(&mut map, &state.fenced(), &nodes);

    // How far the members of changing slots are.
    let progress = fetch_progress(admin, region::progress_queries(&map, &nodes)).await;

    let busy = state.busy();
    let plan = region::plan(&PlanInput {
        map: &map,
        published_version,
        colos: &views,
        nodes: &nodes,
        progress: &progress,
        busy: &busy,
        replicas,
        write_quorum,
        max_changing: ctx.settings.max_membership_changes,
        max_handoffs: ctx
            .settings
            .max_concurrent_handoffs
            .saturating_sub(busy.len()),
    });
    let mut map = plan.map;
    outcome.unplaced = plan.unplaced;
    outcome.unbalanced = plan.unbalanced;
    outcome.changing = plan.changing;

    // Publish.
    let changed = previous
        .as_ref()
        .is_none_or(|p| !region::same_placement(p, &map));
    if changed && !map.colos.is_empty() {
        map.version = published_version + 1;
        let cm = builders::placement_configmap(ns, &map, &active)?;
        publish(&cm_api, cm, resource_version).await?;
        tracing::info!(
            region = region_name,
            version = map.version,
            "placement published"
        );
        state.clear_done(&done);
        report_moved(ctx, ns, &map, &failovers).await;
    }
    state.settle_fenced(&settled);
    outcome.fenced = state.fenced();
    if !map.colos.is_empty() {
        // Hand-offs are planned against the map as now published.
        let handoffs: Vec<(PlannedHandoff, String)> = plan
            .handoffs
            .into_iter()
            .filter_map(|h| {
                let address = map.node(&h.from)?.address.clone();
                Some((h, address))
            })
            .collect();
        outcome.handoffs_started = handoffs.len();
        start_handoffs(ctx, &state, admin, ns, region_name, handoffs);
        outcome.map = Some(map.clone());
    }

    outcome.leases = delete_orphans(ctx, &lease_api, ns, &lease_refs, &nodes, &map, false).await?;
    Ok(outcome)
}

/// Replace with the `resourceVersion` read (or create when there was none): a concurrent
/// writer makes this fail with [`Error::Conflict`] instead of overwriting.
async fn publish(
    api: &Api<ConfigMap>,
    mut cm: ConfigMap,
    resource_version: Option<String>,
) -> Result<()> {
    let name = cm.name_any();
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    let result = match resource_version {
        Some(rv) => {
            cm.metadata.resource_version = Some(rv);
            api.replace(&name, &pp, &cm).await
        }
        None => api.create(&pp, &cm).await,
    };
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict {
            what: format!("ConfigMap {name}"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Progress of the changing slots: for each, the owner's report first, then its members'.
async fn fetch_progress(
    admin: &Arc<dyn NodeAdmin>,
    queries: Vec<region::ProgressQuery>,
) -> BTreeMap<(String, u32), SlotProgress> {
    let one = |q: region::ProgressQuery| {
        let admin = admin.clone();
        async move {
            let owner = admin.status(&q.owner.address, &q.colo, q.slot).await.ok()?;
            let mut members = Vec::with_capacity(q.members.len());
            for m in &q.members {
                if let Ok(s) = admin.status(&m.address, &q.colo, q.slot).await {
                    members.push((m.name.clone(), s));
                }
            }
            region::slot_progress(&q, &owner, &members).map(|p| ((q.colo.clone(), q.slot), p))
        }
    };
    futures::stream::iter(queries)
        .map(one)
        .buffer_unordered(ADMIN_CONCURRENCY)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Runs `handoffs` (owner's address with each) in the background, at most
/// `max_concurrent_handoffs` at once, and publishes each that succeeded as soon as it ends
/// (with any that ended with it): its owner has fenced itself, so the slot takes no writes until
/// its target is published, and must not wait for the batch's slowest hand-off. A hand-off that
/// timed out (`handoff_timeout`), was interrupted (`handoff_interrupted`) or failed is planned
/// again by a later pass if still wanted.
fn start_handoffs(
    ctx: &Arc<Context>,
    state: &Arc<RegionState>,
    admin: &Arc<dyn NodeAdmin>,
    ns: &str,
    region_name: &str,
    handoffs: Vec<(PlannedHandoff, String)>,
) {
    if handoffs.is_empty() {
        return;
    }
    let mut rest: Vec<PlannedHandoff> = handoffs.iter().map(|(h, _)| h.clone()).collect();
    state.begin(&rest);
    let (ctx, state, admin) = (ctx.clone(), state.clone(), admin.clone());
    let (ns, region_name) = (ns.to_string(), region_name.to_string());
    tokio::spawn(async move {
        let limit = ctx.settings.max_concurrent_handoffs.max(1);
        let mut ended = futures::stream::iter(handoffs)
            .map(|(h, address)| {
                let admin = admin.clone();
                async move {
                    let r = admin
                        .handoff(&address, &h.colo, h.slot, &h.to, h.epoch)
                        .await;
                    (h, r)
                }
            })
            .buffer_unordered(limit)
            // The hand-offs that ended together, published together.
            .ready_chunks(limit);
        while let Ok(Some(results)) = ctx.leadership.run(ended.next()).await {
            let mut done = Vec::new();
            let mut finished = Vec::new();
            for (h, r) in results {
                finished.push(h.clone());
                match r {
                    Ok(_) => {
                        ctx.metrics.handoff("done");
                        done.push(h);
                    }
                    Err(e) => match unfenced_answer(&e) {
                        Some(Unfenced::TimedOut) => {
                            ctx.metrics.handoff("timeout");
                            tracing::info!(colo = %h.colo, slot = h.slot, to = %h.to, "hand-off timed out; retried later");
                        }
                        Some(Unfenced::Interrupted) => {
                            // The slot stopped draining before the fence: a new placement moved it.
                            ctx.metrics.handoff("interrupted");
                            tracing::info!(colo = %h.colo, slot = h.slot, to = %h.to, error = %e, "hand-off interrupted by a new placement; planned again if still wanted");
                        }
                        None => {
                            // The owner may have fenced itself even though its answer was lost.
                            state.note_fenced(&h.colo, h.slot, h.epoch);
                            ctx.admin_refused(&ns, &e);
                            ctx.metrics.handoff("failed");
                            tracing::warn!(colo = %h.colo, slot = h.slot, to = %h.to, error = %e, "hand-off failed; retried later");
                        }
                    },
                }
            }
            if !done.is_empty() {
                state.completed(done);
                if let Err(e) = publish_handoffs(&ctx, &state, &ns, &region_name).await {
                    tracing::warn!(error = %e, region = %region_name, "cannot publish completed hand-offs yet; the next pass will");
                }
            }
            // Published (or kept to publish): a later pass may plan these slots again.
            state.release(&finished);
            rest.retain(|h| {
                !finished
                    .iter()
                    .any(|f| f.colo == h.colo && f.slot == h.slot)
            });
        }
        state.end(&rest);
    });
}

/// Publishes the completed hand-offs right away (the slots they move are not served until
/// then): the map as read, with them applied, replaced under its `resourceVersion`.
async fn publish_handoffs(
    ctx: &Arc<Context>,
    state: &RegionState,
    ns: &str,
    region_name: &str,
) -> Result<()> {
    let work: BoxFuture<'_, Result<()>> = Box::pin(async {
        let _guard = state.lock.lock().await;
        let done = state.done();
        if done.is_empty() {
            return Ok(());
        }
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let Some(cm) = api.get_opt(&builders::placement_name(region_name)).await? else {
            return Ok(());
        };
        let Some(mut map) = read_placement(&cm, region_name)? else {
            return Ok(());
        };
        let resource_version = cm.metadata.resource_version.clone();
        if region::apply_handoffs(&mut map, &done) > 0 {
            map.version += 1;
            publish(&api, builders::with_placement(cm, &map)?, resource_version).await?;
            tracing::info!(
                region = region_name,
                version = map.version,
                "hand-offs published"
            );
        }
        // Applied, or no longer matching the map (superseded): either way done with.
        state.clear_done(&done);
        Ok(())
    });
    ctx.leadership.run(work).await?
}

async fn delete_orphans(
    ctx: &Context,
    api: &Api<Lease>,
    ns: &str,
    leases: &[LeaseRef],
    nodes: &Nodes,
    map: &PlacementMap,
    teardown: bool,
) -> Result<Vec<LeaseRef>> {
    let orphans = region::orphan_leases(leases, nodes, map, teardown);
    for l in &orphans {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: l.resource_version.clone(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&l.name, &dp).await {
            Ok(_) => tracing::info!(lease = %l.name, "deleted the Lease of a node that is gone"),
            // Gone already, or renewed meanwhile (then it is not an orphan).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.with_tracker(|t| t.forget(ns, &l.name));
    }
    Ok(leases
        .iter()
        .filter(|l| !orphans.contains(l))
        .cloned()
        .collect())
}

fn colo_ref(ns: &str, colo: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(Colo::api_version(&()).to_string()),
        kind: Some(Colo::kind(&()).to_string()),
        name: Some(colo.to_string()),
        namespace: Some(ns.to_string()),
        ..ObjectReference::default()
    }
}

fn blocked_messages(outcomes: &[FailoverOutcome]) -> Vec<String> {
    let mut stuck: BTreeMap<&str, usize> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.result.is_err()) {
        *stuck.entry(o.from.as_str()).or_default() += 1;
    }
    stuck
        .into_iter()
        .map(|(n, k)| {
            format!("{k} slots of {n} could not fail over: too few of their followers answered")
        })
        .collect()
}

/// Events and counters for failover attempts, once per episode: `FailingOver` when a node's
/// slots start failing over, `FailoverBlocked` (and the `blocked` counter) when slots become
/// blocked.
async fn announce_failovers(
    ctx: &Context,
    ns: &str,
    map: &PlacementMap,
    outcomes: &[FailoverOutcome],
    nodes: &Nodes,
) {
    #[derive(Default)]
    struct PerNode {
        count: usize,
        new_blocked: usize,
        errors: Vec<String>,
    }
    let mut by_node: BTreeMap<&str, PerNode> = BTreeMap::new();
    let mut announce: Vec<&str> = Vec::new();
    {
        let mut reported = lock(&ctx.reported);
        let colos: BTreeSet<&String> = map.colos.keys().collect();
        let blocked_now: BTreeSet<(String, String, u32)> = outcomes
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| (ns.to_string(), o.colo.clone(), o.slot))
            .collect();
        for o in outcomes {
            let e = by_node.entry(o.from.as_str()).or_default();
            e.count += 1;
            if let Err(err) = &o.result {
                if !reported
                    .blocked
                    .contains(&(ns.to_string(), o.colo.clone(), o.slot))
                {
                    e.new_blocked += 1;
                }
                if e.errors.len() < 3 {
                    e.errors.push(format!("{}/{}: {err}", o.colo, o.slot));
                }
            }
        }
        reported
            .blocked
            .retain(|(n, colo, _)| n != ns || !colos.contains(colo));
        reported.blocked.extend(blocked_now);
        for node in by_node.keys() {
            if reported
                .failing_over
                .insert((ns.to_string(), node.to_string()))
            {
                announce.push(node);
            }
        }
    }
    for (node, per) in &by_node {
        let on = colo_ref(ns, map.node(node).map_or("", |n| n.colo.as_str()));
        if announce.contains(node) {
            let why = match nodes.get(*node).map(|n| &n.health) {
                Some(Health::Failed { since }) => {
                    format!("its Lease has not been renewed since {since}")
                }
                _ => "its Lease has lapsed".to_string(),
            };
            ctx.event(
                &on,
                EventType::Warning,
                "FailingOver",
                format!(
                    "node {node}: {why}; failing over the {} slots it owned",
                    per.count
                ),
            )
            .await;
        }
        if per.new_blocked > 0 {
            ctx.metrics.failover("blocked", per.new_blocked as u64);
            ctx.event(
                &on,
                EventType::Warning,
                "FailoverBlocked",
                format!(
                    "{} slots of {node} cannot fail over yet, e.g. {}",
                    per.new_blocked,
                    per.errors.join("; ")
                ),
            )
            .await;
        }
    }
}

/// After the map is published: a `FailoverTarget` event per (failed node, new owner), and the
/// `succeeded` counter.
async fn report_moved(ctx: &Context, ns: &str, map: &PlacementMap, outcomes: &[FailoverOutcome]) {
    let mut moved: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for o in outcomes {
        if let Ok(r) = &o.result {
            *moved
                .entry((o.from.as_str(), r.owner.as_str()))
                .or_default() += 1;
        }
    }
    for ((from, to), k) in moved {
        ctx.metrics.failover("succeeded", k as u64);
        let on = colo_ref(ns, map.node(from).map_or("", |n| n.colo.as_str()));
        ctx.event(
            &on,
            EventType::Normal,
            "FailoverTarget",
            format!(
                "{k} slots of {from} are now owned by {to} (placement version {})",
                map.version
            ),
        )
        .await;
    }
}
