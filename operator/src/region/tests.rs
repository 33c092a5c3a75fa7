use super::*;
use colony_node::placement::ColoSlots;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
}

const D: Duration = Duration::from_secs(15);

#[test]
fn a_first_sighting_is_unknown_and_only_a_renewal_makes_a_node_live() {
    let mut t = LeaseTracker::default();
    assert_eq!(t.health("colony", "a", false, D, at(0)), Health::Starting);
    t.observe("colony", "a", Some("r1"), at(0));
    assert_eq!(
        t.health("colony", "a", true, D, at(1)),
        Health::Unknown,
        "a Lease seen once proves nothing"
    );
    t.observe("colony", "a", Some("r2"), at(5));
    assert_eq!(t.health("colony", "a", true, D, at(5)), Health::Live);
    assert_eq!(
        t.health("colony", "a", true, D, at(19)),
        Health::Live,
        "renewed at 5"
    );
    assert_eq!(
        t.health("colony", "a", true, D, at(20)),
        Health::Failed { since: at(5) }
    );
    // Never renewed after the first sighting: failed a whole duration after it.
    t.observe("colony", "b", Some("r1"), at(0));
    assert_eq!(
        t.health("colony", "b", true, D, at(15)),
        Health::Failed { since: at(0) }
    );
    // A pod without a Lease that is not placed is starting, never failed.
    t.observe("colony", "c", None, at(0));
    assert_eq!(t.health("colony", "c", false, D, at(100)), Health::Starting);
    assert_eq!(
        t.health("colony", "c", true, D, at(100)),
        Health::Failed { since: at(0) }
    );
    let failing = t.failing(
        "colony",
        &["a".into(), "b".into(), "c".into()],
        Duration::from_secs(10),
        at(16),
    );
    assert_eq!(
        failing.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(failing[0].renew_time, "r2");
}

#[test]
fn nodes_of_the_same_name_in_two_namespaces_are_tracked_apart() {
    let mut t = LeaseTracker::default();
    t.observe("one", "ams-0", Some("r1"), at(0));
    t.observe("one", "ams-0", Some("r2"), at(5));
    t.observe("two", "ams-0", Some("x"), at(5));
    assert_eq!(t.health("one", "ams-0", true, D, at(6)), Health::Live);
    assert_eq!(t.health("two", "ams-0", true, D, at(6)), Health::Unknown);
    t.forget("one", "ams-0");
    assert!(t.seen("one", "ams-0").is_none());
    assert!(t.seen("two", "ams-0").is_some());
}

#[test]
fn recorded_failing_since_survives_a_restart_unless_the_lease_moved() {
    let rec = [FailingNode {
        name: "a".into(),
        renew_time: "r1".into(),
        since: at(0).to_string(),
    }];
    let mut t = LeaseTracker::default();
    t.seed("colony", &rec);
    t.observe("colony", "a", Some("r1"), at(16));
    assert_eq!(
        t.health("colony", "a", true, D, at(16)),
        Health::Failed { since: at(0) }
    );
    let mut t = LeaseTracker::default();
    t.seed("colony", &rec);
    t.observe("colony", "a", Some("r2"), at(16));
    assert_eq!(t.health("colony", "a", true, D, at(16)), Health::Live);
}

// ---------------------------------------------------------------------------------------------
// Planning

fn info(name: &str) -> NodeInfo {
    let colo = name.split('-').next().unwrap_or(name).to_string();
    NodeInfo {
        name: name.into(),
        address: format!("{name}.{colo}.colony.svc:8787"),
        colo,
    }
}

fn view(name: &str, health: Health, wanted: bool) -> (String, NodeView) {
    (
        name.to_string(),
        NodeView {
            info: info(name),
            health,
            wanted,
        },
    )
}

fn live(names: &[&str]) -> Nodes {
    names.iter().map(|n| view(n, Health::Live, true)).collect()
}

fn placed(names: &[&str], slots: u32, replicas: usize) -> PlacementMap {
    let nodes: Vec<NodeInfo> = names.iter().map(|n| info(n)).collect();
    let a = assign_slots(&AssignInput {
        colo: "ams",
        slot_count: slots,
        replicas,
        nodes: &nodes,
        previous: None,
    })
    .expect("assigns");
    PlacementMap {
        region: "eu".into(),
        version: 1,
        slot_count: slots,
        replicas,
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        colos: BTreeMap::from([("ams".to_string(), a.slots)]),
    }
}

fn colos(slots: u32) -> Vec<ColoView> {
    vec![ColoView {
        name: "ams".into(),
        slots,
    }]
}

/// Every member of every slot reports having everything; every owner applied `version`.
fn all_caught_up(map: &PlacementMap, version: u64) -> BTreeMap<(String, u32), SlotProgress> {
    let mut out = BTreeMap::new();
    for (colo, slots) in &map.colos {
        for (i, s) in slots.slots.iter().enumerate() {
            out.insert(
                (colo.clone(), i as u32),
                SlotProgress {
                    owner_placement_version: version,
                    owner_durable: Lsn::new(s.epoch, 10),
                    members: s
                        .receivers()
                        .map(|m| (m.to_string(), Lsn::new(s.epoch, 10)))
                        .collect(),
                },
            );
        }
    }
    out
}

fn input<'a>(
    map: &'a PlacementMap,
    colos: &'a [ColoView],
    nodes: &'a Nodes,
    progress: &'a BTreeMap<(String, u32), SlotProgress>,
    busy: &'a BTreeSet<(String, u32)>,
) -> PlanInput<'a> {
    PlanInput {
        map,
        published_version: map.version,
        colos,
        nodes,
        progress,
        busy,
        replicas: 3,
        write_quorum: 2,
        max_changing: 64,
        max_handoffs: 64,
    }
}

