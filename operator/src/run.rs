//! Wiring: wait for the CRDs, win the leader Lease, run the three controllers while leading,
//! serve health, and release the Lease on shutdown.

use crate::context::Context;
use crate::crd::{Colo, Jurisdiction, ObjectNamespace};
use crate::leader::{Elector, Leadership, Timing};
use crate::metrics::Metrics;
use crate::node_admin::HttpAdminConnector;
use crate::reconcile::{error_policy, reconcile_colo, reconcile_jurisdiction, reconcile_namespace};
use crate::server::{self, Health};
use crate::settings::Settings;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("lost the leader Lease {0}: exiting so that another replica takes over")]
    LostLeadership(String),
}

pub struct RunOptions {
    pub settings: Settings,
    pub listen: SocketAddr,
    pub leader_lease: String,
    pub leader_namespace: String,
    pub identity: String,
    pub leader_duration: Duration,
}

/// Waits until the API serves the colony.dev CRDs, instead of crash-looping before they exist.
pub async fn wait_for_crds(client: &Client) -> Result<(), RunError> {
    let mut logged = false;
    loop {
        let lp = ListParams::default().limit(1);
        let probes = (
            Api::<Colo>::all(client.clone()).list(&lp).await,
            Api::<Jurisdiction>::all(client.clone()).list(&lp).await,
            Api::<ObjectNamespace>::all(client.clone()).list(&lp).await,
        );
        match probes {
            (Ok(_), Ok(_), Ok(_)) => return Ok(()),
            (Err(kube::Error::Api(s)), _, _)
            | (_, Err(kube::Error::Api(s)), _)
            | (_, _, Err(kube::Error::Api(s)))
                if s.code == 404 =>
            {
                if !logged {
                    tracing::info!(
                        "the colony.dev CRDs are not installed yet; waiting (install the chart or `kubectl apply -f crds/`)"
                    );
                    logged = true;
                }
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::warn!(error = %e, "cannot list colony.dev resources yet; retrying");
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn same_namespace<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    ns: Option<String>,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == ns)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    opts.settings.check().map_err(RunError::Settings)?;
    let timing = Timing::from_lease(opts.leader_duration);
    if timing.lease < Duration::from_secs(2) {
        return Err(RunError::Settings(format!(
            "the leader lease duration must be at least 2s, not {:?}",
            timing.lease
        )));
    }
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.listen,
            source,
        })?;
    let app = server::router(Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });

    wait_for_crds(&client).await?;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("colony.dev CRDs are served");

    let leadership = Leadership::new();
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &opts.leader_namespace),
        &opts.leader_lease,
        &opts.identity,
        timing,
    );
    elector.acquire(&leadership).await;
    metrics.leader.set(1);
    tracing::info!(identity = %opts.identity, "holding the leader Lease: reconciling");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "colony-operator".into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        opts.settings.clone(),
        Arc::new(HttpAdminConnector {
            timeout: opts.settings.admin_timeout,
        }),
        recorder,
        metrics.clone(),
        leadership.clone(),
    ));
    let controllers = run_controllers(client.clone(), ctx);
    let outcome = tokio::select! {
        () = controllers => Ok(()),
        () = elector.keep(&leadership) => Err(RunError::LostLeadership(opts.leader_lease.clone())),
    };
    leadership.revoke();
    metrics.leader.set(0);
    if outcome.is_ok() {
        // Shutting down (signal): let a successor take over at once.
        if let Err(e) = elector.release().await {
            tracing::warn!(error = %e, "cannot release the leader Lease");
        } else {
            tracing::info!("released the leader Lease");
        }
    }
    outcome
}

async fn run_controllers(client: Client, ctx: Arc<Context>) {
    let wc = watcher::Config::default();
    let colos = Controller::new(Api::<Colo>::all(client.clone()), wc.clone());
    let colo_store = colos.store();
    let colo_store2 = colo_store.clone();
    let colos = colos
        .owns(Api::<StatefulSet>::all(client.clone()), wc.clone())
        .owns(Api::<Service>::all(client.clone()), wc.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), wc.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), wc.clone())
        .watches(
            Api::<ObjectNamespace>::all(client.clone()),
            wc.clone(),
            move |o| same_namespace(&colo_store, o.namespace()),
        )
        .watches(
            Api::<Jurisdiction>::all(client.clone()),
            wc.clone(),
            move |j| same_namespace(&colo_store2, j.namespace()),
        )
        .shutdown_on_signal()
        .run(reconcile_colo, error_policy, ctx.clone())
        .for_each(|_| async {});

    let ons = Controller::new(Api::<ObjectNamespace>::all(client.clone()), wc.clone());
    let on_store = ons.store();
    let on_store2 = on_store.clone();
    let ons = ons
        .watches(Api::<Colo>::all(client.clone()), wc.clone(), move |c| {
            same_namespace(&on_store, c.namespace())
        })
        .watches(
            Api::<Jurisdiction>::all(client.clone()),
            wc.clone(),
            move |j| same_namespace(&on_store2, j.namespace()),
        )
        .shutdown_on_signal()
        .run(reconcile_namespace, error_policy, ctx.clone())
        .for_each(|_| async {});

    let jurs = Controller::new(Api::<Jurisdiction>::all(client.clone()), wc.clone());
    let j_store = jurs.store();
    let jurs = jurs
        .watches(Api::<Colo>::all(client.clone()), wc.clone(), move |c| {
            same_namespace(&j_store, c.namespace())
        })
        .shutdown_on_signal()
        .run(reconcile_jurisdiction, error_policy, ctx)
        .for_each(|_| async {});

    futures::join!(colos, ons, jurs);
}
