//! Tag listings shared by the rebuilds that need one at the same moment,
//! only between callers with the same credentials, never kept once answered.
//! Why a shared listing still serves every snapshot: `docs/design.md`,
//! "Convergence".

use std::sync::Arc;
use std::time::Instant;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::upstream::{Auth, Upstream, UpstreamError};

type Listed = Result<Arc<Vec<String>>, UpstreamError>;

/// One listing request, from the moment it was made.
struct Flight {
    /// Set before the request is sent.
    began: Instant,
    result: Shared<BoxFuture<'static, Listed>>,
}

/// The listings in flight, by repository and identity.
#[derive(Default)]
pub(super) struct Listings {
    flights: DashMap<(String, [u8; 32]), Arc<Flight>>,
}

impl Listings {
    /// The tags of `repo`, from a listing the registry began at or after
    /// `since`, made with `auth`'s credentials.
    pub(super) async fn tags(
        &self,
        upstream: &Upstream,
        repo: &str,
        auth: &Auth,
        since: Instant,
    ) -> Listed {
        let key = (repo.to_owned(), auth.fingerprint());
        loop {
            // Decide under the map's entry lock, await outside it.
            let (flight, fresh) = match self.flights.entry(key.clone()) {
                Entry::Occupied(e) => {
                    let f = e.get().clone();
                    let fresh = f.began >= since;
                    (f, fresh)
                }
                Entry::Vacant(v) => {
                    let f = Arc::new(Flight::start(upstream, repo, auth));
                    v.insert(f.clone());
                    (f, true)
                }
            };
            // The entry goes once answered, even if this caller is
            // cancelled while waiting (a client that went away).
            let done = Done {
                flights: &self.flights,
                key: &key,
                flight: &flight,
            };
            let result = flight.result.clone().await;
            drop(done);
            if fresh {
                return result;
            }
            // That listing began too early for this caller: the next one.
        }
    }
}

/// Removes a flight from the map when dropped, if it is still the one
/// there.
struct Done<'a> {
    flights: &'a DashMap<(String, [u8; 32]), Arc<Flight>>,
    key: &'a (String, [u8; 32]),
    flight: &'a Arc<Flight>,
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.flights
            .remove_if(self.key, |_, current| Arc::ptr_eq(current, self.flight));
    }
}

impl Flight {
    fn start(upstream: &Upstream, repo: &str, auth: &Auth) -> Flight {
        let (upstream, repo, auth) = (upstream.clone(), repo.to_owned(), auth.clone());
        let began = Instant::now();
        let result = async move { upstream.list_tags(&repo, &auth).await.map(Arc::new) }
            .boxed()
            .shared();
        Flight { began, result }
    }
}
