//! The all-or-nothing swap of one consumer's files: each changed file staged beside its
//! destination, every check run, then every file renamed into place (or a gone cluster's file
//! removed); if one fails, what was already swapped goes back. Also the staged check of
//! `haconfd check`, and the first failure of a pass.

use std::path::Path;
use std::sync::Arc;

use super::render::Rendering;
use super::report::PassError;
use crate::apply;
use crate::files::{ApplyError, Retired, Staged};
use crate::render::{RenderError, Rendered};
use crate::target::Target;

/// A changed target of one consumer: its index, its previous bytes, its staged file.
type StagedGroup = (
    Vec<(usize, Option<Vec<u8>>)>,
    Vec<Staged>,
    Vec<(usize, Vec<u8>)>,
);

/// A failure of one target of the group: its index and why.
type Failure = Box<(usize, PassError)>;

/// Each changed target with its previous bytes, and what the swaps retired.
type Swapped = (Vec<(usize, Option<Vec<u8>>)>, Vec<Retired>);

/// Stages, checks and swaps in the changed files of one consumer's targets (`group`), all or
/// none. Returns each changed target with its previous bytes, and what the swaps retired; or the
/// first failure with the index of the target it concerns. Reading, staging and swapping run on
/// the blocking pool; the checks are commands, awaited here.
pub(super) async fn swap_in(
    targets: &Arc<Vec<Target>>,
    group: &[usize],
    rendered: &[Rendering],
    removals: &Arc<Vec<usize>>,
) -> Result<Swapped, (usize, PassError)> {
    let mut wanted = Vec::with_capacity(group.len());
    for &i in group {
        let r = rendered[i]
            .as_ref()
            .expect("rendered before its consumer's turn")
            .as_ref()
            .map_err(|e| (i, e.clone().into()))?;
        wanted.push((i, Arc::clone(r)));
    }
    let (s, rm) = (Arc::clone(targets), Arc::clone(removals));
    // Stage everything before checking or swapping anything.
    let (changed, staged, removed): StagedGroup = blocking(move || stage_all(&s, &rm, wanted))
        .await
        .map_err(|b| *b)?;
    for ((i, _), st) in changed.iter().zip(&staged) {
        apply::check(&targets[*i], st)
            .await
            .map_err(|e| (*i, e.into()))?;
    }
    let s = Arc::clone(targets);
    blocking(move || commit_all(&s, changed, staged, removed))
        .await
        .map_err(|b| *b)
}

/// Stages each changed file of the group; notes the files of gone clusters to remove.
fn stage_all(
    targets: &[Target],
    removals: &[usize],
    wanted: Vec<(usize, Arc<Rendered>)>,
) -> Result<StagedGroup, Failure> {
    let mut changed = Vec::new();
    let mut staged = Vec::new();
    let mut removed = Vec::new();
    for (i, r) in wanted {
        let t = &targets[i];
        let fail = |e: ApplyError| Box::new((i, PassError::from(e)));
        if removals.contains(&i) {
            if let Some(old) = apply::current(&t.dest).map_err(fail)? {
                removed.push((i, old));
            }
            continue;
        }
        if apply::holds(&t.dest, &r.bytes).map_err(fail)? {
            continue;
        }
        let old = apply::current(&t.dest).map_err(fail)?;
        staged.push(apply::stage(t, &r).map_err(fail)?);
        changed.push((i, old));
    }
    Ok((changed, staged, removed))
}

/// Renames every staged file into place, then removes the files of gone clusters; on a
/// failure, what was already swapped goes back (all or nothing within a consumer: a restart of
/// the consumer would otherwise load half a new set, and nothing would be left due for a
/// reload).
fn commit_all(
    targets: &[Target],
    mut changed: Vec<(usize, Option<Vec<u8>>)>,
    staged: Vec<Staged>,
    removed: Vec<(usize, Vec<u8>)>,
) -> Result<Swapped, Failure> {
    let put_back = |done: &mut dyn Iterator<Item = (&usize, Option<&Vec<u8>>)>| {
        for (j, old) in done {
            if let Some(old) = old {
                restore(&targets[*j], old);
            }
        }
    };
    let mut retired = Vec::with_capacity(staged.len());
    for (k, st) in staged.into_iter().enumerate() {
        match apply::commit(st) {
            Ok(r) => retired.push(r),
            Err(e) => {
                put_back(&mut changed[..k].iter().map(|(j, o)| (j, o.as_ref())));
                return Err(Box::new((changed[k].0, PassError::from(e))));
            }
        }
    }
    // Then the files of clusters that are gone; one that cannot be removed puts the group back
    // as it was.
    for (k, (i, old)) in removed.iter().enumerate() {
        if let Err(source) = std::fs::remove_file(&targets[*i].dest) {
            put_back(
                &mut changed
                    .iter()
                    .map(|(j, o)| (j, o.as_ref()))
                    .chain(removed[..k].iter().map(|(j, o)| (j, Some(o)))),
            );
            let e = ApplyError::Commit {
                dest: targets[*i].dest.clone(),
                source,
            };
            return Err(Box::new((*i, PassError::from(e))));
        }
        changed.push((*i, Some(old.clone())));
    }
    Ok((changed, retired))
}

/// Puts a target's known-good bytes back after its consumer refused the new ones.
pub(super) fn restore(t: &Target, old: &[u8]) {
    let known_good = Rendered {
        name: t.name.clone(),
        bytes: old.to_vec(),
    };
    match apply::stage(t, &known_good)
        .and_then(apply::commit)
        .map(drop)
    {
        Ok(()) => {
            tracing::warn!(target = %t.name, dest = %t.dest.display(), "restored the last good file")
        }
        Err(e) => {
            tracing::error!(target = %t.name, dest = %t.dest.display(), error = %e, "cannot restore the last good file")
        }
    }
}

/// Renders, stages into `dir` and checks one target for `check`. Errors name the target's real
/// destination, not the scratch copy.
pub(super) async fn check_one(
    t: &Target,
    r: Result<Rendered, RenderError>,
    dir: &Path,
) -> Result<(), PassError> {
    let r = r?;
    let mut copy = t.clone();
    // The staged file is named as beside the real destination, so a check's own output
    // (`parsing [.haproxy.cfg.haconfd-…:12]`) reads as it does in `once` and `run`.
    let file_name = t.dest.file_name().unwrap_or(t.name.as_ref());
    copy.dest = dir.join(file_name);
    copy.owner = None;
    copy.group = None;
    std::fs::create_dir_all(dir).map_err(|source| ApplyError::Stage {
        path: dir.to_owned(),
        source,
    })?;
    let staged = apply::stage(&copy, &r)?;
    apply::check(&copy, &staged).await.map_err(|e| match e {
        ApplyError::Check { target, source, .. } => ApplyError::Check {
            target,
            dest: t.dest.clone(),
            source,
        },
        other => other,
    })?;
    Ok(())
}

/// The first failure in config order; the others are logged, each naming its target.
pub(super) fn first_failure(
    targets: &[Target],
    mut failures: Vec<(usize, PassError)>,
) -> Option<PassError> {
    failures.sort_by_key(|(i, _)| *i);
    let mut failures = failures.into_iter();
    let (_, first) = failures.next()?;
    for (i, e) in failures {
        tracing::error!(target = %targets[i].name, reason = e.reason(), "this target failed too; its last good file stays: {e:#}");
    }
    Some(first)
}

/// Runs file-system work (reads, fsync, rename, directory syncs) on the blocking pool, off the
/// runtime's one thread: a slow disk must not stall the etcd keepalive, the fast path or
/// `/healthz`.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
