//! The third stage of a pass: bytes for each planned target, from the clusters its plan gives it,
//! through the compiled templates ([`crate::render`]). A target's last render is reused when
//! nothing its template can see has changed since: rendering thousands of members costs tens of
//! milliseconds, comparing them a fraction of one, and most etcd events are heartbeats.

use std::collections::HashMap;
use std::sync::Arc;

use super::plan::{Plan, Planned, ViewOf};
use super::report::PassStats;
use super::Setup;
use crate::model::Cluster;
use crate::render::{RenderError, Rendered, Renderer, ScopeView, View};
use crate::target::{ClusterSettings, Target};

/// A planned target's render, once its consumer's turn came (None before).
pub(super) type Rendering = Option<Result<Arc<Rendered>, RenderError>>;

/// Settings of a cluster that has no `[clusters.<scope>]` table, with `etcd.scope`.
static NO_CLUSTER_SETTINGS: std::sync::LazyLock<ClusterSettings> =
    std::sync::LazyLock::new(ClusterSettings::default);

/// A target's last render, kept to skip the next one when nothing its template sees changed.
#[derive(Debug, Clone)]
struct CachedRender {
    /// Every model the render saw, in the order of its view.
    view: Vec<Arc<Cluster>>,
    rendered: Arc<Rendered>,
}

/// The compiled templates and each target's last render.
pub(super) struct Renders {
    renderer: Renderer,
    cache: HashMap<String, CachedRender>,
    /// Whether unchanged views reuse the last render (see [`super::Engine::set_reuse_renders`]).
    reuse: bool,
}

impl Renders {
    pub(super) fn new(targets: &[Target]) -> Result<Renders, RenderError> {
        Ok(Renders {
            renderer: Renderer::load(targets)?,
            cache: HashMap::new(),
            reuse: true,
        })
    }

    /// New templates (hot reload): compiled, and every cached render dropped.
    pub(super) fn replace(&mut self, targets: &[Target]) -> Result<(), RenderError> {
        self.renderer = Renderer::load(targets)?;
        self.cache.clear();
        Ok(())
    }

    pub(super) fn reuse(&self) -> bool {
        self.reuse
    }

    pub(super) fn set_reuse(&mut self, on: bool) {
        self.reuse = on;
        self.cache.clear();
    }

    /// Renders one planned target from its view.
    pub(super) fn render_planned(
        &self,
        setup: &Setup,
        p: &Planned,
        view: &ViewOf,
    ) -> Result<Rendered, RenderError> {
        with_view(setup, p, view, |v| self.renderer.render_view(&p.target, v))
    }

    /// Renders the planned targets `which` (a consumer's), or reuses a target's last render
    /// when nothing its template can see has changed since (see
    /// [`Cluster::same_for_templates`] and [`Renderer::reads_wal`]). Sound because a render
    /// depends on the context alone (no clock or random functions are registered), and the
    /// context on the clusters and the settings, whose change ([`Renders::replace`]) empties
    /// the cache.
    pub(super) fn render_targets(
        &mut self,
        setup: &Setup,
        plan: &Plan,
        which: &[usize],
        out: &mut [Rendering],
        stats: &mut PassStats,
    ) {
        for &i in which {
            if out[i].is_some() {
                continue;
            }
            let (p, view) = &plan.items[i];
            let t = &p.target;
            if p.remove {
                out[i] = Some(Ok(Arc::new(Rendered {
                    name: t.name.clone(),
                    bytes: Vec::new(),
                })));
                continue;
            }
            let models: Vec<Arc<Cluster>> = view
                .clusters
                .iter()
                .flat_map(|(_, g)| g.iter().cloned())
                .collect();
            if let Some(r) = self.cached(t, &models) {
                out[i] = Some(Ok(r));
                continue;
            }
            stats.rendered.push(t.name.clone());
            let result = self.render_planned(setup, p, view).map(Arc::new);
            match &result {
                Ok(r) => {
                    let cached = CachedRender {
                        view: models,
                        rendered: Arc::clone(r),
                    };
                    self.cache.insert(t.name.clone(), cached);
                }
                Err(_) => {
                    self.cache.remove(&t.name);
                }
            }
            out[i] = Some(result);
        }
    }

    /// `t`'s last render, when it saw the same clusters as `models` do (as far as its template
    /// reads them).
    fn cached(&self, t: &Target, models: &[Arc<Cluster>]) -> Option<Arc<Rendered>> {
        let c = self.cache.get(&t.name).filter(|_| self.reuse)?;
        let reads_wal = self.renderer.reads_wal(t);
        let same = c.view.len() == models.len()
            && c.view
                .iter()
                .zip(models)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.same_for_templates(b, reads_wal));
        same.then(|| Arc::clone(&c.rendered))
    }
}

/// Calls `f` with the render view of one planned target: every cluster of its view, and the
/// cluster of its flat context (its own, for a per-cluster file; the one of `etcd.scope`).
pub(super) fn with_view<R>(
    setup: &Setup,
    p: &Planned,
    view: &ViewOf,
    f: impl FnOnce(&View<'_>) -> R,
) -> R {
    let settings = &setup.settings;
    let scopes: Vec<ScopeView<'_>> = view
        .clusters
        .iter()
        .map(|(scope, groups)| ScopeView {
            scope,
            groups,
            settings: settings.clusters.get(scope.as_str()),
        })
        .collect();
    let flat = match (&p.scope, setup.mode.one()) {
        (Some(s), _) => scopes.iter().find(|v| v.scope == s.as_str()).copied(),
        (None, Some(s)) => scopes
            .iter()
            .find(|v| v.scope == s)
            .copied()
            .or(Some(ScopeView {
                scope: s,
                groups: &[],
                settings: None,
            })),
        (None, None) => None,
    };
    let flat = flat.map(|mut f| {
        if setup.mode.one().is_some() {
            // One cluster: the flat context is as it always was, configured or not.
            f.settings = f.settings.or(Some(&NO_CLUSTER_SETTINGS));
        }
        f
    });
    f(&View {
        namespace: &settings.etcd.namespace,
        clusters: &scopes,
        flat,
    })
}
