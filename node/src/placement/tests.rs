use super::*;

fn node(name: &str, colo: &str) -> NodeInfo {
    NodeInfo {
        name: name.to_string(),
        colo: colo.to_string(),
        address: format!("{name}:8787"),
    }
}

/// `layout[c]` nodes in colo `c{c}`, named `c{c}-n{i}`.
fn region(layout: &[usize]) -> Vec<NodeInfo> {
    layout
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| (0..n).map(move |i| node(&format!("c{c}-n{i}"), &format!("c{c}"))))
        .collect()
}

fn assign(
    colo: &str,
    slots: u32,
    replicas: usize,
    nodes: &[NodeInfo],
    previous: Option<&ColoSlots>,
) -> Assignment {
    assign_slots(&AssignInput {
        colo,
        slot_count: slots,
        replicas,
        nodes,
        previous,
    })
    .expect("assignment")
}

fn owner_counts(slots: &ColoSlots) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in &slots.slots {
        *counts.entry(s.owner.clone()).or_insert(0) += 1;
    }
    counts
}

/// Checks every invariant of a placement against the nodes it was made from.
fn check_invariants(a: &Assignment, colo: &str, slots: u32, replicas: usize, nodes: &[NodeInfo]) {
    let colo_of: HashMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.colo.as_str()))
        .collect();
    let home: Vec<&NodeInfo> = nodes.iter().filter(|n| n.colo == colo).collect();
    let all_colos: BTreeSet<&str> = nodes.iter().map(|n| n.colo.as_str()).collect();
    assert_eq!(a.slots.slots.len(), slots as usize);
    let counts = owner_counts(&a.slots);
    let candidates = if home.is_empty() {
        nodes.len()
    } else {
        home.len()
    };
    let (lo, hi) = (
        slots as usize / candidates,
        (slots as usize).div_ceil(candidates),
    );
    for (owner, count) in &counts {
        assert!(
            colo_of.contains_key(owner.as_str()),
            "owner {owner} is not a healthy node"
        );
        if !home.is_empty() {
            assert_eq!(
                colo_of[owner.as_str()],
                colo,
                "owner {owner} outside the home colo"
            );
        }
        assert!(
            (lo..=hi).contains(count),
            "owner {owner} has {count} slots, expected {lo}..={hi}"
        );
    }
    let wanted = replicas.saturating_sub(1).min(nodes.len() - 1);
    for (i, s) in a.slots.slots.iter().enumerate() {
        assert_eq!(s.followers.len(), wanted, "slot {i} follower count");
        let members: BTreeSet<&str> = s.members().collect();
        assert_eq!(members.len(), s.len(), "slot {i} has a node twice: {s:?}");
        let colos: BTreeSet<&str> = s.members().map(|m| colo_of[m]).collect();
        assert_eq!(
            colos.len(),
            s.len().min(all_colos.len()),
            "slot {i} spans fewer colos than possible: {s:?}"
        );
    }
    assert_eq!(a.under_replicated, nodes.len() < replicas);
}

#[test]
fn every_layout_satisfies_the_invariants() {
    let layouts: &[&[usize]] = &[
        &[1],
        &[2],
        &[5],
        &[1, 1],
        &[2, 1],
        &[1, 1, 1],
        &[2, 2, 2],
        &[3, 1, 1],
        &[1, 2, 3, 4],
        &[0, 3, 2],
        &[4, 0, 0, 1, 1],
        &[2, 2, 2, 2, 2],
    ];
    for layout in layouts {
        let nodes = region(layout);
        for replicas in 1..=5 {
            for slots in [1u32, 2, 7, 64, 1024] {
                let a = assign("c0", slots, replicas, &nodes, None);
                check_invariants(&a, "c0", slots, replicas, &nodes);
                assert!(a.slots.slots.iter().all(|s| s.epoch == 1));
                // Re-running from its own output moves nothing.
                let again = assign("c0", slots, replicas, &nodes, Some(&a.slots));
                assert_eq!(
                    again.slots, a.slots,
                    "layout {layout:?} replicas {replicas} slots {slots}"
                );
                assert_eq!((again.owners_moved, again.followers_moved), (0, 0));
            }
        }
    }
}

