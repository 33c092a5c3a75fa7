//! The reconcilers: thin adapters that read the cluster, call the pure builders and planners,
//! and write back with server-side apply under one field manager. Every reconcile runs only
//! while this operator leads, and is cut off when it can no longer prove it does.

use crate::builders;
use crate::conditions::{self, DEGRADED, Desired, PROGRESSING, READY};
use crate::context::{Context, apply, apply_status, ns_of, to_value};
use crate::crd::{
    Colo, ColoStatus, Jurisdiction, JurisdictionStatus, ObjectNamespace, ObjectNamespaceStatus,
};
use crate::error::{Error, Result};
use crate::pass::{RegionOutcome, region_pass};
use crate::region::{self, Health};
use crate::serving::{self, NotServed};
use crate::settings::FIELD_MANAGER;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs one reconcile under the leadership, with metrics.
async fn reconcile_as_leader(
    kind: &'static str,
    ctx: &Arc<Context>,
    work: BoxFuture<'_, Result<Action>>,
) -> Result<Action> {
    let started = Instant::now();
    let limit = ctx.settings.work_timeout();
    let result = match tokio::time::timeout(limit, ctx.leadership.run(work)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Timeout {
            what: "the reconcile",
            limit,
        }),
    };
    ctx.metrics.reconciled(
        kind,
        started.elapsed(),
        result.as_ref().err().map(Error::label),
    );
    result
}

// ---------------------------------------------------------------------------------------------
// Colo

pub async fn reconcile_colo(colo: Arc<Colo>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_as_leader("Colo", &ctx, Box::pin(reconcile_colo_inner(&colo, &ctx))).await
}

fn has_finalizer(colo: &Colo) -> bool {
    colo.finalizers().iter().any(|f| f == builders::FINALIZER)
}

/// Sets the Colo's finalizers with a merge patch carrying the `resourceVersion` read, so a
/// concurrent change of the list is never overwritten.
async fn set_finalizers(api: &Api<Colo>, colo: &Colo, finalizers: Vec<String>) -> Result<()> {
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": colo.resource_version()}});
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api
        .patch(&colo.name_any(), &pp, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict {
            what: format!("Colo {}", colo.name_any()),
        }),
        Err(e) => Err(e.into()),
    }
}

async fn reconcile_colo_inner(colo: &Colo, ctx: &Arc<Context>) -> Result<Action> {
    let ns = ns_of(colo, "Colo")?;
    let name = colo.name_any();
    let deleting = colo.meta().deletion_timestamp.is_some();
    if deleting && !has_finalizer(colo) {
        return Ok(Action::await_change());
    }
    let client = ctx.client.clone();
    let colo_api: Api<Colo> = Api::namespaced(client.clone(), &ns);
    let ons = Api::<ObjectNamespace>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let jurisdictions = Api::<Jurisdiction>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let colos = colo_api.list(&ListParams::default()).await?.items;
    if !deleting && !has_finalizer(colo) {
        let mut f = colo.finalizers().to_vec();
        f.push(builders::FINALIZER.to_string());
        set_finalizers(&colo_api, colo, f).await?;
    }

    let admin = ctx.node_admin(&ns).await?;
    let outcome = region_pass(
        ctx,
        &admin,
        &ns,
        &colo.spec.region,
        &colos,
        &ons,
        &jurisdictions,
    )
    .await?;
    if deleting {
        return drain(colo, ctx, &ns, &colos, &outcome).await;
    }

    let served = serving::namespaces_of_colo(&name, &ons, &jurisdictions, &colos);
    let config = builders::node_config(colo, &served, ctx.settings.node_lease_duration);
    let cm = builders::node_configmap(colo, &config)?;
    let hash = builders::config_hash(&config)?;
    let key_namespaces: Vec<String> = served.iter().map(|n| n.name.clone()).collect();
    let replicas = builders::statefulset_replicas(&name, colo.spec.nodes, outcome.map.as_ref());
    let pods = builders::pod_names(&name, replicas);

    apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::node_service_account(colo)?,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::node_role(colo, &pods)?,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::node_role_binding(colo)?,
    )
    .await?;
    apply(&Api::namespaced(client.clone(), &ns), &cm).await?;
    apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::headless_service(colo)?,
    )
    .await?;
    let sts = apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::statefulset(colo, &ctx.settings, &key_namespaces, &hash, replicas)?,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &ns),
        &builders::pod_disruption_budget(colo)?,
    )
    .await?;

    let facts = colo_facts(colo, ctx, &ns, &outcome, &sts, replicas, served.len());
    write_colo_status(colo, ctx, &ns, &facts).await?;
    Ok(Action::requeue(ctx.settings.observe_interval))
}

