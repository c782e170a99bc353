//! A bounded in-process cache of verified access-token claims, so a token seen before costs
//! a hash and a map lookup instead of a signature verification.
//!
//! - Keyed by the SHA-256 of the WHOLE token (header, claims and signature): a forged token
//!   differs from a genuine one somewhere, so it has another key and can never hit the
//!   genuine entry (short of a SHA-256 collision); the token itself is not kept.
//! - An entry answers only while `now < exp` (stricter than verification's leeway), so it
//!   never outlives its token; expired entries are dropped when met and when a full shard
//!   needs room.
//! - Bounded: `capacity` entries over [`SHARDS`] shards (each its own lock, so concurrent
//!   validations rarely wait on each other); a full shard replaces a random entry (O(1):
//!   expired entries go when met, or when their slot is picked). About 200 bytes an entry,
//!   so the default 16 384 is ~3 MiB.
//! - Once a shard is full, a token gets in on its SECOND verification only (a doorkeeper
//!   remembers a fingerprint of tokens seen once, in a lossy table of 8-byte slots, 2 ×
//!   capacity rounded up to a power of two: 256 KiB at the default): a flood of tokens used once (fresh tokens after refreshes, a scan)
//!   then neither evicts the tokens in use nor pays for an insertion and an eviction each.
//!   The price: a token that arrives while the cache is full is verified twice before it
//!   is answered from the cache.
//! - Revocation is NOT cached here: the caller checks it on every call.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aws_lc_rs::digest::{SHA256, digest};

use super::AccessClaims;

const SHARDS: usize = 16;

type Key = [u8; 32];
type Shard = Mutex<Slots>;

/// One shard: entries in slots (so a random one can be replaced in O(1)) and an index.
#[derive(Default)]
struct Slots {
    index: HashMap<Key, usize, BuildHasherDefault<KeyHasher>>,
    slots: Vec<(Key, Arc<AccessClaims>)>,
}

impl Slots {
    fn get(&self, key: &Key) -> Option<&Arc<AccessClaims>> {
        self.index.get(key).map(|&i| &self.slots[i].1)
    }

    fn remove(&mut self, key: &Key) {
        let Some(i) = self.index.remove(key) else { return };
        self.slots.swap_remove(i);
        if let Some((moved, _)) = self.slots.get(i) {
            self.index.insert(*moved, i);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
    }
}

pub(super) struct VerifiedCache {
    shards: Vec<Shard>,
    per_shard: usize,
    /// Fingerprints of tokens verified once while their shard was full (see the module
    /// docs); a power of two long.
    seen_once: Box<[AtomicU64]>,
}

impl VerifiedCache {
    /// A cache of about `capacity` entries; 0 disables it.
    pub(super) fn new(capacity: usize) -> VerifiedCache {
        let per_shard = capacity.div_ceil(SHARDS);
        let shards = (0..if capacity == 0 { 0 } else { SHARDS }).map(|_| Mutex::default()).collect();
        let slots = if capacity == 0 { 0 } else { (capacity * 2).next_power_of_two() };
        let seen_once = (0..slots).map(|_| AtomicU64::new(0)).collect();
        VerifiedCache { shards, per_shard, seen_once }
    }

    pub(super) fn key(token: &str) -> Key {
        digest(&SHA256, token.as_bytes()).as_ref().try_into().expect("SHA-256 is 32 bytes")
    }