/// The safety rule of membership changes, checked between two published maps: a node leaves a
/// slot's replica set only from `leaving`; a voter never disappears directly; owners change only
/// with an epoch bump to a node that was a voter.
fn assert_safe_step(before: &PlacementMap, after: &PlacementMap) {
    for (colo, slots) in &before.colos {
        for (i, b) in slots.slots.iter().enumerate() {
            let a = &after.colos[colo].slots[i];
            for m in b.receivers() {
                if !a.has(m) {
                    assert!(
                        b.leaving.iter().any(|l| l == m),
                        "slot {i}: {m} removed without leaving first: {b:?} -> {a:?}"
                    );
                }
            }
            for m in b.members() {
                assert!(
                    a.members().any(|x| x == m) || a.leaving.iter().any(|l| l == m),
                    "slot {i}: voter {m} dropped directly: {b:?} -> {a:?}"
                );
            }
            if a.owner != b.owner {
                assert_eq!(
                    a.epoch,
                    b.epoch + 1,
                    "slot {i}: owner change bumps the epoch"
                );
                assert!(
                    b.followers.contains(&a.owner),
                    "slot {i}: new owner {} was not a voter",
                    a.owner
                );
            } else {
                assert_eq!(a.epoch, b.epoch, "slot {i}");
            }
        }
    }
}

/// Runs passes (publish, hand-offs done, everyone caught up) until nothing changes; checks every
/// step. Returns the final map and the hand-offs made.
fn converge(mut map: PlacementMap, nodes: &Nodes) -> (PlacementMap, Vec<PlannedHandoff>) {
    let colos = colos(map.slot_count);
    let mut all = Vec::new();
    for _ in 0..50 {
        let progress = all_caught_up(&map, map.version);
        let busy = BTreeSet::new();
        let p = plan(&input(&map, &colos, nodes, &progress, &busy));
        let mut next = p.map.clone();
        assert_safe_step(&map, &next);
        if !same_placement(&next, &map) {
            next.version = map.version + 1;
        }
        // The hand-offs complete; published in the next step.
        let mut after = next.clone();
        assert_eq!(apply_handoffs(&mut after, &p.handoffs), p.handoffs.len());
        assert_safe_step(&next, &after);
        if !p.handoffs.is_empty() {
            after.version = next.version + 1;
        }
        all.extend(p.handoffs);
        if same_placement(&after, &map) {
            return (after, all);
        }
        map = after;
    }
    panic!("no convergence in 50 passes");
}