/// A Colo being deleted: its nodes' slots move to the region's other colos (by the region pass,
/// which no longer wants its pods), then its pods stop, their Leases lapse and are deleted, and
/// only then the finalizer goes (and with it, by garbage collection, everything it owns). When
/// no other colo of the region has nodes there is nowhere to move to: the data stays on the
/// volumes (kept), and the Colo goes.
async fn drain(
    colo: &Colo,
    ctx: &Arc<Context>,
    ns: &str,
    colos: &[Colo],
    outcome: &RegionOutcome,
) -> Result<Action> {
    let name = colo.name_any();
    let others_have_nodes = colos.iter().any(|c| {
        c.spec.region == colo.spec.region
            && c.name_any() != name
            && c.meta().deletion_timestamp.is_none()
            && c.spec.nodes > 0
    });
    let still_placed = outcome
        .map
        .as_ref()
        .is_some_and(|m| region::refers_to_colo(m, &name));
    let drained = !still_placed || !others_have_nodes;
    let mut pods_left = None;
    if drained {
        let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        pods_left = match sts_api
            .patch(&name, &pp, &Patch::Merge(json!({"spec": {"replicas": 0}})))
            .await
        {
            Ok(sts) => Some(sts.status.map_or(0, |s| s.replicas)),
            Err(kube::Error::Api(s)) if s.code == 404 => Some(0),
            Err(e) => return Err(e.into()),
        };
    }
    let leases_left = outcome.leases.iter().filter(|l| l.colo == name).count();
    if pods_left == Some(0) && leases_left == 0 {
        let rest: Vec<String> = colo
            .finalizers()
            .iter()
            .filter(|f| *f != builders::FINALIZER)
            .cloned()
            .collect();
        set_finalizers(&Api::namespaced(ctx.client.clone(), ns), colo, rest).await?;
        tracing::info!(colo = %name, "drained: the Colo can go");
        return Ok(Action::await_change());
    }
    let progress = if !drained {
        format!(
            "moving the slots of this colo's nodes to the other colos of region {}",
            colo.spec.region
        )
    } else {
        format!(
            "waiting for the node pods to stop ({} left) and their Leases to lapse ({} left)",
            pods_left.unwrap_or(0),
            leases_left
        )
    };
    let desired = vec![
        Desired::new(READY, false, "Deleting", "this colo is being deleted"),
        Desired::new(PROGRESSING, true, "Draining", progress),
        Desired::new(DEGRADED, false, "AsExpected", ""),
    ];
    let previous = colo.status.clone().unwrap_or_default();
    let status = ColoStatus {
        conditions: conditions::merge(
            &previous.conditions,
            &desired,
            colo.meta().generation,
            &ctx.now_text(),
        ),
        observed_generation: colo.meta().generation,
        ..previous
    };
    if colo.status.as_ref() != Some(&status) {
        apply_status::<Colo>(
            &Api::namespaced(ctx.client.clone(), ns),
            &name,
            to_value("Colo status", &status)?,
        )
        .await?;
    }
    Ok(Action::requeue(ctx.settings.observe_interval))
}

fn colo_facts(
    colo: &Colo,
    ctx: &Context,
    ns: &str,
    outcome: &RegionOutcome,
    sts: &StatefulSet,
    replicas: i32,
    served: usize,
) -> ColoFacts {
    let name = colo.name_any();
    let wanted = builders::pod_names(&name, colo.spec.nodes);
    let is = |n: &String, f: fn(&Health) -> bool| outcome.health.get(n).is_some_and(f);
    let ready_nodes = wanted.iter().filter(|n| is(n, Health::is_live)).count() as i32;
    let mut tracked: BTreeSet<String> = builders::pod_names(&name, replicas).into_iter().collect();
    if let Some(m) = &outcome.map {
        tracked.extend(
            m.nodes
                .values()
                .filter(|n| n.colo == name)
                .map(|n| n.name.clone()),
        );
    }
    let tracked: Vec<String> = tracked.into_iter().collect();
    let slots_owned = outcome.map.as_ref().map_or(0, |m| {
        tracked.iter().map(|n| m.owned_by(n)).sum::<usize>() as i32
    });
    let threshold = ctx.settings.node_lease_duration * 2 / 3;
    let failing = ctx.with_tracker(|t| t.failing(ns, &tracked, threshold, ctx.now()));
    let status = sts.status.as_ref();
    ColoFacts {
        name: name.clone(),
        nodes: colo.spec.nodes,
        ready_nodes,
        pods_ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
        pods_updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
        departing: (replicas - colo.spec.nodes).max(0),
        slots_placed: outcome.map.as_ref().is_some_and(|m| {
            m.colos
                .get(&name)
                .is_some_and(|c| c.slots.iter().all(|s| is(&s.owner, Health::is_live)))
        }),
        slot_mismatch: outcome.slot_mismatch.contains(&name),
        failing,
        failed: tracked
            .iter()
            .filter(|n| is(n, Health::is_failed))
            .cloned()
            .collect(),
        failover_errors: outcome.failover_errors.clone(),
        unbalanced: outcome.unbalanced,
        changing: outcome.changing,
        served,
        slots_owned,
        placement_version: outcome.map.as_ref().map_or(0, |m| m.version as i64),
        fenced: outcome
            .fenced
            .iter()
            .filter(|((colo, _), _)| *colo == name)
            .map(|((_, slot), epoch)| crate::crd::FencedSlot {
                slot: i64::from(*slot),
                epoch: i64::try_from(*epoch).unwrap_or(i64::MAX),
            })
            .collect(),
    }
}