#[test]
fn removing_a_node_moves_only_its_slots() {
    let nodes = region(&[4, 2, 2]);
    let before = assign("c0", 1024, 5, &nodes, None);
    let gone = "c0-n2";
    let owned: usize = owner_counts(&before.slots)[gone];
    let remaining: Vec<NodeInfo> = nodes.iter().filter(|n| n.name != gone).cloned().collect();
    let after = assign("c0", 1024, 5, &remaining, Some(&before.slots));
    check_invariants(&after, "c0", 1024, 5, &remaining);
    assert_eq!(after.owners_moved, owned);
    for (b, a) in before.slots.slots.iter().zip(&after.slots.slots) {
        if b.owner != gone {
            assert_eq!(b.owner, a.owner);
            assert_eq!(b.epoch, a.epoch);
        } else {
            assert_eq!(a.epoch, b.epoch + 1, "an owner change bumps the epoch");
        }
        assert!(!a.followers.iter().any(|f| f == gone));
    }
}

#[test]
fn adding_a_node_moves_just_its_share() {
    let nodes = region(&[3, 2, 2]);
    let before = assign("c0", 1024, 5, &nodes, None);
    let mut grown = nodes.clone();
    grown.push(node("c0-n9", "c0"));
    let after = assign("c0", 1024, 5, &grown, Some(&before.slots));
    check_invariants(&after, "c0", 1024, 5, &grown);
    assert_eq!(
        after.owners_moved, 256,
        "the new node takes exactly its quarter"
    );
    assert_eq!(owner_counts(&after.slots)["c0-n9"], 256);
    // The new node also picks up follower roles, and roles stay balanced within one.
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &after.slots.slots {
        for f in &s.followers {
            *load.entry(f.as_str()).or_default() += 1;
        }
    }
    assert!(load.get("c0-n9").copied().unwrap_or(0) > 0, "{load:?}");
}

#[test]
fn roles_are_balanced_over_a_symmetric_region() {
    // Three colos of two nodes, each colo's slots placed: every node ends up with the same number
    // of roles (owner or follower) over all three placements, within one.
    let nodes = region(&[2, 2, 2]);
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for colo in ["c0", "c1", "c2"] {
        let a = assign(colo, 1024, 5, &nodes, None);
        for s in &a.slots.slots {
            for m in s.members() {
                *load.entry(m.to_string()).or_default() += 1;
            }
        }
    }
    let min = load.values().min().copied().unwrap_or(0);
    let max = load.values().max().copied().unwrap_or(0);
    assert_eq!(load.len(), 6);
    assert!(max - min <= 1, "{load:?}");
}

#[test]
fn a_colo_without_nodes_is_served_from_the_region_and_no_nodes_is_an_error() {
    let nodes = region(&[0, 2, 1]);
    let a = assign("c0", 16, 3, &nodes, None);
    check_invariants(&a, "c0", 16, 3, &nodes);
    assert_eq!(
        assign_slots(&AssignInput {
            colo: "c0",
            slot_count: 4,
            replicas: 3,
            nodes: &[],
            previous: None
        }),
        Err(PlacementError::NoNodes("c0".into()))
    );
    assert_eq!(
        assign_slots(&AssignInput {
            colo: "c0",
            slot_count: 0,
            replicas: 3,
            nodes: &nodes,
            previous: None
        }),
        Err(PlacementError::NoSlots)
    );
}