#[test]
fn scaling_down_hands_over_and_steps_the_departing_node_out_before_it_goes() {
    let map = placed(&["ams-0", "ams-1", "ams-2", "ams-3"], 8, 3);
    assert!(map.owned_by("ams-3") > 0);
    let mut nodes = live(&["ams-0", "ams-1", "ams-2"]);
    nodes.extend([view("ams-3", Health::Live, false)]);
    let (end, handoffs) = converge(map, &nodes);
    assert!(
        !end.nodes.contains_key("ams-3"),
        "no slot refers to the departing node any more"
    );
    assert!(handoffs.iter().any(|h| h.from == "ams-3"));
    for s in &end.colos["ams"].slots {
        assert_eq!(s.len(), 3, "full replica sets again: {s:?}");
        assert!(s.learners.is_empty() && s.leaving.is_empty());
    }
    assert_eq!(
        (
            end.owned_by("ams-0"),
            end.owned_by("ams-1"),
            end.owned_by("ams-2")
        ),
        (3, 3, 2)
    );
}

#[test]
fn a_new_node_joins_as_a_learner_and_gets_its_share_by_hand_off() {
    let map = placed(&["ams-0", "ams-1", "ams-2"], 6, 3);
    let nodes = live(&["ams-0", "ams-1", "ams-2", "ams-3"]);
    // Without progress reports, the newcomer only ever learns.
    let p = plan(&input(
        &map,
        &colos(6),
        &nodes,
        &BTreeMap::new(),
        &BTreeSet::new(),
    ));
    assert!(p.handoffs.is_empty());
    let learning = p.map.colos["ams"]
        .slots
        .iter()
        .filter(|s| s.learners.iter().any(|l| l == "ams-3"))
        .count();
    assert!(learning > 0);
    assert!(
        !p.map.colos["ams"]
            .slots
            .iter()
            .any(|s| s.members().any(|m| m == "ams-3")),
        "a learner does not vote before it caught up"
    );
    assert_eq!(p.changing, learning);
    let again = plan(&input(
        &p.map,
        &colos(6),
        &nodes,
        &BTreeMap::new(),
        &BTreeSet::new(),
    ));
    assert!(same_placement(&again.map, &p.map), "no progress, no step");
    let (end, handoffs) = converge(map, &nodes);
    assert!(end.owned_by("ams-3") >= 1);
    assert!(
        handoffs
            .iter()
            .all(|h| h.to == "ams-3" || h.from == "ams-3")
    );
}

#[test]
fn a_leaving_member_stays_until_the_owner_applied_the_change_and_a_quorum_caught_up() {
    let mut map = placed(&["ams-0", "ams-1", "ams-2"], 1, 3);
    map.version = 7;
    let mut s = map.colos["ams"].slots[0].clone();
    let gone = s.followers[1].clone();
    s.followers.retain(|f| *f != gone);
    s.leaving.push(gone.clone());
    let survivor = s.followers[0].clone();
    map.colos.insert(
        "ams".into(),
        ColoSlots {
            slots: vec![s.clone()],
        },
    );
    let mut nodes = live(&[s.owner.as_str(), survivor.as_str()]);
    nodes.extend([view(&gone, Health::Live, false)]);
    let colos = colos(1);
    let busy = BTreeSet::new();
    let key = ("ams".to_string(), 0);
    let progress = |applied: u64, survivor_at: u64| {
        BTreeMap::from([(
            key.clone(),
            SlotProgress {
                owner_placement_version: applied,
                owner_durable: Lsn::new(s.epoch, 10),
                members: BTreeMap::from([(survivor.clone(), Lsn::new(s.epoch, survivor_at))]),
            },
        )])
    };
    // The owner still runs version 6: the leaving member's acknowledgements may still count.
    let p = progress(6, 10);
    let out = plan(&input(&map, &colos, &nodes, &p, &busy));
    assert_eq!(out.map.colos["ams"].slots[0].leaving, vec![gone.clone()]);
    // Applied, but the remaining follower lags: owner + 0 < quorum 2.
    let p = progress(7, 9);
    let out = plan(&input(&map, &colos, &nodes, &p, &busy));
    assert_eq!(out.map.colos["ams"].slots[0].leaving, vec![gone.clone()]);
    // Applied and caught up: removed.
    let p = progress(7, 10);
    let out = plan(&input(&map, &colos, &nodes, &p, &busy));
    assert!(out.map.colos["ams"].slots[0].leaving.is_empty());
    assert!(!out.map.nodes.contains_key(&gone));
}