async fn write_colo_status(colo: &Colo, ctx: &Context, ns: &str, f: &ColoFacts) -> Result<()> {
    let desired = colo_conditions(f);
    let previous = colo.status.clone().unwrap_or_default();
    let status = ColoStatus {
        conditions: conditions::merge(
            &previous.conditions,
            &desired,
            colo.meta().generation,
            &ctx.now_text(),
        ),
        observed_generation: colo.meta().generation,
        ready_nodes: f.ready_nodes,
        slots_owned: f.slots_owned,
        placement_version: f.placement_version,
        failing_nodes: f.failing.clone(),
        fenced_slots: f.fenced.clone(),
    };
    if colo.status.as_ref() != Some(&status) {
        apply_status::<Colo>(
            &Api::namespaced(ctx.client.clone(), ns),
            &f.name,
            to_value("Colo status", &status)?,
        )
        .await?;
    }
    Ok(())
}

/// What the Colo reconciler found, for [`colo_conditions`].
pub struct ColoFacts {
    pub name: String,
    pub nodes: i32,
    pub ready_nodes: i32,
    pub pods_ready: i32,
    pub pods_updated: i32,
    /// Pods beyond `nodes` kept until their slots have moved away.
    pub departing: i32,
    pub slots_placed: bool,
    pub slot_mismatch: bool,
    pub failing: Vec<crate::crd::FailingNode>,
    pub failed: Vec<String>,
    pub failover_errors: Vec<String>,
    pub unbalanced: usize,
    pub changing: usize,
    pub served: usize,
    pub slots_owned: i32,
    pub placement_version: i64,
    pub fenced: Vec<crate::crd::FencedSlot>,
}

/// The Colo's conditions from what the reconciler found (pure).
pub fn colo_conditions(f: &ColoFacts) -> Vec<Desired> {
    let ready = if f.slot_mismatch {
        Desired::new(
            READY,
            false,
            "SlotCountMismatch",
            format!(
                "colo {} has a different slot count than the other colos of its region; all colos of a region must use the same `slots`",
                f.name
            ),
        )
    } else if f.nodes == 0 {
        Desired::new(
            READY,
            false,
            "NoNodes",
            "spec.nodes is 0: this colo has no node pods",
        )
    } else if f.ready_nodes < f.nodes {
        Desired::new(
            READY,
            false,
            "NodesNotReady",
            format!(
                "{} of {} node pods renew their Lease ({} pods ready)",
                f.ready_nodes, f.nodes, f.pods_ready
            ),
        )
    } else if !f.slots_placed {
        Desired::new(
            READY,
            false,
            "SlotsNotPlaced",
            "not every slot of this colo has a live owner in the published placement map yet",
        )
    } else if f.served == 0 {
        Desired::new(
            READY,
            true,
            "NoNamespaces",
            format!(
                "{} nodes ready, but no ObjectNamespace is served here yet",
                f.ready_nodes
            ),
        )
    } else {
        Desired::new(
            READY,
            true,
            "AllNodesReady",
            format!(
                "{} nodes ready, serving {} namespace(s)",
                f.ready_nodes, f.served
            ),
        )
    };
    let total = f.nodes + f.departing;
    let progressing = if f.departing > 0 {
        Desired::new(
            PROGRESSING,
            true,
            "ScalingDown",
            format!(
                "{} node pod(s) beyond spec.nodes hand their slots over before they are removed",
                f.departing
            ),
        )
    } else if f.pods_updated < total || f.pods_ready < total {
        Desired::new(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{} of {} pods updated, {} ready",
                f.pods_updated, total, f.pods_ready
            ),
        )
    } else if f.unbalanced > 0 || f.changing > 0 {
        Desired::new(
            PROGRESSING,
            true,
            "Rebalancing",
            format!(
                "in the region, {} slots are to be handed to their balanced owner and {} are changing replicas",
                f.unbalanced, f.changing
            ),
        )
    } else {
        Desired::new(PROGRESSING, false, "Stable", "nothing to roll out or move")
    };
    let failing: Vec<&str> = f.failing.iter().map(|n| n.name.as_str()).collect();
    let degraded = if !f.failover_errors.is_empty() {
        Desired::new(
            DEGRADED,
            true,
            "FailoverBlocked",
            f.failover_errors.join("; "),
        )
    } else if !f.failed.is_empty() {
        Desired::new(
            DEGRADED,
            true,
            "NodesFailed",
            format!(
                "Lease not renewed for its whole duration: {}",
                f.failed.join(", ")
            ),
        )
    } else if !failing.is_empty() {
        Desired::new(
            DEGRADED,
            true,
            "NodesFailing",
            format!("Lease not renewed lately: {}", failing.join(", ")),
        )
    } else {
        Desired::new(DEGRADED, false, "AsExpected", "all nodes renew their Lease")
    };
    vec![ready, progressing, degraded]
}

