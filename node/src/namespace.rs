//! A namespace as a node serves it: its settings, its ID keys, and which of its objects hold data.

use crate::config::NamespaceConfig;
use crate::id::{IdKeys, ObjectId};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

pub struct Namespace {
    pub name: Arc<str>,
    pub config: NamespaceConfig,
    pub keys: IdKeys,
    /// Objects of this namespace with data on this node, ordered for paging.
    index: Mutex<BTreeSet<ObjectId>>,
}

impl Namespace {
    pub fn new(config: NamespaceConfig, keys: IdKeys) -> Self {
        Namespace {
            name: Arc::from(config.name.as_str()),
            config,
            keys,
            index: Mutex::new(BTreeSet::new()),
        }
    }

    fn index(&self) -> MutexGuard<'_, BTreeSet<ObjectId>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mark_has_data(&self, id: ObjectId) {
        self.index().insert(id);
    }

    pub fn mark_empty(&self, id: &ObjectId) {
        self.index().remove(id);
    }

    pub fn object_count(&self) -> usize {
        self.index().len()
    }

    /// Up to `limit` object IDs after `after`, and whether more follow.
    pub fn list(&self, after: Option<&ObjectId>, limit: usize) -> (Vec<ObjectId>, bool) {
        let index = self.index();
        let mut iter: Box<dyn Iterator<Item = &ObjectId>> = match after {
            Some(a) => {
                Box::new(index.range((std::ops::Bound::Excluded(*a), std::ops::Bound::Unbounded)))
            }
            None => Box::new(index.iter()),
        };
        let page: Vec<ObjectId> = iter.by_ref().take(limit).copied().collect();
        let more = iter.next().is_some();
        (page, more)
    }
}