#[test]
fn busy_slots_dead_owners_and_the_change_limit_are_respected() {
    let map = placed(&["ams-0", "ams-1", "ams-2"], 6, 3);
    let mut nodes = live(&["ams-0", "ams-1", "ams-2", "ams-3"]);
    // ams-1 is down (Failed) but wanted: it keeps its roles, and its slots are not touched here.
    nodes.insert(
        "ams-1".into(),
        NodeView {
            info: info("ams-1"),
            health: Health::Failed { since: at(0) },
            wanted: true,
        },
    );
    let busy = BTreeSet::from([("ams".to_string(), 0u32)]);
    let progress = BTreeMap::new();
    let colos = colos(6);
    let mut i = input(&map, &colos, &nodes, &progress, &busy);
    i.max_changing = 1;
    let p = plan(&i);
    let (before, after) = (&map.colos["ams"].slots, &p.map.colos["ams"].slots);
    assert_eq!(
        after[0], before[0],
        "a slot with a hand-off in flight is left alone"
    );
    for (b, a) in before.iter().zip(after) {
        if b.owner == "ams-1" {
            assert_eq!(a, b, "the owner is down: failover's business");
        }
        assert!(
            a.has("ams-1") || !b.has("ams-1"),
            "a down node keeps its roles"
        );
    }
    assert_eq!(p.changing, 1, "one slot changes at a time");
}

#[test]
fn an_operator_restart_moves_nothing_while_leases_are_unknown() {
    let map = placed(&["ams-0", "ams-1", "ams-2"], 6, 3);
    let nodes: Nodes = ["ams-0", "ams-1", "ams-2"]
        .iter()
        .map(|n| view(n, Health::Unknown, true))
        .chain([view("ams-3", Health::Unknown, true)])
        .collect();
    let (progress, busy) = (BTreeMap::new(), BTreeSet::new());
    let p = plan(&input(&map, &colos(6), &nodes, &progress, &busy));
    assert!(same_placement(&p.map, &map));
    assert!(p.handoffs.is_empty());
    assert!(failover_tasks(&map, &nodes).is_empty());
}

#[test]
fn a_new_colo_is_placed_on_live_nodes_only() {
    let map = empty_map("eu", 4, 3);
    let mut nodes = live(&["ams-0", "ams-1"]);
    nodes.extend([view("ams-2", Health::Unknown, true)]);
    let (progress, busy) = (BTreeMap::new(), BTreeSet::new());
    let p = plan(&input(&map, &colos(4), &nodes, &progress, &busy));
    assert!(!p.map.nodes.contains_key("ams-2"));
    assert!(p.under_replicated);
    let nobody = Nodes::new();
    let p = plan(&input(&map, &colos(4), &nobody, &progress, &busy));
    assert_eq!(p.unplaced, ["ams"]);
    assert!(p.map.colos.is_empty());
}