#[test]
fn quorums_intersect_for_every_size() {
    for configured in 1..=7 {
        for members in 1..=9 {
            let w = effective_write_quorum(configured, members);
            let r = read_quorum(configured, members);
            assert!(w >= 1 && w <= members);
            assert!(w + r > members, "w={w} r={r} n={members}");
            assert!(w <= configured);
        }
    }
    assert_eq!(effective_write_quorum(3, 5), 3);
    assert_eq!(effective_write_quorum(3, 2), 2);
    assert_eq!(effective_write_quorum(3, 1), 1);
    assert_eq!(effective_write_quorum(2, 3), 2);
    assert_eq!(read_quorum(3, 5), 3);
}

fn slot5() -> SlotReplicas {
    SlotReplicas::new(4, "a", &["b", "c", "d", "e"])
}

fn report(node: &str, lsn: Option<(u64, u64)>) -> FollowerReport {
    FollowerReport {
        node: node.into(),
        durable: lsn.map(|(e, s)| Lsn::new(e, s)),
    }
}

#[test]
fn failover_picks_the_most_advanced_follower_and_bumps_the_epoch() {
    let chosen = choose_failover(
        &slot5(),
        &[
            report("b", Some((4, 10))),
            report("c", Some((4, 12))),
            report("d", Some((3, 99))),
            report("e", None),
        ],
        3,
    )
    .expect("a quorum answered");
    assert_eq!(chosen.owner, "c");
    assert_eq!(chosen.epoch, 5);
    assert_eq!(chosen.followers, vec!["b", "d", "e", "a"]);
}

#[test]
fn failover_breaks_ties_by_name_and_ignores_strangers_and_the_old_owner() {
    let chosen = choose_failover(
        &slot5(),
        &[
            report("e", Some((4, 12))),
            report("c", Some((4, 12))),
            report("b", Some((4, 1))),
            report("a", Some((9, 9))),
            report("zz", Some((9, 9))),
        ],
        3,
    )
    .expect("a quorum answered");
    assert_eq!(chosen.owner, "c");
}

#[test]
fn failover_refuses_without_a_read_quorum() {
    let err = choose_failover(
        &slot5(),
        &[
            report("b", Some((4, 10))),
            report("c", Some((4, 12))),
            report("d", None),
        ],
        3,
    );
    assert_eq!(
        err,
        Err(FailoverError::NotEnoughAnswers {
            answered: 2,
            needed: 3
        })
    );
    let lone = SlotReplicas::new(1, "a", &[]);
    assert_eq!(
        choose_failover(&lone, &[], 3),
        Err(FailoverError::NoFollowers)
    );
}

#[test]
fn every_subset_of_answers_either_refuses_or_finds_the_acknowledged_write() {
    // Exhaustive over which followers answered and which hold the newest acknowledged write
    // (written to the owner plus two followers, i.e. a quorum of 3 out of 5).
    let slot = slot5();
    let followers = ["b", "c", "d", "e"];
    for answered_mask in 0u32..16 {
        for holders in [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]] {
            let reports: Vec<FollowerReport> = followers
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let lsn = if holders.contains(&i) {
                        (4, 20)
                    } else {
                        (4, 19)
                    };
                    report(f, (answered_mask & (1 << i) != 0).then_some(lsn))
                })
                .collect();
            match choose_failover(&slot, &reports, 3) {
                Ok(next) => {
                    let idx = followers
                        .iter()
                        .position(|f| *f == next.owner)
                        .expect("a follower");
                    assert!(
                        holders.contains(&idx),
                        "mask {answered_mask:04b} holders {holders:?} chose {}",
                        next.owner
                    );
                }
                Err(FailoverError::NotEnoughAnswers { answered, needed }) => {
                    assert_eq!(answered, answered_mask.count_ones() as usize);
                    assert_eq!(needed, 3);
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }
}