    /// The claims of a token verified before, if it has not expired since.
    pub(super) fn get(&self, key: &Key, now_unix: i64) -> Option<Arc<AccessClaims>> {
        let mut shard = self.shard(key)?.lock().unwrap_or_else(|p| p.into_inner());
        match shard.get(key) {
            Some(claims) if now_unix < claims.exp => Some(claims.clone()),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    pub(super) fn insert(&self, key: Key, claims: Arc<AccessClaims>, now_unix: i64) {
        if now_unix >= claims.exp {
            return;
        }
        let Some(shard) = self.shard(&key) else { return };
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        let shard = &mut *shard;
        if let Some(&i) = shard.index.get(&key) {
            shard.slots[i].1 = claims;
        } else if shard.slots.len() < self.per_shard {
            shard.index.insert(key, shard.slots.len());
            shard.slots.push((key, claims));
        } else if self.first_sight(&key) {
            // Full, and a token not seen before: remembered, not admitted (module docs).
        } else {
            // Full: replace a slot chosen at random (the new key's own bytes are uniform),
            // O(1) and unbiased — no scan, and no part of the working set evicted first.
            let victim = (u64::from_le_bytes(key[8..16].try_into().expect("8 bytes")) % self.per_shard as u64)
                as usize;
            let (old, _) = std::mem::replace(&mut shard.slots[victim], (key, claims));
            shard.index.remove(&old);
            shard.index.insert(key, victim);
        }
    }

    /// Notes `key` as seen; whether it was NOT seen (recently) before. Lossy: another key
    /// landing on the same slot makes a token wait for one more sighting, nothing worse.
    fn first_sight(&self, key: &Key) -> bool {
        // Bytes the shard (31), the index (0..8) and the victim (8..16) do not use.
        let fingerprint = u64::from_le_bytes(key[16..24].try_into().expect("8 bytes")) | 1;
        let slot =
            u32::from_le_bytes(key[24..28].try_into().expect("4 bytes")) as usize % self.seen_once.len();
        self.seen_once[slot].swap(fingerprint, Ordering::Relaxed) != fingerprint
    }

    /// Forgets everything (the key set lost a key: its tokens must verify again, and fail).
    pub(super) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        for slot in &*self.seen_once {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Entries held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    fn shard(&self, key: &Key) -> Option<&Shard> {
        if self.shards.is_empty() {
            return None;
        }
        // The key is a SHA-256: any of its bytes are uniform.
        Some(&self.shards[usize::from(key[31]) % SHARDS])
    }
}

/// The keys are SHA-256 digests, uniform already: their first eight bytes are the hash.
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its 32 bytes (arrays write their elements as one slice).
        if let Some(first) = bytes.get(..8) {
            self.0 = u64::from_le_bytes(first.try_into().expect("8 bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64, sub: &str) -> Arc<AccessClaims> {
        Arc::new(AccessClaims {
            iss: "i".into(),
            aud: "a".into(),
            sub: sub.into(),
            sid: "s".into(),
            iat: 0,
            nbf: 0,
            exp,
            jti: "j".into(),
            roles: vec![],
            amr: vec![],
            email_verified: false,
        })
    }

    #[test]
    fn hits_only_the_same_token_until_it_expires() {
        let cache = VerifiedCache::new(64);
        let genuine = "header.claims.signature";
        cache.insert(VerifiedCache::key(genuine), claims(100, "alice"), 10);
        assert_eq!(cache.get(&VerifiedCache::key(genuine), 99).unwrap().sub, "alice");
        // Same header and claims, another signature: another key.
        assert!(cache.get(&VerifiedCache::key("header.claims.signaturf"), 50).is_none());
        assert!(cache.get(&VerifiedCache::key(genuine), 100).is_none(), "not at exp");
        assert_eq!(cache.len(), 0, "the expired entry was dropped");
        cache.insert(VerifiedCache::key("expired"), claims(5, "late"), 10);
        assert_eq!(cache.len(), 0, "never stores an expired token");
    }

    #[test]
    fn stays_bounded() {
        let cache = VerifiedCache::new(160);
        for i in 0..10_000 {
            // Each token twice, as a token in use is: the second sighting gets it in.
            for _ in 0..2 {
                cache.insert(VerifiedCache::key(&format!("token-{i}")), claims(1_000, "u"), 0);
            }
        }
        assert!(cache.len() <= 160, "{}", cache.len());
        assert!(cache.len() >= 150, "a full shard evicts one, not all: {}", cache.len());
        assert!(cache.get(&VerifiedCache::key("token-9999"), 1).is_some(), "the latest token in use is in");
        let disabled = VerifiedCache::new(0);
        disabled.insert(VerifiedCache::key("t"), claims(1_000, "u"), 0);
        assert_eq!(disabled.len(), 0);
    }

    #[test]
    fn tokens_used_once_do_not_push_out_the_ones_in_use() {
        let cache = VerifiedCache::new(160);
        let in_use: Vec<Key> = (0..1_000).map(|i| VerifiedCache::key(&format!("in-use-{i}"))).collect();
        for key in &in_use {
            cache.insert(*key, claims(1_000, "u"), 0);
            cache.insert(*key, claims(1_000, "u"), 0);
        }
        let resident: Vec<&Key> = in_use.iter().filter(|k| cache.get(k, 1).is_some()).collect();
        assert!(resident.len() >= 150, "{}", resident.len());
        // A flood of tokens each verified once (fresh tokens after refreshes, a scan).
        for i in 0..100_000 {
            cache.insert(VerifiedCache::key(&format!("once-{i}")), claims(1_000, "u"), 0);
        }
        let still = resident.iter().filter(|k| cache.get(k, 1).is_some()).count();
        assert_eq!(still, resident.len(), "one-time tokens evicted tokens in use");
        // Seen a second time, a newcomer gets in (in place of a random entry).
        let newcomer = VerifiedCache::key("once-99999");
        assert!(cache.get(&newcomer, 1).is_none());
        cache.insert(newcomer, claims(1_000, "u"), 0);
        assert!(cache.get(&newcomer, 1).is_some());
        // Clearing forgets the sightings too: a token seen once before must be seen twice
        // again to get in.
        let late = VerifiedCache::key("late");
        cache.insert(late, claims(1_000, "u"), 0);
        cache.clear();
        for i in 0..400 {
            for _ in 0..2 {
                cache.insert(VerifiedCache::key(&format!("refill-{i}")), claims(1_000, "u"), 0);
            }
        }
        assert!(cache.len() >= 150, "{}", cache.len());
        cache.insert(late, claims(1_000, "u"), 0);
        assert!(cache.get(&late, 1).is_none(), "admitted on its first sighting after clear()");
    }
}