#[test]
fn failover_asks_followers_and_leaving_members_that_have_not_failed() {
    let mut map = placed(&["ams-0", "ams-1", "ams-2", "ams-3"], 4, 3);
    let slot = map.colos["ams"].slots[0].clone();
    let owner = slot.owner.clone();
    let mut s = slot.clone();
    let leaving = s.followers.remove(0);
    s.leaving.push(leaving.clone());
    map.colos.get_mut("ams").expect("ams").slots[0] = s.clone();
    let mut nodes = live(&["ams-0", "ams-1", "ams-2", "ams-3"]);
    nodes.get_mut(&owner).expect("owner").health = Health::Failed { since: at(0) };
    let tasks = failover_tasks(&map, &nodes);
    let t = tasks
        .iter()
        .find(|t| t.slot == 0)
        .expect("slot 0 fails over");
    assert_eq!(t.fence_epoch, s.epoch + 1);
    let mut asked: Vec<&str> = t.ask.iter().map(|n| n.name.as_str()).collect();
    asked.sort();
    let mut want: Vec<&str> = s
        .followers
        .iter()
        .chain(&s.leaving)
        .map(String::as_str)
        .collect();
    want.sort();
    assert_eq!(asked, want);
    // A departing node that is alive is not a failure.
    nodes.get_mut(&owner).expect("owner").health = Health::Live;
    nodes.get_mut(&owner).expect("owner").wanted = false;
    assert!(failover_tasks(&map, &nodes).is_empty());
    // Outcomes apply only to the slot they were decided on.
    let answers: Vec<Vec<FollowerReport>> = tasks
        .iter()
        .map(|t| {
            t.ask
                .iter()
                .map(|n| report(&n.name, Some(Lsn::new(1, 5))))
                .collect()
        })
        .collect();
    let outcomes = decide_failovers(&tasks, &answers, 2);
    let mut moved = map.clone();
    moved.colos.get_mut("ams").expect("ams").slots[0].epoch += 1;
    apply_failovers(&mut moved, &outcomes);
    assert_eq!(
        moved.colos["ams"].slots[0].owner, owner,
        "stale decision ignored"
    );
    apply_failovers(&mut map, &outcomes);
    assert_ne!(map.colos["ams"].slots[0].owner, owner);
}

#[test]
fn completed_hand_offs_apply_only_to_the_slot_they_were_made_on() {
    let mut map = placed(&["ams-0", "ams-1", "ams-2"], 2, 3);
    let s = map.colos["ams"].slots[0].clone();
    let h = PlannedHandoff {
        colo: "ams".into(),
        slot: 0,
        from: s.owner.clone(),
        to: s.followers[0].clone(),
        epoch: s.epoch + 1,
    };
    let mut stale = map.clone();
    stale.colos.get_mut("ams").expect("ams").slots[0].epoch += 1;
    assert_eq!(apply_handoffs(&mut stale, std::slice::from_ref(&h)), 0);
    assert_eq!(apply_handoffs(&mut map, std::slice::from_ref(&h)), 1);
    let after = &map.colos["ams"].slots[0];
    assert_eq!(
        (after.owner.as_str(), after.epoch),
        (h.to.as_str(), h.epoch)
    );
    assert!(after.followers.contains(&h.from));
}

#[test]
fn only_stale_leases_of_unwanted_unreferenced_nodes_are_orphans() {
    let map = placed(&["ams-0", "ams-1"], 2, 2);
    let failed = Health::Failed { since: at(0) };
    let nodes: Nodes = [
        view("ams-0", Health::Live, true),
        view("ams-1", failed.clone(), false),
        view("ams-2", failed.clone(), false),
        view("ams-3", Health::Live, false),
        view("ams-4", failed.clone(), true),
    ]
    .into_iter()
    .collect();
    let lease = |n: &str| LeaseRef {
        name: n.into(),
        colo: "ams".into(),
        resource_version: Some("9".into()),
    };
    let leases: Vec<LeaseRef> = ["ams-0", "ams-1", "ams-2", "ams-3", "ams-4"]
        .iter()
        .map(|n| lease(n))
        .collect();
    let names = |v: Vec<LeaseRef>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
    // ams-1 is still referenced; ams-3 is terminating (still renewing); ams-4 is wanted.
    assert_eq!(
        names(orphan_leases(&leases, &nodes, &map, false)),
        ["ams-2"]
    );
    assert_eq!(
        names(orphan_leases(&leases, &nodes, &map, true)),
        ["ams-1", "ams-2"]
    );
}

