//! Which colos serve an ObjectNamespace (pure): the one answer both the Colo reconciler (what
//! goes into a colo's node configuration) and the ObjectNamespace reconciler (its conditions)
//! use, so they can never disagree.

use crate::builders;
use crate::crd::{Colo, Jurisdiction, ObjectNamespace};
use colony_node::config::NamespaceConfig;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};

/// Why an ObjectNamespace is served nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotServed {
    /// Its spec cannot be turned into a node configuration (bad name, bad limit).
    InvalidSpec(String),
    JurisdictionNotFound(String),
    /// Its Jurisdiction allows some colos of a region but not the others. Replicas of a slot
    /// are placed anywhere in the slot's region, so objects could be copied out of the
    /// jurisdiction: the namespace is not served until the jurisdiction covers whole regions.
    JurisdictionSplitsRegion {
        jurisdiction: String,
        region: String,
        allowed: Vec<String>,
        outside: Vec<String>,
    },
}

impl NotServed {
    pub fn reason(&self) -> &'static str {
        match self {
            NotServed::InvalidSpec(_) => "InvalidSpec",
            NotServed::JurisdictionNotFound(_) => "JurisdictionNotFound",
            NotServed::JurisdictionSplitsRegion { .. } => "JurisdictionSplitsRegion",
        }
    }

    pub fn message(&self) -> String {
        match self {
            NotServed::InvalidSpec(why) => why.clone(),
            NotServed::JurisdictionNotFound(j) => format!(
                "Jurisdiction {j:?} does not exist in this Kubernetes namespace; create it or change spec.jurisdiction"
            ),
            NotServed::JurisdictionSplitsRegion {
                jurisdiction,
                region,
                allowed,
                outside,
            } => format!(
                "Jurisdiction {jurisdiction:?} allows colos [{}] of region {region:?} but not [{}]; the replicas of an object are placed anywhere in its region, so its data could leave the jurisdiction. Allow the whole region (spec.regions), or move the other colos to another region. Not served until then",
                allowed.join(", "),
                outside.join(", ")
            ),
        }
    }
}

/// The colos (existing, not being deleted, Colo resources) a jurisdiction allows, sorted.
pub fn allowed_colos(j: &Jurisdiction, colos: &[Colo]) -> Vec<String> {
    let mut out: Vec<String> = colos
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter(|c| j.spec.colos.contains(&c.name_any()) || j.spec.regions.contains(&c.spec.region))
        .map(|c| c.name_any())
        .collect();
    out.sort();
    out
}

/// The first region a jurisdiction allows only part of, if any.
pub fn split_region(j: &Jurisdiction, colos: &[Colo]) -> Option<NotServed> {
    let allowed: BTreeSet<String> = allowed_colos(j, colos).into_iter().collect();
    let mut by_region: BTreeMap<&str, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for c in colos
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
    {
        let e = by_region.entry(c.spec.region.as_str()).or_default();
        if allowed.contains(&c.name_any()) {
            e.0.push(c.name_any());
        } else {
            e.1.push(c.name_any());
        }
    }
    by_region
        .into_iter()
        .find(|(_, (inside, outside))| !inside.is_empty() && !outside.is_empty())
        .map(|(region, (mut inside, mut outside))| {
            inside.sort();
            outside.sort();
            NotServed::JurisdictionSplitsRegion {
                jurisdiction: j.name_any(),
                region: region.to_string(),
                allowed: inside,
                outside,
            }
        })
}

/// A namespace that is served: its node configuration and the colos that serve it (sorted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub config: NamespaceConfig,
    pub colos: Vec<String>,
}

/// Where `ns` is served, or why nowhere. Colos being deleted serve nothing new.
pub fn served(
    ns: &ObjectNamespace,
    jurisdictions: &[Jurisdiction],
    colos: &[Colo],
) -> Result<Served, NotServed> {
    let config = builders::namespace_config(ns).map_err(NotServed::InvalidSpec)?;
    let colos_served = match &ns.spec.jurisdiction {
        None => {
            let mut all: Vec<String> = colos
                .iter()
                .filter(|c| c.metadata.deletion_timestamp.is_none())
                .map(|c| c.name_any())
                .collect();
            all.sort();
            all
        }
        Some(name) => {
            let j = jurisdictions
                .iter()
                .find(|j| j.name_any() == *name)
                .ok_or_else(|| NotServed::JurisdictionNotFound(name.clone()))?;
            if let Some(split) = split_region(j, colos) {
                return Err(split);
            }
            allowed_colos(j, colos)
        }
    };
    Ok(Served {
        config,
        colos: colos_served,
    })
}

/// The namespaces a colo serves: served there, and whose ID key Secret exists (the
/// ObjectNamespace reconciler records it in status once created), so the node pods never wait
/// for a Secret that is not there yet.
pub fn namespaces_of_colo(
    colo: &str,
    namespaces: &[ObjectNamespace],
    jurisdictions: &[Jurisdiction],
    colos: &[Colo],
) -> Vec<NamespaceConfig> {
    let mut out: Vec<NamespaceConfig> = namespaces
        .iter()
        .filter(|ns| {
            ns.metadata.deletion_timestamp.is_none()
                && ns.status.as_ref().is_some_and(|s| s.keys_secret.is_some())
        })
        .filter_map(|ns| served(ns, jurisdictions, colos).ok())
        .filter(|s| s.colos.iter().any(|c| c == colo))
        .map(|s| s.config)
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