// ---------------------------------------------------------------------------------------------
// ObjectNamespace

pub async fn reconcile_namespace(on: Arc<ObjectNamespace>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_as_leader(
        "ObjectNamespace",
        &ctx,
        Box::pin(reconcile_namespace_inner(&on, &ctx)),
    )
    .await
}

/// What the ObjectNamespace reconciler found, for [`namespace_conditions`].
pub struct NamespaceFacts {
    pub name: String,
    pub jurisdiction: Option<String>,
    /// Why it is served nowhere, if it is not.
    pub not_served: Option<NotServed>,
    pub colos: Vec<String>,
    pub replicas: i32,
    /// Per region served: (region, nodes wanted in it, its colos).
    pub regions: Vec<(String, i32, Vec<String>)>,
}

/// The ObjectNamespace's conditions (pure): what only the cluster state can tell.
pub fn namespace_conditions(f: &NamespaceFacts) -> Vec<Desired> {
    let short = f.regions.iter().find(|(_, nodes, _)| *nodes < f.replicas);
    let ready = if let Some(why) = &f.not_served {
        Desired::new(READY, false, why.reason(), why.message())
    } else if f.colos.is_empty() {
        Desired::new(
            READY,
            false,
            "NoColos",
            match &f.jurisdiction {
                Some(j) => format!(
                    "no Colo is allowed by Jurisdiction {j:?}; objects of {:?} have nowhere to live",
                    f.name
                ),
                None => format!(
                    "no Colo exists yet; objects of {:?} have nowhere to live",
                    f.name
                ),
            },
        )
    } else if let Some((region, nodes, colos)) = short {
        Desired::new(
            READY,
            false,
            "TooFewNodes",
            format!(
                "replicas is {} but region {region:?} has only {nodes} node(s) in {} colo(s) ({}); replicas are placed within a region: add nodes or colos there, or use fewer replicas",
                f.replicas,
                colos.len(),
                colos.join(", ")
            ),
        )
    } else {
        Desired::new(
            READY,
            true,
            "Served",
            format!(
                "served in {} colo(s): {}",
                f.colos.len(),
                f.colos.join(", ")
            ),
        )
    };
    let ok = ready.status;
    vec![
        ready,
        Desired::new(
            PROGRESSING,
            false,
            if ok { "Stable" } else { "Waiting" },
            if ok {
                "nothing to do"
            } else {
                "waiting for the problem in the Ready condition to be fixed"
            },
        ),
        Desired::new(DEGRADED, false, "AsExpected", ""),
    ]
}