#[test]
fn a_deleted_colo_moves_its_nodes_out_but_its_slots_stay_served_by_the_others() {
    let names = ["ams-0", "ams-1", "fra-0", "fra-1"];
    let nodes_info: Vec<NodeInfo> = names.iter().map(|n| info(n)).collect();
    let mut colos_map = BTreeMap::new();
    for colo in ["ams", "fra"] {
        let a = assign_slots(&AssignInput {
            colo,
            slot_count: 4,
            replicas: 3,
            nodes: &nodes_info,
            previous: None,
        })
        .expect("assigns");
        colos_map.insert(colo.to_string(), a.slots);
    }
    let mut map = PlacementMap {
        region: "eu".into(),
        version: 1,
        slot_count: 4,
        replicas: 3,
        nodes: nodes_info
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect(),
        colos: colos_map,
    };
    // ams is being deleted: its pods are no longer wanted; its slots stay (objects homed there).
    let nodes: Nodes = [
        view("ams-0", Health::Live, false),
        view("ams-1", Health::Live, false),
        view("fra-0", Health::Live, true),
        view("fra-1", Health::Live, true),
    ]
    .into_iter()
    .collect();
    let colos = [
        ColoView {
            name: "ams".into(),
            slots: 4,
        },
        ColoView {
            name: "fra".into(),
            slots: 4,
        },
    ];
    for _ in 0..20 {
        let progress = all_caught_up(&map, map.version);
        let busy = BTreeSet::new();
        let p = plan(&input(&map, &colos, &nodes, &progress, &busy));
        let mut next = p.map;
        assert_safe_step(&map, &next);
        apply_handoffs(&mut next, &p.handoffs);
        next.version = map.version + 1;
        if same_placement(&next, &map) {
            break;
        }
        map = next;
    }
    assert!(!refers_to_colo(&map, "ams"), "{:?}", map.nodes.keys());
    assert_eq!(
        map.colos["ams"].slots.len(),
        4,
        "ams's slots are still placed"
    );
    assert!(
        map.colos["ams"]
            .slots
            .iter()
            .all(|s| s.owner.starts_with("fra-"))
    );
}

#[test]
fn a_fenced_epoch_is_published_once_the_owner_is_back() {
    let mut map = placed(&["ams-0", "ams-1", "ams-2"], 3, 3);
    let owner0 = map.colos["ams"].slots[0].owner.clone();
    let owner1 = map.colos["ams"].slots[1].owner.clone();
    let fenced = BTreeMap::from([
        (("ams".to_string(), 0u32), 2u64),
        (("ams".to_string(), 1u32), 1u64),
        (("gone".to_string(), 0u32), 7u64),
    ]);
    let mut nodes = live(&["ams-0", "ams-1", "ams-2"]);
    nodes.get_mut(&owner0).expect("owner").health = Health::Failed { since: at(0) };
    // Slot 1 is already at its fenced epoch, the unknown slot is dropped; slot 0 waits.
    let settled = finish_fenced(&mut map, &fenced, &nodes);
    assert_eq!(settled, [("ams".to_string(), 1), ("gone".to_string(), 0)]);
    assert_eq!(map.colos["ams"].slots[0].epoch, 1);
    nodes.get_mut(&owner0).expect("owner").health = Health::Live;
    let settled = finish_fenced(&mut map, &fenced, &nodes);
    assert!(settled.contains(&("ams".to_string(), 0)));
    let s = &map.colos["ams"].slots[0];
    assert_eq!(
        (s.owner.as_str(), s.epoch),
        (owner0.as_str(), 2),
        "same owner, fenced epoch"
    );
    assert_eq!(map.colos["ams"].slots[1].owner, owner1);
}
