//! `/metrics` rendered once per published status, not once per scrape:
//! the bulk of the page (every family of the status alone) is rendered the
//! first time a scrape sees a new status and then shared, as one `Arc<str>`,
//! by every scrape until the next; only the few families that depend on the
//! time of the scrape are rendered each time ([`render::clock`]).

use std::sync::{Arc, Mutex};

use super::render;
use crate::daemon::Status;

/// One status and its rendered families.
pub struct Page {
    status: Arc<Status>,
    fixed: Arc<str>,
}

impl Page {
    fn new(status: Arc<Status>) -> Self {
        let fixed = render::fixed(&status).into();
        Self { status, fixed }
    }

    /// The families of the status alone, shared.
    pub fn fixed(&self) -> Arc<str> {
        self.fixed.clone()
    }

    /// The families that depend on the time of the scrape, at `now`.
    pub fn clock(&self, now: u64) -> String {
        render::clock(&self.status, now)
    }
}

/// The page of the last status a scrape saw.
#[derive(Default)]
pub struct PageCache(Mutex<Option<Arc<Page>>>);

impl PageCache {
    /// The page of `status`: the cached one if it is of this very status
    /// (the driver publishes each status as a new `Arc`), else rendered now.
    pub fn page(&self, status: Arc<Status>) -> Arc<Page> {
        if let Some(page) = self.lock().as_ref()
            && Arc::ptr_eq(&page.status, &status)
        {
            return page.clone();
        }
        // Rendered outside the lock: a scrape that finds the page cached
        // never waits for a render. Two scrapes of a new status may both
        // render it; the page is the same.
        let page = Arc::new(Page::new(status));
        *self.lock() = Some(page.clone());
        page
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Page>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::fixture::{NOW, healthy};

    #[test]
    fn a_status_is_rendered_once_and_its_page_shared() {
        let cache = PageCache::default();
        let first = Arc::new(healthy(2));
        let a = cache.page(first.clone());
        let b = cache.page(first.clone());
        assert!(Arc::ptr_eq(&a, &b), "the same status: the same page");
        assert!(Arc::ptr_eq(&a.fixed(), &b.fixed()), "one shared body");
        // The next status (equal in value, but published anew) is rendered.
        let next = Arc::new(healthy(2));
        let c = cache.page(next);
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(&c, &cache.page(c.status.clone())));
    }

    #[test]
    fn the_page_is_the_rendered_status_with_ages_at_the_scrape() {
        let cache = PageCache::default();
        let status = Arc::new(healthy(2));
        let page = cache.page(status.clone());
        for now in [NOW, NOW + 30] {
            assert_eq!(
                format!("{}{}", page.fixed(), page.clock(now)),
                render::render(&status, now)
            );
        }
        assert_ne!(page.clock(NOW), page.clock(NOW + 30));
    }
}
