//! Every scenario against a reference client that implements the team's decisions, under O,
//! F and FV: the fake servers really produce the outcomes their scenarios promise, and a
//! well-behaved client breaks no invariant on any of them.
#![allow(clippy::unwrap_used)]

mod support;

use postwarden_sim::scenario::{Outcome, Policy};
use postwarden_sim::{Fleet, Scenario, check};
use support::REPLY_TIMEOUT;
use support::relay::deliver;

async fn run(fleet: &Fleet, scenario: &Scenario, policy: Policy) -> Vec<String> {
    let expected = scenario.expected.outcome(policy);
    let locals: Vec<&str> = match expected {
        Outcome::Split(parts) => parts.iter().map(|(local, _)| *local).collect(),
        _ => vec!["user"],
    };
    let delivery = deliver(fleet, scenario, policy, &locals).await;
    let mut problems = Vec::new();
    let tag = format!("{} {}", scenario.id, policy.code());
    match expected {
        Outcome::Split(parts) => {
            for ((local, want), (_, got)) in parts.iter().zip(&delivery.results) {
                if !want.accepts(got) {
                    problems.push(format!("{tag} {local}: expected {want}, got {got}"));
                }
            }
        }
        want => {
            let got = delivery.results[0].1;
            if !want.accepts(&got) {
                problems.push(format!("{tag}: expected {want}, got {got}"));
            }
        }
    }
    if let Some(via) = scenario.expected.via(policy)
        && delivery.via.as_deref() != Some(via)
    {
        problems.push(format!("{tag}: expected via {via}, got {:?}", delivery.via));
    }
    let transcript = fleet.transcripts().settled(&scenario.domain(), REPLY_TIMEOUT * 2).await;
    for violation in check(scenario.id, &transcript, policy.is_forced()) {
        problems.push(format!("{tag}: {violation}"));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_meets_every_expectation() {
    let mut handles = Vec::new();
    for policy in Policy::ALL {
        // One fleet per policy, so each transcript holds one policy's connections.
        let fleet = std::sync::Arc::new(
            Fleet::start(postwarden_sim::FleetOptions {
                timing: postwarden_sim::Timing::fast(),
                ca: Some(support::ca()),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
        for scenario in fleet.scenarios().to_vec() {
            let fleet = fleet.clone();
            handles.push(tokio::spawn(async move { run(&fleet, &scenario, policy).await }));
        }
    }
    let mut problems = Vec::new();
    for handle in handles {
        problems.extend(handle.await.unwrap());
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}