#[test]
fn handoffs_list_owner_changes_to_current_members_only() {
    let current = ColoSlots {
        slots: vec![
            promote(&slot5(), "b"),
            slot5(),
            SlotReplicas::new(1, "x", &["y"]),
        ],
    };
    let target = ColoSlots {
        slots: vec![slot5(), slot5(), slot5()],
    };
    assert_eq!(
        handoffs(&current, &target),
        vec![Handoff {
            slot: 0,
            from: "b".into(),
            to: "a".into()
        }]
    );
}

#[test]
fn placement_map_round_trips_through_its_compact_wire_form() {
    let nodes = region(&[2, 2, 1]);
    let a = assign("c0", 64, 5, &nodes, None);
    let b = assign("c1", 64, 5, &nodes, None);
    let map = PlacementMap {
        region: "eu".into(),
        version: 7,
        slot_count: 64,
        replicas: 5,
        nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
        colos: [("c0".to_string(), a.slots), ("c1".to_string(), b.slots)]
            .into_iter()
            .collect(),
    };
    let json = serde_json::to_string(&map).expect("serialize");
    let back: PlacementMap = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, map);
    assert_eq!(back.owned_by("c0-n0"), 32);
    assert!(
        json.len() < 64 * 2 * 20 + 1024,
        "compact: {} bytes",
        json.len()
    );
}

#[test]
fn placement_map_rejects_inconsistent_wire_forms() {
    let bad_index = r#"{"region":"eu","version":1,"slotCount":1,"replicas":1,
        "nodes":[{"name":"a","colo":"c","address":"a:1"}],"colos":{"c":[[1,5]]}}"#;
    let err = serde_json::from_str::<PlacementMap>(bad_index).expect_err("index out of range");
    assert!(err.to_string().contains("node #5"), "{err}");
    let bad_count = r#"{"region":"eu","version":1,"slotCount":2,"replicas":1,
        "nodes":[{"name":"a","colo":"c","address":"a:1"}],"colos":{"c":[[1,0]]}}"#;
    let err = serde_json::from_str::<PlacementMap>(bad_count).expect_err("slot count");
    assert!(err.to_string().contains("expected slotCount = 2"), "{err}");
}

#[test]
fn leaving_members_still_count_for_failover_but_are_not_required_to_answer_alone() {
    // Voters a (owner, dead), b, c; d is leaving. Members for failover: 4 -> read quorum 2 with
    // write quorum 3 (configured 3, effective min(3, 4/2+1=3) = 3 -> 4+1-3 = 2).
    let mut s = SlotReplicas::new(7, "a", &["b", "c"]);
    s.leaving = vec!["d".into()];
    let chosen = choose_failover(
        &s,
        &[report("d", Some((7, 9))), report("b", Some((7, 8)))],
        3,
    )
    .expect("quorum");
    assert_eq!(
        chosen.owner, "d",
        "the most advanced answer wins, even a leaving member"
    );
    assert_eq!(chosen.epoch, 8);
    assert!(chosen.leaving.is_empty());
    assert_eq!(chosen.followers, vec!["b", "c", "a"]);
    let err = choose_failover(&s, &[report("b", Some((7, 8)))], 3);
    assert_eq!(
        err,
        Err(FailoverError::NotEnoughAnswers {
            answered: 1,
            needed: 2
        })
    );
}

