//! Who is connected as whom, for the duplicate-connection rule: the newer connection wins.
//!
//! Owns two sharded maps touched for a few lines at IDENTIFY and at disconnect: one live
//! connection per (developer, user), and at most `max_consumers` per developer (the oldest
//! beyond it is kicked). Never held across an await.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Arc;

use super::types::{Kick, KickReason};

/// (developer, user) → (connection id, its off switch).
type UserMap = DashMap<(Arc<str>, Arc<str>), (u64, Arc<Kick>)>;

pub struct Sessions {
    users: UserMap,
    developers: DashMap<Arc<str>, VecDeque<(u64, Arc<Kick>)>>,
    max_consumers: usize,
}

impl Sessions {
    pub fn new(max_consumers: usize) -> Self {
        Self {
            users: DashMap::new(),
            developers: DashMap::new(),
            max_consumers: max_consumers.max(1),
        }
    }

    /// Registers a producer connection; an older one for the same user is kicked (4002).
    pub fn claim_user(&self, developer: &Arc<str>, user: &Arc<str>, conn: u64, kick: &Arc<Kick>) {
        let old = self
            .users
            .insert((developer.clone(), user.clone()), (conn, kick.clone()));
        if let Some((_, old)) = old {
            old.kick(KickReason::Duplicate);
        }
    }

    pub fn release_user(&self, developer: &Arc<str>, user: &Arc<str>, conn: u64) {
        self.users
            .remove_if(&(developer.clone(), user.clone()), |_, (c, _)| *c == conn);
    }

    /// Registers a consumer connection; the oldest beyond the limit is kicked (4002).
    pub fn claim_developer(&self, developer: &Arc<str>, conn: u64, kick: &Arc<Kick>) {
        let mut evicted = Vec::new();
        {
            let mut list = self.developers.entry(developer.clone()).or_default();
            list.push_back((conn, kick.clone()));
            while list.len() > self.max_consumers {
                if let Some((_, old)) = list.pop_front() {
                    evicted.push(old);
                }
            }
        }
        for old in evicted {
            old.kick(KickReason::Duplicate);
        }
    }

    pub fn release_developer(&self, developer: &Arc<str>, conn: u64) {
        if let Some(mut list) = self.developers.get_mut(developer) {
            list.retain(|(c, _)| *c != conn);
        }
        self.developers
            .remove_if(developer, |_, list| list.is_empty());
    }

    /// Live consumer connections of a developer.
    pub fn consumers(&self, developer: &str) -> usize {
        self.developers.get(developer).map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick() -> Arc<Kick> {
        Kick::new()
    }

    #[test]
    fn newer_user_connection_wins() {
        let s = Sessions::new(1);
        let (dev, user): (Arc<str>, Arc<str>) = ("d".into(), "u".into());
        let (a, b) = (kick(), kick());
        s.claim_user(&dev, &user, 1, &a);
        s.claim_user(&dev, &user, 2, &b);
        assert_eq!(a.reason(), Some(KickReason::Duplicate));
        assert!(!b.is_kicked());
        // The loser's late release must not remove the winner.
        s.release_user(&dev, &user, 1);
        let c = kick();
        s.claim_user(&dev, &user, 3, &c);
        assert!(b.is_kicked());
    }

    #[test]
    fn oldest_consumer_beyond_the_limit_is_kicked() {
        let s = Sessions::new(2);
        let dev: Arc<str> = "d".into();
        let ks: Vec<_> = (0..3).map(|_| kick()).collect();
        for (i, k) in ks.iter().enumerate() {
            s.claim_developer(&dev, i as u64, k);
        }
        assert!(ks[0].is_kicked());
        assert!(!ks[1].is_kicked() && !ks[2].is_kicked());
        assert_eq!(s.consumers("d"), 2);
        s.release_developer(&dev, 1);
        s.release_developer(&dev, 2);
        assert_eq!(s.consumers("d"), 0);
    }
}