async fn reconcile_namespace_inner(on: &ObjectNamespace, ctx: &Context) -> Result<Action> {
    if on.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ns_of(on, "ObjectNamespace")?;
    let name = on.name_any();
    let client = ctx.client.clone();
    let jurisdictions = match &on.spec.jurisdiction {
        Some(j) => Api::<Jurisdiction>::namespaced(client.clone(), &ns)
            .get_opt(j)
            .await?
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    let colos = Api::<Colo>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let served = serving::served(on, &jurisdictions, &colos);
    let colo_names = served.as_ref().map(|s| s.colos.clone()).unwrap_or_default();
    let mut regions: BTreeMap<String, (i32, Vec<String>)> = BTreeMap::new();
    for c in colos.iter().filter(|c| colo_names.contains(&c.name_any())) {
        let e = regions.entry(c.spec.region.clone()).or_default();
        e.0 += c.spec.nodes.max(0);
        e.1.push(c.name_any());
    }
    let nodes: i32 = regions.values().map(|(n, _)| n).sum();

    // The ID key Secret of a valid ObjectNamespace: created once, never read, rewritten or
    // deleted by the operator (a conflict means it exists). Node pods mount it once status
    // names it.
    let mut keys_secret = on.status.as_ref().and_then(|s| s.keys_secret.clone());
    let valid = !matches!(served, Err(NotServed::InvalidSpec(_)));
    if keys_secret.is_none() && valid {
        let key = hex::encode(colony_node::id::IdKeys::generate_key());
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        match Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&pp, &builders::ids_secret(on, &key)?)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        keys_secret = Some(builders::ids_secret_name(&name));
    }

    let facts = NamespaceFacts {
        name: name.clone(),
        jurisdiction: on.spec.jurisdiction.clone(),
        not_served: served.err(),
        colos: colo_names.clone(),
        replicas: on.spec.replicas,
        regions: regions.into_iter().map(|(r, (n, c))| (r, n, c)).collect(),
    };
    let desired = namespace_conditions(&facts);
    let previous = on.status.clone().unwrap_or_default();
    let status = ObjectNamespaceStatus {
        conditions: conditions::merge(
            &previous.conditions,
            &desired,
            on.meta().generation,
            &ctx.now_text(),
        ),
        observed_generation: on.meta().generation,
        colo_count: colo_names.len() as i32,
        colos: colo_names,
        nodes,
        keys_secret,
    };
    if on.status.as_ref() != Some(&status) {
        apply_status::<ObjectNamespace>(
            &Api::namespaced(client, &ns),
            &name,
            to_value("ObjectNamespace status", &status)?,
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

// ---------------------------------------------------------------------------------------------
// Jurisdiction

pub async fn reconcile_jurisdiction(j: Arc<Jurisdiction>, ctx: Arc<Context>) -> Result<Action> {
    reconcile_as_leader(
        "Jurisdiction",
        &ctx,
        Box::pin(reconcile_jurisdiction_inner(&j, &ctx)),
    )
    .await
}

async fn reconcile_jurisdiction_inner(j: &Jurisdiction, ctx: &Context) -> Result<Action> {
    if j.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ns_of(j, "Jurisdiction")?;
    let colos = Api::<Colo>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let allowed = serving::allowed_colos(j, &colos);
    let ready = if allowed.is_empty() {
        Desired::new(
            READY,
            false,
            "NoColos",
            format!(
                "no Colo in regions [{}] or named [{}] exists yet",
                j.spec.regions.join(", "),
                j.spec.colos.join(", ")
            ),
        )
    } else {
        Desired::new(
            READY,
            true,
            "ColosAvailable",
            format!("allows {} colo(s): {}", allowed.len(), allowed.join(", ")),
        )
    };
    let degraded = match serving::split_region(j, &colos) {
        Some(split) => Desired::new(DEGRADED, true, split.reason(), split.message()),
        None => Desired::new(DEGRADED, false, "AsExpected", ""),
    };
    let ok = ready.status;
    let desired = vec![
        ready,
        Desired::new(
            PROGRESSING,
            false,
            if ok { "Stable" } else { "Waiting" },
            "",
        ),
        degraded,
    ];
    let previous = j.status.clone().unwrap_or_default();
    let status = JurisdictionStatus {
        conditions: conditions::merge(
            &previous.conditions,
            &desired,
            j.meta().generation,
            &ctx.now_text(),
        ),
        observed_generation: j.meta().generation,
        colo_count: allowed.len() as i32,
        colos: allowed,
    };
    if j.status.as_ref() != Some(&status) {
        apply_status::<Jurisdiction>(
            &Api::namespaced(ctx.client.clone(), &ns),
            &j.name_any(),
            to_value("Jurisdiction status", &status)?,
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Retry policy of all controllers: back off a little (a lost leadership or a conflict is
/// retried after a fresh read).
pub fn error_policy<K>(_obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    match err {
        Error::NotLeader(_) => Action::requeue(ctx.settings.observe_interval),
        Error::Conflict { .. } => {
            tracing::info!(error = %err, "reconcile lost a race");
            Action::requeue(Duration::from_secs(1))
        }
        _ => {
            tracing::warn!(error = %err, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