#[test]
fn membership_changes_step_through_learners_and_leaving() {
    let current = SlotReplicas::new(3, "a", &["b", "c"]);
    let target = SlotReplicas::new(3, "a", &["b", "d"]);
    let caught: std::cell::RefCell<Vec<&str>> = std::cell::RefCell::new(vec![]);
    let check = |n: &str| caught.borrow().contains(&n);
    let progress = |applied: bool| MembershipProgress {
        caught_up: &check,
        owner_applied_current: applied,
        configured_write_quorum: 2,
    };
    // 1. d joins as a learner; c keeps voting (no replacement yet).
    let step1 = plan_membership(&current, &target, &progress(true));
    assert_eq!(step1.learners, vec!["d"]);
    assert_eq!(step1.followers, vec!["b", "c"]);
    assert!(step1.leaving.is_empty());
    // Not caught up: nothing more happens.
    assert_eq!(plan_membership(&step1, &target, &progress(true)), step1);
    // 2. d caught up: it votes, and c starts leaving in the same step.
    caught.borrow_mut().push("d");
    let step2 = plan_membership(&step1, &target, &progress(true));
    assert_eq!(step2.followers, vec!["b", "d"]);
    assert_eq!(step2.leaving, vec!["c"]);
    assert!(step2.learners.is_empty());
    // 3. c is removed only once the owner applied step 2 and a quorum of voters holds everything.
    assert_eq!(
        plan_membership(&step2, &target, &progress(false)).leaving,
        vec!["c"]
    );
    caught.borrow_mut().clear();
    assert_eq!(
        plan_membership(&step2, &target, &progress(true)).leaving,
        vec!["c"],
        "b and d not caught up"
    );
    caught.borrow_mut().push("b");
    let step3 = plan_membership(&step2, &target, &progress(true));
    assert!(step3.leaving.is_empty());
    assert_eq!(step3.followers, vec!["b", "d"]);
    assert_eq!(step3.epoch, 3, "membership changes never change the epoch");
    // A leaving member wanted again comes back as a learner, not straight to voting.
    let back = plan_membership(&step2, &current, &progress(false));
    assert!(back.learners.contains(&"c".to_string()) && !back.followers.contains(&"c".to_string()));
}

#[test]
fn learners_and_leaving_members_survive_the_wire_form() {
    let nodes = region(&[2, 2]);
    let a = assign("c0", 4, 3, &nodes, None);
    let mut slots = a.slots;
    slots.slots[1].learners = vec!["c1-n1".into()];
    slots.slots[2].leaving = vec!["c1-n0".into()];
    let map = PlacementMap {
        region: "eu".into(),
        version: 2,
        slot_count: 4,
        replicas: 3,
        nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
        colos: [("c0".to_string(), slots)].into_iter().collect(),
    };
    let json = serde_json::to_string(&map).expect("serialize");
    assert!(
        json.contains("\"learners\"") && json.contains("\"leaving\""),
        "{json}"
    );
    let back: PlacementMap = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, map);
    assert!(
        back.replicas_of("c0", 1)
            .is_some_and(|r| r.has("c1-n1") && r.len() == 3)
    );
}

#[test]
fn a_hand_off_is_applied_only_onto_the_owner_and_epoch_it_started_from() {
    let mut map = PlacementMap {
        region: "r".into(),
        version: 1,
        slot_count: 1,
        replicas: 3,
        nodes: BTreeMap::new(),
        colos: BTreeMap::from([(
            "c0".to_string(),
            ColoSlots {
                slots: vec![SlotReplicas::new(4, "a", &["b", "c"])],
            },
        )]),
    };
    let from = SlotReplicas::new(4, "a", &["b", "c"]);
    let handed = promote(&from, "b");
    // Failed over meanwhile: same epoch bump, another owner. Not applied.
    let failed_over = SlotReplicas::new(5, "c", &["a", "b"]);
    map.colos.get_mut("c0").expect("colo").slots[0] = failed_over.clone();
    assert!(!map.replace_if_unchanged("c0", 0, &from, handed.clone()));
    assert_eq!(map.replicas_of("c0", 0), Some(&failed_over));
    // An unknown colo or slot: nothing.
    assert!(!map.replace_if_unchanged("c9", 0, &from, handed.clone()));
    assert!(!map.replace_if_unchanged("c0", 7, &from, handed.clone()));
    // Still as it started: applied.
    map.colos.get_mut("c0").expect("colo").slots[0] = from.clone();
    assert!(map.replace_if_unchanged("c0", 0, &from, handed.clone()));
    assert_eq!(map.replicas_of("c0", 0), Some(&handed));
}
