//! CI jobs share base layers: many arch pushes of images with one common
//! layer, at once, on a loaded machine, through archmerge and straight to the
//! registry in the same run. distribution 2.8 races in its own filesystem
//! storage under that load (a blob HEAD answered 500, a manifest PUT refused
//! `MANIFEST_BLOB_UNKNOWN` for blobs it has); archmerge repeats what is safe
//! to repeat, so no push through it may fail, whatever the direct pushes see.
//!
//! A long run, `#[ignore]`d: `scripts/stress.sh` runs it
//! (`STRESS_SHARED_ROUNDS`, default 5 rounds of 8 arches × 6 targets each
//! way).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use support::*;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many platforms the index at `repo:tag` lists (0 when absent).
async fn listed(registry: &str, repo: &str, tag: &str) -> usize {
    let a = get_any_manifest(&http(), registry, repo, tag).await;
    if a.status == 200 {
        a.entries().len()
    } else {
        0
    }
}

/// The `archmerge_upstream_retries_total` lines of archmerge's metrics.
async fn retries(admin: &str) -> Vec<String> {
    let text = http()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("archmerge_upstream_retries_total"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long load run: scripts/stress.sh"]
async fn stress_shared_layers_no_push_through_archmerge_fails() {
    let rounds = setting("STRESS_SHARED_ROUNDS", 5).max(1);
    let targets = 6;
    let registry = spawn_registry();
    let proxy = spawn_archmerge(&registry.url());
    let (via, direct) = (proxy.url(), registry.url());

    // Both cores busy, as on a shared CI machine.
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();

    let started = Instant::now();
    let (mut via_failed, mut direct_failed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for t in 0..targets {
            for (i, a) in EIGHT_ARCHES.iter().enumerate() {
                // Every image of a round shares one base layer, and has a
                // small layer of its own.
                let seed = (round * 100 + t * 8 + i) as u64;
                let spec = ImageSpec::new("linux", a.arch)
                    .layer(500_000 + round as u64, 256 * 1024)
                    .layer(600_000 + seed, 2048);
                let tag = format!("{}_r{round}t{t}", a.alias);
                for (base, repo, through) in [
                    (&via, "shared/via", true),
                    (&direct, "shared/direct", false),
                ] {
                    let (base, spec, tag) = (base.clone(), spec.clone(), tag.clone());
                    tasks.push(tokio::spawn(async move {
                        // As `docker push` does: HEAD each blob, upload what is missing.
                        let r = try_push(&base, repo, &tag, &spec, true)
                            .await
                            .map_err(|e| e.to_string());
                        (through, tag, r)
                    }));
                }
            }
        }
        for t in tasks {
            let (through, tag, r) = t.await.expect("a push task panicked");
            if let Err(e) = r {
                if through {
                    via_failed.push(format!("{tag}: {e}"));
                } else {
                    direct_failed.push(format!("{tag}: {e}"));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }

    // Every target pushed through archmerge lists its eight arches.
    let mut incomplete = Vec::new();
    for round in 0..rounds {
        for t in 0..targets {
            let target = format!("r{round}t{t}");
            let got = listed(&direct, "shared/via", &target).await;
            if got != EIGHT_ARCHES.len() {
                incomplete.push(format!("{target}: {got} of 8"));
            }
        }
    }
    let pushes = rounds * targets * EIGHT_ARCHES.len();
    let retries = retries(&proxy.admin_url()).await;
    println!(
        "\n==> shared-layers summary\n\
         pushes:          {pushes} through archmerge, {pushes} direct, at once, both cores busy\n\
         lost through archmerge: {}\n\
         lost direct:     {}\n\
         archmerge retries: {retries:?}\n\
         targets incomplete: {}\n\
         elapsed:         {:?}",
        via_failed.len(),
        direct_failed.len(),
        if incomplete.is_empty() {
            "none".to_owned()
        } else {
            incomplete.join("; ")
        },
        started.elapsed(),
    );
    for f in direct_failed.iter().take(5) {
        println!("  direct failure: {f}");
    }
    assert!(
        via_failed.is_empty(),
        "pushes through archmerge failed: {via_failed:#?}"
    );
    assert!(incomplete.is_empty(), "targets incomplete: {incomplete:#?}");
}
